"""The run folder as train.py keeps it: checkpoints written atomically, found again by
`--resume_path=auto`, RNG capture, and the `CheckpointManager` that owns the folder's names, the
save cadence, saving, verified resume and the counters a checkpoint carries.

Layout under `{out_path}/{run_name}/`:
- `model_only_chkpt_{step}/`, `final_checkpoint/`: HF `save_pretrained` model + tokenizer (load in
  lm-eval / from_pretrained).
- `checkpoint_{step}/training_state.pt`: everything needed to continue exactly (model,
  optimizer, counters, data positions and RNG states of every rank, config), plus `COMPLETE`,
  a JSON file with the size and SHA-256 of every other file in the folder.
- every one of them holds the run's `run.json` (retrofit/train/run_record.py), saved with it.

Every directory is written under a hidden temporary name and renamed into place, so a job killed
mid-save leaves at worst a `.tmp` folder that nothing picks up. What renames cannot catch (a disk
that flips bits, a file truncated or overwritten later, a copy cut short) the checksums in
`COMPLETE` do: `verify_checkpoint` says why a folder cannot be trusted, and `--resume_path=auto`
then falls back to the next newest one.

The training state holds only tensors and plain Python types (RNG states included), so it loads
with `torch.load(weights_only=True)`: a checkpoint from someone else cannot run code on resume.

Where the model and optimizer tensors go is the backend's business, chosen by `parallelize`:
`LocalCheckpoints` (training_state.pt, written by the main rank) or `fsdp.ShardedCheckpoints`
(DCP shards written by every rank). The manager never asks which one it has.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from retrofit.atomic import atomic_directory
from retrofit.data.rows import DataError
from retrofit.errors import first_line
from retrofit.model.configuration_raven import RavenConfig
from retrofit.train import distributed as dist_utils
from retrofit.errors import ConfigError
from retrofit.train.config import TrainConfig
from retrofit.train.faults import fault_point
from retrofit.train.run_folder import (
    FINAL_CHECKPOINT,
    FULL_CHECKPOINT_RE,
    full_checkpoint_name,
    model_only_name,
)
from retrofit.train.run_record import write_run_record

STATE_FILE = "training_state.pt"
COMPLETE_MARKER = "COMPLETE"


def save_model_only(model, tokenizer, out_dir: str | Path, add_files=None) -> Path:
    """`save_pretrained` model + tokenizer; `add_files(folder)` writes more files (run.json) into the
    folder before it is renamed into place."""
    kind = "final" if Path(out_dir).name == FINAL_CHECKPOINT else "model_only"  # for the fault phases only
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        fault_point(f"{kind}:temp_written")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if add_files is not None:
            add_files(tmp)
        fault_point(f"{kind}:before_rename")
    fault_point(f"{kind}:after_rename")
    return Path(out_dir)


def file_digest(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_complete_marker(checkpoint_dir: str | Path, **info) -> None:
    """Record size and SHA-256 of every file in `checkpoint_dir` (written last: its presence
    means every listed file was fully written)."""
    checkpoint_dir = Path(checkpoint_dir)
    files = {
        path.relative_to(checkpoint_dir).as_posix(): {"bytes": path.stat().st_size, "sha256": file_digest(path)}
        for path in sorted(checkpoint_dir.rglob("*"))
        if path.is_file() and path.name != COMPLETE_MARKER
    }
    (checkpoint_dir / COMPLETE_MARKER).write_text(json.dumps(dict(info, files=files), indent=1) + "\n")


def misnamed_step(checkpoint_dir: Path, recorded_step) -> str | None:
    """Why a `checkpoint_{N}` whose recorded optimizer step is not N cannot be trusted (renamed or
    copied over: resuming it would drop or repeat steps), else None."""
    match = FULL_CHECKPOINT_RE.match(Path(checkpoint_dir).name)
    if match is None or recorded_step is None or int(match.group(1)) == recorded_step:
        return None
    return f"it is named for step {match.group(1)} but holds optimizer step {recorded_step} (renamed or copied over?)"


def verify_checkpoint(checkpoint_dir: str | Path) -> str | None:
    """None if every file listed in COMPLETE is present with its recorded size and checksum,
    else why the checkpoint cannot be trusted (one short phrase)."""
    checkpoint_dir = Path(checkpoint_dir)
    marker = checkpoint_dir / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} marker (its save never finished)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
        return f"its {COMPLETE_MARKER} marker is damaged or lists no checksums (written by an older version?)"
    if (problem := misnamed_step(checkpoint_dir, info.get("optimizer_step"))) is not None:
        return problem
    if STATE_FILE not in files:
        return f"its {COMPLETE_MARKER} marker does not list {STATE_FILE}"
    for name, expected in files.items():
        path = checkpoint_dir / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.get("bytes"):
            return f"{name} has {size} bytes, {expected.get('bytes')} were written (truncated or overwritten)"
        if file_digest(path) != expected.get("sha256"):
            return f"{name} does not match its checksum (the file changed after it was written)"
    return None


def non_finite_entries(tree, prefix: str = "", limit: int = 3) -> list[str]:
    """Names of (up to `limit`) floating tensors / floats in a nested state that hold NaN or inf."""
    found: list[str] = []

    def walk(value, name):
        if len(found) >= limit:
            return
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                found.append(name)
        elif isinstance(value, float):
            if not math.isfinite(value):
                found.append(name)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{name}[{index}]")

    walk(tree, prefix)
    return found


def tensor_bytes(tree) -> int:
    """Bytes of every tensor in a nested state (what saving it writes, roughly)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(value) for value in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(value) for value in tree)
    return 0


