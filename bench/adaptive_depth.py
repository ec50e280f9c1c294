"""Held-out loss against mean recurrent iterations per token: fixed depths, every adaptive exit
criterion over a threshold sweep, and the learned exit gate (docs/adaptive_depth.md).

For one recurrent checkpoint and the first --num_sequences rows of a held-out parquet shard:
- fixed depth r = 1..--max_depth (one pass, `loss_over_depth`);
- each criterion of the adaptive-exit registry (`exits_raven.EXIT_CRITERIA`: whatever it lists, so new
  criteria appear here without changes) at every threshold of its grid (`DEFAULT_THRESHOLDS`, a
  generic log grid for criteria it does not know, or --thresholds NAME=V,V,...), at most
  --max_depth iterations; `gate` only when the checkpoint has a learned exit gate.
Loss is the mean over sequences of each sequence's mean next-token loss, the number
`multi_recurrence_eval.py` reports; every run starts from the same seeded initial states.

Writes OUT/adaptive_depth.md (the table and the issue's goals: mean iterations at which each
criterion reaches the fixed r = 16 loss within 1%, and each criterion's loss at matched mean
iterations), OUT/adaptive_depth.png and OUT/adaptive_depth.json.

    python bench/adaptive_depth.py runs/quickstart/gated --data runs/quickstart/parquet/val --out runs/quickstart/adaptive

Loss only: the quickstart's GSM-style task scores 2-3 of 50 problems at any depth (README), so its
accuracy cannot tell criteria apart, and each of the ~35 points would be a full lm-eval generation run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_THRESHOLDS = {
    "kl": [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    "latent": [1e-3, 3e-3, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5],
    # 1 - p_stop. A gate trained from the latent-equivalent gate (exit_cost, the default) exits at T
    # about where latent exits at T / (1 - T), shifted by what it learned: stop logits from -6 to 16
    # in steps of 0.5. A remaining_gain gate's labels are soft (p_stop of a token with nothing left
    # to gain is about 0.56), so its useful band around 0.44 is sampled densely as well.
    "gate": sorted({round(1 - 1 / (1 + math.exp(-z / 2)), 12) for z in range(-12, 33)}
                   | {0.3, 0.4, 0.42, 0.44, 0.46, 0.48, 0.5, 0.52, 0.54, 0.56, 0.6, 0.7, 0.9}),
}
GENERIC_THRESHOLDS = [1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
TARGET_DEPTH = 16  # the reference: the fixed r = 16 loss
TOLERANCE = 0.01  # within 1%
MATCHED_DEPTHS = (1.5, 2, 3, 4, 6, 8)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CKPT")
    parser.add_argument("--data", required=True, help="held-out parquet shard or folder")
    parser.add_argument("--out", required=True, help="output folder (created; existing results are replaced)")
    parser.add_argument("--num_sequences", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_depth", type=int, default=32)
    parser.add_argument("--thresholds", action="append", default=[], metavar="NAME=V,V,...",
                        help="a criterion's threshold grid instead of the default (repeatable)")
    parser.add_argument("--criteria", default=None,
                        help="comma-separated subset of the registry to sweep (default: every criterion; the logits ones are slow)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def threshold_grids(criteria, overrides: list[str]) -> dict[str, list[float]]:
    grids = {c: list(DEFAULT_THRESHOLDS.get(c, GENERIC_THRESHOLDS)) for c in criteria}
    for item in overrides:
        name, _, values = item.partition("=")
        if name not in grids:
            raise ValueError(f"--thresholds {item!r}: {name!r} is not one of {', '.join(grids)}")
        try:
            grids[name] = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--thresholds {item!r}: thresholds must be numbers") from None
    return grids


def mean_loss(result, depth: int) -> float:
    return float(np.mean([v for batch in result.losses[depth] for v in batch]))


def measure(model, ids, mask, args, grids) -> dict:
    """{"fixed": [(depth, loss)], criterion: [(threshold, mean iterations, loss)]}."""
    from retrofit.evaluate.loss_over_depth import AdaptiveExit, loss_over_depth

    common = dict(batch_size=args.batch_size, seed=args.seed, progress=False)
    depths = list(range(1, args.max_depth + 1))
    fixed = loss_over_depth(model, ids, mask, depths, **common)
    points = {"fixed": [(r, float(r), mean_loss(fixed, r)) for r in depths]}
    for criterion, grid in grids.items():
        points[criterion] = []
        for threshold in grid:
            start = time.perf_counter()
            result = loss_over_depth(model, ids, mask, [args.max_depth], adaptive=AdaptiveExit(threshold, criterion), **common)
            row = (threshold, result.mean_depth[args.max_depth], mean_loss(result, args.max_depth))
            points[criterion].append(row)
            print(f"{criterion:>8} {threshold:<8g} mean iterations {row[1]:6.2f}  loss {row[2]:.4f}  ({time.perf_counter() - start:.1f}s)")
    return points


def iterations_to_reach(rows, target: float) -> float | None:
    """Fewest mean iterations among a criterion's points whose loss is <= target."""
    reached = [depth for _, depth, loss in rows if loss <= target]
    return min(reached) if reached else None


