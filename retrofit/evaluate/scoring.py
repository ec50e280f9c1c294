"""What every depth sweep returns and how it scores a row (the one-pass, adaptive and cached sweeps
of `retrofit.evaluate.loss_over_depth` and `cached_sweep` share these; a leaf module, so the sweeps
import it without importing each other)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


class EvalError(ValueError):
    """Bad input to an evaluation; the message names the bad value."""


def per_sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of each row over its scored targets (labels != -100)."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return mean_over_scored(loss.view(labels.shape), labels)


def mean_over_scored(token_loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    scored = (labels != -100).float()
    return (token_loss * scored).sum(1) / scored.sum(1).clamp(min=1)


@dataclass
class SweepResult:
    losses: dict[int, torch.Tensor] = field(default_factory=dict)  # depth -> per-sequence loss (B,)
    depth_sum: dict[int, float] = field(default_factory=dict)  # depth -> sum of iterations used over scored tokens
    token_count: int = 0  # scored tokens (labels != -100)
    # depth -> recurrent-block token-iterations executed up to that depth (every position of every
    # row that ran, padding included); fixed depth: depth * B * T
    executed: dict[int, float] = field(default_factory=dict)
    positions: int = 0  # B * T
    cache_bytes: dict[int, int] = field(default_factory=dict)  # depth -> KV-cache size (the cached sweep only)


def draw_initial_state(model, batch: int, length: int, generator: torch.Generator | None) -> torch.Tensor:
    """s_0 for a (batch, length) input, from the model's own rule (config init_values std)."""
    shape_only = torch.empty(batch, length, model.config.n_embd, dtype=model.dtype, device=model.device)
    return model.initial_state(shape_only, generator=generator)
