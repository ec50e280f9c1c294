"""Batched decoding with adaptive exit against fixed depth, in one run: tokens per second of
`generate(adaptive_threshold=T, adaptive_criterion=C)` over `generate(num_steps=depth)`, at a
threshold T that about halves the mean iterations per token (found by a bisection on a short
generation of the same prompts). Rows whose token has exited stop running the recurrent block
(`exits_raven.decode_with_exits`), so the saving is real compute; what is left is the per-iteration
work that does not shrink with the rows (launches, Python, weight reads) and the iterations run
until the slowest row of the batch exits (the "step depth" column). Attention over a long cache
does shrink with the rows: `--context N` puts N tokens of earlier context before each prompt.

    python bench/adaptive_decode.py [--model DIR] [--batch 16] [--depth 16] [--criteria latent,kl]
                                    [--new_tokens 32] [--context 0] [--repeats 3] [--threads 2] [--device auto]

--model: a recurrent checkpoint (default: the quickstart's trained model,
runs/quickstart/runs/recurrent/final_checkpoint, when it exists); `random` or a missing default
uses a random model (hidden 256 or --random_hidden, (2, 2, 2) layers, vocab 4096), on which exit criteria behave unlike a
trained model's. Prompts: GSM8K-style problems through the checkpoint's tokenizer when it has
one, else random tokens. The ratio is the median of `--repeats` interleaved runs (fixed, adaptive,
fixed, ...), so load changes on a shared machine hit both alike. Greedy, float32 (bfloat16 on
CUDA), no EOS (every row generates `--new_tokens`).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

from retrofit.openmp import passive_openmp_wait

passive_openmp_wait()
import torch  # noqa: E402

from _common import raven_config  # noqa: E402  (bench/_common.py)

QUICKSTART_MODEL = Path("runs/quickstart/runs/recurrent/final_checkpoint")
RANDOM_SHAPE = dict(hidden=256, intermediate=704, heads=4, kv_heads=2, vocab=4096, prelude=2, core=2, coda=2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="recurrent checkpoint dir, or 'random' (default: the quickstart's)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--depth", type=int, default=16, help="fixed depth, and the adaptive runs' maximum")
    parser.add_argument("--criteria", default="latent,kl", help="comma-separated exit criteria to time")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--prompt_tokens", type=int, default=48, help="prompt length for random-token prompts")
    parser.add_argument("--context", type=int, default=0,
                        help="tokens of earlier context before each prompt (the prompts repeated): a long cache "
                             "makes attention, whose cost follows the rows still iterating, a larger share of a step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.5,
                        help="mean iterations per token to aim for, as a fraction of --depth")
    parser.add_argument("--random_hidden", type=int, default=256,
                        help="width of --model random (intermediate 2.75x, 64-wide heads, KV heads half the heads)")
    parser.add_argument("--search_steps", type=int, default=16, help="bisection steps of the threshold search")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: leave as is)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    for name in ("batch", "depth", "prompt_tokens", "repeats", "search_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.new_tokens < 2:
        parser.error(f"--new_tokens must be >= 2 (the first comes from the prefill), got {args.new_tokens}")
    if args.context < 0:
        parser.error(f"--context must be >= 0, got {args.context}")
    if not 0 < args.target < 1:
        parser.error(f"--target must be in (0, 1), got {args.target}")
    from retrofit.model.exits_raven import exit_criterion

    for name in args.criteria.split(","):
        try:
            exit_criterion(name)
        except ValueError as err:
            parser.error(f"--criteria: {err}")
    return args


def load(args, device, dtype):
    """(model, prompts (B, T), attention mask, description)."""
    from retrofit.model.modeling_raven import RavenForCausalLM
    from retrofit.model.loading import quiet_transformers_bars

    path = Path(args.model) if args.model not in (None, "random") else QUICKSTART_MODEL
    if args.model == "random" or (args.model is None and not (path / "config.json").is_file()):
        torch.manual_seed(0)
        hidden = args.random_hidden
        shape = dict(RANDOM_SHAPE, hidden=hidden, intermediate=int(2.75 * hidden), heads=max(1, hidden // 64),
                     kv_heads=max(1, hidden // 128))
        model = RavenForCausalLM(raven_config(shape, init_values={"std": 0.0}))
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, RANDOM_SHAPE["vocab"], (args.batch, args.prompt_tokens), generator=generator)
        model = model.to(device=device, dtype=dtype).eval()
        return model, ids.to(device), torch.ones_like(ids).to(device), f"random model, hidden {hidden}"
    if not (path / "config.json").is_file():
        sys.exit(f"error: --model {path} has no config.json")
    quiet_transformers_bars()
    model = RavenForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    try:
        from transformers import AutoTokenizer

        from retrofit.data.synthetic import arithmetic_problems, problem_text

        tokenizer = AutoTokenizer.from_pretrained(path)
        texts = [problem_text(p).split("\nA:")[0] + "\nA:" for p in arithmetic_problems(args.batch, seed=1)]
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        return model, enc.input_ids.to(device), enc.attention_mask.to(device), f"{path} (GSM-style prompts)"
    except (OSError, ValueError):
        vocab = model.config.vocab_size
        ids = torch.randint(3, vocab, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        return model, ids.to(device), torch.ones_like(ids).to(device), f"{path} (random-token prompts)"


def with_context(ids, mask, tokens: int):
    """Each prompt after `tokens` tokens of context: the batch's prompts (their real tokens) repeated."""
    if tokens == 0:
        return ids, mask
    filler = ids[mask.bool()]
    filler = filler.repeat(tokens // filler.numel() + 1)[:tokens]
    prefix = filler[None].expand(ids.shape[0], -1)
    return torch.cat([prefix, ids], 1), torch.cat([torch.ones_like(prefix), mask], 1)


def generate(model, ids, mask, depth, new_tokens, threshold=None, criterion="kl"):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, num_steps=depth, eos_token_id=[],
                          adaptive_threshold=threshold, adaptive_criterion=criterion)


