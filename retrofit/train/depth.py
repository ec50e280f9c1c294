"""How deep the recurrent block runs: the per-micro-batch depth sampler and the curricula.

Facts (docs/training.md, Depth sampler; Recurrence curriculum):
- sampler: with mean recurrence r and backprop depth s, t = max(r - s, 0), sigma = 0.5,
  mu = ln(t + s) - sigma^2 / 2, rate ~ LogNormal(mu, sigma), p = Poisson(rate) + 1,
  n = max(p - s, 0) iterations without grad, k = min(s, p) with grad. Draws come from a CPU
  generator seeded with (514229 + data_step) % (2**31 - 1), so every rank draws the same depth
  for the same micro-batch and a resumed run draws what the uninterrupted one did.
- curriculum: r(step) = ceil(max_mean_rec * f(step / warmup_steps)), f(u) = u ("linear") or
  1 - sqrt(1 - u) ("1-sqrt"), clipped to [1, max]. The backprop-depth curriculum ramps the same
  way from `start` to `max_backprop`. While a curriculum is on, the backprop depth never exceeds
  the mean recurrence (`cap_backprop_depth`, the one home of that rule).

The settings are the original train.py's flag groups `--mean_recurrence_schedule.*` and
`--mean_backprop_depth_schedule.*` (`MeanRecurrenceSchedule`, `MeanBackpropDepthSchedule` below,
with the original's defaults): the one definition that training, FLOPs counting and plotting share.
`RecurrenceSchedule` is a run's resolved schedule: max_steps plus both groups, where a curriculum
that is off holds the constant value the run used (the model config's `mean_recurrence` /
`mean_backprop_depth`). It is what train.py records in run.json.

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
  * the backprop depth is capped by the mean recurrence when a curriculum is on
    (`cap_backprop_depth`, which `at` applies too).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

WARMUP_TYPES = ("linear", "1-sqrt")

# The sampler lives in the self-contained model file (a checkpoint carries its own forward pass).
# It is re-exported here lazily so that counting and plotting, which only need the curricula,
# never import torch.
_SAMPLER_NAMES = ("SAMPLER_SEED_OFFSET", "SAMPLER_SIGMA", "sample_num_steps")


def __getattr__(name):
    if name in _SAMPLER_NAMES:
        from ..model import modeling_raven

        return getattr(modeling_raven, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def micro_batch_depth(mean_rec: int, backprop: int, data_step: int, *, seed_offset: int = 0,
                      single_iteration: bool = False) -> tuple[int, int]:
    """(n, k) the micro-batch numbered `data_step` (from 1) runs at the step's (mean recurrence,
    backprop depth): (0, 1) with --single_iteration, else a draw of the sampler.

    The original numbers parquet micro-batches from 2 (its loop enumerates from data_start_step + 1
    with data_start_step = 1), other data from 1: `seed_offset` (TrainConfig.depth_seed_offset)
    seeds the same way, so the same flags draw the original's (n, k) sequence."""
    if single_iteration:
        return (0, 1)
    from ..model.modeling_raven import sample_num_steps

    return sample_num_steps(mean_rec, backprop, data_step + seed_offset)


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


def cap_backprop_depth(mean_rec: int, backprop: int, curriculum_on: bool) -> int:
    """The backprop depth a step runs (or counts) at mean recurrence `mean_rec`: the one rule.

    As the original train.py does it: while a curriculum is on, a backprop depth above the mean
    recurrence becomes the mean recurrence (the ramp starts at r = 1, below any s); without a
    curriculum the model config's values go to the sampler as they are, so a config with
    mean_recurrence < mean_backprop_depth samples around s (t = max(r - s, 0) = 0). The FLOPs
    formula takes min(r, s) iterations with grad either way, so counting does not depend on this."""
    return min(backprop, mean_rec) if curriculum_on else backprop


# The paper trains mean recurrences up to 32 and evaluates up to 128; far above this a flag is a typo
# whose steps would run for days (1e9: each token through the block a billion times).
MAX_RECURRENCE = 1024


