"""Checkpoints written atomically, found again by `--resume_path=auto`, and RNG capture.

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
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import torch

from retrofit.atomic import atomic_directory, remove_leftovers
from retrofit.errors import first_line

STATE_FILE = "training_state.pt"
COMPLETE_MARKER = "COMPLETE"

# The run folder's names (the original's): train.py writes them, evaluation and the results
# table find checkpoints by them.
FULL_CHECKPOINT_PREFIX = "checkpoint_"
MODEL_ONLY_PREFIX = "model_only_chkpt_"
FINAL_CHECKPOINT = "final_checkpoint"
FULL_CHECKPOINT_RE = re.compile(rf"^{FULL_CHECKPOINT_PREFIX}(\d+)$")
MODEL_ONLY_RE = re.compile(rf"^{MODEL_ONLY_PREFIX}(\d+)$")
RUN_OUTPUT_RE = re.compile(
    rf"^({FULL_CHECKPOINT_PREFIX}\d+|{MODEL_ONLY_PREFIX}\d+|{FINAL_CHECKPOINT}|metrics\.jsonl|run\.json)$"
)


def full_checkpoint_name(step: int) -> str:
    return f"{FULL_CHECKPOINT_PREFIX}{step}"


def model_only_name(step: int) -> str:
    return f"{MODEL_ONLY_PREFIX}{step}"


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete temporary folders left by a job killed mid-save (call on the main rank at start)."""
    return remove_leftovers(run_dir)


def save_model_only(model, tokenizer, out_dir: str | Path, add_files=None) -> Path:
    """`save_pretrained` model + tokenizer; `add_files(folder)` writes more files (run.json) into the
    folder before it is renamed into place."""
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if add_files is not None:
            add_files(tmp)
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


def verify_checkpoint(checkpoint_dir: str | Path) -> str | None:
    """None if every file listed in COMPLETE is present with its recorded size and checksum,
    else why the checkpoint cannot be trusted (one short phrase)."""
    checkpoint_dir = Path(checkpoint_dir)
    marker = checkpoint_dir / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} marker (its save never finished)"
    try:
        files = json.loads(marker.read_text())["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"its {COMPLETE_MARKER} marker is damaged or lists no checksums (written by an older version?)"
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


def save_training_state(out_dir: str | Path, state: dict, add_files=None) -> Path:
    """The training state and its COMPLETE marker; `add_files(folder)` writes more files (run.json)
    first, so the marker checksums them too."""
    with atomic_directory(out_dir) as tmp:
        torch.save(state, tmp / STATE_FILE)
        if add_files is not None:
            add_files(tmp)
        write_complete_marker(tmp, optimizer_step=state.get("optimizer_step"))
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


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The `checkpoint_{step}` with the highest step that verifies, or None."""
    return next((path for path in list_checkpoints(run_dir) if verify_checkpoint(path) is None), None)


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


def load_saved_model(model_dir: str | Path, dtype: torch.dtype | None = None, checkpoint_code: bool = False):
    """A saved model folder (`model_only_chkpt_*`, `final_checkpoint`, a conversion, a plain HF model).

    By default a recurrent checkpoint runs this repository's `RavenForCausalLM`, never the
    modeling file copied beside its weights (that copy is for machines without this repo, and
    a checkpoint from someone else could put any code there). `checkpoint_code=True` runs the
    checkpoint's own code (`trust_remote_code=True`) instead.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    config_file = Path(model_dir) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if checkpoint_code:
        remote_class = (config.get("auto_map") or {}).get("AutoModelForCausalLM")
        if remote_class is None:
            return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, **kwargs)
        # Named explicitly: once this repo's classes are registered with the Auto classes,
        # transformers prefers them even with trust_remote_code=True.
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(remote_class, str(model_dir)).from_pretrained(model_dir, **kwargs)
    model_type = config.get("model_type")
    from retrofit.model.configuration_raven import RavenConfig
    from retrofit.model.modeling_raven import RavenForCausalLM

    if model_type == RavenConfig.model_type:
        return RavenForCausalLM.from_pretrained(model_dir, **kwargs)
    AutoConfig.from_pretrained(model_dir, trust_remote_code=False)  # a clear error for custom code
    return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False, **kwargs)
