"""The run folder as train.py keeps it: its names, the save cadence, saving, verified resume and the
counters that a checkpoint carries.

The file format (atomic folders, checksums, RNG states) is retrofit/train/checkpoint.py; where the
model and optimizer tensors go is the backend's business (`LocalCheckpoints`: training_state.pt
written by the main rank; `fsdp.ShardedCheckpoints`: DCP shards written by every rank), chosen by
`parallelize`. Nothing here asks which backend it has.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from retrofit.data.rows import DataError
from retrofit.errors import first_line
from retrofit.train import checkpoint as ckpt
from retrofit.train import distributed as dist_utils
from retrofit.train.config import ConfigError, TrainConfig
from retrofit.train.run_record import write_run_record


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or weights); train.py exits 1 with one `error:` line."""


@dataclass
class TrainingCounters:
    """Where the run stands; all of it is saved in, and restored from, a full checkpoint."""

    optimizer_step: int = 0
    data_step: int = 0
    lr_step_offset: int = 0  # --ignore_past_scheduler restarts the LR schedule at the resumed step
    total_tokens: int = 0
    total_tokens_with_loss: int = 0
    elapsed_time: float = 0.0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in self.state_dict().items():
            setattr(self, name, state.get(name, value))  # lr_step_offset: absent in older checkpoints


def _is_within(path: str | Path, folder: Path) -> bool:
    path, folder = Path(path).resolve(), folder.resolve()
    return path == folder or folder in path.parents


