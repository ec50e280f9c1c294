"""Training building blocks: curricula wiring, LR schedule, optimizers, data readers, checkpoints,
preemption. All in-process and fast; the end-to-end runs are in test_train_runs.py."""

from __future__ import annotations

import math
import signal

import pytest
import torch

from retrofit.train import checkpoint as ckpt
from retrofit.atomic import atomic_directory
from retrofit.data.shards import inspect_parquet_files
from retrofit.data.stream import PackedDatasetStream, ParquetStream, build_sft_dataset
from retrofit.train.depth import sample_num_steps
from retrofit.train.optim import ELLISAdam, build_optimizer, set_learning_rates, split_params, wsd_lr_factor
from retrofit.data.rows import DataError, inputs_and_labels
from retrofit.data.shards import list_parquet_files
from tiny_components import pack_token_rows, tiny_raven_config, write_token_parquet  # noqa: E402
from retrofit.train.monitor import PreemptionWatcher, job_seconds_left
from retrofit.train.run_claim import remove_stale_temporaries


# ---------------------------------------------------------------------------------------------
# Depth sampler and curricula, as train.py wires them
# ---------------------------------------------------------------------------------------------
def test_sampler_matches_hand_computation():
    """n, k from the docs/training.md (Depth sampler) recipe written out by hand, for a few data steps."""
    for mean_rec, s in [(4, 2), (32, 8), (1, 1), (3, 8)]:
        for data_step in (1, 2, 17, 1000):
            s_eff = s
            t = max(mean_rec - s_eff, 0)
            mu = math.log(t + s_eff) - 0.5**2 / 2
            g = torch.Generator().manual_seed((514229 + data_step) % (2**31 - 1))
            rate = torch.empty(1).log_normal_(mean=mu, std=0.5, generator=g)
            p = int(torch.poisson(rate, generator=g).item()) + 1
            assert sample_num_steps(mean_rec, s, data_step) == (max(p - s_eff, 0), min(s_eff, p))


def _schedule(**overrides):
    from retrofit.train.config import TrainConfig
    from retrofit.train.depth import RecurrenceSchedule

    cfg = TrainConfig()
    for key, value in overrides.items():  # "group.name": value
        group, name = key.split(".")
        setattr(getattr(cfg, group), name, value)
    # as build_run resolves it, for a model config with mean_recurrence 32, mean_backprop_depth 8
    return RecurrenceSchedule.resolve(8, cfg.mean_recurrence_schedule, cfg.mean_backprop_depth_schedule, 32, 8)


def test_curricula_hand_values():
    # linear over 50% of 8 steps to 4: warmup 4 steps, r(u) = ceil(4 * u / 4); backprop = model's 8, capped at r
    linear = _schedule(**{"mean_recurrence_schedule.turn_on": True, "mean_recurrence_schedule.warmup": 0.5,
                          "mean_recurrence_schedule.max_mean_rec": 4})
    assert [linear.at(u) for u in range(1, 7)] == [(1, 1), (2, 2), (3, 3), (4, 4), (4, 4), (4, 4)]
    # 1-sqrt: ceil(4 * (1 - sqrt(1 - u/4))) = ceil(0.536), ceil(1.172), ceil(2.0), then 4
    one_sqrt = _schedule(**{"mean_recurrence_schedule.turn_on": True, "mean_recurrence_schedule.warmup": 0.5,
                            "mean_recurrence_schedule.max_mean_rec": 4, "mean_recurrence_schedule.warmup_type": "1-sqrt"})
    assert [one_sqrt.at(u)[0] for u in range(1, 6)] == [1, 2, 2, 4, 4]
    # backprop curriculum from 2 to 8 over 50% (4 steps), mean recurrence fixed at the model's 32
    backprop = _schedule(**{"mean_backprop_depth_schedule.turn_on": True, "mean_backprop_depth_schedule.warmup": 0.5,
                            "mean_backprop_depth_schedule.start": 2})
    assert [backprop.at(u) for u in range(1, 6)] == [(32, 4), (32, 5), (32, 7), (32, 8), (32, 8)]
    # no curricula: the model config's values
    assert _schedule().at(1) == (32, 8)


