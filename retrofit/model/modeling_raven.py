"""A depth-recurrent causal LM in the Raven / Huginn layout, for retrofitted decoder LMs.

    e = prelude(wte(x))                                  # a few early layers, run once
    s_0 ~ TruncNormal(0, std^2, +-3 std)                 # random initial latent state
    s_i = core_block(adapter(cat([s_{i-1}, e])))         # the recurrent block, r times
    logits = lm_head(ln_f(coda(s_r)))                    # a few late layers, run once

Training uses truncated backprop: `num_steps=(n, k)` runs n iterations without grad, then k with
grad. One implementation covers every supported layer family (Llama, Mistral, SmolLM, Qwen2/2.5,
Qwen3, OLMo-2) through three config switches (`norm_placement`, `qk_norm`, `qkv_bias`). Parameter
names follow the authors' released checkpoints.

This file is self-contained (torch + transformers only) and is copied next to saved weights, so a
checkpoint loads with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` anywhere.
It keeps its own KV cache and decode loop instead of transformers' cache classes, whose internals
changed between releases and broke the original code twice.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_raven import RavenConfig, normalise_lora

# ----------------------------------------------------------------------------------------------
# Depth sampling (the repository's docs/training.md, Depth sampler). `retrofit.train.depth` re-exports this; it lives here so a checkpoint
# directory carries everything its forward pass needs.
# ----------------------------------------------------------------------------------------------

SAMPLER_SEED_OFFSET = 514229
SAMPLER_SIGMA = 0.5


def sample_num_steps(mean_recurrence: int, backprop_depth: int, data_step: int) -> tuple[int, int]:
    """Draw (n, k) = (iterations without grad, iterations with grad) for one micro-batch.

    p = Poisson(LogNormal(ln(t + s) - sigma^2/2, sigma)) + 1 with t = max(r - s, 0), then
    n = max(p - s, 0), k = min(s, p). Seeded by the micro-batch index so every rank, and a resumed
    run, draws the same depth for the same micro-batch.
    """
    if mean_recurrence < 1:
        raise ValueError(f"mean_recurrence must be >= 1, got {mean_recurrence}")
    if backprop_depth < 1:
        raise ValueError(f"backprop_depth must be >= 1, got {backprop_depth}")
    s = backprop_depth
    t = max(mean_recurrence - s, 0)
    mu = math.log(t + s) - SAMPLER_SIGMA**2 / 2
    generator = torch.Generator(device="cpu")
    generator.manual_seed((SAMPLER_SEED_OFFSET + data_step) % (2**31 - 1))
    rate = torch.empty(1).log_normal_(mean=mu, std=SAMPLER_SIGMA, generator=generator)
    p = int(torch.poisson(rate, generator=generator).item()) + 1
    return max(p - s, 0), min(s, p)


# ----------------------------------------------------------------------------------------------
# Adaptive exit (Huginn-style per-token early exit): one rule for `generate(adaptive_threshold=...)`
# and for `retrofit.evaluate.loss_over_depth`'s loss-over-depth sweeps, which imports it from here.
# ----------------------------------------------------------------------------------------------

ADAPTIVE_CRITERIA = ("kl", "latent")


def should_exit(criterion: str, before: torch.Tensor, after: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which tokens stop iterating after an iteration: those whose change from the previous
    iteration to this one is below `threshold` (so never before the second iteration).

    kl:     `before`/`after` are next-token log-probabilities; change = KL(p_before || p_after).
    latent: `before`/`after` are latent states; change = ||after - before|| / ||after||.
    Both changes are >= 0, so threshold 0 never exits (fixed depth)."""
    if criterion == "kl":
        change = (before.exp() * (before - after)).sum(-1).clamp(min=0)
    else:
        before, after = before.float(), after.float()
        change = (after - before).norm(dim=-1) / after.norm(dim=-1).clamp(min=1e-12)
    return change < threshold


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (as HF Llama/OLMo-2 do), then scale in the input dtype. F.rms_norm
        # is one call instead of five small kernels (on CPU its result is bit-identical to
        # x * rsqrt(mean(x^2) + eps)); in float32 it also takes the weight, bit-identical to
        # scaling afterwards, and skips the no-op casts (three fewer ops per norm when decoding).
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inverse_frequencies(config: RavenConfig) -> torch.Tensor:
    """RoPE inverse frequencies, with Llama-3 frequency scaling when configured."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = float(params.get("rope_theta", config.rope_theta))
    dim = config.head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_context = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, linear, llama3)")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the HF Llama convention, so converted q/k weights need no permutation).

    x * cos + cat(-x2, x1) * sin, with the sign folded into `signed_sin` = cat(-sin1, sin2)
    (`rope_tables`): the same numbers bit for bit, one kernel fewer per call.
    """
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin


def compiled_cache_capacity(total: int) -> int:
    """Cache length of `generate(compile=True)` for a prompt + new tokens of `total`: the next
    power of two, at least 64. The capacity is a shape of the compiled step, so powers of two give
    few graphs (one per doubling, each reused by every shorter generation in it); with static
    shapes (CUDA) the step attends over the whole (masked) capacity, and under half of it is
    padding. A fixed multiple of 256 made that step slower than eager at batch 16 on CPU (a
    96-token generation attended 256 columns)."""
    return max(64, 1 << (max(total, 1) - 1).bit_length())


def static_decode_shapes(device: torch.device) -> bool:
    """Whether `generate(compile=True)` keeps every shape of its decode step fixed. On CUDA yes:
    attention runs over the whole (masked) cache capacity, so one graph serves a generation and
    can be replayed as a CUDA graph. Elsewhere the attended length is a dynamic dimension of one
    graph: each token attends only the columns written so far (on CPU, reading the padded
    capacity was about a tenth of a batch-16 step)."""
    return torch.device(device).type == "cuda"


