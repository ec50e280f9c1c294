"""Evaluation cost over test-time depth, cached generation, and the KV cache's memory, in one run.

Prints, for one model (a random TinyLlama-shaped (2, 2, 2) model by default, or --model_dir):
- tokens/s of a full-sequence forward at recurrence 1, 2, 4, ..., 64 (the cost of lm-eval
  loglikelihood tasks), relative to recurrence 1;
- tokens/s of cached greedy generation at recurrence 1, 8, 32, and of uncached generation at 8;
- KV-cache memory after generation at recurrence 32 vs 1, for the full cache (one entry per
  iteration x layer, what the models were trained with) and the bounded cache (latest iteration
  only for the recurrent layers);
- what the bounded cache costs in quality: teacher-forced next-token loss computed token by token
  through each cache (the full cache reproduces the single-pass loss exactly), and the agreement
  of greedy continuations.

    python bench/eval_depth.py [--model_dir DIR] [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from _common import scaled_tinyllama_model
from _common import time_call as timed
from retrofit.model.modeling_raven import KVCache, RavenForCausalLM


@torch.no_grad()
def stepwise_nll(model, ids: torch.Tensor, num_steps: int, bounded: bool) -> float:
    """Mean NLL of ids[:, 1:] feeding one token at a time through a (full or bounded) cache."""
    cache = KVCache(bounded=bounded)
    losses = []
    for t in range(ids.shape[1] - 1):
        logits = model(ids[:, t : t + 1], num_steps=num_steps, past_key_values=cache, use_cache=True).logits
        losses.append(F.cross_entropy(logits[:, -1].float(), ids[:, t + 1], reduction="none"))
    return torch.stack(losses, 1).mean().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default=None, help="a recurrent checkpoint (default: random TinyLlama-shaped model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="fewer depths and tokens")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.model_dir:
        model = RavenForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).to(device).eval()
    else:
        model = scaled_tinyllama_model(device, torch.float32).eval()
    model.config.init_values["std"] = 0.0  # deterministic: cache variants differ only by the cache
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.seq), device=device)
    depths = [1, 2, 4, 8, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64]

    print(f"device {device}; model {args.model_dir or 'random (2,2,2), hidden 512'}; batch {args.batch} x seq {args.seq}")
    print("full-sequence forward (loglikelihood evaluation):")
    base = None
    with torch.no_grad():
        model(ids[:, :16], num_steps=1)  # warm-up
        for r in depths:
            seconds = timed(lambda: model(ids, num_steps=r), device)
            tps = ids.numel() / seconds
            base = base or tps
            print(f"  recurrence {r:3d}: {tps:10.0f} tokens/s  ({tps / base:.3f} x recurrence 1, ideal {(4 + 2) / (4 + 2 * r):.3f})")

    prompt = ids[:, :64]
    new = 8 if args.quick else args.new_tokens
    print(f"greedy generation, {new} new tokens, prompt 64, batch {args.batch}:")
    gen = {}
    for r, cached in [(1, True), (8, True), (8, False)] + ([] if args.quick else [(32, True)]):
        seconds = timed(lambda: gen.__setitem__((r, cached), model.generate(
            prompt, max_new_tokens=new, num_steps=r, eos_token_id=None, use_cache=cached)), device)
        print(f"  recurrence {r:3d} {'cached  ' if cached else 'uncached'}: {args.batch * new / seconds:8.1f} tokens/s")
    assert torch.equal(gen[(8, True)], gen[(8, False)]), "cached and uncached generation disagree"
    print("  cached == uncached at recurrence 8: yes")

    print("KV cache memory after a 64-token prompt:")
    memory = {}
    high = 16 if args.quick else 32
    for r in (1, high):
        for bounded in (False, True):
            cache = KVCache(bounded=bounded)
            with torch.no_grad():
                model(prompt, num_steps=r, past_key_values=cache, use_cache=True)
            memory[(r, bounded)] = cache.memory_bytes()
    for bounded in (False, True):
        name = "bounded" if bounded else "full   "
        ratio = memory[(high, bounded)] / memory[(1, bounded)]
        print(f"  {name}: recurrence 1 {memory[(1, bounded)] / 2**20:7.1f} MiB, recurrence {high} "
              f"{memory[(high, bounded)] / 2**20:7.1f} MiB ({ratio:.1f} x)")

    r = 8
    sample = ids[:1, :48 if args.quick else 96]
    with torch.no_grad():
        single = F.cross_entropy(model(sample, num_steps=r).logits[0, :-1].float(), sample[0, 1:]).item()
    full = stepwise_nll(model, sample, r, bounded=False)
    bounded = stepwise_nll(model, sample, r, bounded=True)
    g_full = model.generate(prompt[:1], max_new_tokens=new, num_steps=r, eos_token_id=None)
    g_bounded = model.generate(prompt[:1], max_new_tokens=new, num_steps=r, eos_token_id=None, bounded_cache=True)
    agree = (g_full[0, 64:] == g_bounded[0, 64:]).float().mean().item()
    print(f"bounded cache quality at recurrence {r} (teacher-forced NLL, {sample.shape[1] - 1} tokens):")
    print(f"  single pass {single:.5f} | full cache {full:.5f} | bounded cache {bounded:.5f} "
          f"(diff {bounded - full:+.5f}); greedy tokens agreeing: {agree:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
