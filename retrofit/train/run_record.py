"""run.json: what a training run was, written by train.py and read by the counters and plots.

train.py writes `run.json` into the run folder when it starts and into every checkpoint it saves
(`model_only_chkpt_*`, `final_checkpoint`, `checkpoint_*`, inside the atomic save), so a
checkpoint copied elsewhere still says how it was trained. It holds:

- `settings`: every train.py flag as the run used it (the TrainConfig, nested groups as objects);
- `schedule`: the resolved recurrence schedule (`retrofit.train.depth.RecurrenceSchedule.as_dict`):
  max_steps and both curriculum groups, a curriculum that is off holding the model config's
  constant value; null for a non-recurrent run;
- `curriculum`: the same schedule as data, `[first step, mean recurrence, backprop depth]` at every
  change: `applied` is what training ran, `counted` the paper counter's convention used for FLOPs;
- `max_steps`, `max_length`, `world_size`, `micro_batches_per_step`, `tokens_per_step`
  (= batch_size x world_size x max_length, the D of the FLOPs formula), `lr_schedule`;
- `model_type`, `recurrent`, `versions` (Python and the packages that shape the numbers);
- in a checkpoint's copy only, `checkpoint`: `{"kind": "model_only" | "final" | "full", "step": N}`.

This module imports neither torch nor transformers: plotting and counting read run.json cheaply.
"""

from __future__ import annotations

import json
import platform
from dataclasses import replace
from pathlib import Path

from retrofit.atomic import write_json_atomic
from retrofit.train.depth import MeanBackpropDepthSchedule, MeanRecurrenceSchedule, RecurrenceSchedule

RUN_FILE = "run.json"
FORMAT = "retrofit-recurrence run record 1"
VERSIONED_PACKAGES = ("retrofit-recurrence", "torch", "transformers", "numpy", "datasets", "pyarrow", "jsonargparse")


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def build_run_record(*, settings: dict, schedule: RecurrenceSchedule | None, model_type: str | None, max_steps: int,
                     max_length: int, world_size: int, micro_batches_per_step: int, batch_size: int,
                     lr_schedule: dict) -> dict:
    """The run.json of a run (everything but the per-checkpoint `checkpoint` entry)."""
    return {
        "format": FORMAT,
        "settings": settings,
        "model_type": model_type,
        "recurrent": schedule is not None,
        "max_steps": max_steps,
        "max_length": max_length,
        "world_size": world_size,
        "micro_batches_per_step": micro_batches_per_step,
        "tokens_per_step": batch_size * world_size * max_length,
        "lr_schedule": lr_schedule,
        "schedule": schedule.as_dict() if schedule is not None else None,
        "curriculum": None if schedule is None else {
            "columns": ["first_step", "mean_recurrence", "backprop_depth"],
            "applied": schedule.change_points(applied=True),
            "counted": schedule.change_points(applied=False),
        },
        "versions": package_versions(),
    }


def write_run_record(folder: str | Path, record: dict, checkpoint: dict | None = None) -> Path:
    """Write `folder/run.json` atomically (temp file, then rename); `checkpoint` adds the save's kind and step."""
    folder = Path(folder)
    if checkpoint is not None:
        record = {**record, "checkpoint": checkpoint}
    return write_json_atomic(folder / RUN_FILE, record, indent=1)


def find_run_record(path: str | Path) -> Path | None:
    """run.json of a run folder or checkpoint folder (a checkpoint's own copy first, then its run's)."""
    path = Path(path)
    if path.is_file():
        return path if path.name == RUN_FILE else None
    for folder in (path, path.parent):
        if (folder / RUN_FILE).is_file():
            return folder / RUN_FILE
    return None


def read_run_record(path: str | Path) -> dict | None:
    """The run.json found by `find_run_record`, or None; ValueError naming the file if it is not one."""
    found = find_run_record(path)
    if found is None:
        return None
    try:
        record = json.loads(found.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{found} is not valid JSON ({exc}); delete it or restore it from a checkpoint's copy") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{found} is not a run record of this version (format {FORMAT!r})")
    return record


def record_schedule(record: dict | None) -> RecurrenceSchedule | None:
    """The recorded schedule (None for a non-recurrent run or no record)."""
    if not record or record.get("schedule") is None:
        return None
    return RecurrenceSchedule.from_dict(record["schedule"])


def counting_schedule(record: dict | None, model_config: dict, *, max_steps: int | None = None,
                      max_mean_rec: int | None = None, warmup: float | None = None, warmup_type: str | None = None,
                      backprop_depth: int | None = None, where: str = "") -> RecurrenceSchedule:
    """The schedule to count FLOPs with: the run's recorded one, else what train.py runs with its default flags
    on this model config, with any given value as an override.

    `warmup` sets the mean-recurrence curriculum's length (> 0 turns it on, 0 turns it off); `max_mean_rec`
    and `backprop_depth` its final (or constant) mean recurrence and the backprop depth."""
    base = record_schedule(record)
    max_steps = max_steps if max_steps is not None else (base.max_steps if base else None)
    if max_steps is None:
        raise ValueError(
            f"no run.json{' in ' + where if where else ''} and no --max_steps: the length of the run is needed to"
            " replay its recurrence curriculum (pass --max_steps, or point at a run or checkpoint that has run.json)"
        )
    if base is None:
        base = RecurrenceSchedule.resolve(
            max_steps, MeanRecurrenceSchedule(), MeanBackpropDepthSchedule(),
            model_mean_recurrence=int(model_config.get("mean_recurrence", MeanRecurrenceSchedule.max_mean_rec)),
            model_backprop_depth=int(model_config.get("mean_backprop_depth", MeanBackpropDepthSchedule.max_backprop)),
        )
    rec, bp = base.mean_recurrence_schedule, base.mean_backprop_depth_schedule
    if max_mean_rec is not None:
        rec = replace(rec, max_mean_rec=max_mean_rec)
    if warmup is not None:
        rec = replace(rec, warmup=warmup, turn_on=warmup > 0)
    if warmup_type is not None:
        rec = replace(rec, warmup_type=warmup_type)
    if backprop_depth is not None:
        bp = replace(bp, max_backprop=backprop_depth)
    return RecurrenceSchedule(max_steps=max_steps, mean_recurrence_schedule=rec, mean_backprop_depth_schedule=bp)


def checkpoint_step(record: dict | None) -> int | None:
    """The optimizer step a checkpoint's copy of run.json was saved at (None for the run folder's copy)."""
    return ((record or {}).get("checkpoint") or {}).get("step")
