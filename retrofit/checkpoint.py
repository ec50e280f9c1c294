"""Checkpoints written atomically, found again by `--resume_path=auto`, and RNG capture.

Layout under `{out_path}/{run_name}/`:
- `model_only_chkpt_{step}/`, `final_checkpoint/`: HF `save_pretrained` model + tokenizer (load in
  lm-eval / from_pretrained).
- `checkpoint_{step}/training_state.pt`: everything needed to continue exactly (model,
  optimizer, counters, data positions and RNG states of every rank, config), plus `COMPLETE`.

Every directory is written under a hidden temporary name and renamed into place, so a job killed
mid-save leaves at worst a `.tmp` folder that nothing picks up, never a broken checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "training_state.pt"
COMPLETE_MARKER = "COMPLETE"
FULL_CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")
TMP_TAG = ".tmp-"


@contextmanager
def atomic_directory(final_dir: str | Path):
    """Yield a temporary sibling directory; on success it replaces `final_dir` by renames."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = final_dir.parent / f".{final_dir.name}{TMP_TAG}{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        yield tmp_dir
        if final_dir.exists():
            # Replacing (e.g. re-saving a step after a resume): move the old copy aside first so
            # there is never a moment with no complete copy at all.
            old_dir = final_dir.parent / f".{final_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final_dir, old_dir)
            os.replace(tmp_dir, final_dir)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.replace(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete temporary folders left by a job killed mid-save (call on the main rank at start)."""
    run_dir = Path(run_dir)
    removed = []
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            if path.name.startswith(".") and (TMP_TAG in path.name or ".old-" in path.name):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def save_model_only(model, tokenizer, out_dir: str | Path) -> Path:
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def save_training_state(out_dir: str | Path, state: dict) -> Path:
    with atomic_directory(out_dir) as tmp:
        torch.save(state, tmp / STATE_FILE)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"optimizer_step": state.get("optimizer_step")}) + "\n")
    return Path(out_dir)


def is_complete(checkpoint_dir: str | Path) -> bool:
    checkpoint_dir = Path(checkpoint_dir)
    return (checkpoint_dir / COMPLETE_MARKER).is_file() and (checkpoint_dir / STATE_FILE).is_file()


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete `checkpoint_{step}` with the highest step, or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = []
    for path in run_dir.iterdir():
        match = FULL_CHECKPOINT_RE.match(path.name)
        if match and is_complete(path):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def load_training_state(checkpoint_dir: str | Path, map_location="cpu") -> dict:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"resume path {str(checkpoint_dir)!r} does not exist")
    if not is_complete(checkpoint_dir):
        raise FileNotFoundError(
            f"{str(checkpoint_dir)!r} is not a complete full checkpoint (no {STATE_FILE} + {COMPLETE_MARKER});"
            " model_only_chkpt_* folders hold weights only: pass one as --model_name to start a new run from it"
        )
    # Our own file with Python objects (RNG tuples, config): not a weights-only pickle.
    return torch.load(checkpoint_dir / STATE_FILE, map_location=map_location, weights_only=False)


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