def _check_curriculum(group: str, warmup: float, warmup_type: str, values: dict) -> None:
    if warmup_type not in WARMUP_TYPES:
        raise ValueError(f"--{group}.warmup_type={warmup_type!r}; expected one of {WARMUP_TYPES}")
    if not 0 <= warmup <= 1:
        raise ValueError(f"--{group}.warmup={warmup} must be a fraction of max_steps in [0, 1]")
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"--{group}.{name}={value} must be >= 1 (a number of recurrent iterations)")
        if value > MAX_RECURRENCE:
            raise ValueError(
                f"--{group}.{name}={value} is more than {MAX_RECURRENCE} recurrent iterations: every token would pass"
                f" the recurrent block ~{value} times per step (and backprop keeps their activations); pick <= {MAX_RECURRENCE}"
            )


@dataclass
class MeanRecurrenceSchedule:
    """--mean_recurrence_schedule.*: ramp the mean recurrence up to max_mean_rec over `warmup`.

    The original train.py's flag group and defaults. Off (turn_on=False), training runs the model
    config's mean_recurrence all along."""

    turn_on: bool = False
    warmup: float = 0.1  # fraction of max_steps
    max_mean_rec: int = 32
    warmup_type: str = "linear"  # or "1-sqrt"

    def check(self) -> None:
        """ValueError naming the flag for a value no run can use."""
        _check_curriculum("mean_recurrence_schedule", self.warmup, self.warmup_type, {"max_mean_rec": self.max_mean_rec})


@dataclass
class MeanBackpropDepthSchedule:
    """--mean_backprop_depth_schedule.*: ramp the backprop depth from `start` to max_backprop.

    The original train.py's flag group and defaults. Off, training runs the model config's
    mean_backprop_depth all along."""

    turn_on: bool = False
    warmup: float = 0.1  # fraction of max_steps
    max_backprop: int = 8
    start: int = 1
    warmup_type: str = "linear"

    def check(self) -> None:
        _check_curriculum("mean_backprop_depth_schedule", self.warmup, self.warmup_type,
                          {"max_backprop": self.max_backprop, "start": self.start})


