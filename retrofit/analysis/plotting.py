"""The shared figure style and the plot primitives of plot_evals.py and paper_plots/, and their figures.

Imports matplotlib but neither torch nor transformers (tests/test_analysis_flops.py checks it).

Rows are dicts of the paper_data schema (see retrofit/analysis/results.py). Accuracy is drawn in percent.
Style: a serif font found on this machine, the Okabe-Ito colour-blind-safe palette, labelled axes
with units, legends outside the data, PDF (TrueType fonts embedded) and/or PNG, Agg backend.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from retrofit.atomic import atomic_file  # noqa: E402
from retrofit.train.depth import WARMUP_TYPES, MeanRecurrenceSchedule, RecurrenceSchedule  # noqa: E402
from retrofit.analysis.results import task_chance, task_title  # noqa: E402

# Okabe & Ito (2008), distinguishable with the common colour-vision deficiencies. Yellow last:
# it is the weakest on white.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]
REC_MARKERS = {1: "o", 2: "s", 4: "D", 8: "X", 16: "^", 32: "P", 64: "v"}
SERIF_PREFERENCE = ["Times New Roman", "Nimbus Roman", "TeX Gyre Termes", "Liberation Serif", "DejaVu Serif"]
FORMATS = ("pdf", "png")

AXIS_LABELS = {
    "acc": "Accuracy (%)",
    "chkpt": "Training step (optimizer steps)",
    "FLOPs": "Training compute (FLOPs)",
    "num_rec": "Test recurrence (iterations)",
    "effective_params": "Effective parameters",
    "step": "Training step (optimizer steps)",
}


def apply_style(font_size: float = 11) -> str:
    """Set the rcParams every figure shares; returns the serif font in use."""
    available = {f.name for f in font_manager.fontManager.ttflist}
    serif = [name for name in SERIF_PREFERENCE if name in available] or ["DejaVu Serif"]
    plt.rcParams.update(
        {
            "font.family": "serif",
            "font.serif": serif,
            "mathtext.fontset": "dejavuserif",
            "font.size": font_size,
            "axes.titlesize": font_size + 1,
            "axes.labelsize": font_size,
            "legend.fontsize": font_size - 1,
            "axes.prop_cycle": plt.cycler(color=PALETTE),
            "axes.grid": True,
            "grid.linestyle": "--",
            "grid.alpha": 0.5,
            "lines.linewidth": 2,
            "lines.markersize": 5,
            "savefig.dpi": 150,
            "savefig.bbox": "tight",
            "pdf.fonttype": 42,  # embed TrueType, editable text in PDFs
        }
    )
    return serif[0]


def series_label(name: str) -> str:
    """One-line legend text (paper labels contain newlines)."""
    return " ".join(str(name).split())


def colors_for(names) -> dict:
    """A stable colour per series name, in first-seen order."""
    unique = list(dict.fromkeys(names))
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(unique)}


def is_static(rows: list[dict]) -> bool:
    """A non-recurrent model: trained at recurrence 1 and only ever tested at 1."""
    return all(r.get("train_rec") == 1 and r["num_rec"] == 1 for r in rows)


def several_recs_per_run(rows: list[dict]) -> bool:
    """Whether some run appears at more than one test recurrence (then markers tell them apart)."""
    return any(len({r["num_rec"] for r in rr}) > 1 for rr in group_by(rows, "model").values())


def group_by(rows, *keys) -> dict:
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys) if len(keys) > 1 else row[keys[0]]].append(row)
    return dict(groups)


def at_final_checkpoint(rows: list[dict]) -> list[dict]:
    """Each run's rows at its own last evaluated checkpoint."""
    out = []
    for run_rows in group_by(rows, "model").values():
        steps = [r["chkpt"] for r in run_rows if r["chkpt"] is not None]
        if steps:
            out.extend(r for r in run_rows if r["chkpt"] == max(steps))
    return out


def at_test_rec(rows: list[dict], test_rec: int | str = "train") -> list[dict]:
    """Rows tested at one recurrence per run: `test_rec` or, with "train", the run's training
    recurrence (its largest tested recurrence if it never tested at that one)."""
    out = []
    for run_rows in group_by(rows, "model").values():
        tested = {r["num_rec"] for r in run_rows}
        if test_rec == "train":
            want = run_rows[0].get("train_rec")
            if want not in tested:
                want = max(tested)
        else:
            want = int(test_rec) if int(test_rec) in tested else (1 if is_static(run_rows) else None)
        out.extend(r for r in run_rows if r["num_rec"] == want)
    return out


