"""The last stages of shells/quickstart.sh: static-model validation loss, plots and the summary table.

    python utils/quickstart_summary.py static-loss --eval_file_path VAL --num_sequences N --model DIR OUT.json ...
    python utils/quickstart_summary.py plot-loss   --loss_dir OUT/loss_over_rec_eval --out_dir OUT/plots
    python utils/quickstart_summary.py summary     --out_dir OUT --limit L --eval_recs "1 4 8"
    python utils/quickstart_summary.py report      --out_dir OUT --limit L --eval_recs "1 4 8"   # all three, one process
    python utils/quickstart_summary.py smollm2-report --out_dir OUT --prompt TEXT

static-loss   multi_recurrence_eval.py sweeps recurrent models only; this scores a plain HF model on the same
              rows with the same loss (retrofit.evaluate.loss_over_depth) and writes the same JSON format ({"1": [[...], ...]}).
plot-loss     validation loss against test recurrence, the static models as horizontal lines.
summary       OUT/summary.md: per run the training steps, FLOPs (retrofit.analysis.reporting, param_counter.py's numbers),
              final train loss, validation loss at each recurrence, lm-eval accuracy at each recurrence, figures,
              stage times.
smollm2-report  shells/quickstart_smollm2.sh's summary.md and loss plot: every model's held-out loss over depth,
              the verdict (depth vs r=1, vs the static baseline, gap to the 30-layer base), tokens and FLOPs,
              the generation, stage times.
report        plot_evals.py's figures of OUT/runs/{recurrent,baseline} (retrofit.analysis.reporting), the loss plot, the summary.

How each run trained (steps, tokens per step, curriculum) comes from its run.json (written by train.py),
so none of it is passed here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# The quickstart's lm-eval tasks (utils/make_synthetic_data.py): (headline metric, title, chance),
# read from the one task table plot_evals.py and paper_plots share.
from retrofit.atomic import write_file_atomic
from retrofit.analysis.results import task_chance, task_metric, task_title

QUICKSTART_TASKS = {
    task: (task_metric(task), task_title(task), task_chance(task))
    for task in ("quickstart_gsm8k_cot_sean", "quickstart_arith_mc")
}
RUN_LABELS = {"recurrent": "recurrent", "baseline": "baseline (static)", "pretrain": "pretrained (static)"}


# ------------------------------------------------------------------------------------ static loss


def static_loss(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from retrofit.model.configuration_raven import RavenConfig
    from retrofit.model.loading import quiet_transformers_bars
    from retrofit.evaluate.loss_over_depth import EvalError, inputs_and_labels, load_eval_rows, per_sequence_loss
    from retrofit.data.rows import DataError

    try:
        rows, mask = load_eval_rows(args.eval_file_path, args.num_sequences)
    except (EvalError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for model_dir, out in args.model:
        if Path(out).exists():
            print(f"skip {model_dir}: {out} exists")
            continue
        quiet_transformers_bars()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        if getattr(model.config, "model_type", None) == RavenConfig.model_type:
            print(f"error: {model_dir} is a recurrent model; use multi_recurrence_eval.py", file=sys.stderr)
            return 2
        batches = []
        with torch.no_grad():
            for start in range(0, len(rows), args.batch_size):
                input_ids, attention_mask, labels = inputs_and_labels(rows[start:start + args.batch_size],
                                                                      mask[start:start + args.batch_size])
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                batches.append(per_sequence_loss(logits, labels).tolist())
        write_file_atomic(Path(out), json.dumps({"1": batches}))
        flat = [x for b in batches for x in b]
        print(f"{model_dir}: {len(flat)} sequences, loss {sum(flat) / len(flat):.4f} -> {out}")
    return 0


# ---------------------------------------------------------------------------------------- plots


def plot_evals(out: Path) -> None:
    """plot_evals.py's table and figures of the recurrent and baseline runs, as their run.json describe them."""
    from retrofit.analysis.reporting import collect_and_plot
    from retrofit.analysis.results import RunSpec
    from retrofit.train.run_record import read_run_record, record_schedule

    runs = out / "runs"
    schedule = record_schedule(read_run_record(runs / "recurrent"))
    specs = [RunSpec(path=runs / "recurrent", label=f"recurrent (train rec {schedule.max_mean_rec})"),
             RunSpec(path=runs / "baseline", label="baseline (static)")]
    rows, table, written = collect_and_plot(specs, out / "plots", formats=("png", "pdf"))
    print(f"wrote {len(rows)} rows to {table} and {len(written)} figures")


