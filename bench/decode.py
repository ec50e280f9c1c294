"""Cached greedy decoding of the recurrent model against HF `LlamaForCausalLM.generate`, in one run.

Both models have the same number of layer applications per token (prelude + r * core + coda
recurrent layers = that many HF Llama layers), the same width, heads and vocabulary, random
weights, float32. Each configuration is timed `--repeats` times, interleaved (ours, HF, ours, HF,
...) so load changes on a shared machine hit both alike; the median of each is printed with the
ratio ours / HF in tokens per second (higher is better; the issue's goals: >= 2.0 at batch 1, >= 1.5
at batch 16). Also checks that the cached decode gives the same tokens as recomputing the whole
sequence every step (`use_cache=False`, the reference path), at batch 1 and for a left-padded batch.

    python bench/decode.py [--batches 1,16] [--repeats 5] [--threads 2] [--compile] [--floor]
                           [--speculative_k 4 --speculative_draft_steps 2]

`--compile` adds a row for `generate(..., compile=True)` (a torch.compile'd decode step; on CPU with
inductor's C++ wrapper and a dynamic attended length, on CUDA with static shapes). `--floor` adds
each model's matrix multiplies alone and the ceiling they put on ours / HF. `--speculative_k K
--speculative_draft_steps D` adds a row for self-speculative greedy decoding (K tokens drafted at
depth D, verified at the target depth), with its tokens per draft-and-verify round and whether
its tokens equal the plain cached decode's (the model's initial state is zero, so they must).
Random weights agree little across depths: docs/generation.md quotes the trained quickstart
model's numbers (bench/inference_options.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from retrofit.openmp import passive_openmp_wait

passive_openmp_wait()  # before torch starts OpenMP: HF's eager runs are timed after compiled ones
import torch  # noqa: E402

from _common import llama_config, raven_config, time_call  # noqa: E402
from retrofit.model.modeling_raven import RavenForCausalLM  # noqa: E402

# The shape: hidden 256, intermediate 704, 4 heads / 2 KV heads, (2, 2, 2), vocab 4096.
SHAPE = dict(hidden=256, intermediate=704, heads=4, kv_heads=2, vocab=4096, prelude=2, core=2, coda=2)


def recurrent_model(device, dtype, shape=SHAPE) -> RavenForCausalLM:
    torch.manual_seed(0)
    config = raven_config(shape, init_values={"std": 0.0})
    return RavenForCausalLM(config).to(device=device, dtype=dtype).eval()


def hf_model(num_layers: int, device, dtype, shape=SHAPE):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(shape, num_layers)).to(device=device, dtype=dtype).eval()


def decode_matmuls(model, r: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of every matrix multiply one decode step runs, in order: ours (prelude, the
    adapter's prelude half, r x (adapter state half + core block), coda, head) or HF Llama (7
    projections per layer, head). The same weight tensors the models use, so the replay sees the
    same memory."""
    def ours_layer(block):
        return [block.attn.Wqkv, block.attn.proj, block.mlp.fc, block.mlp.proj]

    def hf_layer(layer):
        a, m = layer.self_attn, layer.mlp
        return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]

    if isinstance(model, RavenForCausalLM):
        t = model.transformer
        h = t.adapter.weight.shape[0]
        adapter_state_half = t.adapter.weight[:, :h].contiguous()  # what `adapter_parts` multiplies per iteration
        linears = [lin for b in t.prelude for lin in ours_layer(b)]
        linears.append((t.adapter.weight[:, h:], None))  # the prelude half, once per step (`adapter_parts`)
        for _ in range(r):
            linears.append((adapter_state_half, None))
            linears += [lin for b in t.core_block for lin in ours_layer(b)]
        linears += [lin for b in t.coda for lin in ours_layer(b)]
    else:
        linears = [lin for layer in model.model.layers for lin in hf_layer(layer)]
    linears.append(model.lm_head)
    return [lin if isinstance(lin, tuple) else (lin.weight, lin.bias) for lin in linears]


