"""Helpers the bench/ scripts share: a scaled-down TinyLlama-shaped recurrent model and timing
that waits for the GPU. Benchmarks print ratios against a baseline measured in the same run.

Bench scripts run as `python bench/x.py`, so Python puts bench/ (this file's folder) on sys.path
and `from _common import ...` finds it. Importing it also puts the checkout first on sys.path (the
scripts measure this checkout's `retrofit`, installed or not) and tests/ after it, for the scripts
that build throwaway runs from the tests' tiny components (`import tiny_components`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tests") not in sys.path:
    sys.path.append(str(ROOT / "tests"))

import torch

from retrofit.model.configuration_raven import RavenConfig
from retrofit.model.modeling_raven import RavenForCausalLM

# TinyLlama's proportions scaled down (hidden 512, GQA 8/2 heads), (2, 2, 2) layers.
SCALED_TINYLLAMA = dict(hidden=512, intermediate=1408, heads=8, kv_heads=2, vocab=4096, prelude=2, core=2, coda=2)


def raven_config(shape: dict, **overrides) -> RavenConfig:
    """The recurrent model of a bench shape (keys hidden, intermediate, heads, kv_heads, vocab,
    prelude, core, coda), token ids bos 0 / eos 1 / pad 2; `overrides` are RavenConfig keys."""
    kwargs = dict(
        n_embd=shape["hidden"], n_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        intermediate_size=shape["intermediate"], n_layers_in_prelude=shape["prelude"],
        n_layers_in_recurrent_block=shape["core"], n_layers_in_coda=shape["coda"],
        vocab_size=shape["vocab"], rope_theta=10000.0, max_position_embeddings=2048,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    return RavenConfig(**{**kwargs, **overrides})


def llama_config(shape: dict, num_layers: int, **overrides):
    """The HF Llama baseline of a bench shape with `num_layers` layers (untied head, SDPA)."""
    from transformers import LlamaConfig

    kwargs = dict(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], num_hidden_layers=num_layers, vocab_size=shape["vocab"],
        max_position_embeddings=2048, tie_word_embeddings=False, attn_implementation="sdpa",
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    return LlamaConfig(**{**kwargs, **overrides})


def scaled_tinyllama_model(device, dtype) -> RavenForCausalLM:
    """A random recurrent model of shape `SCALED_TINYLLAMA` (seed 0), in train mode."""
    torch.manual_seed(0)
    return RavenForCausalLM(raven_config(SCALED_TINYLLAMA)).to(device=device, dtype=dtype).train()


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