def mean_losses(path: Path) -> dict[int, float]:
    """{recurrence: mean loss over sequences} of a multi_recurrence_eval.py JSON."""
    data = json.loads(path.read_text())
    out = {}
    for rec, batches in data.items():
        if not rec.isdigit():
            continue
        flat = [x for batch in batches for x in batch]
        out[int(rec)] = sum(flat) / len(flat)
    return dict(sorted(out.items()))


def plot_loss(args) -> int:
    loss_dir = Path(args.loss_dir)
    curves = {}
    for run, label in RUN_LABELS.items():
        path = loss_dir / run / "final_checkpoint.json"
        if path.exists():
            curves[label] = (mean_losses(path), run == "recurrent")
    if not curves:
        print(f"error: no loss files under {loss_dir}", file=sys.stderr)
        return 2
    draw_loss_plot(curves, Path(args.out_dir))
    return 0


def draw_loss_plot(curves: dict[str, tuple[dict[int, float], bool]], out_dir: Path) -> None:
    """Validation loss against test recurrence: {label: (losses, recurrent?)}; a static model is a
    horizontal line at its one value."""
    from retrofit.analysis import plotting

    plotting.apply_style()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    colors = plotting.colors_for(curves)
    handles = []
    for label, (losses, recurrent) in curves.items():
        if recurrent:
            (line,) = ax.plot(list(losses), list(losses.values()), marker="o", color=colors[label], label=label)
        else:
            line = ax.axhline(losses[1], color=colors[label], linestyle="--", linewidth=2, label=label)
        handles.append(line)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(plotting.AXIS_LABELS["num_rec"])
    ax.set_ylabel("Validation loss (nats/token)")
    ax.set_title("Held-out loss vs test recurrence")
    plotting.legend_outside(fig, handles)
    written = plotting.save_figure(fig, out_dir, "loss_vs_num_rec", plotting.FORMATS)
    print("wrote " + ", ".join(map(str, written)))


# -------------------------------------------------------------------------------------- summary


def final_train_loss(run_dir: Path) -> tuple[int, float] | tuple[None, None]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return None, None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return (records[-1]["step"], records[-1]["loss"]) if records else (None, None)


def lm_eval_scores(checkpoint: Path) -> dict[tuple[str, str], tuple[float, float | None]]:
    """{(eval folder: rec_R | non_recurrent, task): (score, stderr)} from shells/eval.sh's results files."""
    scores = {}
    for file in sorted((checkpoint / "eval").glob("*/*/*/results_*.json")):  # newest last, so it wins
        data = json.loads(file.read_text())
        folder = file.relative_to(checkpoint / "eval").parts[0]
        for task, (metric, _, _) in QUICKSTART_TASKS.items():
            metrics = data.get("results", {}).get(task)
            if metrics and metric in metrics:
                name, _, filt = metric.partition(",")
                stderr = metrics.get(f"{name}_stderr,{filt}")
                scores[(folder, task)] = (float(metrics[metric]), stderr if isinstance(stderr, (int, float)) else None)
    return scores


def stage_times(path: Path) -> dict[str, float]:
    times = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, seconds = line.partition("\t")
            if seconds:
                times[name] = float(seconds)  # the latest run of a stage wins
    return times


def total_seconds(times: dict[str, float], groups: tuple[str, ...]) -> float:
    """Wall time of a quickstart: each group (two parts run side by side, recorded as GROUP and as
    GROUP_part) counts once, by its own entry, else by its slowest part."""
    total = 0.0
    for name, seconds in times.items():
        group = next((g for g in groups if name.startswith(g + "_")), None)
        if group is None:
            total += seconds
        elif group not in times:  # a group finished over several invocations: count its slowest part
            total += seconds if seconds == max(v for n, v in times.items() if n.startswith(group + "_")) else 0.0
    return total


