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

Two readings of one schedule, both kept here:
- `RecurrenceSchedule.at(u)`: the value counted for optimizer step u. The paper's FLOPs columns
  are reproduced exactly by summing step costs over u = 1..checkpoint with it (flops.py,
  param_counter.py).
- `RecurrenceSchedule.applied_at(u)`: what training runs at optimizer step u, as the original
  train.py does it. Its curricula are HF `warmup_stable_decay` schedulers on a dummy optimizer
  whose lr is the maximum (warmup_steps = ceil(warmup * max_steps), no decay), read with ceil
  and stepped after each update:
  * mean recurrence: the value after u - 1 scheduler steps (step 1 runs ceil(0) -> 1);
  * backprop depth: the scheduler starts at floor = max(1, start - 1) (min_lr_ratio =
    floor / max_backprop) and is stepped once before training, so step u runs the value after
    u scheduler steps; on the last step (u = max_steps) the scheduler is past its end and
    reports the floor again;
  * the backprop depth is capped by the mean recurrence when a curriculum is on.
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


def warmup_stable_value(count: int, peak: int, warmup_steps: int, total_steps: int, floor: float,
                        warmup_type: str) -> int:
    """ceil of the value the original's curriculum scheduler reports after `count` steps.

    HF `warmup_stable_decay` with no decay phase, lr = peak and min_lr_ratio = floor / peak:
    a warmup from the floor to the peak over `warmup_steps`, the peak until `total_steps`, and
    the floor again from then on. Computed with the same float operations, so the ceil agrees
    with the original's at every step.
    """
    ratio = min(max(floor / peak, 0.0), 1.0)
    if count < warmup_steps:
        progress = float(count) / float(max(1, warmup_steps))
        factor = max(0.0, warmup_fraction(progress, warmup_type) * (1.0 - ratio) + ratio)
    elif count < total_steps:
        factor = 1.0
    else:
        factor = ratio
    return math.ceil(float(peak) * factor)


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
        """(mean recurrence, backprop depth) counted for optimizer step `step`, counting from 1.

        The paper's FLOPs columns are reproduced exactly by summing over steps 1..checkpoint
        with this convention (the paper's own counter), so flops.py uses it. Training runs
        `applied_at`, which lags the mean recurrence by one step as the original's scheduler does.
        """
        return self.mean_recurrence(step), self.backprop_depth(step)

    def applied_at(self, step: int) -> tuple[int, int]:
        """(mean recurrence, backprop depth) that training runs at optimizer step `step` (from 1),
        exactly as the original train.py's schedulers give them (see the module docstring)."""
        if self.mean_rec_turn_on:
            warmup_steps = math.ceil(self.mean_rec_warmup * self.max_steps)
            mean_rec = warmup_stable_value(
                step - 1, self.max_mean_rec, warmup_steps, self.max_steps, 0.0, self.mean_rec_warmup_type
            )
            mean_rec = max(mean_rec, 1)  # the schedule starts at 0
        else:
            mean_rec = self.max_mean_rec
        if self.backprop_turn_on:
            warmup_steps = math.ceil(self.backprop_warmup * self.max_steps)
            floor = max(1.0, self.backprop_start - 1)  # one below, since it is stepped once up front
            backprop = warmup_stable_value(
                step, self.max_backprop, warmup_steps, self.max_steps, floor, self.backprop_warmup_type
            )
        else:
            backprop = self.max_backprop
        if self.mean_rec_turn_on or self.backprop_turn_on:
            backprop = min(backprop, mean_rec)
        return mean_rec, backprop