def loss_at(rows, depth: float) -> float | None:
    """A criterion's loss at `depth` mean iterations: linear between its two nearest points (the
    lower envelope of its points, so a non-monotone sweep is read at its best), None outside."""
    pts = sorted((d, loss) for _, d, loss in rows)
    envelope, best = [], float("inf")
    for d, loss in pts:
        best = min(best, loss)
        envelope.append((d, best))
    if not envelope or depth < envelope[0][0] or depth > envelope[-1][0]:
        return None
    xs, ys = zip(*envelope)
    return float(np.interp(depth, xs, ys))


def report(points: dict, checkpoint: str, args) -> str:
    fixed_rows = points["fixed"]
    reference = dict((r, loss) for r, _, loss in fixed_rows).get(TARGET_DEPTH)
    lines = [f"# Loss against mean iterations per token: {checkpoint}", "",
             f"{args.num_sequences} held-out sequences of `{args.data}`, at most {args.max_depth} iterations.", ""]
    if reference is not None:
        target = reference * (1 + TOLERANCE)
        lines += [f"Fixed r = {TARGET_DEPTH} loss: {reference:.4f}; within 1%: <= {target:.4f}.", "",
                  "| criterion | fewest mean iterations within 1% of r = 16 | saved vs 16 |", "|---|---:|---:|"]
        for name, rows in points.items():
            reached = iterations_to_reach(rows, target)
            shown = "not reached" if reached is None else f"{reached:.2f}"
            saved = "" if reached is None else f"{1 - reached / TARGET_DEPTH:.0%}"
            lines.append(f"| {name} | {shown} | {saved} |")
        lines.append("")
    lines += ["Loss at matched mean iterations (lower envelope of each sweep, linear between points):", "",
              "| criterion | " + " | ".join(f"{d:g}" for d in MATCHED_DEPTHS) + " |",
              "|---|" + "---:|" * len(MATCHED_DEPTHS)]
    for name, rows in points.items():
        cells = [loss_at(rows, d) for d in MATCHED_DEPTHS]
        lines.append(f"| {name} | " + " | ".join("–" if c is None else f"{c:.4f}" for c in cells) + " |")
    lines += ["", "All points:", "", "| criterion | threshold / depth | mean iterations | loss |", "|---|---:|---:|---:|"]
    for name, rows in points.items():
        lines += [f"| {name} | {t:g} | {d:.2f} | {loss:.4f} |" for t, d, loss in rows]
    return "\n".join(lines) + "\n"


def plot(points: dict, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in points.items():
        rows = sorted(rows, key=lambda row: row[1])
        style = dict(color="black", marker=".", lw=1.5) if name == "fixed" else dict(marker="o", ms=3, lw=1)
        ax.plot([d for _, d, _ in rows], [loss for _, _, loss in rows], label=name, **style)
    reference = dict((r, loss) for r, _, loss in points["fixed"]).get(TARGET_DEPTH)
    if reference is not None:
        ax.axhline(reference * (1 + TOLERANCE), color="grey", ls="--", lw=0.8, label="fixed r=16 + 1%")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean recurrent iterations per token")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "adaptive_depth.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from retrofit.evaluate.loss_over_depth import load_eval_rows
        from retrofit.model.exits_raven import EXIT_CRITERIA as ADAPTIVE_CRITERIA
        from retrofit.model.loading import load_saved_model
        from retrofit.train.distributed import resolve_device

        model = load_saved_model(args.checkpoint).to(resolve_device(args.device)).eval()
        criteria = [c for c in ADAPTIVE_CRITERIA if c != "gate" or getattr(model, "exit_gate", None) is not None]
        if args.criteria:
            wanted = args.criteria.split(",")
            unknown = [c for c in wanted if c not in ADAPTIVE_CRITERIA]
            if unknown:
                raise ValueError(f"--criteria: unknown {', '.join(unknown)}; valid: {', '.join(ADAPTIVE_CRITERIA)}")
            criteria = [c for c in criteria if c in wanted]
        grids = threshold_grids(criteria, args.thresholds)
        ids, mask = load_eval_rows(args.data, args.num_sequences)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    points = measure(model, ids, mask, args, grids)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adaptive_depth.json").write_text(json.dumps(points, indent=1))
    (out / "adaptive_depth.md").write_text(report(points, args.checkpoint, args))
    plot(points, out, Path(args.checkpoint).name)
    print((out / "adaptive_depth.md").read_text().split("\nAll points:")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
