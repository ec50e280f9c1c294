"""Mean recurrence vs training step for the linear and 1-sqrt curricula (the paper's schedule figure).

The figure is retrofit.analysis.plotting.plot_schedules (paper_plots/plot.py draws it too): the curves come from
retrofit.train.depth.RecurrenceSchedule.at (the paper's counting convention); the legend gives each curriculum's
summed mean recurrence over the run (its cost in recurrent-block iterations).

    python paper_plots/scheduling_options.py --out_dir figs [--max_steps 6125 --warmup 0.5 --max_mean_rec 32]
"""

from __future__ import annotations

import argparse
import sys

from retrofit.analysis import plotting


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=6125)
    parser.add_argument("--warmup", type=float, default=0.5, help="fraction of max_steps the curriculum ramps over")
    parser.add_argument("--max_mean_rec", type=int, default=32)
    parser.add_argument("--format", default="both", choices=("pdf", "png", "both"))
    args = parser.parse_args(argv)
    formats = plotting.FORMATS if args.format == "both" else (args.format,)
    try:
        written = plotting.plot_schedules(args.out_dir, formats, args.max_steps, args.warmup, args.max_mean_rec)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
