"""Train a learned exit gate on a frozen retrofitted checkpoint (docs/adaptive_depth.md, Learned exit gate).

Runs the checkpoint once over the first --num_sequences rows of a parquet shard (or folder) to
--iterations recurrent iterations, recording every scored token's latent states and its loss at
each depth, then fits only the gate's weights to those records (--objective, default exit_cost:
the expected loss under the gate's exit distribution plus --depth_cost nats per iteration, from
the gate that reproduces the `latent` criterion). Writes a full checkpoint: the base's
files, its weights unchanged, plus the gate's weights and the `exit_gate` config key; it loads
with `trust_remote_code` anywhere and decodes with `adaptive_criterion="gate"`.

    python train_exit_gate.py runs/quickstart/runs/recurrent/final_checkpoint \\
        --data runs/quickstart/parquet --save_name runs/quickstart/gated

Use training shards, not the held-out shard the gate is evaluated on. A checkpoint that already
has a gate is refused (train the base again instead); --save_name must not exist.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from retrofit.train.exit_gate import INITS, OBJECTIVES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="a saved recurrent checkpoint folder (stays frozen)")
    parser.add_argument("--data", required=True, help="parquet shard or folder of shards (rows of max_length + 1 tokens)")
    parser.add_argument("--save_name", required=True, help="new folder for the gated checkpoint (must not exist)")
    parser.add_argument("--num_sequences", type=int, default=64, help="rows recorded (default 64)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="deepest iteration recorded and the gate's per-iteration biases (default 2 x mean_recurrence, at most 32)")
    parser.add_argument("--objective", default="exit_cost", help=f"one of {', '.join(OBJECTIVES)} (default exit_cost)")
    parser.add_argument("--depth_cost", type=float, default=0.01,
                        help="c, the price in nats of one more iteration in the exit_cost objective (default 0.01)")
    parser.add_argument("--init", default="auto",
                        help=f"the gate before training, one of {', '.join(INITS)}: latent = the gate that exits where the "
                             "latent criterion does (kept scale, default for exit_cost), zero = p_stop 1/2 everywhere (default otherwise)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps on the gate (default 300)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--tokens_per_step", type=int, default=65536,
                        help="recorded tokens per optimizer step, drawn at random; all of them when there are no more "
                             "(default 65536: all of 64 rows of up to 1024 tokens)")
    parser.add_argument("--exit_after_first", action="store_true",
                        help="--init latent only: let the gate learn to stop tokens after their first iteration "
                             "(off: it never does, like every heuristic)")
    parser.add_argument("--sharpness", type=float, default=50.0, help="k of the remaining_gain target (Ouro: 50)")
    parser.add_argument("--min_gain", type=float, default=0.005, help="gamma, nats of gain worth an iteration (Ouro: 0.005)")
    parser.add_argument("--entropy_weight", type=float, default=0.05, help="beta of the expected_loss objective")
    parser.add_argument("--batch_size", type=int, default=16, help="rows per model forward while recording")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def check_args(args) -> None:
    from retrofit.train.exit_gate import ExitGateError

    for key in ("num_sequences", "steps", "tokens_per_step", "batch_size"):
        if getattr(args, key) < 1:
            raise ExitGateError(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.iterations is not None and not 1 <= args.iterations <= 256:
        raise ExitGateError(f"--iterations must be in 1..256, got {args.iterations}")
    if not args.lr > 0:
        raise ExitGateError(f"--lr must be > 0, got {args.lr}")
    if not (Path(args.checkpoint) / "config.json").is_file():
        raise ExitGateError(f"checkpoint {args.checkpoint!r} is not a saved model folder (no config.json)")
    if Path(args.save_name).exists():
        raise ExitGateError(f"--save_name {args.save_name} already exists: choose a new folder (nothing is overwritten)")


def run(args) -> Path:
    import torch

    from retrofit.data.rows import check_token_ids
    from retrofit.evaluate.loss_over_depth import load_eval_rows
    from retrofit.model.loading import load_saved_model
    from retrofit.train.distributed import resolve_device
    from retrofit.train.exit_gate import (
        ExitGateError, GateObjective, collect_depth_records, evaluate_objective, init_latent_equivalent, objective_floor,
        resolve_init, save_gated_checkpoint, train_gate, trainable_parameters,
    )

    objective = GateObjective(args.objective, args.sharpness, args.min_gain, args.entropy_weight, args.depth_cost)
    init = resolve_init(args.init, objective)
    if args.exit_after_first and init != "latent":
        raise ExitGateError(f"--exit_after_first needs --init latent (a {init} gate may stop after any iteration)")
    torch.manual_seed(args.seed)
    model = load_saved_model(args.checkpoint)
    if not hasattr(model, "exit_probability"):
        raise ExitGateError(f"checkpoint {args.checkpoint!r} is not a recurrent model")
    if model.exit_gate is not None:
        raise ExitGateError(f"checkpoint {args.checkpoint!r} already has an exit gate ({model.config.exit_gate})")
    model = model.to(resolve_device(args.device)).eval()
    iterations = args.iterations or min(2 * int(model.config.mean_recurrence), 32)
    input_ids, attention_mask = load_eval_rows(args.data, args.num_sequences)
    check_token_ids(input_ids, model.get_input_embeddings().num_embeddings, args.data)
    start = time.perf_counter()
    records = collect_depth_records(model, input_ids, attention_mask, iterations, args.batch_size, args.seed)
    recorded = time.perf_counter() - start
    model.add_exit_gate(iterations)
    if init == "latent":
        init_latent_equivalent(model, args.exit_after_first)
    before = evaluate_objective(model, records, objective)
    train_gate(model, records, objective, args.steps, args.lr, args.tokens_per_step, args.seed,
               parameters=trainable_parameters(model, init))
    after = evaluate_objective(model, records, objective)
    out = save_gated_checkpoint(model, args.checkpoint, args.save_name)
    floor = objective_floor(records, objective)
    floor_text = "" if floor is None else f" (its floor, the labels' entropy: {floor:.4f})"
    print(f"recorded {records.tokens} tokens x {iterations} iterations in {recorded:.1f}s; "
          f"{args.objective} objective (from the {init} gate) {before:.4f} -> {after:.4f}{floor_text} after {args.steps} steps -> {out}")
    return out


def main(argv=None) -> int:
    from retrofit.data.rows import DataError
    from retrofit.evaluate.loss_over_depth import EvalError
    from retrofit.train.distributed import LaunchError
    from retrofit.train.exit_gate import ExitGateError

    args = parse_args(argv)
    try:
        check_args(args)
        run(args)
    except (ExitGateError, EvalError, DataError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
