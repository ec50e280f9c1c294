"""The layers of the depth-recurrent model (retrofit/model/modeling_raven.py): the depth sampler,
RMSNorm, RoPE, the KV cache, attention, the gated MLP, LoRA deltas and the transformer block.

Part of the model's self-contained code (torch + transformers only): copied beside saved weights
with modeling_raven.py, which imports it relatively.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_raven import RavenConfig


# ----------------------------------------------------------------------------------------------
# Depth sampling (the repository's docs/training.md, Depth sampler). `retrofit.train.depth` re-exports this; it lives with the model so a
# checkpoint directory carries everything its forward pass needs.
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


CACHE_POLICIES = ("full", "latest-M", "compress-S")


def parse_cache_policy(policy: str) -> tuple[str, int]:
    """"full" -> ("full", 0); "latest-M" -> ("latest", M); "compress-S" -> ("compress", S); M, S >= 1."""
    name, _, size = str(policy).partition("-")
    if name == "full" and not size:
        return "full", 0
    if name in ("latest", "compress") and size.isdigit() and int(size) >= 1:
        return name, int(size)
    raise ValueError(f"cache_policy must be 'full', 'latest-M' or 'compress-S' with M, S >= 1, got {policy!r}")


class KVCache:
    """Keys and values per attention "slot", grown by doubling so decoding costs amortised O(1).

    A slot is one layer application: ("prelude", j), ("core", c, j) or ("coda", j), where c is the
    iteration's slot under the cache `policy` (docs/generation.md, KV-cache policies):

      full        c = i: one slot per iteration, what the authors' models were trained with
                  (every iteration attends to the same iteration of earlier tokens).
      latest-M    c = i mod M: M slots per layer, a ring; an earlier token keeps its last M
                  iterations, and iteration i reads the latest iteration congruent to i mod M
                  (Huginn's "compress-s" with s = M x core layers). latest-1 = `bounded=True`.
      compress-S  c = i // S: one slot per S consecutive iterations; an earlier token keeps every
                  S-th iteration (S-1, 2S-1, ..., and its last), and iteration i reads the last
                  iteration of its group (Huginn's "compress-r", per layer). compress-1 = full.

    The token being processed always attends to its own keys of the current iteration (written
    before attention reads the slot); the policies differ only in what earlier tokens offer.
    """

    def __init__(self, bounded: bool = False, capacity: int = 0, policy: str = "full"):
        kind, size = parse_cache_policy(policy)
        if bounded:
            if kind != "full" and (kind, size) != ("latest", 1):
                raise ValueError(f"bounded=True is cache policy latest-1; it conflicts with {policy!r}")
            kind, size = "latest", 1
        self.policy_kind, self.policy_size = kind, size
        self.policy = "full" if kind == "full" else f"{kind}-{size}"
        self.bounded = (kind, size) == ("latest", 1)  # memory independent of depth
        # Tokens to allocate on a slot's first write: `generate` knows its final length, so its
        # cache is allocated once and written in place (no growth, no copies).
        self.capacity = capacity
        self.keys: dict[tuple, torch.Tensor] = {}
        self.values: dict[tuple, torch.Tensor] = {}
        self.seen_tokens = 0  # advanced by the model once a forward call has written every slot
        self.scratch: dict[str, torch.Tensor] = {}  # adaptive decoding's reused row gathers (exits_raven)

    def core_slot(self, iteration: int) -> int:
        """The slot index c of recurrent iteration `iteration` under this cache's policy."""
        if self.policy_kind == "latest":
            return iteration % self.policy_size
        if self.policy_kind == "compress":
            return iteration // self.policy_size
        return iteration

    def slot(self, kind: str, layer: int, iteration: int = 0) -> tuple:
        if kind == "core":
            return (kind, self.core_slot(iteration), layer)
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


def relative_change(state: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """||s_i - s_{i-1}|| / ||s_i|| per token (float32): the `latent` exit criterion's quantity,
    and an input of the learned exit gate."""
    state, previous = state.float(), previous.float()
    return (state - previous).norm(dim=-1) / state.norm(dim=-1).clamp(min=1e-12)


class ExitGate(nn.Module):
    """A learned exit gate: the probability that a token stops after recurrent iteration i,

        p_stop = sigmoid(w . rmsnorm(s_i) + a * log(||s_i - s_{i-1}|| / ||s_i||) + b_min(i, N))

    on the latent state s_i right after the iteration (before the coda), so asking it costs one
    dot product per token instead of a coda + lm_head readout (the `kl` criterion's cost). The
    normalised state says what the token is; the log relative change is the `latent` criterion's
    quantity, so the gate can only improve on it; the per-iteration bias b_i lets the gate learn
    how the benefit of another iteration falls with depth. h + N + 1 weights in all."""

    def __init__(self, config: RavenConfig):
        super().__init__()
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.proj = nn.Linear(config.n_embd, 1, bias=False)
        self.change_weight = nn.Parameter(torch.zeros(1))
        self.iteration_bias = nn.Parameter(torch.zeros(config.exit_gate["iterations"]))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.proj.weight)  # p_stop = 1/2 everywhere before training
        nn.init.zeros_(self.change_weight)
        nn.init.zeros_(self.iteration_bias)

    def forward(self, state: torch.Tensor, previous: torch.Tensor, iteration) -> torch.Tensor:
        """Stop logits (B, T), float32, after 1-based `iteration` (an int, or each token's as a
        tensor) took `previous` to `state`."""
        change = relative_change(state, previous)
        last = self.iteration_bias.shape[0]
        index = torch.as_tensor(iteration, device=self.iteration_bias.device).clamp(1, last) - 1
        bias = self.iteration_bias[index]
        score = self.proj(self.norm(state.float()).to(self.proj.weight.dtype)).squeeze(-1).float()
        return score + self.change_weight.float() * change.clamp(min=1e-6).log() + bias.float()
