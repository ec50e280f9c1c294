"""GPU check (one lent GPU, < 10 minutes): training and decoding of a TinyLlama-shaped model, bf16.

For a random recurrent model at the real TinyLlama (4, 8, 4) shape (hidden 2048, 32/4 heads,
intermediate 5632, vocab 32000), in bf16, prints:

1. training: tokens/s, MFU and peak memory of AdamW steps at mean recurrence 32 with backprop
   depth 8 ((n, k) = (24, 8), fixed so runs compare), micro batch 8 x 1024, eager and with
   `--compile` (each layer compiled, as train.py --compile does), and the SDPA kernel used.
   MFU = model FLOPs (param_counter.py's count: 6 D (N_prelude + N_coda + k N_rec) + 2 D n N_rec)
   over the chip's peak (--peak_tflops, else the datasheet table in retrofit/train/flops.py, else the
   bf16 matmul rate measured here);
2. cached greedy generation tokens/s at recurrence 32 (4 + 32 * 8 + 4 = 264 layer applications)
   for batch 1 and 32, and the same for a HF `LlamaForCausalLM` with 264 layers of the same shape
   (random weights, built on the GPU), with the ratio.

    bash bench/gpu_check.sh                     (on the device machine, from the repo root)
    python bench/gpu_check.py --tiny --device cpu  (a seconds-long smoke run of the same code)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


from _common import llama_config, raven_config, sync
from retrofit.train.flops import count_parameters, micro_batch_flops, peak_tflops_of
from retrofit.model.modeling_raven import Block, RavenForCausalLM

REAL = dict(hidden=2048, heads=32, kv_heads=4, intermediate=5632, vocab=32000, layers=(4, 8, 4),
            batch=8, seq=1024, steps=5, warmup=2, mean_rec=32, backprop=8,
            gen_batches=(1, 32), prompt=32, new_tokens=32, gen_repeats=3)
TINY = dict(hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=256, layers=(1, 2, 1),
            batch=2, seq=32, steps=2, warmup=1, mean_rec=4, backprop=2,
            gen_batches=(1, 4), prompt=8, new_tokens=4, gen_repeats=2)


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def measured_matmul_tflops(device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 256
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - start) / 1e12


def recurrent_model(shape, device, dtype, compile_layers: bool) -> RavenForCausalLM:
    prelude, core, coda = shape["layers"]
    config = raven_config({**shape, "prelude": prelude, "core": core, "coda": coda}, init_values={"std": 0.0})
    torch.manual_seed(0)
    with torch.device(device):
        model = RavenForCausalLM(config).to(dtype)
    if compile_layers:
        for module in model.modules():
            if isinstance(module, Block):
                module.compile()
    return model


def hf_model(shape, num_layers: int, device, dtype):
    from transformers import LlamaForCausalLM

    config = llama_config(shape, num_layers)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in bf16 on the device: no fp32 copy of 11B weights
    try:
        with torch.device(device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)


def sdpa_kernel(model, ids, device) -> str:
    if device.type != "cuda":
        return "cpu"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(ids, labels=ids, num_steps=(0, 1)).loss.backward()
        sync(device)
    model.zero_grad(set_to_none=True)
    names = {e.key for e in prof.key_averages()}
    for tag, label in (("flash", "flash"), ("cudnn", "cudnn"), ("efficient", "mem-efficient"), ("fmha", "mem-efficient")):
        if any(tag in n.lower() for n in names):
            return label
    return "math"


def training_rows(shape, device, dtype, peak: float, with_compile: bool = True):
    n, k = max(shape["mean_rec"] - shape["backprop"], 0), min(shape["mean_rec"], shape["backprop"])
    rows = []
    for compiled in (False, True) if with_compile else (False,):
        reset_memory(device)
        model = recurrent_model(shape, device, dtype, compiled).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), device=device)
        kernel = sdpa_kernel(model, ids, device)
        flops = micro_batch_flops(count_parameters(model), (n, k), ids.numel())
        times = []
        for step in range(shape["warmup"] + shape["steps"]):
            sync(device)
            start = time.perf_counter()
            model(ids, labels=ids, num_steps=(n, k)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if step >= shape["warmup"]:  # the first steps compile and warm up the allocator
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rows.append((compiled, (n, k), ids.numel() / seconds, flops / seconds / 1e12 / peak, peak_memory_gib(device), kernel))
        del model, opt
        reset_memory(device)
    return rows


@torch.no_grad()
def generation_rows(shape, device, dtype):
    prelude, core, coda = shape["layers"]
    r = shape["mean_rec"]
    layers = prelude + r * core + coda
    ours = recurrent_model(shape, device, dtype, compile_layers=False).eval()
    hf = hf_model(shape, layers, device, dtype)
    rows = []
    new = shape["new_tokens"]
    for batch in shape["gen_batches"]:
        prompt = torch.randint(3, shape["vocab"], (batch, shape["prompt"]), device=device)
        mask = torch.ones_like(prompt)
        paths = {
            "ours": lambda: ours.generate(prompt, attention_mask=mask, max_new_tokens=new, num_steps=r,
                                          eos_token_id=[], pad_token_id=2),
            "hf": lambda: hf.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False, eos_token_id=None, pad_token_id=2),
        }
        times = {name: [] for name in paths}
        for fn in paths.values():
            fn()  # warm-up
        for _ in range(shape["gen_repeats"]):  # interleaved
            for name, fn in paths.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
        tps = {name: batch * new / statistics.median(t) for name, t in times.items()}
        rows.append((batch, layers, tps["ours"], tps["hf"]))
    del ours, hf
    reset_memory(device)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run of this script, e.g. on CPU)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="bf16 peak of the chip (default: table, else measured)")
    parser.add_argument("--skip_generation", action="store_true")
    parser.add_argument("--skip_compile", action="store_true", help="no compiled training row (inductor on CPU is slow)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible; pass --device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    shape = TINY if args.tiny else REAL
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    measured = measured_matmul_tflops(device, dtype)
    peak, source = args.peak_tflops, "--peak_tflops"
    if peak is None:
        peak, source = peak_tflops_of(name), "datasheet table"
    if peak is None:
        peak, source = measured, "measured matmul"
    print(f"{name}  torch {torch.__version__}  bf16 matmul {measured:.1f} TFLOP/s measured; MFU against "
          f"{peak:.1f} TFLOP/s ({source})")
    print(f"shape: hidden {shape['hidden']}, heads {shape['heads']}/{shape['kv_heads']}, intermediate "
          f"{shape['intermediate']}, vocab {shape['vocab']}, layers {shape['layers']}, bf16 weights")

    print(f"\ntraining, micro batch {shape['batch']} x {shape['seq']}, AdamW, mean recurrence {shape['mean_rec']}, "
          f"backprop depth {shape['backprop']} (median of {shape['steps']} steps after {shape['warmup']} warm-up)")
    print(f"{'compile':>7} {'(n, k)':>8} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'SDPA':>14}")
    for compiled, nk, tps, mfu, mem, kernel in training_rows(shape, device, dtype, peak, not args.skip_compile):
        mem_text = f"{mem:9.1f}" if mem is not None else f"{'-':>9}"
        print(f"{str(compiled):>7} {str(nk):>8} {tps:10.0f} {mfu:7.1%} {mem_text} {kernel:>14}", flush=True)

    if not args.skip_generation:
        print(f"\ncached greedy generation at recurrence {shape['mean_rec']}, prompt {shape['prompt']}, "
              f"{shape['new_tokens']} new tokens, vs HF LlamaForCausalLM with as many layers")
        print(f"{'batch':>5} {'layers':>6} {'ours tok/s':>11} {'HF tok/s':>9} {'ours/HF':>8}")
        for batch, layers, ours, hf in generation_rows(shape, device, dtype):
            print(f"{batch:>5} {layers:>6} {ours:11.1f} {hf:9.1f} {ours / hf:7.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
