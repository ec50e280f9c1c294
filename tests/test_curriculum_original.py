"""Training's curriculum values and depth draws are the original train.py's, step for step.

The reference is what the original does, rebuilt from real components: HF's
`warmup_stable_decay` scheduler on a one-parameter dummy SGD optimizer whose lr is the maximum,
read with ceil and stepped after every optimizer update (the backprop-depth one starting one
below `start` and stepped once before training).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_scheduler

from retrofit.train.depth import MeanBackpropDepthSchedule, MeanRecurrenceSchedule, RecurrenceSchedule, sample_num_steps

# The dummy optimizers never step (the original's don't either).
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")


def original_curriculum(max_steps, *, mean_rec=None, backprop=None, config_rec=32, config_backprop=8):
    """[(mean recurrence, backprop depth)] for optimizer steps 1..max_steps, stepping HF schedulers
    the way the original loop does. `mean_rec`/`backprop` are the curriculum dicts or None (off)."""

    def dummy_scheduler(peak, warmup, min_lr_ratio, warmup_type):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=float(peak))
        kwargs = {"num_decay_steps": 0, "min_lr_ratio": min_lr_ratio}
        if warmup_type is not None:
            kwargs["warmup_type"] = warmup_type
        return get_scheduler("warmup_stable_decay", optimizer=optimizer, num_warmup_steps=math.ceil(warmup * max_steps),
                             num_training_steps=max_steps, scheduler_specific_kwargs=kwargs)

    rec_sched = bp_sched = None
    if mean_rec:
        rec_sched = dummy_scheduler(mean_rec["max_mean_rec"], mean_rec["warmup"], 0, mean_rec["warmup_type"])
    if backprop:
        start = max(1.0, backprop["start"] - 1)
        ratio = max(0.0, min(1.0, start / backprop["max_backprop"]))
        bp_sched = dummy_scheduler(backprop["max_backprop"], backprop["warmup"], ratio, None)
        bp_sched.step()

    def current():
        if rec_sched is None and bp_sched is None:  # no curriculum: the config's values as they are
            return config_rec, config_backprop
        r = math.ceil(rec_sched.get_last_lr()[0]) if rec_sched else config_rec
        s = math.ceil(bp_sched.get_last_lr()[0]) if bp_sched else config_backprop
        r = max(r, 1)
        return (r, r) if r < s else (r, s)

    values = []
    for _ in range(max_steps):
        values.append(current())
        # optimizer.step(), then the schedulers step
        for sched in (rec_sched, bp_sched):
            if sched is not None:
                sched.step()
    return values


@pytest.mark.parametrize("warmup_type", ["linear", "1-sqrt"])
@pytest.mark.parametrize("max_steps,warmup,max_mean_rec", [(40, 0.25, 32), (50, 0.75, 4), (37, 0.3, 16), (12, 1.0, 8)])
def test_mean_recurrence_curriculum_lags_one_step_like_the_original(warmup_type, max_steps, warmup, max_mean_rec):
    schedule = RecurrenceSchedule(
        max_steps=max_steps,
        mean_recurrence_schedule=MeanRecurrenceSchedule(True, warmup, max_mean_rec, warmup_type),
        mean_backprop_depth_schedule=MeanBackpropDepthSchedule(max_backprop=8),
    )
    ours = [schedule.applied_at(u) for u in range(1, max_steps + 1)]
    reference = original_curriculum(max_steps, mean_rec=dict(max_mean_rec=max_mean_rec, warmup=warmup, warmup_type=warmup_type))
    assert ours == reference
    assert ours[0][0] == 1  # the schedule starts at 0, clipped to 1
    # the lag: step u runs what the counting convention (`at`, used for the paper's FLOPs) gives step u - 1
    if warmup * max_steps == int(warmup * max_steps):
        assert [r for r, _ in ours[1:]] == [schedule.at(u)[0] for u in range(1, max_steps)]


@pytest.mark.parametrize("start", [1, 2, 3, 6])
@pytest.mark.parametrize("mean_rec_on", [False, True])
def test_backprop_curriculum_floor_and_last_step_like_the_original(start, mean_rec_on):
    max_steps, warmup, max_backprop = 30, 0.5, 8
    rec = dict(max_mean_rec=16, warmup=0.25, warmup_type="linear") if mean_rec_on else None
    schedule = RecurrenceSchedule(
        max_steps=max_steps,
        mean_recurrence_schedule=MeanRecurrenceSchedule(mean_rec_on, 0.25, 16 if mean_rec_on else 32),
        mean_backprop_depth_schedule=MeanBackpropDepthSchedule(True, warmup, max_backprop, start),
    )
    ours = [schedule.applied_at(u) for u in range(1, max_steps + 1)]
    assert ours == original_curriculum(max_steps, mean_rec=rec, backprop=dict(max_backprop=max_backprop, warmup=warmup, start=start))
    floor = max(1, start - 1)
    assert ours[-1][1] == min(floor, ours[-1][0])  # back to the floor on the last step
    assert ours[-2][1] == min(max_backprop, ours[-2][0])
    if not mean_rec_on and start > 1:
        # step 1 already ran one scheduler step above the floor: "start" for start >= 2
        assert ours[0][1] == math.ceil(floor + (max_backprop - floor) / math.ceil(warmup * max_steps))


def test_no_curriculum_uses_the_config_values_uncapped():
    schedule = RecurrenceSchedule(max_steps=5, mean_recurrence_schedule=MeanRecurrenceSchedule(max_mean_rec=4),
                                  mean_backprop_depth_schedule=MeanBackpropDepthSchedule(max_backprop=8))
    assert [schedule.applied_at(u) for u in range(1, 6)] == original_curriculum(5, config_rec=4, config_backprop=8)
    assert schedule.applied_at(1) == (4, 8)  # the original passes them to the sampler as they are


def test_parquet_micro_batches_draw_with_the_originals_numbering():
    """The original's parquet loop enumerates micro-batches from 2; other data from 1."""
    from retrofit.train.config import TrainConfig

    parquet = TrainConfig(model_name="m", preprocessed_data_path="d", is_parquet_dataset=True, max_length=8, max_steps=1)
    plain = TrainConfig(model_name="m", preprocessed_data_path="d", max_length=8, max_steps=1)
    assert parquet.depth_seed_offset == 1 and plain.depth_seed_offset == 0
    # the shift matters: consecutive seeds draw different depths
    assert [sample_num_steps(32, 8, i) for i in range(1, 40)] != [sample_num_steps(32, 8, i) for i in range(2, 41)]


