"""Validation loss over depth through the KV cache: teacher-forced decoding, one token at a time.

`loss_over_depth.depth_sweep` scores all positions of a row in one parallel pass, which is what
the model computes with the "full" cache and a fresh initial state per token. Two inference
options change what a position sees and so need the sequential, decoding-time computation:

- a KV-cache policy (`latest-M`, `compress-S`; docs/generation.md, KV-cache policies): earlier
  tokens offer the keys their slot holds after all their iterations, not those of the same
  iteration;
- continuous thought: position t's recurrence starts from position t-1's final latent state of
  the same depth run (position 0 from the seeded initial state), as `generate(continuous=True)`
  seeds each new token with the previous position's final state.

`cached_losses` runs each requested depth separately: for t = 0 .. T-1 it feeds token t through
the model with the cache (prelude, r iterations, coda), keeps the logits, and scores them against
the row's labels like the parallel sweep. With the full policy and no continuous thought it
gives the parallel sweep's losses (up to float rounding): tests/test_inference_options.py.
Cost: T forward calls per depth, so use a few short sequences (multi_recurrence_eval.py
--num_sequences).
"""

from __future__ import annotations

import torch

from retrofit.evaluate.scoring import EvalError, SweepResult, draw_initial_state, per_sequence_loss
from retrofit.model.layers_raven import KVCache, parse_cache_policy


def check_cached_options(cache_policy: str | None, continuous: bool, adaptive, independent_runs: bool) -> None:
    """EvalError for a bad policy or a combination the cached sweep does not run."""
    if cache_policy is None and not continuous:
        return
    if cache_policy is not None:
        try:
            parse_cache_policy(cache_policy)
        except ValueError as err:
            raise EvalError(str(err)) from None
    if adaptive is not None or independent_runs:
        raise EvalError("--cache_policy / --continuous run their own sweep: not with --adaptive_threshold or --independent_runs")


def cached_variant_suffix(cache_policy: str | None, continuous: bool) -> str:
    """What the result file name gains: '' for the default sweep, e.g. '_cache-latest-4_continuous'."""
    suffix = f"_cache-{cache_policy}" if cache_policy is not None else ""
    return suffix + ("_continuous" if continuous else "")


@torch.no_grad()
def teacher_forced_logits(model, input_ids, attention_mask, depth: int, initial_state: torch.Tensor,
                          cache_policy: str = "full", continuous: bool = False) -> tuple[torch.Tensor, KVCache]:
    """Logits (B, T, V) of every position, fed one token at a time through a KV cache at `depth`.

    `initial_state` (B, T, h) seeds each position's recurrence; with `continuous`, only position 0
    takes it and position t starts from position t-1's final latent state."""
    B, T = input_ids.shape
    cache = KVCache(capacity=T, policy=cache_policy)
    logits, previous = [], None
    for t in range(T):
        token = input_ids[:, t : t + 1]
        mask = attention_mask[:, : t + 1] if attention_mask is not None else None
        ctx = model.attention_context(token, mask, None, cache)
        start = previous if (continuous and previous is not None) else initial_state[:, t : t + 1]
        x, previous = model.run_layers(token, ctx, depth, 0, initial_state=start)
        logits.append(model.lm_head(x))
    return torch.cat(logits, dim=1), cache


@torch.no_grad()
def cached_losses(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    recurrences: list[int],
    initial_state: torch.Tensor | None = None,
    adaptive=None,
    cache_policy: str | None = None,
    continuous: bool = False,
) -> SweepResult:
    """Per-sequence losses at every depth in `recurrences`, each from its own teacher-forced
    decoding run through the cache (`teacher_forced_logits`); same result type as `depth_sweep`.
    Also records each depth's cache size in bytes (`cache_bytes`) for the policy tables."""
    if adaptive is not None:
        raise EvalError("the cached sweep runs fixed depths only")
    if initial_state is None:
        initial_state = draw_initial_state(model, *input_ids.shape, generator=None)
    result = SweepResult(token_count=int((labels != -100).sum()))
    for r in recurrences:
        logits, cache = teacher_forced_logits(model, input_ids, attention_mask, r, initial_state.to(model.dtype),
                                              cache_policy or "full", continuous)
        result.losses[r] = per_sequence_loss(logits, labels).cpu()
        result.depth_sum[r] = float(r * result.token_count)
        result.executed[r] = float(r * input_ids.numel())  # fixed depth: every position runs r iterations
        result.cache_bytes[r] = cache.memory_bytes()
    result.positions = input_ids.numel()
    return result
