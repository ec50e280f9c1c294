"""Huginn's inference options on a trained recurrent checkpoint (the quickstart's), in one run.

Prints three tables (docs/generation.md quotes them):
1. KV-cache policies: held-out loss by teacher-forced decoding through the cache, one token at a
   time (`retrofit.evaluate.cached_sweep`), and the cache's size, at depths 8, 16, 32, for full,
   latest-M and compress-S;
2. continuous thought: the same loss at depths 1 .. 32 with and without it (full cache);
3. self-speculative greedy decoding: tokens/s against plain greedy decoding at the target depth
   (interleaved repeats, the baseline in the same run), tokens per draft-and-verify round, and
   whether the tokens are identical (both with the same `state_seed`).

Losses use the first --sequences rows of the held-out shard, --tokens tokens each (few and short:
every depth and policy is T sequential forward calls), every row from the same seeded states.

    python bench/inference_options.py runs/quickstart/runs/recurrent/final_checkpoint \\
        --eval_file_path runs/quickstart/parquet/val [--sequences 16] [--tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from _common import time_call  # bench/_common.py (this checkout on sys.path)
from retrofit.evaluate.cached_sweep import cached_losses
from retrofit.evaluate.loss_over_depth import draw_initial_state, inputs_and_labels, load_eval_rows
from retrofit.model.loading import load_saved_model

POLICIES = ("full", "latest-1", "latest-2", "latest-4", "compress-2", "compress-4")


def mean_loss(result, r: int) -> float:
    return float(result.losses[r].mean())


def policy_table(model, inputs, labels, states, depths, policies) -> None:
    print(f"\n1. KV-cache policies: held-out loss through the cache (mean over {inputs.shape[0]} rows of "
          f"{inputs.shape[1]} tokens) and cache size (MiB, the whole batch)")
    print(f"{'policy':>11} " + " ".join(f"{'loss r=' + str(r):>10} {'MiB':>7}" for r in depths))
    for policy in policies:
        result = cached_losses(model, inputs, None, labels, depths, states, cache_policy=policy)
        cells = [f"{mean_loss(result, r):10.5f} {result.cache_bytes[r] / 2**20:7.2f}" for r in depths]
        print(f"{policy:>11} " + " ".join(cells))


def continuous_table(model, inputs, labels, states, depths) -> None:
    print("\n2. continuous thought: held-out loss through the full cache, fresh state vs the previous position's")
    fresh = cached_losses(model, inputs, None, labels, depths, states)
    chained = cached_losses(model, inputs, None, labels, depths, states, continuous=True)
    print(f"{'depth':>6} {'fresh':>9} {'continuous':>11} {'difference':>11}")
    for r in depths:
        a, b = mean_loss(fresh, r), mean_loss(chained, r)
        print(f"{r:>6} {a:9.5f} {b:11.5f} {b - a:+11.5f}")


def speculative_table(model, prompts, target: int, new_tokens: int, settings, repeats: int) -> None:
    print(f"\n3. self-speculative greedy decoding at depth {target}: {prompts.shape[0]} prompt(s) of "
          f"{prompts.shape[1]} tokens, {new_tokens} new tokens, median of {repeats} interleaved repeats")
    common = dict(max_new_tokens=new_tokens, num_steps=target, eos_token_id=[], pad_token_id=0, state_seed=0)
    paths = {"plain": lambda: model.generate(prompts, **common)}
    for k, draft in settings:
        paths[f"k={k} draft={draft}"] = (lambda k=k, draft=draft: model.generate(
            prompts, speculative_k=k, speculative_draft_steps=draft, **common))
    outputs, per_round = {}, {}
    for name, fn in paths.items():  # warm-up, tokens and acceptance
        outputs[name] = fn()
        per_round[name] = model.last_generation_stats.get("tokens_per_round", 1.0)
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            times[name].append(time_call(fn, prompts.device))
    base = statistics.median(times["plain"])
    tokens = prompts.shape[0] * new_tokens
    print(f"{'path':>18} {'tokens/s':>9} {'vs plain':>9} {'tokens/round':>13} {'same tokens':>12}")
    for name in paths:
        t = statistics.median(times[name])
        same = torch.equal(outputs[name], outputs["plain"])
        print(f"{name:>18} {tokens / t:9.1f} {base / t:8.2f}x {per_round[name]:13.2f} {str(same):>12}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--eval_file_path", required=True, help="held-out parquet shard or folder")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128, help="tokens scored per row (the row's first T + 1)")
    parser.add_argument("--depths", default="8,16,32")
    parser.add_argument("--continuous_depths", default="1,2,4,8,16,32")
    parser.add_argument("--target", type=int, default=8, help="speculative decoding's target depth")
    parser.add_argument("--speculative", default="4:1,4:2,8:2", help="K:D pairs (draft K tokens at depth D)")
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="tables to skip, e.g. 1,2")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_saved_model(args.model_dir, torch.float32).eval()
    rows, mask = load_eval_rows(args.eval_file_path, args.sequences)
    rows, mask = rows[:, : args.tokens + 1], mask[:, : args.tokens + 1]
    inputs, _, labels = inputs_and_labels(rows, mask)
    generator = torch.Generator().manual_seed(args.seed)
    states = draw_initial_state(model, inputs.shape[0], inputs.shape[1], generator)
    print(f"model {args.model_dir} (init std {model.config.init_values.get('std', 0.0)}), "
          f"torch threads {torch.get_num_threads()}, loss rows {tuple(inputs.shape)}, seed {args.seed}")
    skip = set(args.skip.split(","))
    with torch.no_grad():
        if "1" not in skip:
            policy_table(model, inputs, labels, states, [int(r) for r in args.depths.split(",")], POLICIES)
        if "2" not in skip:
            continuous_table(model, inputs, labels, states, [int(r) for r in args.continuous_depths.split(",")])
        if "3" not in skip:
            settings = [tuple(int(v) for v in pair.split(":")) for pair in args.speculative.split(",")]
            prompts = rows[:1, : args.prompt_tokens]
            speculative_table(model, prompts, args.target, args.new_tokens, settings, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
