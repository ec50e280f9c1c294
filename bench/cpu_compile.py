"""`generate(compile=True)` on CPU: when the compilation pays off, and what it does to eager work after it.

Each OpenMP wait policy runs in its own process (the policy is read once, when torch starts
OpenMP): the environment's default (idle OpenMP threads spin for a while) and PASSIVE (they sleep).
In each process, on the recurrent model and an HF Llama with as many layer applications
(`bench/decode.py`'s shape, recurrence 8, batch 1, prompt 32):

1. eager generate of ours and of HF, median of --repeats (before);
2. one generate(compile=True): the compilation's cost, then its per-token time (median);
3. the same eager generates again (after): after / before is the slowdown compiled kernels leave
   behind (the issue: 3-8x with spinning threads).

It prints ratios, and the number of new tokens from which the compiled path's total time (compilation
included) beats eager: compile seconds / (eager - compiled seconds per token).

    python bench/cpu_compile.py [--threads 2] [--repeats 3] [--new_tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

POLICIES = {"default (spinning)": None, "PASSIVE": "PASSIVE"}


def measure(args) -> dict:
    """One process's numbers (its OpenMP policy is whatever the environment gave it)."""
    import torch

    from bench.decode import SHAPE, hf_model, recurrent_model
    from _common import time_call

    torch.set_num_threads(args.threads)
    device, dtype, r = torch.device("cpu"), torch.float32, 8
    ours = recurrent_model(device, dtype)
    hf = hf_model(SHAPE["prelude"] + r * SHAPE["core"] + SHAPE["coda"], device, dtype)
    torch.manual_seed(1)
    prompt = torch.randint(3, SHAPE["vocab"], (1, 32))
    mask = torch.ones_like(prompt)
    new = args.new_tokens

    def ours_generate(compile_step=False, tokens=new):
        return ours.generate(prompt, attention_mask=mask, max_new_tokens=tokens, num_steps=r, eos_token_id=[],
                             pad_token_id=2, compile=compile_step)

    def hf_generate():
        return hf.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           eos_token_id=None, pad_token_id=2)

    def median_time(fn):
        return statistics.median(time_call(fn, device) for _ in range(args.repeats))

    with torch.no_grad():
        ours_generate(), hf_generate()  # warm-up
        before = {"ours eager": median_time(ours_generate), "HF eager": median_time(hf_generate)}
        first_compiled = time_call(lambda: ours_generate(True), device)  # compiles, then generates
        compiled = median_time(lambda: ours_generate(True))
        after = {"ours eager": median_time(ours_generate), "HF eager": median_time(hf_generate)}
    return {"before": before, "after": after, "compiled": compiled, "compile_seconds": first_compiled - compiled,
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one policy, prints JSON
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.new_tokens < 2:
        parser.error("--threads and --repeats must be >= 1, --new_tokens >= 2")
    if args.child:
        print(json.dumps(measure(args)))
        return 0

    root = Path(__file__).resolve().parents[1]
    results = {}
    for name, policy in POLICIES.items():
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        if policy is not None:
            env["OMP_WAIT_POLICY"] = policy
        print(f"measuring with OMP_WAIT_POLICY {name} ...", file=sys.stderr)
        child = subprocess.run([sys.executable, __file__, "--child", "--threads", str(args.threads), "--repeats",
                                str(args.repeats), "--new_tokens", str(args.new_tokens)],
                               env=env, capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            print(f"error: the measurement with OMP_WAIT_POLICY {name} failed", file=sys.stderr)
            return 1
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])

    first = next(iter(results.values()))
    print(f"CPU, {first['threads']} threads, bench/decode.py's shape at recurrence 8, batch 1, prompt 32, "
          f"{args.new_tokens} new tokens, medians of {args.repeats}")
    print(f"{'OMP_WAIT_POLICY':>20} {'eager after/before: ours':>26} {'HF':>6} {'compiled vs eager':>18} "
          f"{'compile s':>10} {'pays off after':>15}")
    for name, r in results.items():
        slow = {k: r["after"][k] / r["before"][k] for k in r["before"]}
        per_token_eager = r["before"]["ours eager"] / args.new_tokens
        per_token_compiled = r["compiled"] / args.new_tokens
        gain = per_token_eager - per_token_compiled
        payoff = f"{r['compile_seconds'] / gain:,.0f} tokens" if gain > 0 else "never"
        print(f"{name:>20} {slow['ours eager']:>25.2f}x {slow['HF eager']:>5.2f}x "
              f"{r['before']['ours eager'] / r['compiled']:>17.2f}x {r['compile_seconds']:>10.1f} {payoff:>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