class KVCache:
    """Keys and values per attention "slot", grown by doubling so decoding costs amortised O(1).

    A slot is one layer application: ("prelude", j), ("core", iteration, j) or ("coda", j). Keeping
    one slot per iteration is what the authors' models were trained with (every iteration attends
    to the same iteration of earlier tokens). With `bounded=True`, all iterations of a core layer
    share one slot that holds the latest iteration's keys, so memory does not grow with depth.
    """

    def __init__(self, bounded: bool = False, capacity: int = 0):
        self.bounded = bounded
        # Tokens to allocate on a slot's first write: `generate` knows its final length, so its
        # cache is allocated once and written in place (no growth, no copies).
        self.capacity = capacity
        self.keys: dict[tuple, torch.Tensor] = {}
        self.values: dict[tuple, torch.Tensor] = {}
        self.seen_tokens = 0  # advanced by the model once a forward call has written every slot

    def slot(self, kind: str, layer: int, iteration: int = 0) -> tuple:
        if kind == "core" and not self.bounded:
            return (kind, iteration, layer)
        return (kind, layer)

    def update(self, slot: tuple, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at positions [start, start + T) of `slot`; return all keys so far."""
        end = start + k.shape[2]
        buf_k, buf_v = self.keys.get(slot), self.values.get(slot)
        if buf_k is None or buf_k.shape[2] < end:
            capacity = max(end, 2 * buf_k.shape[2] if buf_k is not None else (self.capacity or 16))
            new_k = k.new_zeros(k.shape[0], k.shape[1], capacity, k.shape[3])
            new_v = v.new_zeros(new_k.shape)
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            self.keys[slot], self.values[slot] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def update_at(self, slot: tuple, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor):
        """Static-shape write for the compiled decode step: k, v (B, H, 1, D) go to column
        `position` (a 1-element tensor) of a buffer allocated at `capacity`; returns the whole
        buffers (the caller masks the columns not written yet)."""
        if slot not in self.keys:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.keys[slot], self.values[slot] = k.new_zeros(shape), v.new_zeros(shape)
        buf_k, buf_v = self.keys[slot], self.values[slot]
        buf_k.index_copy_(2, position, k)
        buf_v.index_copy_(2, position, v)
        return buf_k, buf_v

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (drop finished sequences)."""
        for store in (self.keys, self.values):
            for slot, tensor in store.items():
                store[slot] = tensor.index_select(0, index)


@dataclass
class AttentionContext:
    """What every layer of one forward call shares: RoPE tables, the mask, the cache position."""

    cos: torch.Tensor  # (B or 1, T, 1, head_dim): broadcast over the heads of a (B, T, H, D) tensor
    sin: torch.Tensor  # the signed sine of `apply_rope`, same shape
    mask: torch.Tensor | None  # bool (B, 1, T, past + T), True = may attend; None = plain causal
    cache: KVCache | None = None
    past_length: int = 0
    # Compiled decode step only: the cache column being written (a 1-element tensor, so the
    # position is not a shape); the mask covers the columns attended, `static_decode_shapes`.
    cache_position: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, config: RavenConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.split_sizes = (q_dim, kv_dim, kv_dim)
        # Qwen2 has a bias on q, k, v (not on the output projection); `bias` is the authors' all-linears switch.
        self.Wqkv = nn.Linear(config.n_embd, q_dim + 2 * kv_dim, bias=config.bias or config.qkv_bias)
        self.proj = nn.Linear(q_dim, config.n_embd, bias=config.bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm == "whole":  # OLMo-2: RMSNorm over the whole projected q and k, before the head split
            self.q_norm = RMSNorm(q_dim, config.norm_eps)
            self.k_norm = RMSNorm(kv_dim, config.norm_eps)
        elif config.qk_norm == "per_head":  # Qwen3: RMSNorm over each head's q and k (one weight shared by all heads)
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, slot: tuple | None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.Wqkv(x)
        q_dim, kv_dim, _ = self.split_sizes
        if self.qk_norm == "none":
            # q and k heads side by side in (B, T, H, D) layout: one RoPE pass rotates both.
            qk = qkv[..., : q_dim + kv_dim].view(B, T, self.n_heads + self.n_kv_heads, self.head_dim)
            qk = apply_rope(qk, ctx.cos, ctx.sin)
            q, k = qk[:, :, : self.n_heads], qk[:, :, self.n_heads :]
            v = qkv[..., q_dim + kv_dim :]
        else:
            q, k, v = qkv.split(self.split_sizes, dim=-1)
            if self.qk_norm == "whole":  # OLMo-2: over the whole projected q and k
                q, k = self.q_norm(q), self.k_norm(k)
            q = q.view(B, T, self.n_heads, self.head_dim)
            k = k.view(B, T, self.n_kv_heads, self.head_dim)
            if self.qk_norm == "per_head":  # Qwen3: each head's q and k, before RoPE
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if ctx.cache is not None and slot is not None:
            if ctx.cache_position is not None:
                k, v = ctx.cache.update_at(slot, k, v, ctx.cache_position)
                # The columns the mask covers: all of the capacity with static shapes, else the
                # tokens so far (a dynamic length).
                k, v = k[:, :, : ctx.mask.shape[-1]], v[:, :, : ctx.mask.shape[-1]]
            else:
                k, v = ctx.cache.update(slot, k, v, ctx.past_length)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=ctx.mask,
            is_causal=ctx.mask is None and T > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class GatedMLP(nn.Module):
    def __init__(self, config: RavenConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=config.bias)  # [gate; up]
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class LoRALinear(nn.Linear):
    """nn.Linear plus low-rank deltas: y = x W^T + b + (alpha / r) x A_i^T B_i^T.

    The base keeps the names `weight` / `bias`, so a LoRA model still loads base checkpoints' keys.
    `lora_A` (D, r, in) and `lora_B` (D, out, r) stack D deltas; `delta_index` picks the one the
    next calls use (the model sets it before every recurrent-block iteration, so recomputation in
    backward sets it again); indices past the last reuse the last. B starts at zero, so adding LoRA
    leaves the outputs unchanged until training moves it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float, num_deltas: int,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.empty(num_deltas, rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(num_deltas, out_features, rank, device=device, dtype=dtype))
        self.lora_scale = alpha / rank
        self.delta_index = 0
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, num_deltas: int) -> "LoRALinear":
        """A LoRA layer sharing `linear`'s weight and bias (no copy)."""
        with torch.device("meta"):  # the throwaway base weight costs nothing
            module = cls(linear.in_features, linear.out_features, False, rank, alpha, num_deltas)
        module.weight, module.bias = linear.weight, linear.bias
        like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        module.lora_A = nn.Parameter(torch.empty(num_deltas, rank, linear.in_features, **like))
        module.lora_B = nn.Parameter(torch.empty(num_deltas, linear.out_features, rank, **like))
        module.reset_lora_parameters()
        return module

    def reset_lora_parameters(self) -> None:
        if self.lora_A.is_meta:
            return
        bound = 1.0 / math.sqrt(self.in_features)  # PEFT's default for A (kaiming-uniform, a = sqrt(5))
        nn.init.uniform_(self.lora_A, -bound, bound)
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = min(self.delta_index, self.lora_A.shape[0] - 1)
        return super().forward(x) + F.linear(F.linear(x, self.lora_A[i]), self.lora_B[i]) * self.lora_scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the (single) delta folded into the weight."""
        if self.lora_A.shape[0] != 1:
            raise ValueError(f"cannot merge {self.lora_A.shape[0]} per-iteration deltas into one weight")
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B[0].float() @ self.lora_A[0].float()) * self.lora_scale
            linear.weight.copy_(self.weight.float() + delta)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


class Block(nn.Module):
    """One transformer layer; `norm_placement` picks Llama (pre-norm) or OLMo-2 (post-norm)."""

    def __init__(self, config: RavenConfig):
        super().__init__()
        self.post_norm = config.norm_placement == "post"
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = GatedMLP(config)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, slot: tuple | None = None) -> torch.Tensor:
        if self.post_norm:
            x = x + self.norm_1(self.attn(x, ctx, slot))
            return x + self.norm_2(self.mlp(x))
        x = x + self.attn(self.norm_1(x), ctx, slot)
        return x + self.mlp(self.norm_2(x))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


@dataclass
class RavenCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    log_ppl: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: KVCache | None = None  # transformers >= 5.2 renames `past_key_values` to `cache` here
    latent_states: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    stats: dict | None = None


RavenCausalLMOutput.past_key_values = property(lambda self: self.cache)


class RavenPreTrainedModel(PreTrainedModel):
    config_class = RavenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Fresh weights (init_from_scratch, or keys missing from a checkpoint): small normal init
        # for matrices, ones for norms. The adapter gets PyTorch's default Linear init, as in the
        # authors' release; conversion sets it explicitly.
        std = self.config.initializer_range
        if isinstance(module, LoRALinear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            module.reset_lora_parameters()
        elif isinstance(module, nn.Linear):
            if module is getattr(getattr(self, "transformer", None), "adapter", None):
                module.reset_parameters()
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint directory before loading it (the authors' OLMo checkpoints state their layout
# only through their weights)
# ----------------------------------------------------------------------------------------------

HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
QK_NORM_SUFFIXES = ("attn.q_norm.weight", "attn.k_norm.weight")


def locate_checkpoint_file(path, name: str, load_kwargs: dict) -> str | None:
    """Local path of `name` in a checkpoint dir or Hub repo, or None when it has no such file."""
    subfolder = load_kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        candidate = os.path.join(path, subfolder, name)
        return candidate if os.path.isfile(candidate) else None
    try:
        from transformers.utils import cached_file

        hub = {k: load_kwargs[k] for k in HUB_KWARGS if k in load_kwargs}
        return cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub)
    except Exception:  # no network, no such repo: from_pretrained will report it properly
        return None


def checkpoint_weight_names(path, load_kwargs: dict) -> set[str] | None:
    """Names of the tensors a checkpoint stores, read from file headers / index files only;
    None when there is no readable weight file (from_pretrained then gives its own error)."""
    for name in WEIGHT_FILES:
        found = locate_checkpoint_file(path, name, load_kwargs)
        if found is None:
            continue
        try:
            if name.endswith(".index.json"):
                with open(found) as f:
                    return set(json.load(f)["weight_map"])
            if name.endswith(".safetensors"):
                with open(found, "rb") as f:  # 8-byte little-endian header size, then a JSON header
                    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
                return {k for k in header if k != "__metadata__"}
            return set(torch.load(found, map_location="meta", weights_only=True, mmap=True))
        except Exception:
            return None
    return None


def config_states_layout(path, load_kwargs: dict) -> bool:
    """Whether the checkpoint's config.json sets `norm_placement` or `qk_norm` itself."""
    found = locate_checkpoint_file(path, "config.json", load_kwargs)
    if found is None:
        return True
    try:
        with open(found) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return True  # from_pretrained reports the broken file
    return "norm_placement" in saved or "qk_norm" in saved


def describe_keys(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:6])
    return shown + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


class RavenGenerationMixin:
    """Decoding for RavenForCausalLM: cached `generate` (greedy or sampled, left-padded batches,
    stopping criteria, streamer), per-token adaptive exit, the bounded cache and the compiled
    static-shape decode step. Kept apart from the model class so that it reads like HF's
    modeling files (layers, then the model), and in this file so that a checkpoint stays
    self-contained. It uses the model's own pieces: `attention_context`, `run_layers`, `embed`,
    `run_prelude`, `recur`, `run_coda`, `lm_head`."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        stopping_criteria=None,
        num_steps: int | None = None,
        use_cache: bool = True,
        streamer=None,
        generator: torch.Generator | None = None,
        adaptive_threshold: float | None = None,
        adaptive_criterion: str = "kl",
        bounded_cache: bool = False,
        compile: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        """Greedy or sampled decoding with this model's own KV cache; returns prompt + new tokens.

        Accepts the arguments lm-eval's HF backend passes (`max_length`, `stopping_criteria`,
        `pad_token_id`, `do_sample`, `temperature`). A left-padded batch needs `attention_mask`;
        without one, it is inferred from `pad_token_id` when that differs from EOS.
        Finished sequences are padded with `pad_token_id` (or EOS).

        `adaptive_threshold`: per-token early exit while decoding (Huginn-style). A new token stops
        iterating once the KL between successive iterations' output distributions
        (`adaptive_criterion="kl"`) or the relative change of the latent state ("latent") falls
        below the threshold, at most `num_steps` (default `config.mean_recurrence`) iterations.
        The prompt itself runs the full depth. `last_generation_stats["mean_depth"]` reports the
        mean depth used per generated token. `bounded_cache=True` keeps only the latest
        iteration's keys for the recurrent layers (memory independent of depth).

        `compile=True` runs each new token through a `torch.compile`d decode step, one graph per
        batch size, depth and cache capacity (`compiled_cache_capacity`): on CUDA with static
        shapes (attention over the whole cache, masked), so it can be replayed as a CUDA graph;
        elsewhere over the columns written so far, a dynamic length (`static_decode_shapes`).
        Same tokens up to float rounding. Not with adaptive exit.
        """
        generation_config = kwargs.pop("generation_config", None)
        if generation_config is not None:
            max_new_tokens = max_new_tokens or generation_config.max_new_tokens
            eos_token_id = eos_token_id if eos_token_id is not None else generation_config.eos_token_id
        B, T = input_ids.shape
        device = input_ids.device
        if max_new_tokens is None:
            max_new_tokens = (max_length - T) if max_length is not None else 20
        max_new_tokens = max(max_new_tokens, 0)
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        eos_ids = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        if pad_token_id is None:
            pad_token_id = self.config.pad_token_id if self.config.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)
        if attention_mask is None:
            if pad_token_id not in eos_ids and bool((input_ids == pad_token_id).any()):
                attention_mask = (input_ids != pad_token_id).long()
            else:
                attention_mask = torch.ones_like(input_ids)
        if temperature is not None and temperature <= 0:
            do_sample = False

        if adaptive_threshold is not None:
            if not use_cache:
                raise ValueError("adaptive_threshold needs use_cache=True")
            if adaptive_criterion not in ADAPTIVE_CRITERIA:
                raise ValueError(f"adaptive_criterion must be 'kl' or 'latent', got {adaptive_criterion!r}")
            if num_steps is not None and not isinstance(num_steps, int):
                raise ValueError(f"adaptive decoding takes an int num_steps (the maximum depth), got {num_steps!r}")
        if compile and (adaptive_threshold is not None or not use_cache):
            raise ValueError("compile=True needs use_cache=True and no adaptive_threshold")
        n_steps, k_steps = self.resolve_num_steps(num_steps if num_steps is not None else int(self.config.mean_recurrence))
        max_steps = n_steps + k_steps

        # Everything a step needs is allocated once: the output tokens, the mask, the cache (at
        # its final length), the RoPE tables and the EOS ids. Nothing is concatenated per token.
        total = T + max_new_tokens
        tokens = torch.full((B, total), pad_token_id, dtype=input_ids.dtype, device=device)
        tokens[:, :T] = input_ids
        mask = torch.ones((B, total), dtype=attention_mask.dtype, device=device)
        mask[:, :T] = attention_mask
        # Once a prompt is padded or a sequence has finished (its later tokens are masked as
        # padding), steps need a mask and per-row positions; until then neither.
        masked = not bool(attention_mask.all())
        real_tokens = attention_mask.long().sum(-1)  # per row, the tokens the mask counts
        cos_table, sin_table = self.rope_tables(total, device)
        eos = torch.tensor(sorted(eos_ids), device=device) if eos_ids else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        # The compiled step's shapes include the cache capacity: round it up so that generations
        # of similar length reuse one compiled graph.
        capacity = compiled_cache_capacity(total) if compile else total
        cache = KVCache(bounded=bounded_cache, capacity=capacity) if use_cache else None
        static_shapes = compile and static_decode_shapes(device)
        step_fn = self._compiled_decode_step(device) if compile else None
        arange_total = torch.arange(capacity, device=device) if static_shapes else None
        depths: list[torch.Tensor] = []
        if streamer is not None:
            streamer.put(input_ids.cpu())  # HF streamer convention: the prompt comes first
        length = T
        for step in range(max_new_tokens):
            if not use_cache:
                out = self(tokens[:, :length], attention_mask=mask[:, :length], num_steps=num_steps, logits_to_keep=1)
                logits = out.logits[:, -1, :]
            elif step == 0:  # the prompt, through the cache (runs the full depth)
                ctx = self.attention_context(input_ids, attention_mask, None, cache)
                x, _ = self.run_layers(input_ids, ctx, n_steps, k_steps)
                logits = self.lm_head(x[:, -1])
            else:
                positions = (real_tokens - 1).clamp(min=0)
                ctx = AttentionContext(
                    cos=cos_table.index_select(0, positions)[:, None, None],
                    sin=sin_table.index_select(0, positions)[:, None, None],
                    mask=None, cache=cache, past_length=length - 1,
                )
                if masked:
                    # The new token sees every real token and itself, as `attention_context` does.
                    key_mask = mask[:, :length].bool()
                    key_mask[:, -1] = True
                    ctx.mask = key_mask[:, None, None, :]
                step_input = tokens[:, length - 1 : length]
                if adaptive_threshold is not None:
                    logits, depth = self._adaptive_decode_step(
                        step_input, ctx, max_steps, adaptive_threshold, adaptive_criterion
                    )
                    depths.append(depth[~done].float())
                elif step_fn is not None:
                    if static_shapes:
                        # Keys over the whole capacity, the columns not written yet masked.
                        key_mask = (arange_total < length)[None].expand(B, -1).clone()
                        if masked:
                            key_mask[:, :total] &= mask.bool()
                    else:
                        key_mask = mask[:, :length].to(torch.bool, copy=True)
                    key_mask[:, length - 1] = True
                    ctx.mask = key_mask[:, None, None, :]
                    if not static_shapes:  # the attended length (`Attention` slices the cache to the mask's) is dynamic
                        torch._dynamo.maybe_mark_dynamic(ctx.mask, 3)
                    ctx.cache_position = torch.full((1,), length - 1, dtype=torch.long, device=device)
                    ctx.past_length = 0  # not a shape here: keeps the compiled step from specialising on it
                    # contiguous: a column of `tokens` has its row stride, which differs with
                    # the generation's length, and a new stride means a new graph.
                    logits = step_fn(self, step_input.contiguous(), ctx, n_steps, k_steps)
                    cache.seen_tokens = length
                else:
                    x, _ = self.run_layers(step_input, ctx, n_steps, k_steps)
                    logits = self.lm_head(x[:, -1])
            logits = logits.float()
            next_token = self._choose_next(logits, do_sample, temperature, top_k, top_p, generator)
            next_token = torch.where(done, pad_token_id, next_token)
            tokens[:, length] = next_token
            if masked or bool(done.any()):
                masked = True
                mask[:, length] = ~done
                real_tokens += ~done
            else:
                real_tokens += 1
            length += 1
            if streamer is not None:
                streamer.put(next_token.cpu())
            if eos is not None:
                done |= torch.isin(next_token, eos)
            if stopping_criteria is not None:
                done |= torch.as_tensor(stopping_criteria(tokens[:, :length], logits), device=device).bool().reshape(-1).expand(B)
            if bool(done.all()):
                break
        if streamer is not None:
            streamer.end()
        if depths:
            used = torch.cat(depths)
            self.last_generation_stats = {"mean_depth": used.mean().item() if used.numel() else 0.0,
                                          "tokens": int(used.numel())}
        else:
            depth = num_steps if num_steps is not None else int(self.config.mean_recurrence)
            self.last_generation_stats = {"mean_depth": float(sum(depth) if isinstance(depth, (tuple, list)) else depth),
                                          "tokens": int(length - T) * B}
        return tokens[:, :length]

    def _compiled_decode_step(self, device: torch.device):
        """The decode step, compiled once per model and device type (`generate(compile=True)`).
        On CPU, inductor's C++ wrapper calls the step's kernels without going through Python per
        kernel: per-token overhead is what a small decode step is made of (measured: 1.3-2.2x
        the eager step at batch 1, against 1.3-1.7x without it)."""
        steps = self.__dict__.setdefault("_compiled_decode_steps", {})
        step = steps.get(device.type)
        if step is None:
            options = {"cpp_wrapper": True} if device.type == "cpu" else None
            dynamic = False if static_decode_shapes(device) else None  # None: honour maybe_mark_dynamic
            step = torch.compile(RavenForCausalLM._decode_step, dynamic=dynamic, fullgraph=False, options=options)
            steps[device.type] = step
        return step

    @staticmethod
    def _decode_step(model, step_input, ctx: AttentionContext, n: int, k: int) -> torch.Tensor:
        """One token through the preallocated cache, for `torch.compile`: the write position is a
        tensor and the attended length a static or a dynamic shape, so one compiled graph serves
        every token of a generation."""
        x, _ = model.run_layers(step_input, ctx, n, k)
        return model.lm_head(x[:, -1])

    def _adaptive_decode_step(self, step_input, ctx: AttentionContext, max_steps: int, threshold: float, criterion: str):
        """One decoding step with per-sequence early exit; returns (last-position logits, depth used)."""
        cache = ctx.cache
        e = self.run_prelude(self.embed(step_input), ctx)
        state = self.initial_state(e)
        parts = self.adapter_parts(e)
        B = step_input.shape[0]
        exited = torch.zeros(B, dtype=torch.bool, device=step_input.device)
        depth = torch.full((B,), max_steps, device=step_input.device)
        previous = None
        last = max_steps - 1
        for i in range(max_steps):
            new_state = self.recur(state, e, ctx, i, adapter_parts=parts)
            if criterion == "latent":
                exits = should_exit(criterion, state, new_state, threshold)[:, -1]
            # Sequences that already exited keep their state (the batch runs until all exit).
            state = torch.where(exited[:, None, None], state, new_state)
            if criterion == "kl":
                x = self.run_coda(state, ctx)  # the last iteration's is also the step's output
                logprobs = self.lm_head(x[:, -1]).float().log_softmax(-1)
                exits = None if previous is None else should_exit(criterion, previous, logprobs, threshold)
                previous = logprobs
            if i > 0 and exits is not None:
                newly = ~exited & exits
                depth = torch.where(newly, torch.full_like(depth, i + 1), depth)
                exited |= newly
            if bool(exited.all()):
                last = i
                break
        if not cache.bounded:
            # Later tokens attend to every iteration's keys: fill the skipped iterations of this
            # position with those of the last iteration run (Huginn's "latest" lookup).
            start = ctx.past_length
            for i in range(last + 1, max_steps):
                for j in range(len(self.transformer.core_block)):
                    src = cache.slot("core", j, last)
                    k = cache.keys[src][:, :, start : start + step_input.shape[1]]
                    v = cache.values[src][:, :, start : start + step_input.shape[1]]
                    cache.update(cache.slot("core", j, i), k, v, start)
        if criterion != "kl":
            x = self.run_coda(state, ctx)
        cache.seen_tokens = ctx.past_length + step_input.shape[1]
        return self.lm_head(x[:, -1]), depth

    @staticmethod
    def _choose_next(logits, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(dim=-1)
        logits = logits / max(temperature or 1.0, 1e-5)
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1, None]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            remove = cumulative - sorted_logits.softmax(-1) > top_p
            logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)



class RavenForCausalLM(RavenGenerationMixin, RavenPreTrainedModel):
    _tied_weights_keys = {}
    # RoPE tables are recomputed from the config; checkpoints that also stored them load fine.
    _keys_to_ignore_on_load_unexpected = [r"freqs_cis$", r"rotary_emb\.inv_freq$"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained` with two additions.

        - A config.json without `norm_placement` / `qk_norm` (the authors' OLMo release) gets the
          OLMo-2 layout when the weights hold q/k norm tensors, the Llama layout otherwise.
        - Strict weights: a checkpoint tensor the model would not use, or a model weight the
          checkpoint lacks, is a ValueError naming the keys (never a silent drop or random init).
        """
        config = kwargs.get("config")
        if config is None or isinstance(config, RavenConfig):
            unstated = config.layout_from_weights if config is not None else not config_states_layout(
                pretrained_model_name_or_path, kwargs
            )
            names = checkpoint_weight_names(pretrained_model_name_or_path, kwargs) if unstated else None
            if names is not None and any(n.endswith(QK_NORM_SUFFIXES) for n in names):
                layout = {"norm_placement": "post", "qk_norm": "whole"}
                if config is not None:
                    config = copy.deepcopy(config)
                    for key, value in layout.items():
                        setattr(config, key, value)
                    config.layout_from_weights = False
                    kwargs["config"] = config
                else:
                    kwargs.update(layout)  # applied to the loaded config like any config override
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        problems = []
        if info.get("unexpected_keys"):
            problems.append(f"weights the model does not use: {describe_keys(info['unexpected_keys'])}")
        if info.get("missing_keys"):
            problems.append(f"weights the checkpoint lacks: {describe_keys(info['missing_keys'])}")
        if problems:
            raise ValueError(
                f"checkpoint {pretrained_model_name_or_path} does not match its config "
                f"(norm_placement={model.config.norm_placement!r}, qk_norm={model.config.qk_norm!r}, qkv_bias={model.config.qkv_bias}): "
                + "; ".join(problems)
            )
        return (model, info) if want_info else model

    def __init__(self, config: RavenConfig):
        config.validate()  # again: from_pretrained applies overrides (e.g. mean_recurrence=R) after __init__
        super().__init__(config)
        h = config.n_embd
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, h),
                prelude=nn.ModuleList(Block(config) for _ in range(config.n_layers_in_prelude)),
                adapter=nn.Linear(2 * h, h, bias=False),
                core_block=nn.ModuleList(Block(config) for _ in range(config.n_layers_in_recurrent_block)),
                coda=nn.ModuleList(Block(config) for _ in range(config.n_layers_in_coda)),
                ln_f=RMSNorm(h, config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(h, config.padded_vocab_size, bias=False)
        # RoPE frequencies are derived from the config, never saved: kept out of the module's
        # buffers so meta-device loading (transformers 5) cannot leave them uninitialised.
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.step = 0  # counts training forwards that sampled their own depth
        # Recompute each grad iteration of the recurrent block in backward instead of keeping its
        # activations (training only; set by the trainer, not saved).
        self.activation_checkpointing = False
        self._core_lora_layers: list[LoRALinear] = []
        self._install_lora()
        self.post_init()

    # -- HF plumbing ---------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights + config, and copy this file and the config file beside them (auto_map)."""
        self.config.auto_map = {
            "AutoConfig": "configuration_raven.RavenConfig",
            "AutoModelForCausalLM": "modeling_raven.RavenForCausalLM",
        }
        self.config.architectures = ["RavenForCausalLM"]
        super().save_pretrained(save_directory, *args, **kwargs)
        here = Path(__file__).resolve().parent
        for name in ("modeling_raven.py", "configuration_raven.py"):
            if (here / name).resolve() != (Path(save_directory) / name).resolve():
                shutil.copyfile(here / name, Path(save_directory) / name)

    # -- LoRA ------------------------------------------------------------------------------------

    def add_lora(self, rank: int, alpha: float | None = None, targets=("core_block",), num_deltas: int = 1) -> None:
        """Add low-rank deltas (zero at first) to every linear layer of `targets` and record them
        in the config, so a saved checkpoint rebuilds them wherever it is loaded."""
        if self.config.lora:
            raise ValueError(f"this model already has LoRA deltas ({self.config.lora})")
        self.config.lora = normalise_lora(
            {"rank": rank, "alpha": alpha if alpha is not None else rank, "targets": list(targets), "num_deltas": num_deltas}
        )
        self._install_lora()

    def _install_lora(self) -> None:
        for part in ("prelude", "core_block", "coda"):
            num_deltas = self.config.lora_deltas(part)
            if not num_deltas:
                continue
            for block in self.transformer[part]:
                for parent in list(block.modules()):
                    for name, child in list(parent.named_children()):
                        if type(child) is nn.Linear:
                            lora = LoRALinear.from_linear(child, self.config.lora["rank"], self.config.lora["alpha"], num_deltas)
                            setattr(parent, name, lora)
        self._core_lora_layers = [m for m in self.transformer.core_block.modules() if isinstance(m, LoRALinear)]

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if ".lora_" in name]

    def freeze_base_weights(self) -> None:
        """Train only the LoRA deltas."""
        if not self.config.lora:
            raise ValueError("freeze_base_weights needs LoRA deltas (add_lora first)")
        for name, param in self.named_parameters():
            param.requires_grad_(".lora_" in name)

    def merge_lora_(self) -> list[str]:
        """Fold every single delta (shared across iterations, prelude, coda) into its base weight, in
        place; per-iteration deltas of the recurrent block stay. Returns the parts merged."""
        if not self.config.lora:
            return []
        merged = [part for part in self.config.lora["targets"] if self.config.lora_deltas(part) == 1]
        for part in merged:
            for block in self.transformer[part]:
                for parent in list(block.modules()):
                    for name, child in list(parent.named_children()):
                        if isinstance(child, LoRALinear):
                            setattr(parent, name, child.merged())
        remaining = [t for t in self.config.lora["targets"] if t not in merged]
        self.config.lora = dict(self.config.lora, targets=remaining) if remaining else None
        self._core_lora_layers = [m for m in self.transformer.core_block.modules() if isinstance(m, LoRALinear)]
        return merged

    # -- building blocks of the forward pass (also used by conversion checks and depth sweeps) --

    def attention_context(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> AttentionContext:
        """RoPE tables and the attention mask for a call on `input_ids` (B, T).

        `attention_mask` (B, past + T), 1 = real token, covers cached tokens too. Positions count
        real tokens only, so a left-padded sequence gets the same positions as it would alone.
        """
        B, T = input_ids.shape
        device = input_ids.device
        past = cache.seen_tokens if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != past + T:
            raise ValueError(
                f"attention_mask has length {attention_mask.shape[-1]}, expected {past + T} (cached {past} + new {T})"
            )
        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None and padded:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        if position_ids is None:
            cos, sin = self.rope_tables(past + T, device)
            cos, sin = cos[past : past + T, None], sin[past : past + T, None]  # (T, 1, D), broadcast over B
        else:
            cos, sin = self.rope_at(position_ids)

        mask = None
        if padded or (past > 0 and T > 1):
            q_pos = torch.arange(past, past + T, device=device)
            k_pos = torch.arange(past + T, device=device)
            mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # causal, (1, 1, T, past + T)
            if padded:
                mask = mask & attention_mask.bool()[:, None, None, :]
                # A padding query would attend to nothing (NaN in SDPA): let it see itself.
                mask = mask | (k_pos[None, :] == q_pos[:, None])[None, None]
        return AttentionContext(cos=cos, sin=sin, mask=mask, cache=cache, past_length=past)

    def rope_tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (`apply_rope`) of positions 0 .. >= length-1, (P, head_dim).

        Computed once per device and dtype and grown by doubling, so a decode step only indexes
        them, and every call (cached or not) reads the same numbers for the same position.
        """
        dtype = self.transformer.wte.weight.dtype
        key = (torch.device(device), dtype)
        tables = self._rope_tables.get(key)
        if tables is None or tables[0].shape[0] < length:
            size = max(256, 1 << (max(length, 1) - 1).bit_length())
            inv_freq = rope_inverse_frequencies(self.config).to(device)
            freqs = torch.arange(size, device=device).float()[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            sin = emb.sin()
            half = sin.shape[-1] // 2
            signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
            tables = self._rope_tables[key] = (emb.cos().to(dtype), signed_sin.to(dtype))
        return tables

    def rope_at(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin at `position_ids` (B, T), shaped (B, T, 1, head_dim)."""
        cos, sin = self.rope_tables(int(position_ids.max()) + 1, position_ids.device)
        flat = position_ids.reshape(-1)
        shape = (*position_ids.shape, 1, cos.shape[-1])
        return cos.index_select(0, flat).view(shape), sin.index_select(0, flat).view(shape)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(input_ids)
        scale = self.config.init_values.get("embed_scale", 1.0)
        return x * scale if scale != 1.0 else x

    def run_prelude(self, x: torch.Tensor, ctx: AttentionContext, hidden: list | None = None) -> torch.Tensor:
        for j, layer in enumerate(self.transformer.prelude):
            x = layer(x, ctx, ctx.cache.slot("prelude", j) if ctx.cache else None)
            if hidden is not None:
                hidden.append(x)
        return x

    def initial_state(self, prelude_out: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """s_0 ~ TruncNormal(0, std^2, +-3 std), std read from the config at call time (0 -> zeros)."""
        std = float(self.config.init_values.get("std", 0.0))
        state = torch.zeros_like(prelude_out)
        if std > 0:
            nn.init.trunc_normal_(state, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
            scale = self.config.init_values.get("embed_scale", 1.0)
            if scale != 1.0:
                state = state * scale
        return state

    def adapter_parts(self, prelude_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split adapter(cat([s, e])) = s @ W_s^T + e @ W_e^T and project e once per forward.

        The prelude output is the same at every iteration, so its half of the adapter is computed
        once instead of r times, and no (B, T, 2h) concatenation is materialised per iteration.
        """
        weight = self.transformer.adapter.weight
        h = weight.shape[0]
        return weight[:, :h].contiguous(), F.linear(prelude_out, weight[:, h:])

    def recur(
        self,
        state: torch.Tensor,
        prelude_out: torch.Tensor,
        ctx: AttentionContext,
        iteration: int,
        hidden: list | None = None,
        adapter_parts: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One pass of the recurrent block: core_block(adapter(cat([state, prelude_out]))).

        Pass `adapter_parts=self.adapter_parts(prelude_out)` when iterating many times.
        """
        w_state, embed_proj = adapter_parts if adapter_parts is not None else self.adapter_parts(prelude_out)
        for layer in self._core_lora_layers:  # per-iteration LoRA: this iteration's delta
            layer.delta_index = iteration
        x = torch.addmm(embed_proj.reshape(-1, embed_proj.shape[-1]), state.reshape(-1, state.shape[-1]), w_state.t())
        x = x.view(state.shape)
        for j, layer in enumerate(self.transformer.core_block):
            x = layer(x, ctx, ctx.cache.slot("core", j, iteration) if ctx.cache else None)
            if hidden is not None:
                hidden.append(x)
        return x

    def run_coda(self, x: torch.Tensor, ctx: AttentionContext, hidden: list | None = None) -> torch.Tensor:
        """Coda layers and the final norm; returns the normalised hidden state fed to lm_head."""
        for j, layer in enumerate(self.transformer.coda):
            x = layer(x, ctx, ctx.cache.slot("coda", j) if ctx.cache else None)
            if hidden is not None:
                hidden.append(x)
        return self.transformer.ln_f(x)

    def resolve_num_steps(self, num_steps) -> tuple[int, int]:
        """(n, k) from None | int | (n, k); None samples in training mode, else mean_recurrence."""
        if num_steps is None:
            if self.training:
                self.step += 1
                return sample_num_steps(
                    int(self.config.mean_recurrence), int(self.config.mean_backprop_depth), self.step
                )
            return int(self.config.mean_recurrence), 0
        if isinstance(num_steps, (tuple, list)) or (torch.is_tensor(num_steps) and num_steps.numel() == 2):
            n, k = (int(v) for v in num_steps)
        else:
            n, k = int(num_steps), 0
        if n < 0 or k < 0 or n + k < 1:
            raise ValueError(f"num_steps must give at least one iteration, got (n={n}, k={k})")
        return n, k

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_steps=None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        initial_state: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        return_dict: bool = True,
        **kwargs,
    ) -> RavenCausalLMOutput:
        """Labels are aligned with input_ids (no shift inside, as in the authors' Huginn code).

        `logits_to_keep=m > 0` computes logits for the last m positions only (decoding).
        """
        n, k = self.resolve_num_steps(num_steps)
        past_key_values = kwargs.pop("cache", past_key_values)
        if use_cache and past_key_values is None:
            past_key_values = KVCache()
        ctx = self.attention_context(input_ids, attention_mask, position_ids, past_key_values)
        hidden = [] if output_hidden_states else None
        x, state = self.run_layers(input_ids, ctx, n, k, initial_state, hidden)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)

        loss = log_ppl = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
            )
            log_ppl = loss.detach().exp()
        return RavenCausalLMOutput(
            loss=loss,
            log_ppl=log_ppl,
            logits=logits,
            cache=past_key_values if use_cache else None,
            latent_states=state.detach(),
            hidden_states=tuple(hidden) if hidden is not None else None,
            stats={"num_steps_no_grad": n, "num_steps_with_grad": k},
        )

    def run_layers(
        self,
        input_ids: torch.Tensor,
        ctx: AttentionContext,
        n: int,
        k: int,
        initial_state: torch.Tensor | None = None,
        hidden: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """prelude, n iterations without grad, k with grad, coda: (ln_f output, last state).

        The forward pass without the head; `forward` and the decode steps of `generate` share it.
        Advances the cache (if any) past these tokens.
        """
        e = self.embed(input_ids)
        if hidden is not None:
            hidden.append(e)
        e = self.run_prelude(e, ctx, hidden)
        state = self.initial_state(e) if initial_state is None else initial_state
        parts = self.adapter_parts(e)
        with torch.no_grad():
            for i in range(n):
                state = self.recur(state, e, ctx, i, hidden, parts)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and ctx.cache is None and hidden is None
        for i in range(n, n + k):
            if recompute:
                # Keep only the iteration's inputs; its activations are recomputed in backward.
                state = torch.utils.checkpoint.checkpoint(self.recur, state, e, ctx, i, None, parts, use_reentrant=False)
            else:
                state = self.recur(state, e, ctx, i, hidden, parts)
        x = self.run_coda(state, ctx, hidden)
        if ctx.cache is not None:
            ctx.cache.seen_tokens = ctx.past_length + input_ids.shape[1]
        return x, state


RavenConfig.register_for_auto_class()
RavenForCausalLM.register_for_auto_class("AutoModelForCausalLM")

if __name__.startswith("retrofit."):
    # Imported as part of this repo (not as remote code beside a checkpoint): let the Auto classes
    # resolve model_type RavenConfig.model_type to these classes without trust_remote_code.
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(RavenConfig.model_type, RavenConfig, exist_ok=True)
    AutoModelForCausalLM.register(RavenConfig, RavenForCausalLM, exist_ok=True)