def plot_accuracy(ax, rows: list[dict], x: str, colors: dict, *, static_as_line: bool = False,
                  markers_by_rec: bool = True, errorbars: bool = False, line_styles: dict | None = None):
    """One line per (run, test recurrence) of accuracy (%) against column `x`.

    With static_as_line, a non-recurrent run (one point per x) becomes a horizontal line at its
    mean accuracy: how the paper draws the static baseline in accuracy-vs-recurrence panels.
    """
    for model, run_rows in group_by(rows, "model").items():
        color = colors[model]
        if static_as_line and is_static(run_rows):
            accuracy = 100 * sum(r["acc"] for r in run_rows) / len(run_rows)
            ax.axhline(accuracy, color=color, linestyle="--", linewidth=2)
            continue
        # A line joins points that differ only in x: one per test recurrence, or against the
        # recurrence itself one per checkpoint.
        line_key = "chkpt" if x == "num_rec" else "num_rec"
        for _, series in sorted(group_by(run_rows, line_key).items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            num_rec = series[0]["num_rec"]
            series = sorted((r for r in series if r.get(x) is not None), key=lambda r: r[x])
            if not series:
                continue
            xs = [r[x] for r in series]
            ys = [100 * r["acc"] for r in series]
            default_style = "--" if is_static(run_rows) else "-"
            style = dict(color=color, linestyle=(line_styles or {}).get(model, default_style))
            if markers_by_rec and x != "num_rec":
                style["marker"] = REC_MARKERS.get(num_rec, "o")
            elif x == "num_rec" or len(xs) <= 12:
                style["marker"] = "o"
            if errorbars and all(r.get("stderr") is not None for r in series):
                ax.errorbar(xs, ys, yerr=[100 * r["stderr"] for r in series], capsize=2, **style)
            else:
                ax.plot(xs, ys, **style)
    if x == "num_rec":
        recs = sorted({r["num_rec"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(recs)
        ax.set_xticklabels([str(r) for r in recs])
        ax.minorticks_off()
    else:
        format_x(ax, x)
    ax.set_xlabel(AXIS_LABELS.get(x, x))
    ax.set_ylabel(AXIS_LABELS["acc"])


def format_x(ax, x: str):
    """Compact tick labels: 25k for steps, scientific notation for FLOPs."""
    if x == "FLOPs":
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    elif x in ("chkpt", "step"):
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}"))


def chance_line(ax, task: str):
    chance = task_chance(task)
    if chance:
        ax.axhline(100 * chance, color="grey", linestyle=":", linewidth=1.2, label="chance")


def run_legend_handles(colors: dict, rows: list[dict] | None = None, line_styles: dict | None = None) -> list:
    static = set()
    if rows is not None:
        static = {m for m, rr in group_by(rows, "model").items() if is_static(rr)}
    handles = []
    for model, color in colors.items():
        style = (line_styles or {}).get(model, "--" if model in static else "-")
        handles.append(Line2D([0], [0], color=color, linestyle=style, linewidth=2.5, label=series_label(model)))
    return handles


def rec_legend_handles(recs) -> list:
    return [
        Line2D([0], [0], color="black", marker=REC_MARKERS.get(r, "o"), linestyle="none", label=str(r))
        for r in sorted(recs)
    ]


def legend_outside(fig, handles: list, title: str | None = None, where: str = "right", ncol: int = 1, anchor=None):
    """A figure legend beside (right) or under (below) the axes, never over the data."""
    if where == "right":
        loc, default_anchor = "upper left", (1.0, 0.95)
    else:
        loc, default_anchor = "upper center", (0.5, 0.0)
    return fig.legend(handles=handles, title=title, loc=loc, bbox_to_anchor=anchor or default_anchor,
                      ncol=ncol, frameon=False)


def save_figure(fig, out_dir: str | Path, name: str, formats=FORMATS) -> list[Path]:
    """Write `name.{fmt}` for each format atomically (temp file, then rename), close the figure."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown figure format {fmt!r}; expected one of {FORMATS}")
        target = out_dir / f"{name}.{fmt}"
        with atomic_file(target, suffix=f".{fmt}") as tmp:  # savefig infers nothing from the name: format given
            fig.savefig(tmp, format=fmt, bbox_inches="tight")
        written.append(target)
    plt.close(fig)
    return written


def accuracy_figure(panels: list[tuple[list[dict], str]], colors: dict, *, title: str | None = None,
                    task: str | None = None, static_as_line: bool = True, rec_legend: bool = True,
                    line_styles: dict | None = None, panel_width: float = 4.4, height: float = 3.2,
                    legend_where: str = "right", errorbars: bool = False):
    """Accuracy panels side by side (shared y) with one run legend (and a test-recurrence marker
    legend) outside the axes. `panels` is a list of (rows, x column)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels), height), sharey=True, squeeze=False)
    all_rows = []
    rec_legend = rec_legend and any(several_recs_per_run(rows) for rows, x in panels if x != "num_rec")
    for ax, (rows, x) in zip(axes[0], panels):
        plot_accuracy(ax, rows, x, colors, static_as_line=static_as_line and x == "num_rec", line_styles=line_styles,
                      markers_by_rec=rec_legend, errorbars=errorbars)
        if task is not None:
            chance_line(ax, task)
        all_rows.extend(rows)
    for ax in axes[0][1:]:
        ax.set_ylabel("")
    if title:
        fig.suptitle(title)
    used = {r["model"] for r in all_rows}
    handles = run_legend_handles({m: c for m, c in colors.items() if m in used}, all_rows, line_styles)
    if task is not None and task_chance(task):
        handles.append(Line2D([0], [0], color="grey", linestyle=":", linewidth=1.2, label="chance"))
    fig.tight_layout()
    legend_outside(fig, handles, title="Run", where=legend_where,
                   ncol=1 if legend_where == "right" else min(3, len(handles)))
    recs = {r["num_rec"] for rows, x in panels if x != "num_rec" for r in rows}
    if rec_legend and len(recs) > 1:
        # Runs beside the axes, test recurrences (markers) under them: two legends never overlap.
        below = legend_where == "right"
        fig.legend(handles=rec_legend_handles(recs), title="Test recurrence (marker)", frameon=False,
                   loc="upper center" if below else "upper left",
                   bbox_to_anchor=(0.5, 0.0) if below else (1.0, 0.95), ncol=len(recs) if below else 1)
    return fig