# ---------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------
def test_wsd_factor_matches_transformers():
    from transformers import get_wsd_schedule

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    total, warmup, decay = 40, 3, 12
    sched = get_wsd_schedule(opt, num_warmup_steps=warmup, num_decay_steps=decay, num_training_steps=total,
                             min_lr_ratio=0.001)
    for step in range(total + 3):
        assert opt.param_groups[0]["lr"] == pytest.approx(wsd_lr_factor(step, warmup, decay, total, 0.001), abs=1e-12)
        opt.step()
        sched.step()


def test_throttle_divides_only_recurrent_groups(tokenizer):
    from retrofit.model.modeling_raven import RavenForCausalLM

    model = RavenForCausalLM(tiny_raven_config(len(tokenizer)))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    set_learning_rates(opt, 0.5, recurrent_divisor=4)
    by_kind = {g["recurrent"]: g["lr"] for g in opt.param_groups}
    assert by_kind == {True: pytest.approx(1e-3 * 0.5 / 4), False: pytest.approx(1e-3 * 0.5)}
    recurrent_ids = {id(p) for g in opt.param_groups if g["recurrent"] for p in g["params"]}
    expected = {id(p) for n, p in model.named_parameters() if "adapter" in n or "core_block" in n}
    assert recurrent_ids == expected


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------
def test_muon_groups_recurrent_model(tokenizer):
    from retrofit.model.modeling_raven import RavenForCausalLM

    model = RavenForCausalLM(tiny_raven_config(len(tokenizer)))
    opt = build_optimizer(model, lr=5e-5, weight_decay=1e-4, betas=(0.9, 0.95), eps=1e-8,
                          kind="muon", muon_lr=1e-3, muon_weight_decay=1e-4)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    adam_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert "transformer.adapter.weight" in muon_names
    assert "transformer.core_block.0.attn.Wqkv.weight" in muon_names and "transformer.prelude.0.mlp.fc.weight" in muon_names
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight",
            "transformer.core_block.0.norm_1.weight"} <= adam_names
    assert muon_names.isdisjoint(adam_names) and len(muon_names | adam_names) == len(names)
    assert all(names[id(p)].endswith("weight") and p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert all(g["lr"] == 1e-3 and g["weight_decay"] == 1e-4 for g in muon.param_groups)
    assert all(g["lr"] == 5e-5 and g["betas"] == (0.9, 0.95) for g in adamw.param_groups)
    # one step runs and the state round-trips
    model(torch.randint(0, 100, (1, 8)), labels=torch.randint(0, 100, (1, 8)), num_steps=(1, 1)).loss.backward()
    opt.step()
    opt.load_state_dict(opt.state_dict())


def test_muon_groups_plain_hf_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    buckets = split_params(model)
    matrix = {n for n, _ in buckets["matrix"]}
    other = {n for n, _ in buckets["other"]}
    assert "model.embed_tokens.weight" in other and "lm_head.weight" in other
    assert "model.layers.0.self_attn.q_proj.weight" in matrix and "model.layers.7.mlp.down_proj.weight" in matrix
    assert all("norm" in n for n in other - {"model.embed_tokens.weight", "lm_head.weight"})
    assert not buckets["matrix_rec"] and not buckets["other_rec"]


def _reference_ellis_adam(params, grads_per_step, lr_per_step, init_lr, betas, eps, wd):
    """AdamW* written out step by step from docs/training.md (Optimizers) (all options on)."""
    b1, b2 = betas
    p = params.clone()
    m = v = None
    for t, (g, lr) in enumerate(zip(grads_per_step, lr_per_step), start=1):
        if m is None:
            m, v = g.clone(), g * g  # running init
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        v = torch.clamp(v, min=eps**2)
        rms = torch.sqrt(torch.mean(g * g / v))
        step_size = lr / max(float(rms), 1.0) / (1 - b1**t)
        p = p * (1 - lr / init_lr * wd)
        p = p - step_size * torch.atan2(m, torch.sqrt(v / (1 - b2**t)))
    return p


def test_ellis_adam_matches_reference():
    torch.manual_seed(0)
    start = torch.randn(5, 3, dtype=torch.float64)
    grads = [torch.randn(5, 3, dtype=torch.float64) * scale for scale in (1.0, 0.1, 3.0, 1e-4)]
    lrs = [1e-2, 5e-3, 5e-3, 1e-3]
    param = torch.nn.Parameter(start.clone())
    opt = ELLISAdam([param], lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1,
                    running_init=True, update_clipping=True, atan_adam=True, decouple_wd=True)
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        param.grad = g.clone()
        opt.step()
    expected = _reference_ellis_adam(start, grads, lrs, 1e-2, (0.9, 0.95), 1e-6, 0.1)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-12)