def previous_run_outputs(run_dir: Path) -> list[Path]:
    """What an earlier run left in `run_dir` (checkpoints, model-only saves, metrics)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if ckpt.RUN_OUTPUT_RE.match(p.name))


def prepare_run_dir(cfg: TrainConfig) -> str | None:
    """Main rank: refuse to train over a previous run unless asked, clear it for --overwrite=true,
    and check that the folder is writable. Returns a message for the log, or raises ConfigError."""
    run_dir = cfg.run_dir
    outputs = previous_run_outputs(run_dir)
    message = None
    if outputs and cfg.resume_path is None:
        names = ", ".join(p.name for p in outputs[:4]) + (", ..." if len(outputs) > 4 else "")
        if not cfg.overwrite:
            raise ConfigError(
                f"{run_dir} already holds a run ({names}); continue it with --resume_path=auto, or pass"
                " --overwrite=true to delete it and start again (or choose another --run_name)"
            )
        for value, flag in ((cfg.model_name, "--model_name"), (cfg.preprocessed_data_path, "--preprocessed_data_path")):
            if value is not None and any(_is_within(value, p) for p in outputs):
                raise ConfigError(f"--overwrite=true would delete {flag}={value}; copy it out of {run_dir} first")
        for path in outputs:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        message = f"--overwrite=true: deleted the previous run in {run_dir} ({names})"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to --out_path={cfg.out_path} ({exc.strerror or exc}): choose a writable folder"
        ) from None
    ckpt.remove_stale_temporaries(run_dir)
    return message


def claim_run_dir(cfg: TrainConfig, env) -> str | None:
    """Every rank: the main rank inspects (and for --overwrite clears) the run folder, every rank
    gets its verdict, so all of them stop with the same error. A --resume_path that is no
    checkpoint fails here, before any work. Returns a message for the log."""
    verdict = None
    if env.is_main:
        try:
            verdict = ("ok", prepare_run_dir(cfg))
        except ConfigError as exc:
            verdict = ("error", str(exc))
    kind, text = dist_utils.broadcast_object(verdict)
    if kind == "error":
        raise ConfigError(text)
    if cfg.resume_path not in (None, "auto"):
        ckpt.check_training_state_dir(cfg.resume_path)
    return text


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the curriculum's settings one by one, for 'changed settings' messages."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class CheckpointManager:
    """Saves and resumes one run: `run_state` holds what a checkpoint carries besides the model and
    optimizer (the data stream, the counters, the schedule, the run record)."""

    def __init__(self, cfg: TrainConfig, env, parallel, optimizer, stream, tokenizer, run_state, log=print):
        self.cfg, self.env, self.log = cfg, env, log
        self.model, self.backend = parallel.module, parallel.checkpoints
        self.optimizer, self.stream, self.tokenizer = optimizer, stream, tokenizer
        self.run = run_state  # .counters, .max_steps, .schedule, .run_record

    # ---- cadence ------------------------------------------------------------------------------
    def full_checkpoint_due(self, step: int) -> bool:
        """A resumable checkpoint every 2 x save_interval steps (the original's cadence)."""
        return self.cfg.save_interval > 0 and step % (2 * self.cfg.save_interval) == 0

    def save_on_cadence(self, step: int) -> None:
        """Weights every save_interval steps, a full checkpoint every other time."""
        if self.cfg.save_interval > 0 and step % self.cfg.save_interval == 0:
            self.save_model_only(ckpt.model_only_name(step))
        if self.full_checkpoint_due(step):
            self.save_full_checkpoint()

    def save_before_stopping(self, step: int) -> None:
        """A stop request: a full checkpoint unless the cadence has just written one."""
        if not self.full_checkpoint_due(step):
            self.save_full_checkpoint()

    # ---- saving -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The training state besides model and optimizer tensors: every rank contributes its data
        position and RNG state (collective)."""
        data_states = dist_utils.all_gather_object(self.stream.state_dict())
        rng_states = dist_utils.all_gather_object(ckpt.capture_rng_state())
        return dict(
            self.run.counters.state_dict(),
            max_steps=self.run.max_steps,
            curriculum=self.run.schedule.as_dict() if self.run.schedule else None,
            data=data_states,
            rng=rng_states,
            world_size=self.env.world_size,
            config=dataclasses.asdict(self.cfg),
        )

    def save_full_checkpoint(self) -> Path:
        """Collective: `checkpoint_{step}`, written by the backend's writers."""
        out_dir = self.cfg.run_dir / ckpt.full_checkpoint_name(self.run.counters.optimizer_step)
        self.refuse_non_finite(out_dir.name, include_optimizer=True)
        state = self.state_dict()
        if self.backend.writes_on(self.env):
            self.backend.save(out_dir, self.model, self.optimizer, state, self._record_writer("full"))
            self.log(f"saved full checkpoint {out_dir}")
        dist_utils.barrier()
        return out_dir

    def save_model_only(self, name: str) -> None:
        """Collective: `save_pretrained` weights + tokenizer (`model_only_chkpt_{step}`, `final_checkpoint`)."""
        from retrofit.train.modes import exportable_model

        self.refuse_non_finite(name, include_optimizer=False)
        # FSDP: gathered to rank 0 (collective); --lora.merge_on_save: shared deltas folded in
        model = exportable_model(self.model, self.cfg, self.backend, self.env.is_main)
        if self.env.is_main:
            kind = "final" if name == ckpt.FINAL_CHECKPOINT else "model_only"
            ckpt.save_model_only(model, self.tokenizer, self.cfg.run_dir / name, add_files=self._record_writer(kind))
            self.log(f"saved {self.cfg.run_dir / name}")
        dist_utils.barrier()

    def save_final(self) -> None:
        self.save_model_only(ckpt.FINAL_CHECKPOINT)

    def _record_writer(self, kind: str):
        """Writes the checkpoint's copy of run.json into the folder being saved (before it is renamed into place)."""
        step = self.run.counters.optimizer_step
        return lambda folder: write_run_record(folder, self.run.run_record, checkpoint={"kind": kind, "step": step})

    def refuse_non_finite(self, what: str, include_optimizer: bool) -> None:
        """Every rank holds the same weights and optimizer state (or, with FSDP, learns every
        rank's findings), so every rank raises alike."""
        tree = {"model": self.model.state_dict()}
        if include_optimizer:
            tree["optimizer"] = self.optimizer.state_dict()
        bad = self.backend.non_finite(tree)
        if bad:
            raise TrainingError(
                f"not saving {what} at optimizer step {self.run.counters.optimizer_step}: non-finite values in"
                f" {', '.join(bad)}; resume from the last checkpoint with a lower learning rate"
            )

    # ---- resuming -----------------------------------------------------------------------------
    def resume(self) -> Path | None:
        """Load the checkpoint named by --resume_path; for "auto", the newest one of the run that
        verifies and loads, saying which newer ones were skipped and why."""
        cfg = self.cfg
        if cfg.resume_path is None:
            return None
        if cfg.resume_path != "auto":
            path = Path(cfg.resume_path)
            self.load_state_dict(path, ckpt.load_training_state(path))
            return path
        candidates = ckpt.list_checkpoints(cfg.run_dir)
        if not candidates:
            if (cfg.run_dir / ckpt.FINAL_CHECKPOINT).exists():
                raise ConfigError(
                    f"{cfg.run_dir} holds a finished run ({ckpt.FINAL_CHECKPOINT}) without a full checkpoint to resume"
                    " from; pass --overwrite=true (without --resume_path) to train it again, or choose another --run_name"
                )
            self.log(f"--resume_path=auto: no checkpoint in {cfg.run_dir} yet, starting from scratch")
            return None
        skipped = []
        for path in candidates:
            try:
                self.load_state_dict(path, ckpt.load_training_state(path))
            except ckpt.CheckpointError as exc:
                skipped.append(f"{path.name} ({exc.reason})")
                self.log(f"--resume_path=auto: skipping {path.name}: {exc.reason}")
                continue
            return path
        raise ConfigError(
            f"--resume_path=auto: no checkpoint in {cfg.run_dir} verifies and loads: {'; '.join(skipped)}; pass a"
            " checkpoint you trust as --resume_path, or --overwrite=true (without --resume_path) to start again"
        )

    def changed_settings(self, state: dict) -> list[str]:
        """Settings that define the run and differ from the checkpoint's, as 'name old -> new'."""
        cfg, old = self.cfg, state.get("config") or {}
        checks = []
        if not cfg.ignore_past_parquet_dataset:  # restarting the data allows a new batch layout and seed
            checks += [(name, old.get(name), getattr(cfg, name)) for name in ("batch_size", "micro_batch_size", "seed")]
        if not cfg.ignore_past_scheduler:  # restarting the schedules allows a new length and curriculum
            checks.append(("max_steps", state.get("max_steps"), self.run.max_steps))
            old_curriculum = _flatten(state.get("curriculum") or {})
            new_curriculum = _flatten(self.run.schedule.as_dict() if self.run.schedule else {})
            for key in sorted(set(old_curriculum) & set(new_curriculum) - {"max_steps"}):
                checks.append((f"--{key}", old_curriculum[key], new_curriculum[key]))
        return [f"{name} {a} -> {b}" for name, a, b in checks if a is not None and a != b]

    def load_state_dict(self, path: Path, state: dict) -> None:
        """Put a loaded training state into the model, optimizer, counters, data and RNGs.

        CheckpointError: this checkpoint cannot be used (auto-resume tries the next one);
        ConfigError / DataError: it does not fit this run's flags or data (no fallback helps)."""
        cfg, env = self.cfg, self.env
        changed = self.changed_settings(state)
        if changed:
            raise ConfigError(
                f"{path} was written with other settings: {', '.join(changed)}; resume with the original flags"
                " (--ignore_past_scheduler=true allows a new max_steps/curriculum, --ignore_past_parquet_dataset=true"
                " a new batch_size/micro_batch_size/seed) or start a new run"
            )
        if bool(state.get("sharded")) != self.backend.sharded:
            written = "with --fsdp=true (sharded)" if state.get("sharded") else "without --fsdp"
            raise ConfigError(f"{path} was written {written}; resume it with the same --fsdp setting")
        try:
            bad = self.backend.load(path, state, self.model, self.optimizer)  # FSDP: collective
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ckpt.CheckpointError(path, f"does not fit this model/optimizer: {first_line(exc)[:300]}") from None
        if bad:
            raise ckpt.CheckpointError(path, f"holds non-finite values ({', '.join(bad)})")
        counters = self.run.counters
        counters.load_state_dict(state)
        if cfg.ignore_past_scheduler:
            counters.lr_step_offset = counters.optimizer_step
        if not cfg.ignore_past_parquet_dataset:
            data_states = state["data"]
            if len(data_states) != env.world_size:
                raise DataError(
                    f"{path} was written by {len(data_states)} rank(s), this run has {env.world_size}; pass"
                    " --ignore_past_parquet_dataset=true to start the data from the beginning"
                )
            self.stream.load_state_dict(data_states[env.rank])
        rng_states = state["rng"]
        ckpt.restore_rng_state(rng_states[env.rank % len(rng_states)])
        self.log(f"resumed from {path} at optimizer step {counters.optimizer_step} (data step {counters.data_step})")
