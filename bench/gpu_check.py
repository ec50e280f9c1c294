"""GPU check for a lent H200 (or any CUDA GPU): bf16 training throughput and MFU, eager vs compiled.

Prints one table: for a TinyLlama-shaped (4, 8, 4) random recurrent model, micro batch 8 x 1024,
AdamW steps in bf16 at mean recurrence 4 and 32 (backprop depth 8, (n, k) fixed at the mean so
runs are comparable), tokens/s and MFU. MFU uses the FLOPs formula of docs/analysis.md (Parameters and FLOPs)
(6 D (N_prelude + N_coda + min(r, 8) N_rec) + 2 D max(r - 8, 0) N_rec) against the chip's bf16
matmul rate measured in the same run, with and without torch.compile (per layer, so the unrolled
recurrence does not have to be traced), and names the SDPA kernel the profiler saw.
Needs only torch + transformers (both on the device image); run through bench/gpu_check.sh.
"""

from __future__ import annotations

import sys
import time

import torch

from retrofit.configuration_raven import RavenConfig
from retrofit.modeling_raven import Block, RavenForCausalLM

BATCH, SEQ, STEPS, WARMUP = 8, 1024, 6, 2


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def build(compile_layers: bool) -> RavenForCausalLM:
    config = RavenConfig(n_embd=2048, n_heads=32, num_key_value_heads=4, intermediate_size=5632,
                         n_layers_in_prelude=4, n_layers_in_recurrent_block=8, n_layers_in_coda=4,
                         vocab_size=32000, rope_theta=10000.0, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = RavenForCausalLM(config).to("cuda", torch.bfloat16).train()
    if compile_layers:
        for module in model.modules():
            if isinstance(module, Block):
                module.compile()
    return model


def flops_per_step(model: RavenForCausalLM, r: int, tokens: int, s: int = 8) -> float:
    count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    t = model.transformer
    n_pc, n_rec = count(t.prelude) + count(t.coda), count(t.core_block)
    return 6 * tokens * (n_pc + min(r, s) * n_rec) + 2 * tokens * max(r - s, 0) * n_rec


def sdpa_kernel(model, ids) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(ids, labels=ids, num_steps=(0, 1)).loss.backward()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    for tag, label in (("flash", "flash"), ("cudnn", "cudnn"), ("efficient", "mem-efficient"), ("fmha", "mem-efficient")):
        if any(tag in n.lower() for n in names):
            return label
    return "math"


def main(argv: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    peak = matmul_tflops()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  bf16 matmul {peak:.0f} TFLOP/s (measured)")
    rows = []
    for compiled in (False, True):
        model = build(compiled)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        ids = torch.randint(0, 32000, (BATCH, SEQ), device="cuda")
        kernel = sdpa_kernel(model, ids)
        for r in (4, 32):
            n, k = max(r - 8, 0), min(r, 8)
            torch.cuda.reset_peak_memory_stats()
            for step in range(WARMUP + STEPS):
                if step == WARMUP:
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                model(ids, labels=ids, num_steps=(n, k)).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / STEPS
            flops = flops_per_step(model, r, ids.numel())
            rows.append((compiled, r, n, k, ids.numel() / seconds, flops / seconds / 1e12 / peak,
                         torch.cuda.max_memory_allocated() / 2**30, kernel))
        del model, opt
        torch.cuda.empty_cache()
    print(f"{'compile':>7} {'mean rec':>8} {'(n, k)':>8} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'SDPA':>14}")
    for compiled, r, n, k, tps, mfu, mem, kernel in rows:
        print(f"{str(compiled):>7} {r:>8} {str((n, k)):>8} {tps:>10.0f} {mfu:>6.1%} {mem:>9.1f} {kernel:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