def fmt_loss(value):
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def summary(args) -> int:
    from retrofit.analysis.reporting import count, flops_report
    from retrofit.train.run_record import read_run_record, record_schedule

    out = Path(args.out_dir)
    runs = out / "runs"
    eval_recs = [int(r) for r in args.eval_recs.replace(",", " ").split()]
    # Training: steps, FLOPs (param_counter.py's numbers, from each final checkpoint's run.json), final train loss.
    flops = {run: flops_report(runs / run / "final_checkpoint") for run in RUN_LABELS}
    record = read_run_record(runs / "recurrent")
    schedule = record_schedule(record)
    curriculum, backprop = schedule.mean_recurrence_schedule, schedule.mean_backprop_depth_schedule
    recurrent_config = json.loads((runs / "recurrent/final_checkpoint/config.json").read_text())
    counts = count(runs / "recurrent/final_checkpoint", [1])
    lines = ["# Quickstart summary", ""]
    lines += training_section(runs, flops, record["tokens_per_step"], recurrent_config, curriculum, backprop)
    lines += loss_section(out / "loss_over_rec_eval", recurrent_config, curriculum)
    lines += lm_eval_section(runs, eval_recs, args.limit)
    lines += parameters_section(counts)
    lines += figures_section(out)
    lines += times_section(out)
    write_file_atomic(out / "summary.md", "\n".join(lines) + "\n")
    print(f"wrote {out / 'summary.md'}")
    return 0


def training_section(runs: Path, flops: dict, tokens_per_step: int, recurrent_config: dict, curriculum, backprop) -> list[str]:
    lines = []
    lines += [
        "## Training",
        "",
        f"{tokens_per_step:,} tokens per step. The recurrent model is the pretrained Llama converted to "
        f"(prelude {recurrent_config['n_layers_in_prelude']}, recurrent block "
        f"{recurrent_config['n_layers_in_recurrent_block']}, coda {recurrent_config['n_layers_in_coda']}) layers and "
        f"trained with a {curriculum.warmup_type} curriculum to mean recurrence {curriculum.max_mean_rec} over "
        f"{curriculum.warmup:.0%} of its steps (backprop depth {backprop.max_backprop}); the baseline trains the "
        "pretrained Llama for the same steps and tokens. How each run trained is read from its run.json. "
        "FLOPs: param_counter.py (6·N·D per step, plus 2·N_rec·D per no-grad iteration).",
        "",
        "| run | model | train steps | tokens | training FLOPs | final train loss |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for run, model in (("pretrain", "Llama, from scratch"), ("recurrent", "recurrent (converted)"),
                       ("baseline", "Llama (pretrained)")):
        step, loss = final_train_loss(runs / run)
        tokens = (step or 0) * flops[run]["tokens_per_step"]
        lines.append(f"| {RUN_LABELS[run]} | {model} | {step if step is not None else '–'} | {tokens:,} | "
                     f"{flops[run]['FLOPs']:.3e} | {fmt_loss(loss)} |")

    ratio = flops["recurrent"]["FLOPs"] / flops["baseline"]["FLOPs"]
    lines += ["", f"Both runs start from the pretrained Llama (whose FLOPs they share); for the same tokens the "
              f"recurrent run spent {ratio:.2f}× the baseline's FLOPs."]

    return lines


def loss_section(loss_dir: Path, recurrent_config: dict, curriculum) -> list[str]:
    """Validation loss at each recurrence."""
    lines = []
    losses = {run: mean_losses(loss_dir / run / "final_checkpoint.json")
              for run in RUN_LABELS if (loss_dir / run / "final_checkpoint.json").exists()}
    recs = sorted({r for run_losses in losses.values() for r in run_losses})
    first = (losses.get("recurrent") or {})
    num_sequences = None
    if (loss_dir / "recurrent/final_checkpoint.json").exists():
        num_sequences = sum(len(b) for b in json.loads((loss_dir / "recurrent/final_checkpoint.json").read_text())["1"])
    std = float((recurrent_config.get("init_values") or {}).get("std", 0.0))
    state = (f"a random initial state (TruncNormal std {std:g}, seeded)" if std > 0
             else "a deterministic zero initial state (init_values.std = 0)")
    lines += [
        "",
        "## Validation loss vs test recurrence",
        "",
        f"Mean next-token loss (nats) on the first {num_sequences or '?'} rows of the held-out shard "
        f"(parquet/val). The recurrent model starts from {state} in every evaluation, the default of the "
        "converted config; static models have one value (their depth is fixed).",
        "",
        "| run | " + " | ".join(f"r={r}" for r in recs) + " |",
        "|---|" + "---:|" * len(recs),
    ]
    for run, run_losses in losses.items():
        cells = [fmt_loss(run_losses.get(r)) if run == "recurrent" else (fmt_loss(run_losses[1]) if r == 1 else "")
                 for r in recs]
        lines.append(f"| {RUN_LABELS[run]} | " + " | ".join(cells) + " |")
    if first:
        best = min(first, key=first.get)
        lines += ["", f"Lowest recurrent loss {first[best]:.3f} at r={best} (trained at mean recurrence {curriculum.max_mean_rec})."]

    return lines


