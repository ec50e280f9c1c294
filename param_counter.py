"""Parameter counts by part, effective parameters and training FLOPs of a model directory.

Reads only config.json and builds the model on the meta device, so a 1B model costs no memory.
Prints JSON. Formulas: docs/analysis.md (Parameters and FLOPs); the curriculum is
retrofit.depth.RecurrenceSchedule.at (the paper counter's convention; training applies the same
schedule one step late via `applied_at`, as the original's scheduler does).

    # counts, and effective parameters at test recurrence 16
    python param_counter.py path/to/recurrent_model --num_rec 16
    # FLOPs spent up to step 38000 of a 50k-step run, curriculum linear over 25% to 16
    python param_counter.py path/to/recurrent_model --max_steps 50000 --checkpoint 38000 \
        --max_mean_rec 16 --warmup 0.25 --warmup_type linear
    # a static baseline: 6 N D per step
    python param_counter.py path/to/hf_model --non_recurrent --checkpoint 25000

Importable: `from param_counter import count, flops_report`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from retrofit.depth import WARMUP_TYPES
from retrofit.flops import (
    DEFAULT_BACKPROP_DEPTH,
    DEFAULT_TOKENS_PER_STEP,
    ParamCounts,
    count_model_dir,
    make_schedule,
    read_config,
    summed_mean_recurrence,
    training_flops,
)


def count(model_dir: str | Path, num_rec: list[int] | None = None) -> dict:
    """Counts per part; with num_rec, effective (non-embedding) parameters at each recurrence."""
    counts = count_model_dir(model_dir)
    report = {"model_dir": str(model_dir), **parts_report(counts)}
    if num_rec:
        report["effective_params"] = {str(r): counts.non_embedding(r) for r in num_rec}
    return report


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


def flops_report(
    model_dir: str | Path,
    checkpoint: int,
    max_steps: int | None = None,
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
    max_mean_rec: int | None = None,
    warmup: float = 0.25,
    warmup_type: str = "linear",
    backprop_depth: int = DEFAULT_BACKPROP_DEPTH,
    non_recurrent: bool = False,
) -> dict:
    """Training FLOPs spent up to `checkpoint` (steps 1..checkpoint)."""
    counts = count_model_dir(model_dir)
    if non_recurrent and counts.recurrent:
        raise ValueError(f"--non_recurrent given but {model_dir} is a recurrent model (model_type huginn_raven)")
    report = {"checkpoint": checkpoint, "tokens_per_step": tokens_per_step}
    if not counts.recurrent:
        report.update(mode="static (6 N D per step)", N=counts.layers)
        report["FLOPs"] = training_flops(counts, checkpoint, None, tokens_per_step)
        return report
    if max_steps is None:
        raise ValueError("--max_steps is needed to replay the recurrence curriculum of a recurrent model")
    if max_mean_rec is None:
        max_mean_rec = int(read_config(model_dir).get("mean_recurrence", 32))
    schedule = make_schedule(max_steps, max_mean_rec, warmup, warmup_type, backprop_depth)
    report.update(
        mode="recurrent",
        max_steps=max_steps,
        max_mean_rec=max_mean_rec,
        warmup=warmup,
        warmup_type=warmup_type,
        backprop_depth=backprop_depth,
        summed_mean_recurrence=summed_mean_recurrence(schedule, checkpoint),
        FLOPs=training_flops(counts, checkpoint, schedule, tokens_per_step),
    )
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="recurrent (model_type huginn_raven) or plain HF model dir with config.json")
    parser.add_argument("--num_rec", type=int, nargs="+", help="test recurrence(s) for effective parameters")
    parser.add_argument("--checkpoint", type=int, help="count training FLOPs up to this optimizer step")
    parser.add_argument("--max_steps", type=int, help="max_steps of the training run (curriculum length)")
    parser.add_argument("--tokens_per_step", type=int, default=DEFAULT_TOKENS_PER_STEP)
    parser.add_argument("--max_mean_rec", type=int, help="final mean recurrence of the curriculum (default: config)")
    parser.add_argument("--warmup", type=float, default=0.25, help="fraction of max_steps the curriculum ramps over")
    parser.add_argument("--warmup_type", default="linear", choices=WARMUP_TYPES)
    parser.add_argument("--backprop_depth", type=int, default=DEFAULT_BACKPROP_DEPTH)
    parser.add_argument("--non_recurrent", action="store_true", help="a static model: 6 N D per step")
    args = parser.parse_args(argv)

    try:
        report = count(args.model_dir, args.num_rec)
        if args.checkpoint is not None or args.max_steps is not None:
            checkpoint = args.checkpoint if args.checkpoint is not None else args.max_steps
            report["training"] = flops_report(
                args.model_dir, checkpoint, args.max_steps, args.tokens_per_step, args.max_mean_rec,
                args.warmup, args.warmup_type, args.backprop_depth, args.non_recurrent,
            )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
