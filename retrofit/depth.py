"""How deep the recurrent block runs: the per-micro-batch depth sampler and the curricula.

Facts (docs/training.md, Depth sampler; Recurrence curriculum):
- sampler: with mean recurrence r and backprop depth s, t = max(r - s, 0), sigma = 0.5,
  mu = ln(t + s) - sigma^2 / 2, rate ~ LogNormal(mu, sigma), p = Poisson(rate) + 1,
  n = max(p - s, 0) iterations without grad, k = min(s, p) with grad. Draws come from a CPU
  generator seeded with (514229 + data_step) % (2**31 - 1), so every rank draws the same depth
  for the same micro-batch and a resumed run draws what the uninterrupted one did.
- curriculum: r(step) = ceil(max_mean_rec * f(step / warmup_steps)), f(u) = u ("linear") or
  1 - sqrt(1 - u) ("1-sqrt"), clipped to [1, max]. The backprop-depth curriculum ramps the same
  way from `start` to `max_backprop`. The backprop depth never exceeds the mean recurrence.

This module is the single source of truth for those schedules: train.py steps them and
flops.py replays them to count training FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WARMUP_TYPES = ("linear", "1-sqrt")

# The sampler lives in the self-contained model file (a checkpoint carries its own forward pass);
# this module re-exports it so training code has one place to import depth logic from.
from .modeling_raven import SAMPLER_SEED_OFFSET, SAMPLER_SIGMA, sample_num_steps  # noqa: E402,F401


def warmup_fraction(u: float, warmup_type: str) -> float:
    """f(u) of the curriculum for u in [0, 1]."""
    u = min(max(u, 0.0), 1.0)
    if warmup_type == "linear":
        return u
    if warmup_type == "1-sqrt":
        return 1.0 - math.sqrt(1.0 - u)
    raise ValueError(f"unknown warmup_type {warmup_type!r}; expected one of {WARMUP_TYPES}")


def scheduled_value(step: int, warmup_steps: float, start: float, end: int, warmup_type: str) -> int:
    """ceil(start + (end - start) * f(step / warmup_steps)), at least 1 and at most end."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return max(1, int(end))
    value = math.ceil(start + (end - start) * warmup_fraction(step / warmup_steps, warmup_type))
    return int(min(max(value, 1), end))


@dataclass
class RecurrenceSchedule:
    """Mean recurrence and backprop depth as a function of the optimizer step.

    With `turn_on=False` for a curriculum, that quantity stays at its final value.
    """

    max_mean_rec: int = 32
    max_backprop: int = 8
    max_steps: int = 1
    mean_rec_turn_on: bool = False
    mean_rec_warmup: float = 0.25  # fraction of max_steps
    mean_rec_warmup_type: str = "linear"
    backprop_turn_on: bool = False
    backprop_warmup: float = 0.25
    backprop_start: int = 1
    backprop_warmup_type: str = "linear"

    def __post_init__(self):
        for name in ("mean_rec_warmup_type", "backprop_warmup_type"):
            if getattr(self, name) not in WARMUP_TYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {WARMUP_TYPES}")
        if self.max_mean_rec < 1 or self.max_backprop < 1:
            raise ValueError(
                f"max_mean_rec ({self.max_mean_rec}) and max_backprop ({self.max_backprop}) must be >= 1"
            )

    def mean_recurrence(self, step: int) -> int:
        if not self.mean_rec_turn_on:
            return self.max_mean_rec
        warmup_steps = self.mean_rec_warmup * self.max_steps
        return scheduled_value(step, warmup_steps, 0, self.max_mean_rec, self.mean_rec_warmup_type)

    def backprop_depth(self, step: int) -> int:
        if self.backprop_turn_on:
            warmup_steps = self.backprop_warmup * self.max_steps
            depth = scheduled_value(
                step, warmup_steps, self.backprop_start, self.max_backprop, self.backprop_warmup_type
            )
        else:
            depth = self.max_backprop
        return min(depth, self.mean_recurrence(step))

    def at(self, step: int) -> tuple[int, int]:
        """(mean recurrence, backprop depth) for optimizer step `step`, counting from 1.

        The paper's FLOPs columns are reproduced exactly by summing over steps 1..checkpoint
        with this convention, so train.py uses it too.
        """
        return self.mean_recurrence(step), self.backprop_depth(step)