def lm_eval_section(runs: Path, eval_recs: list[int], limit) -> list[str]:
    lines = []
    rec_scores = lm_eval_scores(runs / "recurrent/final_checkpoint")
    base_scores = lm_eval_scores(runs / "baseline/final_checkpoint")
    lines += [
        "",
        "## lm-eval accuracy",
        "",
        f"shells/eval.sh, 1-shot, first {limit} documents of each held-out task. "
        "Synthetic GSM8K: exact match of the last number generated (flexible-extract), greedy; "
        "multiple choice: acc (4 choices, chance 25%).",
        "",
        "| task | " + " | ".join(f"recurrent r={r}" for r in eval_recs) + " | baseline (static) |",
        "|---|" + "---:|" * (len(eval_recs) + 1),
    ]

    def cell(scores, key):
        if key not in scores:
            return "–"
        value, stderr = scores[key]
        return f"{100 * value:.1f}%" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")

    for task, (_, title, _) in QUICKSTART_TASKS.items():
        cells = [cell(rec_scores, (f"rec_{r}", task)) for r in eval_recs] + [cell(base_scores, ("non_recurrent", task))]
        lines.append(f"| {title} (`{task}`) | " + " | ".join(cells) + " |")

    return lines


def parameters_section(counts: dict) -> list[str]:
    lines = []
    parts = counts["parts"]
    lines += [
        "",
        "## Parameters",
        "",
        "Recurrent model: " + ", ".join(f"{k} {v:,}" for k, v in parts.items())
        + f"; effective non-embedding parameters at r: N_prelude + N_coda + r·N_rec "
        f"({counts['effective_params']['1']:,} at r=1).",
    ]

    return lines


def figures_section(out: Path) -> list[str]:
    lines = []
    plots = out / "plots"
    figures = sorted(p for p in plots.glob("*.png"))
    lines += ["", "## Figures", ""] + [f"- `{p.relative_to(out)}` (and `.pdf`)" for p in figures]
    if (plots / "results.jsonl").exists():
        lines.append(f"- `{(plots / 'results.jsonl').relative_to(out)}`: the accuracy table plot_evals.py drew")

    return lines


def times_section(out: Path) -> list[str]:
    """Stage wall times, and their total counting each side-by-side group once."""
    lines = []
    times = stage_times(out / "stage_times.tsv")
    times.pop("report", None)  # a previous report's time; this one is still running
    lines += ["", "## Stage wall times", "",
              "Seconds on this machine, from the run that did the work (`train`, `val_loss` and `lm_eval` are the "
              "wall time of two processes running side by side; their parts are listed too).", "",
              "| stage | seconds |", "|---|---:|"]
    for name, seconds in times.items():
        lines.append(f"| {name} | {seconds:.1f} |")
    total = total_seconds(times, ("train", "val_loss", "lm_eval"))
    lines.append(f"| **total** (all but the plots and this summary) | {total:.1f} |")

    return lines