def find_threshold(model, ids, mask, depth, criterion, target_depth, steps=16, probe_tokens=8) -> tuple[float, float]:
    """A threshold whose mean depth on a short generation is near `target_depth` (bisection on
    log10 of the threshold over [1e-14, 1e3]; mean depth grows as the threshold falls)."""
    low, high = -14.0, 3.0  # log10: low -> deep, high -> shallow
    best = (math.inf, 10.0**low, float(depth))
    for _ in range(steps):
        mid = (low + high) / 2
        generate(model, ids, mask, depth, probe_tokens, 10.0**mid, criterion)
        mean_depth = model.last_generation_stats["mean_depth"]
        best = min(best, (abs(mean_depth - target_depth), 10.0**mid, mean_depth))
        if mean_depth > target_depth:
            low = mid
        else:
            high = mid
    return best[1], best[2]


def main(argv=None) -> int:
    args = parse_args(argv)
    from retrofit.train.distributed import resolve_device

    device = resolve_device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, ids, mask, what = load(args, device, dtype)
    ids, mask = with_context(ids, mask, args.context)
    # Timed: the decode steps after the prompt (`decode_seconds`). The prefill (the prompt at full
    # depth, which yields the first new token) is the same in every run, and with a long context
    # it is most of a generation's time.
    tokens = args.batch * (args.new_tokens - 1)
    print(f"model: {what}; batch {args.batch}, prompt {ids.shape[1]} tokens, {args.new_tokens} new, "
          f"depth {args.depth}, {device.type} {dtype}, {torch.get_num_threads()} threads")
    plans = []
    for criterion in args.criteria.split(","):
        threshold, probe_depth = find_threshold(model, ids, mask, args.depth, criterion, args.target * args.depth,
                                                args.search_steps)
        plans.append((criterion, threshold))
        print(f"{criterion}: threshold {threshold:.3g} (mean depth {probe_depth:.2f} on an 8-token probe)")
    generate(model, ids, mask, args.depth, 2)  # warm-up
    fixed_times, adaptive_times, depths = [], {c: [] for c, _ in plans}, {}
    for _ in range(args.repeats):
        generate(model, ids, mask, args.depth, args.new_tokens)
        fixed_times.append(model.last_generation_stats["decode_seconds"])
        for criterion, threshold in plans:
            generate(model, ids, mask, args.depth, args.new_tokens, threshold, criterion)
            stats = model.last_generation_stats
            adaptive_times[criterion].append(stats["decode_seconds"])
            depths[criterion] = (stats["mean_depth"], stats["mean_step_depth"])
    fixed = tokens / statistics.median(fixed_times)
    print(f"\n{'run':<28} {'mean depth':>10} {'step depth':>10} {'tokens/s':>9} {'ratio':>6}")
    print(f"{'fixed depth':<28} {args.depth:>10.2f} {args.depth:>10.2f} {fixed:>9.1f} {1.0:>6.2f}")
    for criterion, threshold in plans:
        speed = tokens / statistics.median(adaptive_times[criterion])
        mean_depth, step_depth = depths[criterion]
        print(f"{f'{criterion} @ {threshold:.3g}':<28} {mean_depth:>10.2f} {step_depth:>10.2f} {speed:>9.1f} {speed / fixed:>6.2f}")
    print("(tokens/s: the tokens after the first over the decode steps' time, the prefill left out; ratio: adaptive tokens/s over fixed "
          "depth's, medians of interleaved runs; mean depth: recurrent "
          "iterations per generated token after the prompt; step depth: iterations per decode step, the deepest "
          "row's, which every row of the batch waits for)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
