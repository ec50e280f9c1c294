"""Evaluation speed on one small random recurrent model, baselines measured in the same run:

1. Validation loss over depth (multi_recurrence_eval.py's computation, `loss_over_depth`) at
   recurrences 1,2,4,...,64: one pass (64 iterations, coda read out at each depth) against
   independent runs from scratch per depth (1+2+...+64 = 127 iterations, the original's way).
   Both start from the same seeded random state; their largest loss difference is printed.
2. Generation tokens/s with the model's KV cache against without (the whole sequence recomputed
   every token), greedy, at a fixed recurrence, zero initial state; both give the same tokens.

    .venv/bin/python bench/bench_eval.py [--num_sequences 32] [--seq_len 256] [--recurrences 1,2,4,8,16,32,64]

Prints wall times and ratios; no absolute number is asserted anywhere.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from _common import raven_config, time_call
from retrofit.evaluate.loss_over_depth import loss_over_depth, parse_recurrences, per_sequence_loss
from retrofit.model.modeling_raven import RavenForCausalLM


def small_model(vocab: int, device: str) -> RavenForCausalLM:
    """Shaped like the paper's models, scaled down: 1 prelude, 2 recurrent, 1 coda layer."""
    shape = dict(hidden=128, intermediate=384, heads=4, kv_heads=2, vocab=vocab, prelude=1, core=2, coda=1)
    config = raven_config(shape, mean_recurrence=8)
    torch.manual_seed(0)
    return RavenForCausalLM(config).to(device).eval()


def timed_pair(fn_a, fn_b, repeats: int):
    """Median wall time of each of two functions, calls interleaved (a, b, a, b, ...) after one
    warm-up each, so load changes on a shared machine hit both alike; also the median of the
    per-pair ratios b / a (robust to a load spike in one pair) and their last results."""
    fn_a(), fn_b()
    times: list[list[float]] = [[], []]
    outs = [None, None]
    for _ in range(repeats):
        for k, fn in enumerate((fn_a, fn_b)):
            start = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - start)
    ratio = statistics.median(b / a for a, b in zip(*times))
    return [statistics.median(t) for t in times], ratio, outs


@torch.no_grad()
def component_costs(model, rows: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of the sweep's parts on one batch: embedding + prelude (with the adapter's
    prelude half), one recurrent iteration, one readout (coda, head, per-sequence loss)."""
    inputs, labels = rows[:, :-1].to(model.device), rows[:, 1:].to(model.device)
    ctx = model.attention_context(inputs)
    e = model.run_prelude(model.embed(inputs), ctx)
    parts = model.adapter_parts(e)
    state = model.initial_state(e)
    parts_fns = {
        "prelude": lambda: model.adapter_parts(model.run_prelude(model.embed(inputs), ctx)),
        "iteration": lambda: model.recur(state, e, ctx, 0, adapter_parts=parts),
        "readout": lambda: per_sequence_loss(model.lm_head(model.run_coda(state, ctx)), labels).cpu(),
    }
    times = {name: [] for name in parts_fns}
    for _ in range(repeats + 1):  # the first round warms up
        for name, fn in parts_fns.items():
            times[name].append(time_call(fn, model.device))
    return {name: statistics.median(t[1:]) for name, t in times.items()}


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_sequences", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per row (max_length); rows hold one more")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--recurrences", default="1,2,4,8,16,32,64")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--gen_batch", type=int, default=4)
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--gen_recurrence", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: on a busy shared CPU, multi-threaded small "
                             "ops wait on descheduled threads and timings swing by 10x)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    recurrences = parse_recurrences(args.recurrences)
    model = small_model(args.vocab, args.device)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, model: 1+2+1 layers, width 128, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, random initial state std "
          f"{model.config.init_values['std']:.4g}")

    # -- 1. loss over depth ------------------------------------------------------------------
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(3, args.vocab, (args.num_sequences, args.seq_len + 1), generator=g)
    mask = torch.ones_like(rows)
    mask[-1, -args.seq_len // 4 :] = 0  # one padded row, as at the end of a packed shard

    def sweep(independent: bool):
        return loss_over_depth(model, rows, mask, recurrences, batch_size=args.batch_size, seed=0,
                               independent_runs=independent, progress=False)

    (t_one, t_ind), ratio, (one, ind) = timed_pair(lambda: sweep(False), lambda: sweep(True), args.repeats)
    cost = component_costs(model, rows[: args.batch_size], args.repeats)
    diff = max(abs(a - b) for r in recurrences for ba, bb in zip(one.losses[r], ind.losses[r]) for a, b in zip(ba, bb))
    iters_one, iters_ind = max(recurrences), sum(recurrences)
    print(f"\nloss over depth: {args.num_sequences} sequences x {args.seq_len} tokens, batch {args.batch_size}, "
          f"recurrences {','.join(map(str, recurrences))}")
    print(f"  one pass          {t_one:8.2f} s   ({iters_one} iterations per batch; median of {args.repeats})")
    print(f"  independent runs  {t_ind:8.2f} s   ({iters_ind} iterations per batch)")
    print(f"  speedup one pass / independent: {ratio:.2f}x median of pairs, {t_ind / t_one:.2f}x of medians "
          f"(goal >= 1.9x; iteration ratio {iters_ind / iters_one:.2f}x); "
          f"max |loss difference| {diff:.2e}")
    # What no implementation of the one pass can beat: both sides pay one coda + head readout per
    # depth, only the independent runs repeat the prelude and the earlier iterations.
    n = len(recurrences)
    ideal = ((n * cost["prelude"] + iters_ind * cost["iteration"] + n * cost["readout"])
             / (cost["prelude"] + iters_one * cost["iteration"] + n * cost["readout"]))
    print(f"  per batch: prelude {cost['prelude'] * 1e3:.1f} ms, iteration {cost['iteration'] * 1e3:.1f} ms, "
          f"readout (coda + head + loss) {cost['readout'] * 1e3:.1f} ms = {cost['readout'] / cost['iteration']:.2f} "
          f"iterations; ideal one pass / independent at this shape: {ideal:.2f}x")

    # -- 2. generation with and without the KV cache -----------------------------------------------
    # Zero initial state here, so cached and uncached decoding can be compared token for token.
    model.config.init_values["std"] = 0.0
    prompt = torch.randint(3, args.vocab, (args.gen_batch, args.prompt_len), generator=g).to(args.device)

    def generate(use_cache: bool):
        return model.generate(prompt, max_new_tokens=args.new_tokens, num_steps=args.gen_recurrence,
                              use_cache=use_cache, eos_token_id=[], pad_token_id=2)

    (t_cached, t_plain), gen_ratio, (cached, plain) = timed_pair(lambda: generate(True), lambda: generate(False), args.repeats)
    new = args.gen_batch * args.new_tokens
    print(f"\ngeneration: batch {args.gen_batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"recurrence {args.gen_recurrence}, greedy")
    print(f"  with KV cache     {new / t_cached:9.1f} tokens/s")
    print(f"  without cache     {new / t_plain:9.1f} tokens/s")
    print(f"  speedup cached / uncached: {gen_ratio:.2f}x median of pairs; same tokens: {torch.equal(cached, plain)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
