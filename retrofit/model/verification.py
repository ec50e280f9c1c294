"""Verification of a converted model against its base (retrofit/model/conversion.py runs it).

It replaces the original's manual swap of modeling files: the saved model is reloaded
and run in float32 with the adapter bypassed and the state started from the prelude output for
one iteration, which must reproduce the base model with only the chosen layers kept, hidden
state by hidden state.

The reference is the base model in float32 with its weights rounded to the saved dtype and nothing
else (RoPE inverse frequencies and other buffers stay float32, as the reloaded model computes
them from the config). A row passes when

    max |ours - reference| <= TOLERANCE * max(1, max |reference|)

i.e. a relative tolerance against the row's largest reference value, floored at an absolute
TOLERANCE for rows of magnitude below 1. Real bases carry "massive activations" (hidden-state
dims in the hundreds), where float32 rounding alone is far above any fixed absolute bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .modeling_raven import RavenForCausalLM

TOLERANCE = 1e-4
VERIFY_PROMPT = "The quick brown fox jumps over the lazy dog. 12 + 30 = 42."


@dataclass(frozen=True)
class VerificationRow:
    name: str
    max_abs_diff: float
    max_abs_reference: float

    @property
    def relative_diff(self) -> float:
        """max |diff| over the row's scale, max(1, max |reference|): what the tolerance bounds."""
        return self.max_abs_diff / max(1.0, self.max_abs_reference)

    def passes(self, tolerance: float = TOLERANCE) -> bool:
        return self.relative_diff <= tolerance


def round_weights_like_saved(base: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Round the base's parameters (what conversion saves) to `dtype`, keep them float32, and leave
    buffers (RoPE inverse frequencies) untouched: the reloaded model recomputes those in float32."""
    with torch.no_grad():
        for param in base.parameters():
            param.copy_(param.to(dtype).float())
    return base


@torch.no_grad()
def verification_table(raven: RavenForCausalLM, base: nn.Module, choice, input_ids: torch.Tensor):
    """[VerificationRow] for the embedding, every kept layer's output and the logits, float32,
    adapter bypassed; `choice`: the conversion's `LayerChoice`."""
    raven, base = raven.float().eval(), base.float().eval()
    captured: list[torch.Tensor] = []
    hooks = [
        base.model.layers[i].register_forward_hook(
            lambda _m, _inp, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        for i in choice.kept
    ]
    original_layers = base.model.layers
    try:
        # The base model with only the chosen layers kept, in order.
        base.model.layers = nn.ModuleList(original_layers[i] for i in choice.kept)
        base_logits = base(input_ids=input_ids, use_cache=False).logits
    finally:
        base.model.layers = original_layers
        for h in hooks:
            h.remove()
    base_embed = base.model.embed_tokens(input_ids)

    ctx = raven.attention_context(input_ids)
    ours: list[torch.Tensor] = []
    e = raven.embed(input_ids)
    rows = [("embedding", e, base_embed)]
    x = raven.run_prelude(e, ctx, ours)
    for j, layer in enumerate(raven.transformer.core_block):  # one iteration, no adapter, s_0 = prelude output
        x = layer(x, ctx)
        ours.append(x)
    logits = raven.lm_head(raven.run_coda(x, ctx, ours))
    names = (
        [f"prelude.{j} (layer {i})" for j, i in enumerate(choice.prelude)]
        + [f"core_block.{j} (layer {i})" for j, i in enumerate(choice.core)]
        + [f"coda.{j} (layer {i})" for j, i in enumerate(choice.coda)]
    )
    rows += list(zip(names, ours, captured))
    rows.append(("logits", logits, base_logits))
    return [
        VerificationRow(name, (a.float() - b.float()).abs().max().item(), b.float().abs().max().item())
        for name, a, b in rows
    ]


def print_table(rows: list[VerificationRow], tolerance: float = TOLERANCE) -> bool:
    width = max(len(row.name) for row in rows)
    print(f"{'hidden state':<{width}}  max |diff|   max |ref|  relative  ok")
    ok_all = True
    for row in rows:
        ok = row.passes(tolerance)
        ok_all &= ok
        print(f"{row.name:<{width}}  {row.max_abs_diff:10.3e}  {row.max_abs_reference:10.3e}  {row.relative_diff:8.2e}  {'yes' if ok else 'NO'}")
    print(f"verification {'passed' if ok_all else 'FAILED'} (a row passes when max |diff| <= {tolerance:g} * max(1, max |ref|))")
    return ok_all


def verification_input(tokenizer, vocab_size: int) -> torch.Tensor:
    """The fixed prompt, tokenized; a fixed pseudo-random prompt when there is no tokenizer."""
    if tokenizer is not None:
        ids = tokenizer(VERIFY_PROMPT, return_tensors="pt").input_ids
        if ids.numel() > 1 and int(ids.max()) < vocab_size:
            return ids
    return torch.randint(0, vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