@dataclass
class RecurrenceSchedule:
    """A run's resolved schedule: mean recurrence and backprop depth as functions of the optimizer step.

    A curriculum that is off holds the constant value the run used in its max_* field (see
    `resolve`). `as_dict` / `from_dict` are the form run.json stores."""

    max_steps: int = 1
    mean_recurrence_schedule: MeanRecurrenceSchedule = field(default_factory=MeanRecurrenceSchedule)
    mean_backprop_depth_schedule: MeanBackpropDepthSchedule = field(default_factory=MeanBackpropDepthSchedule)

    def __post_init__(self):
        if isinstance(self.mean_recurrence_schedule, dict):
            self.mean_recurrence_schedule = MeanRecurrenceSchedule(**self.mean_recurrence_schedule)
        if isinstance(self.mean_backprop_depth_schedule, dict):
            self.mean_backprop_depth_schedule = MeanBackpropDepthSchedule(**self.mean_backprop_depth_schedule)
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        self.mean_recurrence_schedule.check()
        self.mean_backprop_depth_schedule.check()

    @classmethod
    def resolve(cls, max_steps: int, mean_recurrence_schedule: MeanRecurrenceSchedule,
                mean_backprop_depth_schedule: MeanBackpropDepthSchedule, model_mean_recurrence: int,
                model_backprop_depth: int) -> "RecurrenceSchedule":
        """The schedule train.py runs for these flags: a curriculum that is off holds the model's value."""
        rec, bp = mean_recurrence_schedule, mean_backprop_depth_schedule
        return cls(
            max_steps=max_steps,
            mean_recurrence_schedule=rec if rec.turn_on else replace(rec, max_mean_rec=int(model_mean_recurrence)),
            mean_backprop_depth_schedule=bp if bp.turn_on else replace(bp, max_backprop=int(model_backprop_depth)),
        )

    @classmethod
    def from_dict(cls, data: dict) -> "RecurrenceSchedule":
        return cls(**data)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def max_mean_rec(self) -> int:
        return self.mean_recurrence_schedule.max_mean_rec

    @property
    def max_backprop(self) -> int:
        return self.mean_backprop_depth_schedule.max_backprop

    @property
    def any_curriculum(self) -> bool:
        return self.mean_recurrence_schedule.turn_on or self.mean_backprop_depth_schedule.turn_on

    def mean_recurrence(self, step: int) -> int:
        rec = self.mean_recurrence_schedule
        if not rec.turn_on:
            return rec.max_mean_rec
        return scheduled_value(step, rec.warmup * self.max_steps, 0, rec.max_mean_rec, rec.warmup_type)

    def backprop_depth(self, step: int) -> int:
        bp = self.mean_backprop_depth_schedule
        if bp.turn_on:
            depth = scheduled_value(step, bp.warmup * self.max_steps, bp.start, bp.max_backprop, bp.warmup_type)
        else:
            depth = bp.max_backprop
        return cap_backprop_depth(self.mean_recurrence(step), depth, self.any_curriculum)

    def at(self, step: int) -> tuple[int, int]:
        """(mean recurrence, backprop depth) counted for optimizer step `step`, counting from 1.

        The paper's FLOPs columns are reproduced exactly by summing over steps 1..checkpoint
        with this convention (the paper's own counter), so flops.py uses it. Training runs
        `applied_at`, which lags the mean recurrence by one step as the original's scheduler does.
        """
        return self.mean_recurrence(step), self.backprop_depth(step)

    def stable_from(self) -> int:
        """First step from which `at` no longer changes (the curricula have finished)."""
        warmups = [0.0]
        for group in (self.mean_recurrence_schedule, self.mean_backprop_depth_schedule):
            if group.turn_on:
                warmups.append(group.warmup * self.max_steps)
        return math.ceil(max(warmups)) + 1

    def applied_at(self, step: int) -> tuple[int, int]:
        """(mean recurrence, backprop depth) that training runs at optimizer step `step` (from 1),
        exactly as the original train.py's schedulers give them (see the module docstring)."""
        rec, bp = self.mean_recurrence_schedule, self.mean_backprop_depth_schedule
        if rec.turn_on:
            warmup_steps = math.ceil(rec.warmup * self.max_steps)
            mean_rec = warmup_stable_value(step - 1, rec.max_mean_rec, warmup_steps, self.max_steps, 0.0, rec.warmup_type)
            mean_rec = max(mean_rec, 1)  # the schedule starts at 0
        else:
            mean_rec = rec.max_mean_rec
        if bp.turn_on:
            warmup_steps = math.ceil(bp.warmup * self.max_steps)
            floor = max(1.0, bp.start - 1)  # one below, since it is stepped once up front
            backprop = warmup_stable_value(step, bp.max_backprop, warmup_steps, self.max_steps, floor, bp.warmup_type)
        else:
            backprop = bp.max_backprop
        return mean_rec, cap_backprop_depth(mean_rec, backprop, self.any_curriculum)

    def change_points(self, applied: bool = True) -> list[list[int]]:
        """The whole schedule as data: [[first step, mean recurrence, backprop depth], ...], one
        entry per step where (applied_at or at) changes, from step 1 to max_steps."""
        value_at = self.applied_at if applied else self.at
        # Up to step max_steps - 1 the mean recurrence only grows and, while it stays put, the backprop
        # depth moves one way: once the value differs from one seen, it never returns to it. So each
        # change is found by bisection (a 1e12-step run costs ~40 evaluations per change), and the
        # last step, where the original's scheduler drops to its floor, is looked at on its own.
        end = max(1, self.max_steps - 1)
        step, value = 1, value_at(1)
        points = [[1, *value]]
        while True:
            low, high = step + 1, end + 1  # the first step in (step, end] with another value; end + 1: none
            while low < high:
                middle = (low + high) // 2
                if value_at(middle) != value:
                    high = middle
                else:
                    low = middle + 1
            if low > end:
                break
            step, value = low, value_at(low)
            points.append([step, *value])
        if self.max_steps > end and value_at(self.max_steps) != value:
            points.append([self.max_steps, *value_at(self.max_steps)])
        return points
