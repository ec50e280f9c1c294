"""train.py end to end on tiny real models: curriculum run killed and resumed, 2-process DDP,
the paper's shell commands, SFT mode and the error cases."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny_components import pack_token_rows, save_raven_model, tiny_raven_config, write_token_parquet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")
VOLATILE_KEYS = {"tokens_per_second", "mfu"}  # wall-clock dependent


def run_env(**extra) -> dict:
    # WANDB_MODE=offline: if wandb happens to be installed, runs without --wandb_disabled stay local
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               WANDB_MODE="offline")
    for key in [k for k in env if k.startswith(("SLURM_", "FLUX_"))] + ["RANK", "WORLD_SIZE", "LOCAL_RANK"]:
        env.pop(key, None)
    env.update(extra)
    return env


def train(args: list[str], env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, env=env or run_env(),
                          cwd=ROOT, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE_KEYS} for r in records]


def curriculum_args(model_dir, data_dir, out, run_name) -> list[str]:
    return [
        f"--model_name={model_dir}", f"--preprocessed_data_path={data_dir}", "--is_parquet_dataset=true",
        "--max_length=32", "--micro_batch_size=2", "--batch_size=4", "--max_steps=8", "--save_interval=1",
        "--mean_recurrence_schedule.turn_on=true", "--mean_recurrence_schedule.warmup=0.5",
        "--mean_recurrence_schedule.max_mean_rec=4", "--muon.use_muon=true", "--muon.lr=0.001",
        "--optim_config.lr=5e-4", "--scheduler_args.warmup=0.25", "--scheduler_args.cooldown=0.5",
        "--wandb_disabled=true", f"--out_path={out}", f"--run_name={run_name}",
    ]


@pytest.mark.slow
def test_curriculum_run_stopped_twice_and_resumed_matches_uninterrupted(tmp_path, train_raven_dir, train_parquet_dir):
    from retrofit.train.checkpoint import load_training_state
    from retrofit.train.depth import sample_num_steps
    from retrofit.model.modeling_raven import RavenForCausalLM

    full = curriculum_args(train_raven_dir, train_parquet_dir, tmp_path, "full")
    train(full)
    reference = read_metrics(tmp_path / "full")
    assert [r["step"] for r in reference] == list(range(1, 9))
    # linear curriculum over 4 steps to 4, applied one step late as the original's scheduler does;
    # backprop depth (model's 2) capped by it
    assert [r["mean_recurrence"] for r in reference] == [1, 1, 2, 3, 4, 4, 4, 4]
    assert [r["mean_backprop_depth"] for r in reference] == [1, 1, 2, 2, 2, 2, 2, 2]
    for r in reference:  # the (n, k) logged is the draw for the step's last micro-batch
        assert r["data_step"] == 2 * r["step"]
        # parquet micro-batch i draws with seed index i + 1 (the original's numbering)
        drawn = sample_num_steps(r["mean_recurrence"], r["mean_backprop_depth"], r["data_step"] + 1)
        assert (r["num_steps_no_grad"], r["num_steps_with_grad"]) == drawn
    assert reference[-1]["loss"] < reference[0]["loss"]

    split = curriculum_args(train_raven_dir, train_parquet_dir, tmp_path, "split")
    # 1) SLURM says the job ends now: with --save_n_mins_before_timeout it saves and stops after step 1
    slurm = run_env(SLURM_JOB_ID="123", SLURM_JOB_END_TIME=str(int(time.time())))
    out = train(split + ["--save_n_mins_before_timeout=5"], env=slurm)
    assert "stopped at step 1" in out.stdout and "time limit" in out.stdout
    assert not (tmp_path / "split" / "final_checkpoint").exists()

    # 2) resume, then SIGTERM during step 3: it finishes that step, saves a full checkpoint, exits 0
    proc = subprocess.Popen([sys.executable, TRAIN, *split, "--resume_path=auto"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=run_env(), cwd=ROOT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/8"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, "".join(lines)
    text = "".join(lines)
    assert "resumed from" in text and "checkpoint_1" in text and "received SIGTERM" in text
    stopped_at = max(int(p.name.split("_")[1]) for p in (tmp_path / "split").glob("checkpoint_*"))
    assert 2 <= stopped_at < 8
    state = load_training_state(tmp_path / "split" / f"checkpoint_{stopped_at}")
    assert state["optimizer_step"] == stopped_at and state["data_step"] == 2 * stopped_at

    # 3) resume again to the end
    train(split + ["--resume_path=auto"])
    assert stable(read_metrics(tmp_path / "split")) == stable(reference)
    a = RavenForCausalLM.from_pretrained(tmp_path / "full" / "final_checkpoint").state_dict()
    b = RavenForCausalLM.from_pretrained(tmp_path / "split" / "final_checkpoint").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path, tokenizer, tokenizer_dir, corpus):
    import datasets

    # A zero initial state (std 0): with the default random s0 each rank would draw its own noise
    # for its rows, so losses could only match in distribution, not to the last digit.
    model_dir = save_raven_model(tiny_raven_config(len(tokenizer), init_values={"std": 0.0}), tmp_path / "m", tokenizer_dir)

    rows = pack_token_rows(tokenizer, corpus[:150], 33)
    datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * 33 for _ in rows]}).save_to_disk(
        tmp_path / "packed")
    common = [
        f"--model_name={model_dir}", f"--preprocessed_data_path={tmp_path / 'packed'}", "--max_steps=4",
        "--optim_config.lr=1e-3", "--scheduler_args.warmup=0.25", "--mean_recurrence_schedule.turn_on=true",
        "--mean_recurrence_schedule.warmup=0.5", "--mean_recurrence_schedule.max_mean_rec=4",
        "--wandb_disabled=true", f"--out_path={tmp_path}", "--save_interval=2", "--throttle=true",
    ]
    # same global batch (2 rows per optimizer step): 1 process x micro-batch 2, or 2 ranks x 1
    train(common + ["--run_name=one", "--micro_batch_size=2", "--batch_size=2"])
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", TRAIN,
           *common, "--run_name=two", "--micro_batch_size=1", "--batch_size=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for key in ("step", "data_step", "mean_recurrence", "num_steps_no_grad", "num_steps_with_grad", "total_tokens"):
            assert a[key] == b[key], key
        for key in ("loss", "log_ppl", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    from retrofit.train.checkpoint import load_training_state

    state = load_training_state(tmp_path / "two" / "checkpoint_4")
    assert state["world_size"] == 2 and len(state["data"]) == 2 and len(state["rng"]) == 2


# The paper's commands (shells/tinyllama.sh, llama.sh, olmo.sh of the original), verbatim except
# for MODEL, NONREC_MODEL and DATA.
SEED_COMMANDS = [
    "--epochs=1 --max_length=1024 --out_path=OUT --optim_config.lr=5e-5 --model_name=MODEL --preprocessed_data_path=DATA --is_parquet_dataset=true --scheduler_args.cooldown=0.9 --scheduler_args.warmup=0.005 --max_grad_norm=1.0 --micro_batch_size=8 --batch_size=32 --no_amp=false --max_steps=25000 --compile=false --save_interval=1000 --save_n_mins_before_timeout=5 --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.25 --muon.use_muon=true --muon.lr=0.001",
    "--epochs=1 --max_length=1024 --out_path=OUT --optim_config.lr=5e-5 --model_name=MODEL --preprocessed_data_path=DATA --is_parquet_dataset=true --scheduler_args.cooldown=0.9 --scheduler_args.warmup=0.005 --max_grad_norm=1.0 --micro_batch_size=8 --batch_size=32 --no_amp=false --max_steps=25000 --compile=false --save_interval=1000 --save_n_mins_before_timeout=5 --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.25 --use_ellis_adam.use_ellis_adam=true",
    "--epochs=1 --max_length=1024 --out_path=OUT --optim_config.lr=5e-5 --model_name=MODEL --preprocessed_data_path=DATA --is_parquet_dataset=true --scheduler_args.cooldown=0.6 --scheduler_args.warmup=0.0025 --max_grad_norm=1.0 --micro_batch_size=8 --batch_size=16 --no_amp=false --max_steps=50000 --compile=false --save_interval=1000 --save_n_mins_before_timeout=5 --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.75  --mean_recurrence_schedule.warmup_type=1-sqrt --mean_recurrence_schedule.max_mean_rec=4 --muon.use_muon=true --muon.lr=0.001",
    "--epochs=1 --max_length=1024 --out_path=OUT --optim_config.lr=5e-5 --model_name=NONREC_MODEL --preprocessed_data_path=DATA --is_parquet_dataset=true --scheduler_args.cooldown=0.6 --scheduler_args.warmup=0.0025 --max_grad_norm=1.0 --micro_batch_size=8 --batch_size=16 --no_amp=false --max_steps=50000 --compile=false --non_recurrent_model=true --save_interval=1000 --save_n_mins_before_timeout=5 --muon.use_muon=true --muon.lr=0.001",
    "--epochs=1 --max_length=1024 --out_path=OUT --optim_config.lr=5e-5 --model_name=MODEL --preprocessed_data_path=DATA --scheduler_args.cooldown=0.0 --scheduler_args.warmup=0.00008 --max_grad_norm=1.0 --micro_batch_size=8 --batch_size=16 --compile=false --init_from_scratch=true --save_n_mins_before_timeout=10 --no_amp=false --save_interval=1000 --is_parquet_dataset=true --parquet_dataset_max_tokens=250_000_000_000",
    "--epochs=1 --max_length=1024 --out_path=OUT --optim_config.lr=5e-5 --model_name=MODEL --preprocessed_data_path=DATA --scheduler_args.cooldown=0.0 --scheduler_args.warmup=0.005 --max_grad_norm=1.0 --micro_batch_size=8 --batch_size=128 --compile=false --no_amp=false --is_parquet_dataset=true --max_steps=25000 --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.125 --save_interval=1000 --save_n_mins_before_timeout=5",
    "--epochs=1 --max_length=1024 --out_path=OUT --optim_config.lr=5e-5 --model_name=MODEL --preprocessed_data_path=DATA --is_parquet_dataset=true --scheduler_args.cooldown=0.6 --scheduler_args.warmup=0.0025 --max_grad_norm=1.0 --micro_batch_size=8 --batch_size=16 --no_amp=false --max_steps=50000 --compile=false --save_interval=1000 --save_n_mins_before_timeout=5 --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.75 --mean_recurrence_schedule.max_mean_rec=4 --muon.use_muon=true --muon.lr=0.001 --mean_recurrence_schedule.warmup_type=1-sqrt",
]


@pytest.mark.slow
def test_seed_shell_commands_parse_and_one_runs(tmp_path, tokenizer, tokenizer_dir, corpus, tiny_llama_dir):
    from retrofit.train.config import parse_config

    data = write_token_parquet(pack_token_rows(tokenizer, corpus, 1025), tmp_path / "data", num_shards=2)
    model = save_raven_model(tiny_raven_config(len(tokenizer)), tmp_path / "model", tokenizer_dir)
    commands = [
        c.replace("MODEL", str(model)).replace("NONREC_" + str(model), str(tiny_llama_dir))
        .replace("DATA", str(data)).replace("OUT", str(tmp_path / "out")).split()
        for c in SEED_COMMANDS
    ]
    parsed = [parse_config(argv) for argv in commands]
    assert parsed[0].muon.use_muon and parsed[0].muon.lr == 0.001 and parsed[0].optim_config.lr == 5e-5
    assert parsed[1].ellis_adam.enabled and parsed[3].non_recurrent_model
    assert parsed[2].mean_recurrence_schedule.warmup_type == "1-sqrt"
    assert parsed[4].parquet_dataset_max_tokens == 250_000_000_000 and parsed[4].init_from_scratch
    # run the first (TinyLlama Figure 4, Muon) as is: its 36 rows of 1025 tokens give one
    # optimizer step of 32 rows, then the data ends; a missing wandb must not matter
    out = train(commands[0])
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        assert "wandb is not installed" in out.stdout
    assert "finished at step 1 (end of data" in out.stdout
    assert (tmp_path / "out" / "default-run" / "final_checkpoint" / "config.json").exists()
    record = read_metrics(tmp_path / "out" / "default-run")[0]
    assert record["mean_recurrence"] == 1 and record["total_tokens"] == 32 * 1024


# ---------------------------------------------------------------------------------------------
# In-process runs: SFT mode and the error cases
# ---------------------------------------------------------------------------------------------
def main_in_process(args: list[str]) -> int:
    import train as train_module

    return train_module.main(args + ["--wandb_disabled=true"])


def test_chat_sft_mode_on_plain_hf_model(tmp_path, tiny_llama_dir):
    import datasets

    from retrofit.data.synthetic import arithmetic_problems

    problems = arithmetic_problems(24, seed=1)
    datasets.Dataset.from_dict({"question": [p["question"] for p in problems],
                                "answer": [p["answer"] for p in problems]}).save_to_disk(tmp_path / "gsm")
    code = main_in_process([f"--model_name={tiny_llama_dir}", f"--dataset_location={tmp_path / 'gsm'}",
                            "--non_recurrent_model=true", "--micro_batch_size=4", "--batch_size=8", "--epochs=1",
                            "--optim_config.lr=1e-3", f"--out_path={tmp_path}", "--run_name=sft"])
    assert code == 0
    records = read_metrics(tmp_path / "sft")
    assert len(records) == 3  # 24 rows / 8 per step, max_steps derived from epochs
    assert all(0 < r["total_tokens_with_loss"] < r["total_tokens"] / 2 for r in records)  # answers only
    assert records[0]["mean_recurrence"] is None
    assert all(r["mfu"] is None for r in records)  # a CPU run with no --peak_tflops: no peak to divide by
    assert (tmp_path / "sft" / "final_checkpoint" / "tokenizer_config.json").exists()


def test_error_cases_exit_2_with_a_clear_message(tmp_path, capsys, train_raven_dir, train_parquet_dir, tokenizer,
                                                 tokenizer_dir, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = [f"--model_name={train_raven_dir}", "--is_parquet_dataset=true", "--max_steps=2", f"--out_path={tmp_path}"]

    def expect(args, message):
        assert main_in_process(base + args) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], errors

    expect([f"--preprocessed_data_path={train_parquet_dir}", "--batch_size=6", "--micro_batch_size=4"],
           "batch_size=6 is not a multiple of micro_batch_size=4")
    expect([f"--preprocessed_data_path={train_parquet_dir}", "--max_length=64"], "has 33 tokens, expected 65")
    (tmp_path / "nomask").mkdir()
    pq.write_table(pa.table({"input_ids": [[1] * 33]}), tmp_path / "nomask" / "shard-00000.parquet")
    expect([f"--preprocessed_data_path={tmp_path / 'nomask'}"], "no column 'attention_mask'")
    (tmp_path / "empty").mkdir()
    expect([f"--preprocessed_data_path={tmp_path / 'empty'}"], "no *.parquet files")
    small_vocab = save_raven_model(tiny_raven_config(100), tmp_path / "small_vocab", tokenizer_dir)
    expect([f"--preprocessed_data_path={train_parquet_dir}", f"--model_name={small_vocab}"],
           f"has {len(tokenizer)} tokens but the model's embedding has 100 rows")
    expect([f"--preprocessed_data_path={train_parquet_dir}", "--non_recurrent_model=true"], "is a recurrent model")


def test_init_from_scratch_ellis_adam_fixed_steps(tmp_path, train_raven_dir, train_parquet_dir):
    from retrofit.train.checkpoint import load_training_state
    from retrofit.train.flops import count_model_dir
    from retrofit.model.modeling_raven import RavenForCausalLM

    code = main_in_process([f"--model_name={train_raven_dir}", f"--preprocessed_data_path={train_parquet_dir}",
                            "--is_parquet_dataset=true", "--max_steps=2", "--save_interval=1", "--micro_batch_size=2",
                            "--batch_size=2", "--init_from_scratch=true", "--single_iteration=true",
                            "--ellis_adam.enabled=true", "--optim_config.lr=1e-3",
                            "--peak_tflops=1e-6", f"--out_path={tmp_path}", "--run_name=scratch"])
    assert code == 0
    records = read_metrics(tmp_path / "scratch")
    assert [(r["num_steps_no_grad"], r["num_steps_with_grad"]) for r in records] == [(0, 1), (0, 1)]
    # mfu = model FLOPs of the step (param_counter's count at the drawn depth) / time / peak.
    counts = count_model_dir(train_raven_dir)
    tokens = 2 * 32  # batch 2 x max_length 32
    flops = 6 * tokens * (counts.prelude + counts.coda + counts.recurrent_block)  # (n, k) = (0, 1)
    for r in records:
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_second"] / tokens / 1e6, rel=1e-6)
    state = load_training_state(tmp_path / "scratch" / "checkpoint_2")
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(next(iter(state["optimizer"]["state"].values())))
    pretrained = RavenForCausalLM.from_pretrained(train_raven_dir).state_dict()["transformer.wte.weight"]
    assert not torch.allclose(state["model"]["transformer.wte.weight"], pretrained, atol=1e-2)  # random init
