"""Parameter counts by part, effective parameters and training FLOPs of a model or checkpoint directory.

Reads only config.json (the model is built on the meta device, so a 1B model costs no memory) and
the run.json that train.py writes into every checkpoint and run folder: for a checkpoint of a run,
the training FLOPs up to that checkpoint need no flags at all. Prints JSON. Formulas:
docs/analysis.md (Parameters and FLOPs); the curriculum is retrofit.train.depth.RecurrenceSchedule.at
(the paper counter's convention).

    # counts, effective parameters at test recurrence 16, and (from run.json) the FLOPs spent so far
    python param_counter.py outputs/my_run/model_only_chkpt_38000 --num_rec 16
    # no run.json (e.g. a downloaded model): describe the run with flags, as train.py's flags would;
    # a 50k-step run, curriculum linear over 25% to 16, FLOPs up to step 38000
    python param_counter.py path/to/recurrent_model --max_steps 50000 --checkpoint 38000 \
        --max_mean_rec 16 --warmup 0.25 --warmup_type linear
    # a static baseline: 6 N D per step
    python param_counter.py path/to/hf_model --non_recurrent --checkpoint 25000
    # a conversion preset, from its stored base sizes (no download): base and converted counts
    python param_counter.py --preset qwen2.5-0.5b-4-8-4 --num_rec 1 32
    python param_counter.py --preset all

With run.json, any flag given overrides the recorded value. Without it, --warmup > 0 turns the
mean-recurrence curriculum on (train.py's default is off), and the backprop depth is the model
config's mean_backprop_depth, as train.py uses it. The same functions: retrofit.analysis.reporting.
"""

from __future__ import annotations

import argparse
import json
import sys

from retrofit.train.depth import WARMUP_TYPES
from retrofit.analysis.reporting import count, flops_report, preset_report
from retrofit.train.run_record import find_run_record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("model_dir", nargs="?", help="checkpoint, recurrent (converted) or plain HF model dir with config.json")
    parser.add_argument("--preset", help="count a conversion preset instead (its base and converted model; 'all' for every preset)")
    parser.add_argument("--num_rec", type=int, nargs="+", help="test recurrence(s) for effective parameters")
    parser.add_argument("--checkpoint", type=int, help="count training FLOPs up to this optimizer step"
                        " (default: the step the checkpoint was saved at, from its run.json)")
    parser.add_argument("--max_steps", type=int, help="max_steps of the training run (default: run.json)")
    parser.add_argument("--tokens_per_step", type=int, help="tokens per optimizer step, D (default: run.json, else 2**20)")
    parser.add_argument("--max_mean_rec", type=int, help="final mean recurrence of the curriculum (default: run.json,"
                        " else the model config's mean_recurrence)")
    parser.add_argument("--warmup", type=float, help="fraction of max_steps the mean-recurrence curriculum ramps over;"
                        " 0 = no curriculum (default: run.json, else train.py's default: no curriculum)")
    parser.add_argument("--warmup_type", choices=WARMUP_TYPES, help="curriculum shape (default: run.json, else linear)")
    parser.add_argument("--backprop_depth", type=int, help="mean backprop depth (default: run.json, else the model"
                        " config's mean_backprop_depth)")
    parser.add_argument("--non_recurrent", action="store_true", help="a static model: 6 N D per step")
    args = parser.parse_args(argv)

    try:
        for flag, value, low in (("--checkpoint", args.checkpoint, 0), ("--max_steps", args.max_steps, 1),
                                 ("--tokens_per_step", args.tokens_per_step, 1), ("--max_mean_rec", args.max_mean_rec, 1),
                                 ("--backprop_depth", args.backprop_depth, 1), ("--num_rec", min(args.num_rec or [1]), 1)):
            if value is not None and value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")
        if args.warmup is not None and not 0 <= args.warmup <= 1:
            raise ValueError(f"--warmup must be a fraction of max_steps in [0, 1], got {args.warmup}")
        if args.preset is not None:
            if args.model_dir is not None or args.checkpoint is not None or args.max_steps is not None:
                raise ValueError("--preset counts a preset's models; give it without a model_dir, --checkpoint or --max_steps")
            from retrofit.model.conversion import PRESET_DEFINITIONS

            if args.preset != "all" and args.preset not in PRESET_DEFINITIONS:
                raise ValueError(f"unknown --preset {args.preset!r}; choose one of {', '.join(PRESET_DEFINITIONS)} or all")
            names = list(PRESET_DEFINITIONS) if args.preset == "all" else [args.preset]
            reports = [preset_report(name, args.num_rec) for name in names]
            print(json.dumps(reports if args.preset == "all" else reports[0], indent=2))
            return 0
        if args.model_dir is None:
            raise ValueError("give a model_dir or --preset NAME")
        report = count(args.model_dir, args.num_rec)
        described = args.checkpoint is not None or args.max_steps is not None
        if described or find_run_record(args.model_dir) is not None:
            report["training"] = flops_report(
                args.model_dir, args.checkpoint, args.max_steps, args.tokens_per_step, args.max_mean_rec,
                args.warmup, args.warmup_type, args.backprop_depth, args.non_recurrent,
            )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