def markdown_table(summary_text: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the markdown table under `## heading` of a summary.md, header row included."""
    section = summary_text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]


def summary_figures(summary_text: str) -> dict:
    """The figures of a summary.md that the README quotes: the recurrent model's validation loss at
    r=1, its lowest (as printed, 3 decimals) and the first depth that reaches it, the baseline's
    loss, the synthetic GSM8K accuracies (recurrent: lowest and highest over the depths evaluated)
    and the stage seconds (rounded)."""
    losses = markdown_table(summary_text, "Validation loss vs test recurrence")
    depths = [int(c.removeprefix("r=")) for c in losses[0][1:]]
    rows = {row[0]: row[1:] for row in losses[1:]}
    recurrent = [float(c) for c in rows["recurrent"]]
    lowest = min(recurrent)
    accuracy = markdown_table(summary_text, "lm-eval accuracy")
    header, gsm8k = accuracy[0], next(row for row in accuracy[1:] if "`quickstart_gsm8k_cot_sean`" in row[0])
    percent = {h: float(c.split("%")[0]) for h, c in zip(header[1:], gsm8k[1:])}
    recurrent_acc = [v for h, v in percent.items() if h.startswith("recurrent")]
    times = {row[0]: round(float(row[1])) for row in markdown_table(summary_text, "Stage wall times")[1:]
             if not row[0].startswith("**")}
    return {
        "loss_r1": recurrent[0],
        "loss_lowest": lowest,
        "lowest_from_r": depths[recurrent.index(lowest)],
        "loss_baseline": float(rows["baseline (static)"][0]),
        "gsm8k_recurrent": (min(recurrent_acc), max(recurrent_acc)),
        "gsm8k_baseline": percent["baseline (static)"],
        "seconds": times,
    }


def report(args) -> int:
    """plot_evals.py's figures, the loss plot and the summary, in one process (one set of imports)."""
    out = Path(args.out_dir)
    plot_evals(out)
    status = plot_loss(argparse.Namespace(loss_dir=str(out / "loss_over_rec_eval"), out_dir=str(out / "plots")))
    return status or summary(args)


# ------------------------------------------------------------------ shells/quickstart_smollm2.sh


# The real quickstart's loss files (OUT/loss_over_rec_eval/...): label, path, recurrent?
SMOLLM2_CURVES = (
    ("30-layer base", "base/base.json", False),
    ("converted, default adapter", "models/recurrent-default.json", True),
    ("converted, identity adapter", "models/recurrent-identity.json", True),
    ("healed recurrent", "recurrent/final_checkpoint.json", True),
    ("healed static baseline", "baseline/final_checkpoint.json", False),
)


def ranges_text(indices: list[int]) -> str:
    """[0, 1, 2, 7, 8] -> '0-2,7-8' (the converter's index syntax)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def smollm2_verdict(curves: dict[str, dict[int, float]]) -> list[str]:
    """The issue's questions, answered from the losses: does depth help after healing, does the
    recurrent model beat the static baseline healed on the same tokens, how far is the 30-layer base."""
    healed, static, base = (curves.get(k) for k in ("healed recurrent", "healed static baseline", "30-layer base"))
    if not healed or 1 not in healed:
        return []
    deep = {r: v for r, v in healed.items() if r >= 4}
    lines = []
    if deep:
        best = min(deep, key=deep.get)
        lines.append(f"- Healed recurrent: best loss at r >= 4 is {deep[best]:.3f} (r={best}) against {healed[1]:.3f} at r=1: "
                     f"depth {'helps' if deep[best] < healed[1] else 'does not help'} "
                     f"({deep[best] - healed[1]:+.3f}); every r >= 4 below r=1: {'yes' if max(deep.values()) < healed[1] else 'no'}.")
        if static:
            lines.append(f"- Against the static baseline healed on the same tokens ({static[1]:.3f}): "
                         f"{deep[best] - static[1]:+.3f} at r={best}, {healed[1] - static[1]:+.3f} at r=1.")
        if base:
            lines.append(f"- Gap to the 30-layer base ({base[1]:.3f}): {deep[best] - base[1]:+.3f} at r={best}"
                         + (f"; static baseline {static[1] - base[1]:+.3f}." if static else "."))
    return lines


def smollm2_report(args) -> int:
    """OUT/summary.md and OUT/plots/loss_vs_num_rec.* of shells/quickstart_smollm2.sh."""
    from retrofit.analysis.reporting import flops_report

    out = Path(args.out_dir)
    loss_dir, runs = out / "loss_over_rec_eval", out / "runs"
    curves = {label: mean_losses(loss_dir / rel) for label, rel, _ in SMOLLM2_CURVES if (loss_dir / rel).exists()}
    if not curves:
        print(f"error: no loss files under {loss_dir}", file=sys.stderr)
        return 2
    recurrent = {label for label, _, is_recurrent in SMOLLM2_CURVES if is_recurrent}
    draw_loss_plot({label: (losses, label in recurrent) for label, losses in curves.items()}, out / "plots")

    config = json.loads((runs / "recurrent/final_checkpoint/config.json").read_text())
    shape = tuple(config[k] for k in ("n_layers_in_prelude", "n_layers_in_recurrent_block", "n_layers_in_coda"))
    source = config.get("source_layers") or {}
    split = " | ".join(ranges_text(source.get(part, [])) for part in ("prelude", "core_block", "coda"))
    num_sequences = len([x for b in json.loads((loss_dir / SMOLLM2_CURVES[0][1]).read_text())["1"] for x in b]) \
        if (loss_dir / SMOLLM2_CURVES[0][1]).exists() else "?"
    recs = sorted({r for losses in curves.values() for r in losses})
    lines = [
        "# Real-base quickstart summary (SmolLM2-135M-Instruct)", "",
        f"Base: SmolLM2-135M-Instruct (30 layers) from the pinned GGUF. Recurrent model: base layers {split} as "
        f"(prelude, recurrent block, coda) = {shape}, {sum(shape)} of 30 layers kept. Static baseline: the same kept "
        "layers as a plain Llama, no recurrence.", "",
        "## Validation loss vs test recurrence", "",
        f"Mean next-token loss (nats) on the first {num_sequences} rows of the held-out Python documentation topics "
        "(parquet/val, never trained on). Static models have one value.", "",
        "| model | " + " | ".join(f"r={r}" for r in recs) + " |",
        "|---|" + "---:|" * len(recs),
    ]
    for label, losses in curves.items():
        cells = [fmt_loss(losses.get(r)) if label in recurrent else (fmt_loss(losses[1]) if r == 1 else "") for r in recs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [""] + smollm2_verdict(curves)

    lines += ["", "## Healing", "",
              "Both runs read the same rows in the same order (equal tokens); FLOPs from param_counter.py's count "
              "(retrofit.analysis.reporting).", "",
              "| run | steps | tokens | training FLOPs | final train loss |", "|---|---:|---:|---:|---:|"]
    flops = {}
    for run in ("recurrent", "baseline"):
        checkpoint = runs / run / "final_checkpoint"
        if not checkpoint.exists():
            continue
        flops[run] = flops_report(checkpoint)
        step, loss = final_train_loss(runs / run)
        tokens = (step or 0) * flops[run]["tokens_per_step"]
        lines.append(f"| {run} | {step if step is not None else '–'} | {tokens:,} | {flops[run]['FLOPs']:.3e} | {fmt_loss(loss)} |")
    if len(flops) == 2:
        lines += ["", f"At equal tokens the recurrent run spent {flops['recurrent']['FLOPs'] / flops['baseline']['FLOPs']:.2f}× "
                  "the baseline's training FLOPs."]

    generation = out / "generation.txt"
    if generation.exists():
        lines += ["", f"## Generation (healed model, chat template, r={config.get('mean_recurrence')})", "",
                  f"Prompt: {args.prompt}", "", "```", generation.read_text().strip(), "```"]

    times = stage_times(out / "stage_times.tsv")
    times.pop("report", None)
    lines += ["", "## Stage wall times", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in times.items()]
    lines.append(f"| **total** (train and val_loss: two processes side by side, counted once) | "
                 f"{total_seconds(times, ('train', 'val_loss')):.1f} |")
    write_file_atomic(out / "summary.md", "\n".join(lines) + "\n")
    print(f"wrote {out / 'summary.md'}")
    return 0


# -------------------------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("static-loss", help="validation loss of plain HF models")
    p.add_argument("--eval_file_path", required=True)
    p.add_argument("--num_sequences", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--model", nargs=2, action="append", required=True, metavar=("MODEL_DIR", "OUT_JSON"))
    p = sub.add_parser("plot-loss", help="validation loss vs test recurrence")
    p.add_argument("--loss_dir", required=True)
    p.add_argument("--out_dir", required=True)
    for name in ("summary", "report"):
        p = sub.add_parser(name, help="write OUT/summary.md" if name == "summary" else "plots, then the summary")
        add_summary_args(p)
    p = sub.add_parser("smollm2-report", help="summary and loss plot of shells/quickstart_smollm2.sh")
    p.add_argument("--out_dir", required=True, help="the real quickstart's output folder")
    p.add_argument("--prompt", required=True, help="the generation stage's prompt, for the text")
    args = parser.parse_args(argv)
    return {"static-loss": static_loss, "plot-loss": plot_loss, "summary": summary, "report": report,
            "smollm2-report": smollm2_report}[args.command](args)


def add_summary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out_dir", required=True, help="the quickstart's output folder (runs/ holds the runs and their run.json)")
    p.add_argument("--limit", type=int, required=True, help="lm-eval documents per task (for the text)")
    p.add_argument("--eval_recs", required=True)


if __name__ == "__main__":
    sys.exit(main())