def matmul_floor(matmuls, batch: int, prompt: int, new_tokens: int, device, dtype):
    """A function replaying one generation's matrix multiplies and nothing else: the prompt's
    (batch x prompt rows; the head on the last position only, as both generate loops do) and
    new_tokens - 1 decode steps' (batch rows). That is the time a decode loop with zero per-op
    overhead would take, reading the same weights in the same order."""
    widths = {w.shape[1] for w, _ in matmuls}
    step_in = {d: torch.randn(batch, d, device=device, dtype=dtype) for d in widths}
    prompt_in = {d: torch.randn(batch * prompt, d, device=device, dtype=dtype) for d in widths}
    head = matmuls[-1]

    def replay():
        for w, b in matmuls[:-1]:
            torch.nn.functional.linear(prompt_in[w.shape[1]], w, b)
        torch.nn.functional.linear(step_in[head[0].shape[1]], *head)
        for _ in range(new_tokens - 1):
            for w, b in matmuls:
                torch.nn.functional.linear(step_in[w.shape[1]], w, b)
    return replay


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--recurrence", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time generate(compile=True)")
    parser.add_argument("--floor", action="store_true",
                        help="also time the decode steps' matrix multiplies alone, for both models (the "
                             "zero-overhead floor), and print the ceiling it puts on ours / HF")
    parser.add_argument("--speculative_k", type=int, default=0, help="also time self-speculative decoding, K drafted tokens")
    parser.add_argument("--speculative_draft_steps", type=int, default=2, help="draft depth for --speculative_k")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    r = args.recurrence
    ours = recurrent_model(device, dtype)
    layers = SHAPE["prelude"] + r * SHAPE["core"] + SHAPE["coda"]
    hf = hf_model(layers, device, dtype)
    new = args.new_tokens
    print(f"device {device}, {args.dtype}, torch threads {torch.get_num_threads()}, shape {SHAPE}, recurrence {r} "
          f"({layers} layer applications; HF Llama with {layers} layers), prompt {args.prompt}, {new} new tokens, "
          f"greedy, median of {args.repeats} interleaved repeats")

    torch.manual_seed(1)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{'batch':>5} {'path':>18} {'tokens/s':>10} {'vs HF':>7}")
    with torch.no_grad():
        for batch in batches:
            prompt = torch.randint(3, SHAPE["vocab"], (batch, args.prompt), device=device)
            mask = torch.ones_like(prompt)

            def run_ours(compile_step=False, **options):
                return ours.generate(prompt, attention_mask=mask, max_new_tokens=new, num_steps=r,
                                     eos_token_id=[], pad_token_id=2, **({"compile": True} if compile_step else {}), **options)

            def run_hf():
                return hf.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, eos_token_id=None, pad_token_id=2)

            paths = {"ours (cached)": run_ours, "HF Llama": run_hf}
            if args.compile:
                paths["ours (compiled)"] = lambda: run_ours(True)
            if args.speculative_k:
                paths["ours (speculative)"] = lambda: run_ours(
                    speculative_k=args.speculative_k, speculative_draft_steps=args.speculative_draft_steps)
            if args.floor:
                # The same generation's matrix multiplies alone, for each model.
                for name, model in (("ours matmuls only", ours), ("HF matmuls only", hf)):
                    paths[name] = matmul_floor(decode_matmuls(model, r), batch, args.prompt, new, device, dtype)
            times = {name: [] for name in paths}
            outputs, per_round = {}, None
            for name, fn in paths.items():  # warm-up (and compilation)
                outputs[name] = fn()
                if name == "ours (speculative)":
                    per_round = ours.last_generation_stats["tokens_per_round"]
            for _ in range(args.repeats):
                for name, fn in paths.items():
                    times[name].append(time_call(fn, device))
            hf_tps = batch * new / statistics.median(times["HF Llama"])
            for name in paths:
                tps = batch * new / statistics.median(times[name])
                print(f"{batch:>5} {name:>18} {tps:10.1f} {tps / hf_tps:7.2f}x")
            if args.floor:
                # With no overhead at all, ours could run at its matmul-only rate: against HF's
                # measured generate, that is the most any decode loop over these weights can reach.
                ceiling = statistics.median(h / o for h, o in zip(times["HF Llama"], times["ours matmuls only"]))
                print(f"      ceiling (HF generate time / our matmul-only time, median of pairs): {ceiling:.2f}x")
            assert outputs["ours (cached)"].shape == (batch, args.prompt + new)
            if per_round is not None:
                same = torch.equal(outputs["ours (speculative)"], outputs["ours (cached)"])
                ratio = statistics.median(times["ours (cached)"]) / statistics.median(times["ours (speculative)"])
                print(f"      speculative: {ratio:.2f}x the tokens/s of ours (cached), {per_round:.2f} tokens per round, "
                      f"tokens == eager cached tokens: {same}")
            if "ours (compiled)" in outputs:
                same = torch.equal(outputs["ours (compiled)"], outputs["ours (cached)"])
                print(f"      compiled tokens == eager cached tokens: {same}")

        # Same tokens as the reference path: recompute the whole sequence every step (no cache),
        # for one prompt and for a left-padded batch.
        prompt = torch.randint(3, SHAPE["vocab"], (3, args.prompt), device=device)
        mask = torch.ones_like(prompt)
        mask[1, : args.prompt // 2] = 0
        mask[2, : args.prompt - 3] = 0
        prompt = prompt.masked_fill(mask == 0, 2)
        check = min(new, 16)
        kw = dict(attention_mask=mask, max_new_tokens=check, num_steps=r, eos_token_id=[], pad_token_id=2)
        same = torch.equal(ours.generate(prompt, use_cache=True, **kw), ours.generate(prompt, use_cache=False, **kw))
        print(f"cached == uncached (full recompute) tokens, left-padded batch of 3, {check} new tokens: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