def save_training_state(out_dir: str | Path, state: dict, add_files=None) -> Path:
    """The training state and its COMPLETE marker; `add_files(folder)` writes more files (run.json)
    first, so the marker checksums them too."""
    with atomic_directory(out_dir) as tmp:
        torch.save(state, tmp / STATE_FILE)
        fault_point("full:temp_written")
        if add_files is not None:
            add_files(tmp)
        write_complete_marker(tmp, optimizer_step=state.get("optimizer_step"))
        fault_point("full:before_rename")
    fault_point("full:after_rename")
    return Path(out_dir)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every `checkpoint_{step}` folder of a run, newest (highest step) first, complete or not."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = FULL_CHECKPOINT_RE.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, damaged or not loadable (`reason` says which)."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def check_training_state_dir(checkpoint_dir: str | Path) -> None:
    """CheckpointError unless `checkpoint_dir` is a folder with a training state (cheap: no hashing)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(checkpoint_dir, "does not exist; pass a checkpoint_{step} folder or --resume_path=auto")
    if not (checkpoint_dir / STATE_FILE).is_file():
        if (checkpoint_dir / "config.json").is_file():
            raise CheckpointError(
                checkpoint_dir,
                f"holds model weights only, not a training state ({STATE_FILE}); resume from a checkpoint_{{step}}"
                " folder, or pass this folder as --model_name to start a new run from these weights",
            )
        raise CheckpointError(checkpoint_dir, f"is not a full checkpoint (no {STATE_FILE}); pass a checkpoint_{{step}} folder")


def load_training_state(checkpoint_dir: str | Path, map_location="cpu", verify: bool = True) -> dict:
    """Verify the checksums, then load with `weights_only=True` (tensors and plain types only)."""
    checkpoint_dir = Path(checkpoint_dir)
    check_training_state_dir(checkpoint_dir)
    if verify and (problem := verify_checkpoint(checkpoint_dir)) is not None:
        raise CheckpointError(checkpoint_dir, f"does not verify: {problem}")
    try:
        return torch.load(checkpoint_dir / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:  # a damaged zip, a pickle with objects weights_only refuses, ...
        raise CheckpointError(checkpoint_dir, f"does not load: {first_line(exc)[:300]}") from None


class LocalCheckpoints:
    """The checkpoint backend of one process or DDP: the main rank writes the whole model and
    optimizer state into training_state.pt (FSDP's backend: fsdp.ShardedCheckpoints)."""

    sharded = False

    def writes_on(self, env) -> bool:
        return env.is_main

    def save(self, out_dir: str | Path, model, optimizer, state: dict, add_files=None) -> Path:
        return save_training_state(out_dir, dict(state, model=model.state_dict(), optimizer=optimizer.state_dict()), add_files)

    def load(self, checkpoint_dir: Path, state: dict, model, optimizer) -> list[str]:
        """Put the state's tensors into model and optimizer; returns the names of non-finite ones
        (checked first: then nothing is loaded). Raises what load_state_dict raises on a misfit."""
        bad = non_finite_entries({"model": state["model"], "optimizer": state["optimizer"]})
        if not bad:
            model.load_state_dict(state["model"], strict=True)
            optimizer.load_state_dict(state["optimizer"])
        return bad

    def non_finite(self, tree) -> list[str]:
        return non_finite_entries(tree)

    def full_state_dict(self, model) -> dict:
        return model.state_dict()


def capture_rng_state() -> dict:
    """RNG states as tensors and plain types (numpy's key array becomes a tensor), so the
    training state stays loadable with `weights_only=True`."""
    version, python_state, gauss = random.getstate()
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["state"].tolist()), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["key"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def unsharded_copy(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (not sharded) CPU model of `model`'s class and config holding `state_dict`."""
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclasses it
    config = copy.deepcopy(model.config)
    if getattr(config, "model_type", None) == RavenConfig.model_type:
        with torch.device("meta"):  # no buffers to initialise: build without memory, then take the weights
            plain = cls(config)
        plain.load_state_dict(state_dict, assign=True)
    else:  # HF models keep non-persistent buffers (RoPE tables) that a meta build would leave empty
        plain = cls(config)
        plain.load_state_dict(state_dict)
    return plain.eval()


def exportable_model(model, cfg, checkpoints, is_main: bool):
    """Collective under FSDP. The model to `save_pretrained` on the main rank (None elsewhere):
    the model itself, or an unsharded CPU copy (FSDP: gathered; --lora.merge_on_save: merged).
    `checkpoints`: the run's checkpoint backend."""
    if not checkpoints.sharded and not cfg.lora.merge_on_save:
        return model
    state = checkpoints.full_state_dict(model)
    if not is_main:
        return None
    plain = unsharded_copy(model, state)
    if cfg.lora.merge_on_save and hasattr(plain, "merge_lora_"):
        plain.merge_lora_()
    return plain


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
        # the newest full checkpoint this run wrote or resumed from: what --resume_path=auto would take
        self.last_full_checkpoint: Path | None = None

    # ---- cadence ------------------------------------------------------------------------------
    def full_checkpoint_due(self, step: int) -> bool:
        """A resumable checkpoint every 2 x save_interval steps (the original's cadence)."""
        return self.cfg.save_interval > 0 and step % (2 * self.cfg.save_interval) == 0

    def save_on_cadence(self, step: int) -> None:
        """Weights every save_interval steps, a full checkpoint every other time."""
        if self.cfg.save_interval > 0 and step % self.cfg.save_interval == 0:
            self.save_model_only(model_only_name(step))
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
        rng_states = dist_utils.all_gather_object(capture_rng_state())
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
        out_dir = self.cfg.run_dir / full_checkpoint_name(self.run.counters.optimizer_step)
        self.refuse_non_finite(out_dir.name, include_optimizer=True)
        state = self.state_dict()
        problem = None
        if self.backend.writes_on(self.env):
            try:
                self.backend.save(out_dir, self.model, self.optimizer, state, self._record_writer("full"))
                self.last_full_checkpoint = out_dir
                self.log(f"saved full checkpoint {out_dir}")
            except OSError as exc:
                problem = self._save_failure(out_dir, exc, {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})
        self._raise_if_any_rank_failed(problem)
        return out_dir

    def save_model_only(self, name: str) -> None:
        """Collective: `save_pretrained` weights + tokenizer (`model_only_chkpt_{step}`, `final_checkpoint`)."""
        self.refuse_non_finite(name, include_optimizer=False)
        # FSDP: gathered to rank 0 (collective); --lora.merge_on_save: shared deltas folded in
        model = exportable_model(self.model, self.cfg, self.backend, self.env.is_main)
        problem = None
        if self.env.is_main:
            kind = "final" if name == FINAL_CHECKPOINT else "model_only"
            try:
                save_model_only(model, self.tokenizer, self.cfg.run_dir / name, add_files=self._record_writer(kind))
                self.log(f"saved {self.cfg.run_dir / name}")
            except OSError as exc:
                problem = self._save_failure(self.cfg.run_dir / name, exc, model.state_dict())
        self._raise_if_any_rank_failed(problem)

    def _save_failure(self, out_dir: Path, exc: OSError, tensors) -> str:
        """One line for a save the file system refused (disk full, read-only, quota): the atomic
        write has already removed its temporary folder, so the run folder holds only good checkpoints."""
        try:
            free = f"{shutil.disk_usage(out_dir.parent).free / 1e9:.2f} GB free"
        except OSError:
            free = "free space unknown"
        needed = tensor_bytes(tensors) / 1e9
        latest = self.last_full_checkpoint
        resume = f"--resume_path=auto continues from {latest.name}" if latest else "no full checkpoint to resume from yet"
        return (
            f"cannot save {out_dir} ({exc.strerror or exc}): it needs about {needed:.2f} GB, {free}; free space or"
            f" make the folder writable, then {resume}"
        )

    def _raise_if_any_rank_failed(self, problem: str | None) -> None:
        """Collective: every rank stops with the writer's error (no rank waits in a barrier for a dead save)."""
        problems = [p for p in dist_utils.all_gather_object(problem) if p]
        if problems:
            raise TrainingError(problems[0])

    def save_final(self) -> None:
        self.save_model_only(FINAL_CHECKPOINT)

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
            self.load_state_dict(path, load_training_state(path))
            return path
        candidates = list_checkpoints(cfg.run_dir)
        if not candidates:
            if (cfg.run_dir / FINAL_CHECKPOINT).exists():
                raise ConfigError(
                    f"{cfg.run_dir} holds a finished run ({FINAL_CHECKPOINT}) without a full checkpoint to resume"
                    " from; pass --overwrite=true (without --resume_path) to train it again, or choose another --run_name"
                )
            self.log(f"--resume_path=auto: no checkpoint in {cfg.run_dir} yet, starting from scratch")
            return None
        skipped = []
        for path in candidates:
            try:
                self.load_state_dict(path, load_training_state(path))
            except CheckpointError as exc:
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
        if (problem := misnamed_step(path, state.get("optimizer_step"))) is not None:
            raise CheckpointError(path, problem)
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
            raise CheckpointError(path, f"does not fit this model/optimizer: {first_line(exc)[:300]}") from None
        if bad:
            raise CheckpointError(path, f"holds non-finite values ({', '.join(bad)})")
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
        restore_rng_state(rng_states[env.rank % len(rng_states)])
        self.last_full_checkpoint = path
        self.log(f"resumed from {path} at optimizer step {counters.optimizer_step} (data step {counters.data_step})")