def shade(color, fraction: float, max_lighten: float = 0.65, max_darken: float = 0.55):
    """`color` lightened (fraction 0) through itself (0.5) to darkened (1): one hue per run, a shade
    per test recurrence."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    t = 2 * fraction - 1
    if t < 0:
        k = max_lighten * -t
        return (r + (1 - r) * k, g + (1 - g) * k, b + (1 - b) * k)
    k = 1 - max_darken * t
    return (r * k, g * k, b * k)


def task_grid_figure(rows: list[dict], tasks: list[str], x: str, colors: dict, *, ncols: int = 4,
                     shade_by_rec: bool = False, title: str | None = None, panel_size=(3.4, 2.7)):
    """One small accuracy panel per task, shared run legend beside the grid."""
    ncols = min(ncols, len(tasks))
    nrows = -(-len(tasks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False)
    recs = sorted({r["num_rec"] for r in rows})
    markers = x != "num_rec" and several_recs_per_run(rows)
    for i, (ax, task) in enumerate(zip(axes.flat, tasks)):
        task_rows = [r for r in rows if r["task"] == task]
        if shade_by_rec:
            for model, run_rows in group_by(task_rows, "model").items():
                for num_rec, series in sorted(group_by(run_rows, "num_rec").items()):
                    fraction = recs.index(num_rec) / max(1, len(recs) - 1)
                    series = sorted((r for r in series if r.get(x) is not None), key=lambda r: r[x])
                    ax.plot([r[x] for r in series], [100 * r["acc"] for r in series],
                            color=shade(colors[model], fraction), linewidth=1.6)
            ax.set_xlabel(AXIS_LABELS.get(x, x))
            ax.set_ylabel(AXIS_LABELS["acc"])
            format_x(ax, x)
        else:
            plot_accuracy(ax, task_rows, x, colors, static_as_line=x == "num_rec", markers_by_rec=markers)
        chance_line(ax, task)
        ax.set_title(task_title(task))
        if i % ncols:
            ax.set_ylabel("")
        if i < len(tasks) - ncols:
            ax.set_xlabel("")
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    used = {r["model"] for r in rows}
    handles = run_legend_handles({m: c for m, c in colors.items() if m in used}, rows)
    legend_outside(fig, handles, title="Run")
    if shade_by_rec and len(recs) > 1:
        grey = "#555555"
        rec_handles = [Line2D([0], [0], color=shade(grey, i / (len(recs) - 1)), linewidth=3, label=str(r))
                       for i, r in enumerate(recs)]
        fig.legend(handles=rec_handles, title="Test recurrence (darker = more)", frameon=False, loc="upper center",
                   bbox_to_anchor=(0.5, 0.0), ncol=len(recs))
    elif markers:
        fig.legend(handles=rec_legend_handles(recs), title="Test recurrence (marker)", frameon=False,
                   loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(recs))
    return fig


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
RUN_TABLE_X_AXES = ("num_rec", "chkpt", "FLOPs")


def plot_run_table(rows: list[dict], out_dir: str | Path, formats=FORMATS, test_rec="train",
                   errorbars: bool = False, log=None) -> list[Path]:
    """plot_evals.py's figures. Per task: accuracy vs test recurrence, vs checkpoint and vs training
    FLOPs, one line per run; `log` (a logging.Logger) hears about skipped panels."""
    apply_style()
    colors = colors_for(r["model"] for r in rows)
    written = []
    for task, task_rows in group_by(rows, "task").items():
        title = task_title(task)
        for x in RUN_TABLE_X_AXES:
            if x == "num_rec":
                panel_rows, suffix = at_final_checkpoint(task_rows), " (last checkpoint of each run)"
            else:
                panel_rows = [r for r in at_test_rec(task_rows, test_rec) if r.get(x) is not None]
                suffix = " (tested at the training recurrence)" if test_rec == "train" else f" (test recurrence {test_rec})"
            if not panel_rows:
                if log is not None:
                    log.warning("%s: no rows with %s; skipping the %s_vs_%s figure", task, x, task, x)
                continue
            fig = accuracy_figure([(panel_rows, x)], colors, title=title + suffix, task=task,
                                  panel_width=5.5, height=3.6, errorbars=errorbars)
            written += save_figure(fig, out_dir, f"{task}_vs_{x}", formats)
    return written


def schedule_curves(max_steps: int, warmup: float, max_mean_rec: int) -> dict:
    """warmup type -> (mean recurrence at steps 1..max_steps as counted for FLOPs, their sum)."""
    curves = {}
    for warmup_type in WARMUP_TYPES:
        schedule = RecurrenceSchedule(
            max_steps=max_steps,
            mean_recurrence_schedule=MeanRecurrenceSchedule(turn_on=warmup > 0, warmup=warmup,
                                                            max_mean_rec=max_mean_rec, warmup_type=warmup_type),
        )
        values = [schedule.at(step)[0] for step in range(1, max_steps + 1)]
        curves[warmup_type] = (values, sum(values))
    return curves


def plot_schedules(out_dir, formats=FORMATS, max_steps: int = 6125, warmup: float = 0.5,
                   max_mean_rec: int = 32, name: str = "scheduling_options") -> list[Path]:
    """The paper's schedule figure: mean recurrence vs step for the linear and 1-sqrt curricula,
    each labelled with its summed mean recurrence (its cost in recurrent-block iterations)."""
    apply_style(font_size=12)
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    steps = list(range(1, max_steps + 1))
    for warmup_type, (values, total) in schedule_curves(max_steps, warmup, max_mean_rec).items():
        ax.plot(steps, values, linewidth=2.5, label=f"{warmup_type}: $\\Sigma\\,\\bar{{r}}$ = {total:,}")
    ax.set_xlabel(AXIS_LABELS["step"])
    format_x(ax, "step")
    ax.set_ylabel("Mean recurrence (iterations)")
    ax.set_title(f"Curriculum over {warmup:.0%} of {max_steps:,} steps to {max_mean_rec}")
    ax.legend(title="Curriculum (summed over the run)", loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return save_figure(fig, out_dir, name, formats)