# The quickstart's recurrent run (shells/quickstart.sh defaults): 200 steps of one parquet micro-batch,
# curriculum 1-sqrt over half the steps to 8, the converted model's backprop depth 4. Its (n, k) per
# step, recorded before the backprop-depth cap got its one home (cap_backprop_depth).
QUICKSTART_FLAGS = ["--model_name=m", "--preprocessed_data_path=d", "--is_parquet_dataset=true", "--max_length=128",
                    "--micro_batch_size=16", "--batch_size=16", "--max_steps=200",
                    "--mean_recurrence_schedule.turn_on=true", "--mean_recurrence_schedule.warmup_type=1-sqrt",
                    "--mean_recurrence_schedule.warmup=0.5", "--mean_recurrence_schedule.max_mean_rec=8"]
QUICKSTART_FIRST_DEPTHS = "2,1 1,1 0,1 1,1 0,1 0,1 1,1 0,1 0,1 1,1 0,1 0,1 0,1 1,1 1,1 1,1 0,1 1,1 2,1 0,1 3,1 1,1 0,1 0,1 0,1 1,2"
QUICKSTART_DEPTHS_SHA256 = "5157098a0fffe3e423091225faf380f4982fe0149f1835c5c4fe34362ef55c12"


def test_quickstart_draws_the_same_depth_sequence_as_before():
    import hashlib
    from retrofit.train.config import parse_config
    from retrofit.train.depth import micro_batch_depth

    cfg = parse_config(QUICKSTART_FLAGS)
    # as build_run resolves it; the converted model's config: mean_recurrence 8, mean_backprop_depth 4
    schedule = RecurrenceSchedule.resolve(cfg.max_steps, cfg.mean_recurrence_schedule, cfg.mean_backprop_depth_schedule,
                                          model_mean_recurrence=8, model_backprop_depth=4)
    depths = [micro_batch_depth(*schedule.applied_at(step), step, seed_offset=cfg.depth_seed_offset)
              for step in range(1, cfg.max_steps + 1)]  # one micro-batch per step: data_step == step
    text = " ".join(f"{n},{k}" for n, k in depths)
    assert text.startswith(QUICKSTART_FIRST_DEPTHS)
    assert hashlib.sha256(text.encode()).hexdigest() == QUICKSTART_DEPTHS_SHA256


def test_counting_and_training_cap_the_backprop_depth_by_one_rule():
    """`at` (FLOPs counting) and `applied_at` (training) both cap s by r only while a curriculum is on."""
    from retrofit.train.depth import cap_backprop_depth
    from retrofit.train.flops import ParamCounts, step_flops

    assert cap_backprop_depth(4, 8, curriculum_on=True) == 4 and cap_backprop_depth(4, 8, curriculum_on=False) == 8
    off = RecurrenceSchedule(max_steps=5, mean_recurrence_schedule=MeanRecurrenceSchedule(max_mean_rec=4),
                             mean_backprop_depth_schedule=MeanBackpropDepthSchedule(max_backprop=8))
    assert off.at(3) == off.applied_at(3) == (4, 8)
    ramp = RecurrenceSchedule(max_steps=8, mean_recurrence_schedule=MeanRecurrenceSchedule(True, 0.5, 8),
                              mean_backprop_depth_schedule=MeanBackpropDepthSchedule(max_backprop=4))
    assert all(s <= r for r, s in [ramp.at(u) for u in range(1, 9)] + [ramp.applied_at(u) for u in range(1, 9)])
    # the FLOPs formula counts min(r, s) iterations with grad: the cap never changes a count
    counts = ParamCounts(recurrent=True, embeddings=0, prelude=10, recurrent_block=100, coda=10)
    assert step_flops(counts, 4, 8, 16) == step_flops(counts, 4, 4, 16)
