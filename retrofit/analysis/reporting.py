"""What param_counter.py, plot_evals.py and the quickstart summary report, as library functions.

- `count` / `flops_report`: parameter counts by part and training FLOPs of a model or checkpoint
  folder. How the run was trained comes from its run.json (retrofit/train/run_record.py); arguments are
  overrides, and without run.json they describe the run as train.py's flags would.
- `collect_and_plot`: lm-eval results of runs -> the paper-data table (results.jsonl) and figures.

Imports neither torch nor transformers; counting builds the model on the meta device, importing
them only then (retrofit/train/flops.py).
"""

from __future__ import annotations

from pathlib import Path

from retrofit.train.flops import (
    DEFAULT_TOKENS_PER_STEP,
    ParamCounts,
    count_model_dir,
    count_preset,
    read_config,
    summed_mean_recurrence,
    training_flops,
)
from retrofit.train.run_record import checkpoint_step, counting_schedule, find_run_record, read_run_record


def parts_report(counts: ParamCounts) -> dict:
    if counts.recurrent:
        parts = {
            "embeddings + lm_head": counts.embeddings,
            "prelude": counts.prelude,
            "recurrent_block": counts.recurrent_block,
            "coda": counts.coda,
            "adapter": counts.adapter,
            "other (final norm)": counts.other,
        }
        if counts.lora_stored:
            parts["lora (stored)"] = counts.lora_stored
            parts["lora per application"] = {"prelude": counts.lora_prelude, "recurrent_block (one iteration)":
                                             counts.lora_recurrent_block, "coda": counts.lora_coda}
    else:
        parts = {"embeddings + lm_head": counts.embeddings, "non_embedding": counts.layers}
    return {"recurrent": counts.recurrent, "parts": parts, "total": counts.total,
            "non_embedding_at_r1": counts.non_embedding(1)}


def count(model_dir: str | Path, num_rec: list[int] | None = None) -> dict:
    """Counts per part; with num_rec, effective (non-embedding) parameters at each recurrence."""
    counts = count_model_dir(model_dir)
    report = {"model_dir": str(model_dir), **parts_report(counts)}
    if num_rec:
        report["effective_params"] = {str(r): counts.non_embedding(r) for r in num_rec}
    return report


def preset_report(name: str, num_rec: list[int] | None = None) -> dict:
    """Counts of a conversion preset: the base (static) and the converted model, by part."""
    from retrofit.model.conversion import PRESET_DEFINITIONS

    base, converted = count_preset(name)
    preset = PRESET_DEFINITIONS[name]
    layers = dict(zip(("prelude", "recurrent_block", "coda"), (list(group) for group in preset.groups)))
    report = {"preset": name, "base": preset.base, "family": preset.family, "layers": layers,
              "base_model": parts_report(base), "converted": parts_report(converted)}
    if num_rec:
        report["converted"]["effective_params"] = {str(r): converted.non_embedding(r) for r in num_rec}
    return report


def flops_report(
    model_dir: str | Path,
    checkpoint: int | None = None,
    max_steps: int | None = None,
    tokens_per_step: int | None = None,
    max_mean_rec: int | None = None,
    warmup: float | None = None,
    warmup_type: str | None = None,
    backprop_depth: int | None = None,
    non_recurrent: bool = False,
) -> dict:
    """Training FLOPs spent up to `checkpoint` (steps 1..checkpoint).

    Every argument left at None comes from the run.json of `model_dir` (a checkpoint's own copy, else
    its run folder's): `checkpoint` defaults to the step the checkpoint was saved at."""
    counts = count_model_dir(model_dir)
    record = read_run_record(model_dir)
    if non_recurrent and counts.recurrent:
        raise ValueError(f"--non_recurrent given but {model_dir} is a recurrent model")
    if record is not None and record.get("recurrent") and not counts.recurrent:
        raise ValueError(f"{find_run_record(model_dir)} describes a recurrent run but {model_dir} holds a static model")
    if checkpoint is None:
        checkpoint = checkpoint_step(record)
    if checkpoint is None:
        checkpoint = max_steps if max_steps is not None else (record or {}).get("max_steps")
    if checkpoint is None:
        raise ValueError(f"no run.json in {model_dir} (or its run folder): pass --checkpoint (and --max_steps)")
    if tokens_per_step is None:
        tokens_per_step = (record or {}).get("tokens_per_step") or DEFAULT_TOKENS_PER_STEP
    found = find_run_record(model_dir)
    report = {"checkpoint": checkpoint, "tokens_per_step": tokens_per_step,
              "run_record": str(found) if found is not None else None}
    if not counts.recurrent:
        report.update(mode="static (6 N D per step)", N=counts.layers)
        report["FLOPs"] = training_flops(counts, checkpoint, None, tokens_per_step)
        return report
    schedule = counting_schedule(record, read_config(model_dir), max_steps=max_steps, max_mean_rec=max_mean_rec,
                                 warmup=warmup, warmup_type=warmup_type, backprop_depth=backprop_depth,
                                 where=str(model_dir))
    report.update(
        mode="recurrent",
        max_steps=schedule.max_steps,
        max_mean_rec=schedule.max_mean_rec,
        schedule=schedule.as_dict(),
        summed_mean_recurrence=summed_mean_recurrence(schedule, checkpoint),
        FLOPs=training_flops(counts, checkpoint, schedule, tokens_per_step),
    )
    return report


def collect_and_plot(specs: list, out_dir: str | Path, jsonl: list = (), formats=None, test_rec="train",
                     errorbars: bool = False, table_name: str = "results.jsonl", log=None) -> tuple[list[dict], Path, list[Path]]:
    """Rows of every run (retrofit.analysis.results.RunSpec) plus existing tables -> `out_dir/table_name` and
    plot_evals.py's figures. Returns (rows, table path, figure paths)."""
    from retrofit.analysis import plotting
    from retrofit.analysis.results import collect_runs, read_jsonl, write_jsonl

    rows = collect_runs(specs)
    for path in jsonl:
        rows.extend(read_jsonl(path))
    table = write_jsonl(rows, Path(out_dir) / table_name)
    written = plotting.plot_run_table(rows, out_dir, formats or plotting.FORMATS, test_rec, errorbars, log=log)
    return rows, table, written