def test_ellis_adam_plain_options_equal_adamw():
    """With every AdamW* option off (and coupled wd scaled like AdamW's) it is AdamW."""
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    ours = ELLISAdam([a], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    for _ in range(3):
        g = torch.randn(4, 4, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach())


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def _drain(stream):
    out = []
    while (batch := stream.next_batch()) is not None:
        out.append(batch)
    return out


def test_parquet_stream_sharding_and_resume(tmp_path, train_parquet_dir):
    # rows that say which row they are: row i is [i] * 33
    numbered = write_token_parquet([[i] * 33 for i in range(96)], tmp_path, num_shards=4, row_group_size=10)
    files = list_parquet_files(numbered)
    assert [f.name for f in files] == [f"shard-{i:05d}.parquet" for i in range(4)]
    assert inspect_parquet_files(files, 32) == 32
    single = [r[0] for b in _drain(ParquetStream(numbered, 3, 32)) for r in b["input_ids"].tolist()]
    assert sorted(single) == list(range(96))  # every row once
    per_rank = [
        [r[0] for b in _drain(ParquetStream(numbered, 3, 32, rank=rank, world_size=2)) for r in b["input_ids"].tolist()]
        for rank in range(2)
    ]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(96))  # disjoint and complete
    assert {len({i // 24 for i in rows}) for rows in per_rank} == {2}  # two whole files each
    assert per_rank[0][:10] != sorted(per_rank[0][:10])  # shuffled within row groups
    # exact position: stop mid row group, save, resume in a fresh reader
    first = ParquetStream(train_parquet_dir, 5, 32, epochs=2)
    for _ in range(7):
        first.next_batch()
    state = first.state_dict()
    rest = _drain(first)
    again = ParquetStream(train_parquet_dir, 5, 32, epochs=2)
    again.load_state_dict(state)
    resumed = _drain(again)
    assert len(resumed) == len(rest) > 0
    for x, y in zip(rest, resumed):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["attention_mask"], y["attention_mask"])


def test_parquet_stream_carries_the_sft_loss_mask(tmp_path):
    """Chat SFT shards carry `loss_mask`; the reader keeps it row-aligned, so labels cover only answers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [[i] * 33 for i in range(20)]
    loss = [[0] * 20 + [1] * 13 for _ in rows]
    table = pa.table({"input_ids": rows, "attention_mask": [[1] * 33 for _ in rows], "loss_mask": loss})
    pq.write_table(table, tmp_path / "shard-00000.parquet", row_group_size=8)
    batches = _drain(ParquetStream(tmp_path, 6, 32))
    assert all(set(b) == {"input_ids", "attention_mask", "loss_mask"} for b in batches)
    batch = batches[0]
    _, _, labels = inputs_and_labels(**batch)
    assert (labels[:, :19] == -100).all() and (labels[:, 19:] != -100).all()


def test_packed_stream_ranks_split_the_global_batch(train_parquet_dir):
    import datasets
    import pyarrow.parquet as pq

    table = pq.read_table(list_parquet_files(train_parquet_dir)[0])
    ds = datasets.Dataset(table)
    one = PackedDatasetStream(ds, 4, seed=3)
    ranks = [PackedDatasetStream(ds, 2, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(3):
        whole = one.next_batch()["input_ids"]
        assert torch.equal(whole, torch.cat([s.next_batch()["input_ids"] for s in ranks]))
    state = one.state_dict()
    nxt = one.next_batch()["input_ids"]
    fresh = PackedDatasetStream(ds, 4, seed=3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.next_batch()["input_ids"], nxt)


def test_streams_check_their_rows_when_built(train_parquet_dir):
    """Each reader checks its rows once, when it is built: the row length given, or taken from the data."""
    import datasets
    import pyarrow.parquet as pq

    assert ParquetStream(train_parquet_dir, 4, None).max_length == 32
    with pytest.raises(DataError, match="has 33 tokens, expected 65"):
        ParquetStream(train_parquet_dir, 4, 64)
    table = pq.read_table(list_parquet_files(train_parquet_dir)[0])
    assert PackedDatasetStream(datasets.Dataset(table), 4).max_length == 32
    with pytest.raises(DataError, match="my rows: row 0 of 'input_ids' has 33 tokens, expected 17"):
        PackedDatasetStream(datasets.Dataset(table), 4, max_length=16, source="my rows")
    with pytest.raises(DataError, match="my rows: the dataset is empty"):
        PackedDatasetStream(datasets.Dataset(table.slice(0, 0)), 4, source="my rows")


def test_labels_mask_padding_and_prompt():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 2, 2]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]]),
        "loss_mask": torch.tensor([[0, 0, 1, 1, 0, 0]]),
    }
    inputs, inputs_mask, labels = inputs_and_labels(**batch)
    assert inputs.tolist() == [[5, 6, 7, 8, 2]] and inputs_mask.tolist() == [[1, 1, 1, 1, 0]]
    assert labels.tolist() == [[-100, 7, 8, -100, -100]]
    del batch["loss_mask"]
    assert inputs_and_labels(**batch)[2].tolist() == [[6, 7, 8, -100, -100]]


def test_sft_dataset_supervises_only_the_answer(tokenizer):
    import datasets

    raw = datasets.Dataset.from_dict({"question": ["What is 2 + 3?"], "answer": ["2 + 3 = 5.\n#### 5"]})
    longest, inferred = build_sft_dataset(raw, tokenizer, "question", "answer", max_length=None)
    assert sum(longest[0]["attention_mask"]) == inferred + 1  # no max_length: the longest row, unpadded
    ds, max_length = build_sft_dataset(raw, tokenizer, "question", "answer", max_length=inferred + 20)
    row = ds[0]
    assert len(row["input_ids"]) == max_length + 1
    assert row["input_ids"][0] == tokenizer.bos_token_id
    answer_ids = [t for t, m in zip(row["input_ids"], row["loss_mask"]) if m]
    assert tokenizer.decode(answer_ids).startswith("2 + 3 = 5.\n#### 5<|im_end|>")
    assert "What is" in tokenizer.decode(row["input_ids"][: row["loss_mask"].index(1)])
    assert row["input_ids"][inferred + 1 :] == [tokenizer.pad_token_id] * 20
    assert row["attention_mask"] == [1] * (inferred + 1) + [0] * 20
    all_tokens, _ = build_sft_dataset(raw, tokenizer, "question", "answer", max_length, take_loss_over_all_tokens=True)
    assert all_tokens[0]["loss_mask"] == all_tokens[0]["attention_mask"]
    with pytest.raises(DataError, match="no column"):
        build_sft_dataset(raw, tokenizer, "problem", "answer", max_length)


def test_bad_parquet_is_rejected_before_training(tmp_path, tokenizer, corpus):
    rows = pack_token_rows(tokenizer, corpus[:40], 33)
    good = write_token_parquet(rows, tmp_path / "good", num_shards=1)
    with pytest.raises(DataError, match="row 0 of 'input_ids' has 33 tokens, expected 65"):
        inspect_parquet_files(list_parquet_files(good), 64)
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "nomask").mkdir()
    pq.write_table(pa.table({"input_ids": rows}), tmp_path / "nomask" / "shard-00000.parquet")
    with pytest.raises(DataError, match=r"is not packed training rows: no column 'attention_mask' \(columns: input_ids\)"):
        inspect_parquet_files(list_parquet_files(tmp_path / "nomask"), 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.parquet files"):
        list_parquet_files(tmp_path / "empty")
    with pytest.raises(DataError, match="cannot be split across 2"):
        ParquetStream(good, 2, 32, rank=0, world_size=2)


# ---------------------------------------------------------------------------------------------
# Checkpoints and preemption
# ---------------------------------------------------------------------------------------------
def test_latest_checkpoint_ignores_incomplete_and_temporary(tmp_path):
    for step in (2, 4):
        ckpt.save_training_state(tmp_path / f"checkpoint_{step}", {"optimizer_step": step})
    (tmp_path / "checkpoint_6").mkdir()  # a folder without the COMPLETE marker
    (tmp_path / ".checkpoint_8.tmp-abcd").mkdir()  # a save killed before its rename
    # the killed save's temp folder is no checkpoint; --resume_path=auto skips the one without COMPLETE
    assert ckpt.list_checkpoints(tmp_path) == [tmp_path / f"checkpoint_{s}" for s in (6, 4, 2)]
    assert ckpt.verify_checkpoint(tmp_path / "checkpoint_6") is not None
    assert ckpt.verify_checkpoint(tmp_path / "checkpoint_4") is None
    with pytest.raises(ckpt.CheckpointError, match="is not a full checkpoint"):
        ckpt.load_training_state(tmp_path / "checkpoint_6")
    # a failed save leaves the previous copy in place
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "checkpoint_4") as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("killed")
    assert ckpt.load_training_state(tmp_path / "checkpoint_4")["optimizer_step"] == 4
    assert remove_stale_temporaries(tmp_path) == [tmp_path / ".checkpoint_8.tmp-abcd"]


def test_job_time_left_from_slurm_and_signals(monkeypatch):
    assert job_seconds_left({"SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "1000"}, now=400.0) == 600.0
    assert job_seconds_left({}, now=0.0) is None
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_END_TIME", "1")  # long past
    watcher = PreemptionWatcher(save_n_mins_before_timeout=5)
    try:
        assert "time limit" in watcher.reason()
    finally:
        watcher.close()
    monkeypatch.delenv("SLURM_JOB_ID")
    watcher = PreemptionWatcher(save_n_mins_before_timeout=5)
    try:
        assert watcher.reason() is None
        signal.raise_signal(signal.SIGUSR1)
        assert watcher.reason() == "signal SIGUSR1"
    finally:
        watcher.close()


# ---------------------------------------------------------------------------------------------
# Flags and the plain-HF loss
# ---------------------------------------------------------------------------------------------
def test_yaml_config_and_dotted_flags(tmp_path):
    from retrofit.train.config import parse_config

    (tmp_path / "run.yaml").write_text(
        "run_name: from-yaml\nmax_steps: 7\nmuon:\n  use_muon: true\n  lr: 0.002\n"
        "mean_recurrence_schedule:\n  turn_on: true\n  warmup_type: 1-sqrt\n"
    )
    cfg = parse_config(["--config", str(tmp_path / "run.yaml"), "--muon.lr=0.003", "--device=cpu"])
    assert (cfg.run_name, cfg.max_steps, cfg.muon.use_muon, cfg.muon.lr) == ("from-yaml", 7, True, 0.003)
    assert cfg.mean_recurrence_schedule.warmup_type == "1-sqrt" and cfg.mean_recurrence_schedule.max_mean_rec == 32
    assert cfg.seed == 74 and cfg.optim_config.betas == (0.9, 0.95) and cfg.device == "cpu"
    with pytest.raises(SystemExit):
        parse_config(["--muon.not_a_flag=1"])


def test_plain_hf_model_loss_uses_aligned_labels(tiny_llama_dir):
    """Feeding our aligned labels as `shift_labels` gives the same loss as the recurrent model's
    definition: CE(logits[t], row[t + 1]) averaged over non-masked targets."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    rows = torch.randint(3, 300, (2, 17))
    mask = torch.ones_like(rows)
    mask[1, 12:] = 0
    inputs, _, labels = inputs_and_labels(rows, mask)
    ours = model(input_ids=inputs, labels=labels, shift_labels=labels).loss
    logits = model(input_ids=inputs).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(ours, expected)


def test_launcher_environments():
    from retrofit.train.distributed import read_launch_env, resolve_device

    assert read_launch_env({}) == (0, 1, 0)
    assert read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}
    assert read_launch_env(slurm) == (5, 16, 1)
    assert read_launch_env(dict(slurm, SLURM_STEP_NUM_TASKS="8")) == (5, 8, 1)
    assert read_launch_env({"FLUX_TASK_RANK": "2", "FLUX_JOB_SIZE": "4", "FLUX_TASK_LOCAL_ID": "2"}) == (2, 4, 2)
    with pytest.raises(ValueError, match="RANK=4 is outside"):
        read_launch_env({"RANK": "4", "WORLD_SIZE": "4"})
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
