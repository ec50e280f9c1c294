"""Helpers the bench/ scripts share: a scaled-down TinyLlama-shaped recurrent model and timing
that waits for the GPU. Benchmarks print ratios against a baseline measured in the same run."""

from __future__ import annotations

import time

import torch

from retrofit.configuration_raven import RavenConfig
from retrofit.modeling_raven import RavenForCausalLM

# TinyLlama's proportions scaled down (hidden 512, GQA 8/2 heads), (2, 2, 2) layers.
SCALED_TINYLLAMA = dict(hidden=512, intermediate=1408, heads=8, kv_heads=2, vocab=4096, prelude=2, core=2, coda=2)


def scaled_tinyllama_model(device, dtype) -> RavenForCausalLM:
    """A random recurrent model of shape `SCALED_TINYLLAMA` (seed 0), in train mode."""
    shape = SCALED_TINYLLAMA
    config = RavenConfig(
        n_embd=shape["hidden"], n_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        intermediate_size=shape["intermediate"], n_layers_in_prelude=shape["prelude"],
        n_layers_in_recurrent_block=shape["core"], n_layers_in_coda=shape["coda"],
        vocab_size=shape["vocab"], rope_theta=10000.0, max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return RavenForCausalLM(config).to(device=device, dtype=dtype).train()


def sync(device) -> None:
    """Wait for queued GPU work, so a wall-clock time covers it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device) -> float:
    """Wall-clock seconds of one fn() call, GPU work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def saved_activation_bytes(fn, model: torch.nn.Module | None = None) -> int:
    """Bytes of the tensors autograd saves for backward during fn(), each storage counted once
    (views share one). With `model`, its weights are left out (they are persistent state, not
    activations): plain-tensor weights (DDP, or an FSDP unit's gathered copy while it runs) and
    Parameters."""
    total, seen = 0, set()

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return t
        if model is not None:
            weights = {p.untyped_storage().data_ptr() for p in model.parameters() if type(p.data) is torch.Tensor}
            if key in weights or isinstance(t, torch.nn.Parameter):
                return t
        seen.add(key)
        total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total
