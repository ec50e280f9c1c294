"""Collect lm-eval results of training runs into one table and plot them.

Reads every lm-eval results JSON under each run folder (layout of shells/eval.sh:
`{run}/{model_only_chkpt_STEP|final_checkpoint}/eval/rec_R/.../results_*.json`; a folder of
--output_path files or a single results file works too), takes the test recurrence from
config.model_args (else the rec_R folder) and the step from `chkpt_STEP` (final_checkpoint: the
step in its run.json), counts parameters from the evaluated checkpoint's config.json on the meta
device, replays the run's recurrence curriculum from its run.json (written by train.py) for
training FLOPs, and writes

    {out_dir}/results.jsonl              the paper_data schema: model, chkpt, task, acc, stderr,
                                         train_rec, num_rec, cooldown, effective_params, FLOPs
    {out_dir}/{task}_vs_num_rec.{pdf,png}  accuracy vs test recurrence at each run's last checkpoint
    {out_dir}/{task}_vs_chkpt.{pdf,png}    accuracy vs training step
    {out_dir}/{task}_vs_FLOPs.{pdf,png}    accuracy vs training FLOPs

Examples:
    python plot_evals.py outputs/my_run --out_dir plots/my_run          # run.json says how it trained
    python plot_evals.py downloaded_run --max_steps 50000 --max_mean_rec 32 --warmup 0.75 \
        --warmup_type 1-sqrt --out_dir plots/downloaded    # no run.json: describe the run with flags
    python plot_evals.py --runs_file runs.json --jsonl paper_plots/data/olmo_50k_steps.jsonl --out_dir plots
where runs.json is a list of objects with the RunSpec fields of retrofit/analysis/results.py (path, label,
train_rec, max_steps, warmup, warmup_type, backprop_depth, tokens_per_step, non_recurrent,
model_dir, cooldown). The training flags are overrides of run.json; without it they mean what
param_counter.py's do. --jsonl adds rows of an existing table (e.g. the paper's) to the same plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from retrofit.analysis import plotting
from retrofit.train.depth import WARMUP_TYPES
from retrofit.analysis.reporting import collect_and_plot
from retrofit.analysis.results import RunSpec

log = logging.getLogger("plot_evals")


def run_specs(args) -> list[RunSpec]:
    specs = []
    if args.runs_file:
        try:
            entries = json.loads(Path(args.runs_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read --runs_file {args.runs_file}: {e}") from None
        if not isinstance(entries, list):
            raise ValueError(f"--runs_file {args.runs_file} must hold a JSON list of run objects")
        for entry in entries:
            try:
                specs.append(RunSpec(**entry))
            except TypeError as e:
                raise ValueError(f"bad run entry {entry} in {args.runs_file}: {e}") from None
    labels = args.labels or []
    if labels and len(labels) != len(args.runs):
        raise ValueError(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    for i, path in enumerate(args.runs):
        specs.append(RunSpec(
            path=path, label=labels[i] if labels else None, train_rec=args.max_mean_rec, max_steps=args.max_steps,
            warmup=args.warmup, warmup_type=args.warmup_type, backprop_depth=args.backprop_depth,
            tokens_per_step=args.tokens_per_step, non_recurrent=args.non_recurrent, model_dir=args.model_dir,
        ))
    return specs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run folders (or lm-eval result files); flags below apply to all")
    parser.add_argument("--runs_file", help="JSON list of run objects with per-run training descriptions")
    parser.add_argument("--jsonl", nargs="+", default=[], help="existing tables (paper_data schema) to plot too")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--labels", nargs="+", help="legend name per positional run (default: folder name)")
    overrides = parser.add_argument_group("how the runs trained (default: each run's run.json)")
    overrides.add_argument("--max_steps", type=int, help="max_steps of the runs (curriculum length; final_checkpoint step)")
    overrides.add_argument("--max_mean_rec", type=int, help="training mean recurrence (else the checkpoint config's)")
    overrides.add_argument("--warmup", type=float, help="curriculum length as a fraction of max_steps; 0 = none")
    overrides.add_argument("--warmup_type", choices=WARMUP_TYPES)
    overrides.add_argument("--backprop_depth", type=int, help="else the checkpoint config's mean_backprop_depth")
    overrides.add_argument("--tokens_per_step", type=int, help="else 2**20 (the paper's)")
    overrides.add_argument("--non_recurrent", action="store_true", help="the runs train a static HF model")
    overrides.add_argument("--model_dir", help="config.json to count parameters when the evaluated checkpoints are gone")
    parser.add_argument("--test_rec", default="train",
                        help="test recurrence of the vs-step / vs-FLOPs plots: an integer or 'train' (default)")
    parser.add_argument("--errorbars", action="store_true", help="draw lm-eval's standard errors")
    parser.add_argument("--format", nargs="+", default=list(plotting.FORMATS), choices=plotting.FORMATS)
    parser.add_argument("--table_name", default="results.jsonl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)

    try:
        if args.test_rec != "train" and not args.test_rec.isdigit():
            raise ValueError(f"--test_rec must be an integer or 'train', got {args.test_rec!r}")
        specs = run_specs(args)
        if not specs and not args.jsonl:
            raise ValueError("give at least one run folder, --runs_file or --jsonl")
        rows, table, written = collect_and_plot(specs, args.out_dir, args.jsonl, args.format, args.test_rec,
                                                args.errorbars, args.table_name, log=log)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("wrote %d rows to %s", len(rows), table)
    log.info("wrote %d figures to %s", len(written), args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
