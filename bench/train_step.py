"""Training-step cost of the recurrent model against plain HF Llama layers, in one run.

For a scaled-down TinyLlama shape (hidden 512, GQA 8/2 heads, (2, 2, 2) layers, sequence 256,
batch 4) this times forward + backward at (n, k) = (0, 1), (0, 4), (3, 4), (24, 8) against a HF
`LlamaForCausalLM` with the same number of layer applications (prelude + (n + k) * core + coda),
interleaving the two so machine noise hits both alike, and prints per-token cost ratios:

- grad iterations vs the equivalent HF layers (goal <= 1.05),
- one no-grad iteration vs one grad iteration (goal <= 0.40),
- activation memory saved for backward at k = 8 for n = 0, 8, 24 (goal: flat in n). It is measured
  exactly, as the bytes autograd keeps (saved-tensor hooks), so CPU runs can check it too.

    python bench/train_step.py [--repeats 3] [--device cpu|cuda] [--dtype float32|bfloat16] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from _common import (
    SCALED_TINYLLAMA,
    llama_config,
    saved_activation_bytes,
    scaled_tinyllama_model,
    time_call,
)
from retrofit.model.modeling_raven import RavenForCausalLM

SHAPE = SCALED_TINYLLAMA
DEPTHS = [(0, 1), (0, 4), (3, 4), (24, 8)]


def hf_model(num_layers: int, device, dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(SHAPE, num_layers)).to(device=device, dtype=dtype).train()


def iteration_costs(ours: RavenForCausalLM, ids, repeats: int, device, dtype) -> tuple[float, float, float]:
    """Best-of-`repeats` seconds of: one grad iteration, the equivalent HF layers, one no-grad iteration."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    ctx = ours.attention_context(ids)
    with torch.no_grad():
        e = ours.run_prelude(ours.embed(ids), ctx)
        parts = tuple(p.detach() for p in ours.adapter_parts(e))
    state = torch.randn_like(e)
    config = llama_config(SHAPE, SHAPE["core"])
    torch.manual_seed(0)
    hf_block = torch.nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(SHAPE["core"])).to(device, dtype)
    positions = torch.arange(ids.shape[1], device=device)[None].expand(ids.shape[0], -1)
    rope = LlamaRotaryEmbedding(config).to(device)(e, positions)

    def ours_grad():
        x = state.detach().requires_grad_(True)
        ours.recur(x, e, ctx, 0, adapter_parts=parts).sum().backward()

    def hf_grad():
        x = state.detach().requires_grad_(True)
        for layer in hf_block:
            x = layer(x, position_embeddings=rope, position_ids=positions)
        x.sum().backward()

    def ours_nograd():
        with torch.no_grad():
            ours.recur(state, e, ctx, 0, adapter_parts=parts)

    best = {f: float("inf") for f in (ours_grad, hf_grad, ours_nograd)}
    for f in best:
        f()  # warm-up
    for _ in range(repeats):  # interleaved
        for f in best:
            best[f] = min(best[f], time_call(f, device))
    ours.zero_grad(set_to_none=True)
    return best[ours_grad], best[hf_grad], best[ours_nograd]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="skip the (24, 8) timing (slow on CPU)")
    parser.add_argument("--hidden", type=int, default=SHAPE["hidden"])
    parser.add_argument("--intermediate", type=int, default=SHAPE["intermediate"])
    parser.add_argument("--heads", type=int, default=SHAPE["heads"])
    parser.add_argument("--kv_heads", type=int, default=SHAPE["kv_heads"])
    parser.add_argument("--depths", default=None, help="(n, k) pairs to time, e.g. '0:4,3:4' (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no_memory", action="store_true", help="skip the activation-memory table")
    args = parser.parse_args(argv)
    SHAPE.update(hidden=args.hidden, intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ids = torch.randint(0, SHAPE["vocab"], (args.batch, args.seq), device=device)
    tokens = ids.numel()
    ours = scaled_tinyllama_model(device, dtype)
    ours.config.init_values["std"] = 0.0

    def ours_step(n, k):
        out = ours(ids, labels=ids, num_steps=(n, k))
        out.loss.backward()
        ours.zero_grad(set_to_none=True)

    depths = [d for d in DEPTHS if not (args.quick and d == (24, 8))]
    if args.depths:
        depths = [tuple(int(v) for v in pair.split(":")) for pair in args.depths.split(",")]
    results = {}
    for n, k in depths:
        layers = SHAPE["prelude"] + (n + k) * SHAPE["core"] + SHAPE["coda"]
        reference = hf_model(layers, device, dtype)

        def hf_step(reference=reference):
            out = reference(ids, labels=ids)
            out.loss.backward()
            reference.zero_grad(set_to_none=True)

        ours_step(n, k), hf_step()  # warm-up
        t_ours, t_hf = [], []
        for _ in range(args.repeats):  # interleaved
            t_ours.append(time_call(lambda: ours_step(n, k), device))
            t_hf.append(time_call(hf_step, device))
        # min: the least-disturbed run on a shared machine; the median of the per-pair ratios is
        # robust to a load change hitting one pair.
        pair_ratio = statistics.median(o / h for o, h in zip(t_ours, t_hf))
        results[(n, k)] = (min(t_ours), min(t_hf), layers, pair_ratio)
        del reference

    print(f"device {device}, dtype {args.dtype}, batch {args.batch} x seq {args.seq}, "
          f"shape {SHAPE}, best of {args.repeats}")
    print(f"{'(n, k)':>8} {'HF layers':>9} {'ours ms/tok':>12} {'HF ms/tok':>10} {'ours/HF':>8} {'median pair ratio':>18}")
    for (n, k), (t_o, t_h, layers, pair_ratio) in results.items():
        print(f"{str((n, k)):>8} {layers:>9} {1e3 * t_o / tokens:12.4f} {1e3 * t_h / tokens:10.4f} {t_o / t_h:8.3f}"
              f" {pair_ratio:18.3f}")

    # Marginal costs, measured directly on one iteration (differences of whole steps are too noisy
    # on a shared CPU): our grad iteration (forward + backward, including the gradient w.r.t. the
    # incoming state) vs the same number of HF decoder layers, and our no-grad iteration.
    grad_iter, hf_layers, nograd_iter = iteration_costs(ours, ids, args.repeats * 3, device, dtype)
    print(f"one grad iteration: ours / equivalent HF layers = {grad_iter / hf_layers:.3f}  (goal <= 1.05)")
    print(f"one no-grad iteration / one grad iteration      = {nograd_iter / grad_iter:.3f}  (goal <= 0.40)")

    if args.no_memory:
        return
    print("activation memory saved for backward at k = 8:")
    base = None
    for n in (0, 8, 24):
        nbytes = saved_activation_bytes(lambda: ours(ids, labels=ids, num_steps=(n, 8)))
        base = base or nbytes
        print(f"  n = {n:2d}: {nbytes / 2**20:8.1f} MiB  ({nbytes / base:.3f} x n = 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
