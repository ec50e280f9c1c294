"""Mean recurrence vs training step for the linear and 1-sqrt curricula (the paper's schedule figure).

The curves come from retrofit.depth.RecurrenceSchedule.at (the paper's counting convention); the legend gives
each curriculum's summed mean recurrence over the run (its cost in recurrent-block iterations).

    python paper_plots/scheduling_options.py --out_dir figs [--max_steps 6125 --warmup 0.5 --max_mean_rec 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from retrofit import plotting
from retrofit.depth import WARMUP_TYPES
from retrofit.flops import make_schedule, summed_mean_recurrence

plt = plotting.plt


def schedule_curves(max_steps: int, warmup: float, max_mean_rec: int) -> dict:
    """warmup type -> (mean recurrence at steps 1..max_steps, their sum)."""
    curves = {}
    for warmup_type in WARMUP_TYPES:
        schedule = make_schedule(max_steps, max_mean_rec, warmup, warmup_type)
        values = [schedule.at(step)[0] for step in range(1, max_steps + 1)]
        total = summed_mean_recurrence(schedule, max_steps)
        assert total == sum(values)
        curves[warmup_type] = (values, total)
    return curves


def plot_schedules(out_dir, formats=plotting.FORMATS, max_steps: int = 6125, warmup: float = 0.5,
                   max_mean_rec: int = 32, name: str = "scheduling_options") -> list[Path]:
    plotting.apply_style(font_size=12)
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    steps = list(range(1, max_steps + 1))
    for warmup_type, (values, total) in schedule_curves(max_steps, warmup, max_mean_rec).items():
        ax.plot(steps, values, linewidth=2.5, label=f"{warmup_type}: $\\Sigma\\,\\bar{{r}}$ = {total:,}")
    ax.set_xlabel(plotting.AXIS_LABELS["step"])
    plotting.format_x(ax, "step")
    ax.set_ylabel("Mean recurrence (iterations)")
    ax.set_title(f"Curriculum over {warmup:.0%} of {max_steps:,} steps to {max_mean_rec}")
    ax.legend(title="Curriculum (summed over the run)", loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return plotting.save_figure(fig, out_dir, name, formats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=6125)
    parser.add_argument("--warmup", type=float, default=0.5, help="fraction of max_steps the curriculum ramps over")
    parser.add_argument("--max_mean_rec", type=int, default=32)
    parser.add_argument("--format", default="both", choices=("pdf", "png", "both"))
    args = parser.parse_args(argv)
    formats = plotting.FORMATS if args.format == "both" else (args.format,)
    try:
        written = plot_schedules(args.out_dir, formats, args.max_steps, args.warmup, args.max_mean_rec)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
