"""Watching a run from outside the math: preemption, the metrics log and the progress bar.

Preemption: `PreemptionWatcher` turns SIGTERM / SIGUSR1 (any scheduler, torchrun forwards them)
and "N minutes before the job's time limit" (SLURM or flux) into one flag the loop checks once
per optimizer step; the loop then saves a full checkpoint and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from retrofit.atomic import write_file_atomic
from retrofit.errors import ConfigError
from retrofit.train.run_folder import METRICS_FILE


# --------------------------------------------------------------------------------------------
# Job time limit
# --------------------------------------------------------------------------------------------
def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def job_seconds_left(environ=None, now: float | None = None) -> float | None:
    """Seconds until the scheduler kills this job, or None when unknown (no scheduler, no limit).

    SLURM: SLURM_JOB_END_TIME (unix time) if set, else `squeue -h -j $SLURM_JOB_ID -o %e`.
    flux: `flux job timeleft` (seconds).
    """
    environ = os.environ if environ is None else environ
    now = time.time() if now is None else now
    if environ.get("SLURM_JOB_ID"):
        end = environ.get("SLURM_JOB_END_TIME")
        if end and end.strip().lstrip("-").isdigit():
            return float(end) - now
        out = _run(["squeue", "-h", "-j", environ["SLURM_JOB_ID"], "-o", "%e"])
        if out:
            try:  # squeue prints local time like 2026-11-30T12:00:00 (or N/A / Unknown)
                return datetime.datetime.fromisoformat(out.splitlines()[0]).timestamp() - now
            except ValueError:
                return None
        return None
    if environ.get("FLUX_JOB_ID") or environ.get("FLUX_URI"):
        out = _run(["flux", "job", "timeleft"])
        if out:
            try:
                value = float(out.split()[0])
                return None if math.isinf(value) else value
            except ValueError:
                return None
    return None


class PreemptionWatcher:
    """Set by a stop signal, or when fewer than `save_n_mins_before_timeout` minutes remain."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, save_n_mins_before_timeout: float | None = None, recheck_seconds: float = 600.0):
        self.received: str | None = None
        self.margin = None if save_n_mins_before_timeout is None else 60.0 * save_n_mins_before_timeout
        self.recheck_seconds = recheck_seconds
        self._deadline = None  # time.monotonic() at which we must have saved
        self._last_check = -math.inf
        self._previous_handlers = {}
        for name in self.SIGNALS:
            if hasattr(signal, name):
                signum = getattr(signal, name)
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def close(self):
        """Put back the handlers that were installed before (for in-process callers)."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _on_signal(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"received {self.received}: will save a full checkpoint and exit after this step", flush=True)

    def _refresh_deadline(self):
        now = time.monotonic()
        if now - self._last_check < self.recheck_seconds:
            return
        self._last_check = now
        left = job_seconds_left()
        self._deadline = None if left is None else now + left - self.margin

    def reason(self) -> str | None:
        """Why the run should stop now (None: keep going)."""
        if self.received:
            return f"signal {self.received}"
        if self.margin is not None:
            self._refresh_deadline()
            if self._deadline is not None and time.monotonic() >= self._deadline:
                return f"less than {self.margin / 60:g} minutes left before the job's time limit"
        return None


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
class MetricsLogger:
    """One JSON object per optimizer step in `metrics.jsonl` (main rank), and wandb if enabled.

    wandb is imported only when enabled and is never required: without it we warn once and go on.
    WANDB_MODE=offline works as usual.
    """

    def __init__(self, path: str | Path, enabled: bool = True, wandb_kwargs: dict | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_kwargs is not None:
            try:
                import wandb
            except ImportError:
                print("wandb is not installed: logging to metrics.jsonl only (pass --wandb_disabled=true to silence)")
            else:
                try:
                    wandb.init(**wandb_kwargs)
                    self.wandb = wandb
                except Exception as exc:  # a wandb login/network problem must not stop training
                    print(f"wandb.init failed ({exc}); logging to metrics.jsonl only", file=sys.stderr)

    def truncate_after(self, step: int) -> int:
        """Keep only the records up to `step` (0: none) and return how many were dropped: records
        of a run that died after its last checkpoint (or before its first), and a last line cut
        short by a kill mid-write."""
        if not self.enabled or not self.path.exists():
            return 0
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept, dropped = [], 0
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # the write a kill interrupted
                    dropped += 1
                    continue
                raise ValueError(f"{self.path} line {number} is not JSON; repair or delete that line") from None
            if record["step"] <= step:
                kept.append(line)
            else:
                dropped += 1
        write_file_atomic(self.path, "".join(line + "\n" for line in kept))
        return dropped

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in record.items() if v is not None}, step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def format_step_line(record: dict, max_steps: int) -> str:
    parts = [
        f"step {record['step']}/{max_steps}",
        f"loss {record['loss']:.4f}",
        f"log-ppl {record['log_ppl']:.3f}",
        f"grad-norm {record['grad_norm']:.3f}",
        f"lr {record['lr']:.3e}",
    ]
    if record.get("mean_recurrence") is not None:
        parts += [
            f"mean-rec {record['mean_recurrence']}",
            f"backprop {record['mean_backprop_depth']}",
            f"(n,k)=({record['num_steps_no_grad']},{record['num_steps_with_grad']})",
        ]
    parts.append(f"tok/s {record['tokens_per_second']:,.0f}")
    if record.get("mfu") is not None:
        parts.append(f"mfu {record['mfu']:.1%}")
    return " | ".join(parts)


class TrainingProgress:
    """A bar over the optimizer steps (loss and tokens/s beside it) on the main rank when stderr is
    a terminal (retrofit/progress.py); otherwise, and on other ranks, nothing. While the bar is drawn
    the per-step lines go through it, so the two never tear each other apart."""

    def __init__(self, max_steps: int, start_step: int, enabled: bool = True):
        from retrofit.progress import progress_bar

        self.bar = progress_bar(total=max_steps, initial=start_step, unit="step", desc="train", enabled=enabled,
                                dynamic_ncols=True)

    def show(self, record: dict, line: str, log=print) -> None:
        """Advance to the record's step and print its line (`log` when no bar is drawn)."""
        if self.bar.disable:
            log(line)
            return
        self.bar.write(line, file=sys.stdout)
        sys.stdout.flush()  # as the plain print does: `| tee log` must not lag behind the bar
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:,.0f}", refresh=False)
        self.bar.update(record["step"] - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def open_monitors(
    cfg, is_main: bool, step: int, max_steps: int, log=print
) -> tuple[PreemptionWatcher, MetricsLogger, TrainingProgress]:
    """The run's stop watcher, metrics log and progress bar from `step` to `max_steps` (`cfg`: a
    TrainConfig), closed together when the run ends. A fresh start (`step` 0) empties metrics.jsonl
    (records of a run killed before its first checkpoint); a resume drops the records past the
    resumed step."""
    watcher = PreemptionWatcher(cfg.save_n_mins_before_timeout)
    metrics = MetricsLogger(
        cfg.run_dir / METRICS_FILE,
        enabled=is_main,
        wandb_kwargs=None
        if cfg.wandb_disabled
        else dict(project=Path(cfg.out_path).name, name=cfg.run_name, dir=cfg.out_path, config=dataclasses.asdict(cfg)),
    )
    try:
        dropped = metrics.truncate_after(step)
    except ValueError as exc:  # a damaged line in the middle of metrics.jsonl
        raise ConfigError(str(exc)) from None
    if dropped:
        log(f"metrics.jsonl: dropped {dropped} record(s) after step {step}")
    # Last: a damaged metrics.jsonl above stops the run before any bar is drawn.
    return watcher, metrics, TrainingProgress(max_steps, step, enabled=is_main)
