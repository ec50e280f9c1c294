"""Recreate the paper's evaluation figures from its raw results (the JSONL files in paper_plots/data/).

    python paper_plots/plot.py --out_dir figs [--data_dir paper_plots/data] [--format pdf|png|both]

Figures (file stem: what it shows; input file):
  {family}_{gsm8k|math}_flops_and_recurrence  accuracy vs training FLOPs (tested at the training
        recurrence) and vs test recurrence at the final checkpoint, one line per training recurrence
        (tinyllama_gsm8k_ablate_rec_long, tinyllama_gsm8k_llama_long_4_rec, olmo_50k_steps)
  final_checkpoint_bars         GSM8K / MATH of every final checkpoint at test recurrence 1 and 32
  data_mix_vs_step, data_mix_vs_recurrence  healing: single- vs two-phase training on the data mix
        (tinyllama_nemotron_fineweb_2)
  pretrained_vs_random          Llama-3.2 (2,4,2) from pretrained weights vs random init over
        training, a shade per test recurrence (tinyllama_long_run_table)
  curriculum_shape              linear vs 1-sqrt curriculum, and their length (tinyllama_1_sqrt_app_fig)
  extend_prelude_coda           (4,8,4) vs (7,8,7) (extend_prelude_coda)
  loop_whole_model              TinyLlama shapes on FineWeb-Edu at test recurrence 32 (loop_whole_model)
  scheduling_options            the two curriculum shapes (retrofit.analysis.plotting.plot_schedules)

The same plotting primitives draw plot_evals.py's figures of your own runs (retrofit/analysis/plotting.py).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path


from retrofit.analysis import plotting
from retrofit.analysis.results import read_jsonl

log = logging.getLogger("paper_plots")
# The authors' published results ship with the repository (see data/README.md for the columns).
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"
plt = plotting.plt

MATH_TASKS = {"gsm8k_cot_sean": "gsm8k", "minerva_math": "math"}
# family -> (data file, optimizer step of the final checkpoint)
MATH_RUNS = {
    "tinyllama": ("tinyllama_gsm8k_ablate_rec_long.jsonl", 50_000),
    "llama": ("tinyllama_gsm8k_llama_long_4_rec.jsonl", 48_000),
    "olmo": ("olmo_50k_steps.jsonl", 48_000),
}
FAMILY_TITLES = {"tinyllama": "TinyLlama-1.1B (4,8,4)", "llama": "Llama-3.2-1B (4,6,4)", "olmo": "OLMo-2-1B (4,6,4)"}
GENERAL_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "winogrande", "mmlu", "piqa", "openbookqa", "social_iqa"]


def clean_label(name: str) -> str:
    """Legend text: one line, the static baselines named as such, no internal run tags."""
    name = " ".join(str(name).split()).replace(" 75 sqrt", "")
    return re.sub(r"^(TinyLlama|Llama|Olmo)\S*\s+Static Depth", r"\1 static depth", name)


def load(data_dir: Path, file_name: str) -> list[dict]:
    rows = read_jsonl(data_dir / file_name)
    for row in rows:
        row["model"] = clean_label(row["model"])
    return rows


def ordered_colors(rows: list[dict]) -> dict:
    """Static baselines first, then runs by training recurrence: colours follow depth."""
    runs = {r["model"]: r.get("train_rec", 0) for r in rows}
    return plotting.colors_for(sorted(runs, key=lambda m: (runs[m], m)))


def math_figures(data_dir: Path, out_dir: Path, formats) -> list[Path]:
    written = []
    for family, (file_name, final_step) in MATH_RUNS.items():
        rows = load(data_dir, file_name)
        colors = ordered_colors(rows)
        for task, short in MATH_TASKS.items():
            task_rows = [r for r in rows if r["task"] == task]
            vs_flops = [r for r in task_rows if r["num_rec"] == r["train_rec"]]
            final = [r for r in task_rows if r["chkpt"] == final_step]
            fig = plotting.accuracy_figure(
                [(vs_flops, "FLOPs"), (final, "num_rec")], colors, task=task, rec_legend=False,
                title=f"{FAMILY_TITLES[family]}: {plotting.task_title(task)} (left: tested at the training "
                      f"recurrence; right: step {final_step:,})")
            written += plotting.save_figure(fig, out_dir, f"{family}_{short}_flops_and_recurrence", formats)
    return written


def final_checkpoint_bars(data_dir: Path, out_dir: Path, formats, test_recs=(1, 32)) -> list[Path]:
    """Grouped bars: per family, per training recurrence, GSM8K and MATH at test recurrence 1 and 32."""
    fig, ax = plt.subplots(figsize=(13, 3.6))
    task_colors = {"gsm8k_cot_sean": plotting.PALETTE[0], "minerva_math": plotting.PALETTE[1]}
    width, x, ticks, labels, sections = 0.2, 0.0, [], [], []
    for family, (file_name, final_step) in MATH_RUNS.items():
        rows = [r for r in load(data_dir, file_name) if r["chkpt"] == final_step and r["task"] in task_colors]
        start = x
        for train_rec in sorted({r["train_rec"] for r in rows}):
            slot = 0
            for task, color in task_colors.items():
                for test_rec in test_recs:
                    match = [r for r in rows if r["train_rec"] == train_rec and r["task"] == task
                             and r["num_rec"] == test_rec]
                    if match:
                        ax.bar(x + slot * width, 100 * match[0]["acc"], width, color=color, edgecolor="black",
                               linewidth=0.6, hatch="///" if test_rec != test_recs[0] else None)
                        slot += 1
            ticks.append(x + (slot - 1) * width / 2)
            labels.append("static" if train_rec == 1 else f"train rec {train_rec}")
            x += max(slot, 1) * width + 0.25
        sections.append((start, x - 0.25, FAMILY_TITLES[family]))
        x += 0.35
    top = ax.get_ylim()[1]
    for i, (start, end, title) in enumerate(sections):
        ax.text((start + end) / 2, top * 1.02, title, ha="center", va="bottom")
        if i:
            ax.axvline(start - 0.3, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0, top * 1.12)
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=35, ha="right")
    ax.set_ylabel(plotting.AXIS_LABELS["acc"])
    ax.grid(axis="x", visible=False)
    ax.set_axisbelow(True)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, edgecolor="black", label=plotting.task_title(t)) for t, c in task_colors.items()]
    handles += [Patch(facecolor="white", edgecolor="black", label=f"test recurrence {test_recs[0]}"),
                Patch(facecolor="white", edgecolor="black", hatch="///", label=f"test recurrence {test_recs[1]}")]
    fig.tight_layout()
    plotting.legend_outside(fig, handles, title="Final checkpoints")
    return plotting.save_figure(fig, out_dir, "final_checkpoint_bars", formats)


def data_mix_figures(data_dir: Path, out_dir: Path, formats) -> list[Path]:
    rows = [r for r in load(data_dir, "tinyllama_nemotron_fineweb_2.jsonl") if r["model"] != "tinyllama-hf"]
    colors = ordered_colors(rows)
    tasks = ["gsm8k_cot_sean", "minerva_math"] + GENERAL_TASKS
    final = max(r["chkpt"] for r in rows)
    vs_step = [r for r in rows if r["num_rec"] == r["train_rec"]]
    fig = plotting.task_grid_figure(vs_step, tasks, "chkpt", colors, ncols=5,
                                    title="Data mix and healing (TinyLlama (4,8,4), tested at the training recurrence)")
    written = plotting.save_figure(fig, out_dir, "data_mix_vs_step", formats)
    fig = plotting.task_grid_figure([r for r in rows if r["chkpt"] == final], tasks, "num_rec", colors, ncols=5,
                                    title=f"Data mix and healing at step {final:,}")
    return written + plotting.save_figure(fig, out_dir, "data_mix_vs_recurrence", formats)


def pretrained_vs_random(data_dir: Path, out_dir: Path, formats) -> list[Path]:
    rows = load(data_dir, "tinyllama_long_run_table.jsonl")
    names = {"Llama": "Llama-3.2 (2,4,2) from pretrained weights", "Random": "Llama-3.2 (2,4,2) from random init"}
    for row in rows:
        row["model"] = names.get(row["model"], row["model"])
    colors = plotting.colors_for(names.values())
    tasks = ["hellaswag"] + [t for t in GENERAL_TASKS if t != "hellaswag"] + ["lambada_openai"]
    fig = plotting.task_grid_figure(rows, tasks, "chkpt", colors, ncols=5, shade_by_rec=True,
                                    title="Pretrained vs random initialisation over training")
    return plotting.save_figure(fig, out_dir, "pretrained_vs_random", formats)


def curriculum_shape(data_dir: Path, out_dir: Path, formats) -> list[Path]:
    rows = load(data_dir, "tinyllama_1_sqrt_app_fig.jsonl")
    rows = [r for r in rows if r["num_rec"] == 4 or r["train_rec"] == 1]
    fig = plotting.task_grid_figure(rows, list(MATH_TASKS), "FLOPs", ordered_colors(rows), ncols=2,
                                    panel_size=(4.6, 3.2),
                                    title="Curriculum shape (TinyLlama (4,8,4), train and test recurrence 4)")
    return plotting.save_figure(fig, out_dir, "curriculum_shape", formats)


def extend_prelude_coda(data_dir: Path, out_dir: Path, formats) -> list[Path]:
    rows = load(data_dir, "extend_prelude_coda.jsonl")
    fig = plotting.task_grid_figure(rows, list(MATH_TASKS), "FLOPs", ordered_colors(rows), ncols=2,
                                    panel_size=(4.6, 3.2), title="Longer prelude and coda (test recurrence 16)")
    return plotting.save_figure(fig, out_dir, "extend_prelude_coda", formats)


def loop_whole_model(data_dir: Path, out_dir: Path, formats) -> list[Path]:
    rows = load(data_dir, "loop_whole_model.jsonl")
    rows = [r for r in rows if r["num_rec"] == 32 or r["train_rec"] == 1]
    fig = plotting.task_grid_figure(rows, GENERAL_TASKS, "chkpt", ordered_colors(rows), ncols=4,
                                    title="TinyLlama shapes on FineWeb-Edu (test recurrence 32)")
    return plotting.save_figure(fig, out_dir, "loop_whole_model", formats)


FIGURES = [  # (function, input files it needs)
    (math_figures, [f for f, _ in MATH_RUNS.values()]),
    (final_checkpoint_bars, [f for f, _ in MATH_RUNS.values()]),
    (data_mix_figures, ["tinyllama_nemotron_fineweb_2.jsonl"]),
    (pretrained_vs_random, ["tinyllama_long_run_table.jsonl"]),
    (curriculum_shape, ["tinyllama_1_sqrt_app_fig.jsonl"]),
    (extend_prelude_coda, ["extend_prelude_coda.jsonl"]),
    (loop_whole_model, ["loop_whole_model.jsonl"]),
]


def make_all(data_dir: str | Path, out_dir: str | Path, formats=plotting.FORMATS) -> list[Path]:
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data_dir {str(data_dir)!r} is not a folder (expected the paper_data JSONL files)")
    needed = sorted({f for _, files in FIGURES for f in files})
    missing = [f for f in needed if not (data_dir / f).is_file()]
    if len(missing) == len(needed):
        raise FileNotFoundError(f"--data_dir {str(data_dir)!r} holds none of the paper's files: {needed}")
    plotting.apply_style()
    written = []
    for make, files in FIGURES:
        absent = [f for f in files if f in missing]
        if absent:
            log.warning("skipping %s: %s not in %s", make.__name__, ", ".join(absent), data_dir)
            continue
        plotting.apply_style()
        written += make(data_dir, out_dir, formats)
    written += plotting.plot_schedules(out_dir, formats)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR),
                        help="folder of the paper's JSONL files (default: the copy shipped in paper_plots/data)")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--format", default="both", choices=("pdf", "png", "both"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    formats = plotting.FORMATS if args.format == "both" else (args.format,)
    try:
        written = make_all(args.data_dir, args.out_dir, formats)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
