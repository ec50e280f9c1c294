"""The cluster launchers in shells/: _submit.sh, the experiment scripts and preprocess/*.sh.

Fake `sbatch`, `srun`, `scontrol` and `flux` executables go first on PATH and record how they were
called (and the batch script they were given). The recorded batch scripts are then really run by
bash with the fakes standing in for the scheduler, so the signal forwarding and requeue logic is
exercised for real. `--local` runs a real 2-process torchrun on CPU.
"""

from __future__ import annotations

import json
import re
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from retrofit.train.flag_renames import rewrite_renamed_flags

ROOT = Path(__file__).resolve().parents[1]
SHELLS = ROOT / "shells"
SUBMIT = SHELLS / "_submit.sh"
VENV_BIN = Path(sys.executable).parent

# Every variable the launchers read from the machine config; cleared from the test environment.
CONFIG_KEYS = """SCHEDULER GPUS_PER_NODE CPUS_PER_TASK CPU_JOB_CPUS DEFAULT_TIME ENV_SETUP LOG_DIR
SIGNAL_LEAD_SECONDS MAX_REQUEUES SLURM_ACCOUNT SLURM_PARTITION SLURM_QOS SLURM_GPU_TYPE SLURM_CPU_PARTITION SLURM_EXTRA
FLUX_QUEUE FLUX_BANK FLUX_CPU_QUEUE FLUX_EXTRA PROCESSED_DATA_PATH MODELS_DIR DATASETS_DIR
TOKENIZED_DATA_PATH CACHE_DIR HF_HOME HF_DATASETS_CACHE MACHINE_CONFIG""".split()

# One recorder for every fake command: appends {"tool", "argv", "env", "script"} to calls.jsonl.
# srun / `flux run` stand for the job's tasks: with FAKE_TASK_MODE=wait they report that they
# started and then wait for USR1/TERM (recording which one arrived) the way train.py does.
FAKE_TOOL = textwrap.dedent(
    """\
    #!{python}
    import json, os, signal, sys, time
    from pathlib import Path

    log = Path(os.environ["FAKE_LOG"])
    tool, argv = Path(sys.argv[0]).name, sys.argv[1:]

    def record(**extra):
        entry = dict(tool=tool, argv=argv, **extra)
        with open(log / "calls.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\\n")

    def act_as_tasks():
        env = {{k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "FAKE_ENV_SETUP")}}
        record(env=env)
        if os.environ.get("FAKE_TASK_MODE") != "wait":
            sys.exit(int(os.environ.get("FAKE_TASK_RC", "0")))
        def stop(signum, frame):
            record(signal=signal.Signals(signum).name)
            sys.exit(0)
        signal.signal(signal.SIGUSR1, stop)
        signal.signal(signal.SIGTERM, stop)
        (log / "tasks_started").touch()
        time.sleep(30)
        record(signal=None)
        sys.exit(3)

    if tool == "sbatch" or argv[:1] == ["batch"]:
        record(script=Path(argv[-1]).read_text())
        print("Submitted batch job 4242")
    elif tool == "srun" or argv[:1] == ["run"]:
        act_as_tasks()
    elif tool == "scontrol" and argv[:2] == ["show", "hostnames"]:
        print("node001\\nnode002")
    elif tool == "flux" and argv[:2] == ["job", "timeleft"]:
        print(os.environ.get("FAKE_TIMELEFT", "86400"))
    else:
        record()
    """
)


@pytest.fixture()
def cluster(tmp_path):
    """A fake cluster: fake scheduler tools on PATH, a machine config, and helpers to run things."""
    bin_dir, log_dir, fake_log = tmp_path / "bin", tmp_path / "logs", tmp_path / "fake"
    for d in (bin_dir, log_dir, fake_log):
        d.mkdir()
    for tool in ("sbatch", "srun", "scontrol", "flux"):
        path = bin_dir / tool
        path.write_text(FAKE_TOOL.format(python=sys.executable))
        path.chmod(0o755)
    config = tmp_path / "machine_config.sh"
    config.write_text(
        textwrap.dedent(
            f"""\
            SCHEDULER=slurm
            GPUS_PER_NODE=4
            CPUS_PER_TASK=12
            CPU_JOB_CPUS=48
            SLURM_ACCOUNT=myaccount
            SLURM_PARTITION=gpuq
            SLURM_CPU_PARTITION=cpuq
            FLUX_QUEUE=pbatch
            FLUX_BANK=mybank
            PROCESSED_DATA_PATH=/data/processed
            LOG_DIR={log_dir}
            ENV_SETUP="export FAKE_ENV_SETUP=yes"
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_KEYS and not k.startswith(("SLURM_", "FLUX_"))}
    env.update(PATH=f"{bin_dir}:{VENV_BIN}:{env.get('PATH', '')}", MACHINE_CONFIG=str(config), FAKE_LOG=str(fake_log))

    class Cluster:
        def __init__(self):
            self.env, self.config, self.log_dir, self.fake_log = env, config, log_dir, fake_log

        def run(self, script, *args, extra_env=None, check=True):
            proc = subprocess.run(
                ["bash", str(script), *map(str, args)],
                env={**self.env, **(extra_env or {})},
                capture_output=True,
                text=True,
                timeout=120,
            )
            if check:
                assert proc.returncode == 0, proc.stderr
            return proc

        def calls(self, tool=None):
            path = self.fake_log / "calls.jsonl"
            if not path.exists():
                return []
            calls = [json.loads(line) for line in path.read_text().splitlines()]
            return [c for c in calls if tool is None or c["tool"] == tool]

        def submitted_script(self, tool="sbatch"):
            (call,) = self.calls(tool)
            return call["script"]

        def run_batch_script(self, script_text, extra_env=None, signal_to_send=None):
            """Run a recorded batch script as the scheduler would; optionally signal it mid-run."""
            script = self.fake_log / "job.sh"
            script.write_text(script_text)
            env = {**self.env, "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[001-002]", **(extra_env or {})}
            proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if signal_to_send is not None:
                started = self.fake_log / "tasks_started"
                deadline = time.monotonic() + 20
                while not started.exists():
                    assert proc.poll() is None, proc.communicate()
                    assert time.monotonic() < deadline, "the tasks never started"
                    time.sleep(0.05)
                proc.send_signal(signal_to_send)
            out, err = proc.communicate(timeout=60)
            return proc.returncode, out, err

    return Cluster()


def directives(script: str, prefix: str = "#SBATCH") -> list[str]:
    return [line[len(prefix) :].strip() for line in script.splitlines() if line.startswith(prefix + " ")]


def script_command(script: str) -> list[str]:
    """The command a generated batch script runs (its CMD=(...) line)."""
    line = next(line for line in script.splitlines() if line.startswith("CMD=("))
    return shlex.split(line[len("CMD=(") : -1])


def task_argv(cluster, tool="srun") -> list[str]:
    calls = [c for c in cluster.calls(tool) if "env" in c]
    assert len(calls) == 1, cluster.calls()
    return calls[0]["argv"]


# ------------------------------------------------------------------------------------------------
# _submit.sh on SLURM
# ------------------------------------------------------------------------------------------------
def test_slurm_submission_nodes_gpus_time_requeue_and_resume(cluster):
    proc = cluster.run(SUBMIT, "--nodes", "2", "--gpus", "4", "--time", "01:30:00", "--", "python", "train.py", "--run_name=demo")
    (call,) = cluster.calls("sbatch")
    script_path = Path(call["argv"][0])
    assert call["argv"] == [str(script_path)] and script_path.parent == cluster.log_dir
    assert script_path.read_text() == call["script"]  # the batch script is kept beside the logs
    assert "Submitted batch job 4242" in proc.stdout
    d = directives(call["script"])
    for expected in (
        "--job-name=demo",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=12",
        "--time=01:30:00",
        "--partition=gpuq",
        "--account=myaccount",
        "--requeue",
        "--signal=B:USR1@120",
        f'--output="{cluster.log_dir}/%x-%j.out"',
    ):
        assert expected in d, (expected, d)
    assert not any(x.startswith("--qos") for x in d)  # empty config values are left out

    rc, _, err = cluster.run_batch_script(call["script"])
    assert rc == 0, err
    (task,) = [c for c in cluster.calls("srun")]
    assert task["argv"] == [
        "--nodes=2",
        "--kill-on-bad-exit=1",
        "--ntasks-per-node=4",
        "--cpus-per-task=12",
        "python",
        "train.py",
        "--run_name=demo",
        "--resume_path=auto",
    ]
    assert task["env"] == {"MASTER_ADDR": "node001", "MASTER_PORT": str(20000 + 4242), "FAKE_ENV_SETUP": "yes"}
    assert not cluster.calls("scontrol"), "a run that ends by itself is not requeued"


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_slurm_batch_script_forwards_signal_and_requeues_before_time_limit(cluster, sig, requeued):
    cluster.run(SUBMIT, "--nodes", "1", "--", "python", "train.py")
    rc, _, err = cluster.run_batch_script(cluster.submitted_script(), extra_env={"FAKE_TASK_MODE": "wait"}, signal_to_send=sig)
    assert rc == 0, err
    received = [c["signal"] for c in cluster.calls("srun") if "signal" in c]
    assert received == [sig.name], "the tasks must get the signal so train.py can checkpoint"
    requeues = [c["argv"] for c in cluster.calls("scontrol")]
    # USR1 = time limit near: requeue ourselves. TERM = preemption (SLURM requeues the job
    # because of --requeue) or scancel: nothing to do.
    assert requeues == ([["requeue", "4242"]] if requeued else [])


def test_slurm_stops_requeueing_after_max_requeues(cluster):
    cluster.run(SUBMIT, "--", "python", "train.py", extra_env={"MAX_REQUEUES": "3"})
    rc, _, err = cluster.run_batch_script(
        cluster.submitted_script(), extra_env={"FAKE_TASK_MODE": "wait", "SLURM_RESTART_COUNT": "3"}, signal_to_send=signal.SIGUSR1
    )
    assert rc == 0 and "not requeueing" in err
    assert not cluster.calls("scontrol")


def test_failing_task_status_is_the_job_status(cluster):
    cluster.run(SUBMIT, "--", "python", "train.py")
    rc, _, _ = cluster.run_batch_script(cluster.submitted_script(), extra_env={"FAKE_TASK_RC": "7"})
    assert rc == 7
    assert not cluster.calls("scontrol")


def test_cpu_job_is_one_task_without_requeue_or_resume(cluster):
    cluster.run(SUBMIT, "--cpu", "--", "python", "utils/to_parquet.py", "--dataset_path=/a", "--dataset_save_dir=/b")
    script = cluster.submitted_script()
    d = directives(script)
    assert {"--nodes=1", "--ntasks=1", "--cpus-per-task=48", "--partition=cpuq", "--no-requeue"} <= set(d)
    assert not any(x.startswith(("--gpus", "--signal")) or x == "--requeue" for x in d)
    rc, _, err = cluster.run_batch_script(script)
    assert rc == 0, err
    assert task_argv(cluster) == [
        "--nodes=1",
        "--kill-on-bad-exit=1",
        "--ntasks=1",
        "python",
        "utils/to_parquet.py",
        "--dataset_path=/a",
        "--dataset_save_dir=/b",
    ]


def test_explicit_resume_path_and_no_requeue_are_respected(cluster):
    cluster.run(SUBMIT, "--", "python", "train.py", "--resume_path=/ckpt/checkpoint_10")
    script = cluster.submitted_script()
    assert script_command(script) == ["python", "train.py", "--resume_path=/ckpt/checkpoint_10"]
    assert "--requeue" in directives(script)
    (cluster.fake_log / "calls.jsonl").unlink()
    cluster.run(SUBMIT, "--no-requeue", "--", "python", "train.py")
    script = cluster.submitted_script()
    assert script_command(script) == ["python", "train.py"] and "--no-requeue" in directives(script)


def test_environment_overrides_machine_config(cluster):
    env = {"GPUS_PER_NODE": "8", "SLURM_PARTITION": "big", "SLURM_GPU_TYPE": "h100", "SLURM_EXTRA": "--exclusive --mem=0"}
    cluster.run(SUBMIT, "--", "python", "train.py", extra_env=env)
    d = directives(cluster.submitted_script())
    assert {"--ntasks-per-node=8", "--gpus-per-node=h100:8", "--partition=big", "--account=myaccount"} <= set(d)
    assert {"--exclusive", "--mem=0"} <= set(d)


def test_example_machine_config_is_complete(cluster):
    env = {"MACHINE_CONFIG": str(SHELLS / "_machine_config.sh.example"), "LOG_DIR": str(cluster.log_dir)}
    out = cluster.run(SHELLS / "tinyllama.sh", "math-rec4", "--dry-run", extra_env=env).stdout
    d = directives(out)
    assert {"--nodes=16", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--partition=gpu", "--time=24:00:00"} <= set(d)
    assert "source .venv/bin/activate" in out.splitlines()
    assert any(a.startswith("--preprocessed_data_path=/path/to/your/work/dir/processed_datasets/") for a in script_command(out))


def test_dry_run_prints_command_and_script_and_submits_nothing(cluster):
    proc = cluster.run(SUBMIT, "--dry-run", "--nodes", "3", "--", "python", "train.py", "--run_name=x y")
    lines = proc.stdout.splitlines()
    submit = shlex.split(lines[0])
    assert submit[0] == "sbatch" and submit[1].startswith(str(cluster.log_dir / "x_y-"))
    assert "#!/bin/bash" in lines and "#SBATCH --nodes=3" in lines
    assert "CMD=(python train.py --run_name=x\\ y --resume_path=auto)" in lines  # quoted exactly
    assert cluster.calls() == [] and list(cluster.log_dir.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# _submit.sh on flux
# ------------------------------------------------------------------------------------------------
def test_flux_submission_and_resubmission_before_time_limit(cluster):
    cluster.run(
        SUBMIT, "--scheduler", "flux", "--nodes", "2", "--time", "00:00:30", "--", "python", "train.py",
        extra_env={"SIGNAL_LEAD_SECONDS": "1"},
    )
    script = cluster.submitted_script("flux")
    (batch,) = cluster.calls("flux")
    assert batch["argv"][:1] == ["batch"]
    d = directives(script, "#flux:")
    for expected in ("--nodes=2", "--exclusive", "--time-limit=30s", "--queue=pbatch", "--bank=mybank"):
        assert expected in d, (expected, d)
    (cluster.fake_log / "calls.jsonl").unlink()

    # The job has 2 s left: its timer sends USR1 one second before the end, the script forwards
    # it to `flux run`, and after the tasks stop it resubmits itself to the parent instance.
    rc, _, err = cluster.run_batch_script(script, extra_env={"FAKE_TASK_MODE": "wait", "FAKE_TIMELEFT": "2"})
    assert rc == 0, err
    calls = cluster.calls("flux")
    run = next(c for c in calls if c["argv"][:1] == ["run"] and "env" in c)
    assert run["argv"] == ["run", "--nodes=2", "--ntasks=8", "--gpus-per-task=1", "--cores-per-task=12",
                           "python", "train.py", "--resume_path=auto"]
    assert run["env"]["MASTER_ADDR"] and run["env"]["FAKE_ENV_SETUP"] == "yes"
    assert [c["signal"] for c in calls if "signal" in c] == ["SIGUSR1"]
    resubmits = [c["argv"] for c in calls if c["argv"][:1] == ["--parent"]]
    batch_path = batch["argv"][-1]
    assert resubmits == [["--parent", "batch", "--env=SUBMIT_RESTART_COUNT=1", batch_path]]


# ------------------------------------------------------------------------------------------------
# _submit.sh --local and errors
# ------------------------------------------------------------------------------------------------
def test_local_dry_run_uses_torchrun_standalone(cluster):
    proc = cluster.run(SUBMIT, "--local", "--gpus", "2", "--dry-run", "--", "python", "train.py", "--max_steps=2")
    assert "--standalone --nproc_per_node 2 --no-python python train.py --max_steps=2 --resume_path=auto" in proc.stdout
    assert cluster.calls() == []


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "train.py").exists(), reason="train.py not written yet")
def test_local_two_process_training_run(cluster, tmp_path, train_raven_dir, train_parquet_dir):
    """A real 2-rank gloo run of train.py through `_submit.sh --local` (torchrun --standalone)."""
    proc = cluster.run(
        SUBMIT, "--local", "--gpus", "2", "--",
        "python", "train.py", f"--model_name={train_raven_dir}", f"--preprocessed_data_path={train_parquet_dir}",
        "--is_parquet_dataset=true", "--max_length=32", "--micro_batch_size=2", "--batch_size=2", "--max_steps=2",
        "--save_interval=1", "--device=cpu", "--mean_recurrence_schedule.turn_on=true",
        "--mean_recurrence_schedule.max_mean_rec=4", "--wandb_disabled=true", f"--out_path={tmp_path}", "--run_name=local2",
        extra_env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert "torchrun" in proc.stderr or "torch.distributed.run" in proc.stderr
    assert "--resume_path=auto: no checkpoint in" in proc.stdout  # appended by _submit.sh
    assert "2 process(es) on cpu" in proc.stdout and "finished at step 2" in proc.stdout
    run_dir = tmp_path / "local2"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (run_dir / "checkpoint_2").is_dir() and (run_dir / "final_checkpoint").is_dir()


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--nodes", "0", "--", "python", "train.py"], {}, "--nodes must be a positive integer, got '0'"),
        (["--gpus", "two", "--", "python", "train.py"], {}, "--gpus must be a positive integer, got 'two'"),
        (["--time", "90", "--", "python", "train.py"], {}, "--time must look like HH:MM:SS or D-HH:MM:SS, got '90'"),
        (["--time", "00:01:00", "--", "python", "train.py"], {}, "--time 00:01:00 leaves no room"),
        (["--scheduler", "pbs", "--", "python", "train.py"], {}, "scheduler must be slurm or flux, got 'pbs'"),
        (["--bogus", "--", "python", "train.py"], {}, "unknown option '--bogus'"),
        (["--", "python", "train.py"], {"SCHEDULER": ""}, "SCHEDULER is not set"),
        (["--", "python", "train.py"], {"GPUS_PER_NODE": ""}, "GPUS_PER_NODE is not set"),
        (["--", "python", "train.py"], {"MACHINE_CONFIG": "/nonexistent/config.sh"}, "MACHINE_CONFIG=/nonexistent/config.sh does not exist"),
        (["--", "python", "train.py"], {"LOG_DIR": '/tmp/say "hi"'}, "contains a double quote"),
        (["--", "python", "train.py"], {"MAX_REQUEUES": "abc"}, "MAX_REQUEUES must be a whole number >= 0, got 'abc'"),
        (["--", "python", "train.py"], {"MAX_REQUEUES": "-1"}, "MAX_REQUEUES must be a whole number >= 0, got '-1'"),
        (["--", "python", "train.py"], {"CPUS_PER_TASK": "abc"}, "must be positive integers, got 'abc'"),
        (["--cpu", "--", "python", "train.py"], {"CPU_JOB_CPUS": "0"}, "must be positive integers, got '0'"),
    ],
)
def test_submit_errors_are_one_line(cluster, args, env, message):
    proc = cluster.run(SUBMIT, *args, extra_env=env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert cluster.calls() == []


@pytest.mark.parametrize("scheduler,prefix,log_name", [("slurm", "#SBATCH", "%x-%j.out"), ("flux", "#flux:", "demo-{{id}}.out")])
def test_log_folder_with_spaces_is_quoted_in_the_directives(cluster, tmp_path, scheduler, prefix, log_name):
    log_dir = tmp_path / "my logs"
    cluster.run(SUBMIT, "--scheduler", scheduler, "--", "python", "train.py", "--run_name=demo",
                extra_env={"LOG_DIR": str(log_dir)})
    (output,) = [d for d in directives(cluster.submitted_script("sbatch" if scheduler == "slurm" else "flux"), prefix)
                 if d.startswith("--output=")]
    # both schedulers split directive lines shell-style (flux: shlex; sbatch strips double quotes)
    assert shlex.split(output) == [f"--output={log_dir}/{log_name}"]
    assert log_dir.is_dir()


def test_submit_without_command_prints_usage(cluster):
    proc = cluster.run(SUBMIT, check=False)
    assert proc.returncode == 2 and "usage: bash shells/_submit.sh" in proc.stderr
    assert "usage:" in cluster.run(SUBMIT, "--help").stdout


# ------------------------------------------------------------------------------------------------
# Experiment scripts: the paper's runs with the original train.py flags
# ------------------------------------------------------------------------------------------------
# The original shells/*.sh commands (flags only), $PROCESSED_DATA_PATH = /data/processed.
TINY = "/data/processed/smcleish/Recurrent-TinyLlama-3T-untrained"
ORIGINAL = {
    ("tinyllama", "optimizer-adamw"): (8, f"""--epochs=1 --max_length=1024 --out_path=huginn_llama --optim_config.lr=5e-5
        --model_name=smcleish/Recurrent-TinyLlama-3T-untrained
        --preprocessed_data_path={TINY}/tinyllama_1_1b_packed_350b_sample_wrapped_packing/dataset
        --is_parquet_dataset=true --scheduler_args.cooldown=0.9 --scheduler_args.warmup=0.0042 --max_grad_norm=1.0
        --micro_batch_size=8 --batch_size=32 --no_amp=false --max_steps=30000 --compile=false --save_interval=1000
        --save_n_mins_before_timeout=5 --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.25"""),
    ("tinyllama", "math-rec16"): (16, f"""--epochs=1 --max_length=1024 --out_path=huginn_llama --optim_config.lr=5e-5
        --model_name=smcleish/Recurrent-TinyLlama-3T-untrained
        --preprocessed_data_path={TINY}/tinyllama_1_1b_packed_nemotron_cc_math_v1_4plus_wrapped_packing/dataset
        --is_parquet_dataset=true --scheduler_args.cooldown=0.6 --scheduler_args.warmup=0.0025 --max_grad_norm=1.0
        --micro_batch_size=8 --batch_size=16 --no_amp=false --max_steps=50000 --compile=false --save_interval=1000
        --save_n_mins_before_timeout=5 --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.75
        --mean_recurrence_schedule.warmup_type=1-sqrt --mean_recurrence_schedule.max_mean_rec=16
        --muon.use_muon=true --muon.lr=0.001"""),
    ("tinyllama", "mix-phase2-recurrent"): (8, f"""--epochs=1 --max_length=1024 --out_path=huginn_llama
        --optim_config.lr=5e-5 --model_name=huginn_llama/first_phase_4_8_4/model_only_chkpt_25000
        --preprocessed_data_path={TINY}/fineweb_nemotron_sft_general_math_even_mix/dataset
        --is_parquet_dataset=true --scheduler_args.cooldown=0.9 --scheduler_args.warmup=0.005 --max_grad_norm=1.0
        --micro_batch_size=8 --batch_size=32 --no_amp=false --max_steps=25000 --compile=false --save_interval=1000
        --save_n_mins_before_timeout=5 --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.25
        --mean_recurrence_schedule.max_mean_rec=4 --muon.use_muon=true --muon.lr=0.001"""),
    ("tinyllama", "mix-phase1-static"): (8, f"""--epochs=1 --max_length=1024 --out_path=huginn_llama --optim_config.lr=5e-5
        --model_name=TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
        --preprocessed_data_path={TINY}/tinyllama_1_1b_packed_350b_sample_wrapped_packing/dataset
        --is_parquet_dataset=true --scheduler_args.cooldown=0.9 --scheduler_args.warmup=0.005 --max_grad_norm=1.0
        --micro_batch_size=8 --batch_size=32 --no_amp=false --max_steps=25000 --compile=false --non_recurrent_model=true
        --save_interval=1000 --save_n_mins_before_timeout=5 --muon.use_muon=true --muon.lr=0.001
        --run_name=first_phase_non_rec"""),
    ("llama", "long-scratch"): (64, """--epochs=1 --max_length=1024 --out_path=huginn_llama --optim_config.lr=5e-5
        --model_name=smcleish/Recurrent-Llama-3.2-2-4-2-untrained
        --preprocessed_data_path=/data/processed/smcleish/Recurrent-Llama-3.2-2-4-2-untrained/llama_1b_packed_350b_sample_wrapped_packing/dataset
        --scheduler_args.cooldown=0.0 --scheduler_args.warmup=0.00008 --max_grad_norm=1.0 --micro_batch_size=8
        --batch_size=16 --compile=false --init_from_scratch=true --save_n_mins_before_timeout=10 --no_amp=false
        --save_interval=1000 --is_parquet_dataset=true --parquet_dataset_max_tokens=250_000_000_000"""),
    ("llama", "curriculum-period"): (1, """--epochs=1 --max_length=1024 --out_path=huginn_llama --optim_config.lr=5e-5
        --model_name=smcleish/Recurrent-Llama-3.2-2-4-2-untrained
        --preprocessed_data_path=/data/processed/smcleish/Recurrent-Llama-3.2-2-4-2-untrained/llama_1b_packed_350b_sample_wrapped_packing/dataset
        --scheduler_args.cooldown=0.0 --scheduler_args.warmup=0.005 --max_grad_norm=1.0 --micro_batch_size=8
        --batch_size=128 --compile=false --no_amp=false --is_parquet_dataset=true --max_steps=25000
        --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.125 --save_interval=1000
        --save_n_mins_before_timeout=5"""),
    ("llama", "math-static"): (16, """--epochs=1 --max_length=1024 --out_path=huginn_llama --optim_config.lr=5e-5
        --model_name=models/Llama-3.2-1B-untied
        --preprocessed_data_path=/data/processed/smcleish/Recurrent-Llama-3.2-2-4-2-untrained/llama_1b_packed_nemotron_cc_math_v1_4plus_wrapped_packing/dataset
        --is_parquet_dataset=true --scheduler_args.cooldown=0.6 --scheduler_args.warmup=0.0025 --max_grad_norm=1.0
        --micro_batch_size=8 --batch_size=16 --no_amp=false --max_steps=50000 --compile=false --non_recurrent_model=true
        --save_interval=1000 --save_n_mins_before_timeout=5 --muon.use_muon=true --muon.lr=0.001"""),
    ("olmo", "math-rec32"): (16, """--epochs=1 --max_length=1024 --out_path=huginn_llama --optim_config.lr=5e-5
        --model_name=smcleish/Recurrent-OLMo-2-0425-untrained
        --preprocessed_data_path=/data/processed/smcleish/Recurrent-OLMo-2-0425-untrained/olmo_2_0425_1b_packed_nemotron_cc_math_v1_4plus_wrapped_packing_10_splits/dataset
        --is_parquet_dataset=true --scheduler_args.cooldown=0.6 --scheduler_args.warmup=0.0025 --max_grad_norm=1.0
        --micro_batch_size=8 --batch_size=16 --no_amp=false --max_steps=50000 --compile=false --save_interval=1000
        --save_n_mins_before_timeout=5 --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.75
        --mean_recurrence_schedule.max_mean_rec=32 --muon.use_muon=true --muon.lr=0.001
        --mean_recurrence_schedule.warmup_type=1-sqrt"""),
}


@pytest.mark.parametrize("model, name", sorted(ORIGINAL))
def test_experiment_runs_the_original_flags(cluster, model, name):
    nodes, flags = ORIGINAL[(model, name)]
    cluster.run(SHELLS / f"{model}.sh", name)
    script = cluster.submitted_script()
    assert {f"--nodes={nodes}", "--ntasks-per-node=4", "--gpus-per-node=4", "--requeue", f"--job-name={model}-{name}"} <= set(
        directives(script)
    )
    rc, _, err = cluster.run_batch_script(script)
    assert rc == 0, err
    argv = task_argv(cluster)
    command = argv[argv.index("python") :]
    assert command[:2] == ["python", "train.py"]
    train_flags = command[2:]
    assert len(train_flags) == len(set(train_flags)), "no flag twice"
    added = {"--resume_path=auto"} | ({f"--run_name={model}-{name}"} if "--run_name=" not in flags else set())
    renamed, _ = rewrite_renamed_flags(flags.split())  # the launchers use the new names (docs/differences.md)
    assert set(train_flags) == set(renamed) | added


def test_experiment_options_and_extra_flags_pass_through(cluster):
    cluster.run(SHELLS / "olmo.sh", "math-rec4", "--nodes", "8", "--gpus=8", "--time", "2-00:00:00", "--", "--max_steps=100")
    script = cluster.submitted_script()
    assert {"--nodes=8", "--ntasks-per-node=8", "--time=2-00:00:00"} <= set(directives(script))
    assert script_command(script)[-3:] == ["--run_name=olmo-math-rec4", "--max_steps=100", "--resume_path=auto"]


def list_names(script: Path) -> list[str]:
    out = subprocess.run(["bash", str(script), "--list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines()]


EXPERIMENT_SCRIPTS = ["tinyllama.sh", "llama.sh", "olmo.sh"]


def test_lists_name_the_papers_experiments():
    assert list_names(SHELLS / "tinyllama.sh") == [
        "optimizer-muon", "optimizer-adamw", "optimizer-ellisadam",
        "math-rec4", "math-rec8", "math-rec16", "math-rec32", "math-static",
        "curriculum-linear-75", "curriculum-linear-100",
        "mix-single-static", "mix-single-recurrent", "mix-phase1-static", "mix-phase1-recurrent",
        "mix-phase2-static", "mix-phase2-recurrent",
    ]  # fmt: skip
    assert list_names(SHELLS / "llama.sh") == [
        "long-pretrained", "long-scratch", "curriculum-period",
        "math-rec4", "math-rec8", "math-rec16", "math-rec32", "math-static",
    ]  # fmt: skip
    assert list_names(SHELLS / "olmo.sh") == ["math-rec4", "math-rec8", "math-rec16", "math-rec32", "math-static"]


def dry_run_command(cluster, script: Path, name: str) -> list[str]:
    return script_command(cluster.run(script, name, "--dry-run").stdout)


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "train.py").exists(), reason="train.py not written yet")
def test_every_experiment_parses_and_validates_with_train_py(cluster):
    """train.py's own parser accepts every experiment's flags (names, types, consistency)."""
    from retrofit.train.config import parse_config

    for script in EXPERIMENT_SCRIPTS:
        for name in list_names(SHELLS / script):
            command = dry_run_command(cluster, SHELLS / script, name)
            assert command[:2] == ["python", "train.py"]
            cfg = parse_config(command[2:])
            cfg.validate()
            assert cfg.resume_path == "auto" and cfg.run_name and cfg.is_parquet_dataset
            assert cfg.batch_size % cfg.micro_batch_size == 0


def test_curriculum_ablation_differs_from_math_rec4_only_in_the_curriculum(cluster):
    base = set(dry_run_command(cluster, SHELLS / "tinyllama.sh", "math-rec4"))
    linear_75 = set(dry_run_command(cluster, SHELLS / "tinyllama.sh", "curriculum-linear-75"))
    assert base - linear_75 == {"--run_name=tinyllama-math-rec4", "--mean_recurrence_schedule.warmup_type=1-sqrt"}
    assert linear_75 - base == {"--run_name=tinyllama-curriculum-linear-75", "--mean_recurrence_schedule.warmup_type=linear"}
    linear_100 = set(dry_run_command(cluster, SHELLS / "tinyllama.sh", "curriculum-linear-100"))
    assert linear_100 - linear_75 == {"--run_name=tinyllama-curriculum-linear-100", "--mean_recurrence_schedule.warmup=1.0"}


@pytest.mark.parametrize("script", EXPERIMENT_SCRIPTS + ["preprocess/data.sh", "preprocess/models.sh"])
def test_unknown_experiment_is_a_one_line_error(cluster, script):
    proc = cluster.run(SHELLS / script, "no-such-run", check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"error: unknown experiment 'no-such-run' (bash shells/{script} --list shows them)\n"
    assert cluster.calls() == []


def test_missing_data_path_is_a_one_line_error(cluster):
    proc = cluster.run(SHELLS / "tinyllama.sh", "math-rec4", "--dry-run", extra_env={"PROCESSED_DATA_PATH": ""}, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: PROCESSED_DATA_PATH is not set")


def test_experiment_usage(cluster):
    proc = cluster.run(SHELLS / "llama.sh", check=False)
    assert proc.returncode == 2 and "usage: bash shells/llama.sh EXPERIMENT" in proc.stderr
    assert "long-scratch" in cluster.run(SHELLS / "llama.sh", "--help").stdout


# ------------------------------------------------------------------------------------------------
# preprocess/*.sh
# ------------------------------------------------------------------------------------------------
def test_preprocess_jobs_chain_through_the_same_paths(cluster):
    env = {"DATASETS_DIR": "/raw", "TOKENIZED_DATA_PATH": "/tok", "CACHE_DIR": "/cache"}
    data = SHELLS / "preprocess" / "data.sh"
    tokenize = dry_run_command_env(cluster, data, "tokenize-llama-math", env)
    assert tokenize == [
        "python", "preprocess_data_packing.py",
        "--tokenizer_name=smcleish/Recurrent-Llama-3.2-2-4-2-untrained",
        "--out_path=llama_1b_packed_nemotron_cc_math_v1_4plus_wrapped_packing",
        "--dataset_location=/raw/datasets/Nemotron-CC-Math-v1-4plus", "--save_path=/tok", "--cache_path=/cache",
    ]  # fmt: skip
    # preprocess_data_packing.py's output layout, read by the parquet job ...
    name = "smcleish/Recurrent-Llama-3.2-2-4-2-untrained/llama_1b_packed_nemotron_cc_math_v1_4plus_wrapped_packing"
    parquet = dry_run_command_env(cluster, data, "parquet-llama-math", env)
    assert parquet == [
        "python", "utils/to_parquet.py",
        f"--dataset_path=/tok/llama_huginn_preprocessed_data_packed_wrapped/{name}/dataset",
        f"--dataset_save_dir=/data/processed/{name}/dataset",
    ]  # fmt: skip
    # ... whose shards are where llama.sh's math runs read their data.
    train = dry_run_command(cluster, SHELLS / "llama.sh", "math-rec4")
    assert f"--preprocessed_data_path=/data/processed/{name}/dataset" in train
    assert dry_run_command_env(cluster, data, "download", env) == ["python", "utils/download_ds.py", "--dataset_path=/raw"]
    # Figure 8's mix reads three tokenized sets and writes where tinyllama.sh's mix-* runs read.
    mix = dry_run_command_env(cluster, data, "mix-tinyllama", env)
    sources = mix[mix.index("--sources") + 1 :]
    assert [s.rsplit(":", 1)[1] for s in sources] == ["12800000"] * 3
    tokenized = "/tok/llama_huginn_preprocessed_data_packed_wrapped/smcleish/Recurrent-TinyLlama-3T-untrained/"
    assert all(s.startswith(tokenized) for s in sources)
    mix_dir = mix[2].split("=", 1)[1]
    assert f"--preprocessed_data_path={mix_dir}" in dry_run_command(cluster, SHELLS / "tinyllama.sh", "mix-single-static")


def dry_run_command_env(cluster, script, name, env):
    out = cluster.run(script, name, "--dry-run", extra_env=env).stdout
    assert "#SBATCH --ntasks=1" in out and "#SBATCH --no-requeue" in out  # a CPU job
    return script_command(out)


def test_model_jobs_download_untie_and_convert_in_models_dir(cluster):
    models = SHELLS / "preprocess" / "models.sh"

    def command(name):
        out = cluster.run(models, name, "--local", "--dry-run", extra_env={"MODELS_DIR": "/m"}).stdout
        return shlex.split(out.split(" && ", 1)[1])

    assert command("download-olmo") == ["python", "utils/download_to_local.py", "--model_name=olmo", "--save_dir=/m"]
    assert command("untie-llama") == [
        "python", "utils/untie_embeds_hf.py", "--model_name=/m/Llama-3.2-1B", "--save_name=/m/Llama-3.2-1B-untied",
    ]  # fmt: skip
    assert command("convert-tinyllama-4-8-4") == [
        "python", "convert_pretrained_model/convert_llama.py", "--model_name=/m/TinyLlama-1.1B-intermediate-step-1431k-3T",
        "--save_name=/m/Recurrent-TinyLlama-3T-untrained", "--preset=tinyllama-4-8-4",
    ]  # fmt: skip
    assert command("convert-olmo-4-6-4")[1:3] == [
        "convert_pretrained_model/convert_olmo.py", "--model_name=/m/OLMo-2-0425-1B-step1907359",
    ]  # the path olmo.sh's static baseline reads too (with MODELS_DIR=models: the original's)
    presets = [n.removeprefix("convert-") for n in list_names(models) if n.startswith("convert-")]
    assert presets == ["tinyllama-4-8-4", "llama-2-4-2", "llama-4-6-4", "olmo-4-6-4"]
    conversion = pytest.importorskip("retrofit.model.conversion")
    assert set(presets) <= set(conversion.PRESETS)
    download = pytest.importorskip("utils.download_to_local")
    assert {"tinyllama", "llama", "olmo"} <= set(download.PAPER_MODELS)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean(cluster):
    mine = ["_common.sh", "_submit.sh", "_machine_config.sh.example", "tinyllama.sh", "llama.sh", "olmo.sh",
            "quickstart.sh", "quickstart_smollm2.sh"]
    scripts = [str(SHELLS / name) for name in mine] + sorted(str(p) for p in (SHELLS / "preprocess").glob("*.sh"))
    proc = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    # ... and so are the batch scripts it generates.
    for scheduler in ("slurm", "flux"):
        out = cluster.run(SUBMIT, "--dry-run", "--scheduler", scheduler, "--", "python", "train.py").stdout
        batch = cluster.fake_log / f"batch-{scheduler}.sh"
        batch.write_text(out.split("\n", 2)[2])
        proc = subprocess.run(["shellcheck", str(batch)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


# ------------------------------------------------------------------ shells/quickstart_smollm2.sh
# The real-base quickstart takes about 40 minutes, so its run is measured by hand (docs/training.md);
# here its command line and knobs are checked, which fail before any stage starts.
SMOLLM2_QUICKSTART = SHELLS / "quickstart_smollm2.sh"


def run_smollm2_quickstart(*args, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SMOLLM2_")}
    return subprocess.run(["bash", str(SMOLLM2_QUICKSTART), *args], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_smollm2_quickstart_help_lists_every_knob():
    proc = run_smollm2_quickstart("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: bash shells/quickstart_smollm2.sh [OUT_DIR]")
    script = SMOLLM2_QUICKSTART.read_text()
    knobs = sorted(set(re.findall(r"\$\{(SMOLLM2_[A-Z_]+):-", script)))
    assert len(knobs) >= 12
    for knob in knobs:  # every knob the script reads is documented in the header --help prints
        assert f"{knob}=" in proc.stdout, knob


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["a", "b"], {}, "(got 2 arguments)"),
        (["--steps", "3"], {}, "unknown option '--steps'"),
        ([], {"SMOLLM2_STEPS": "ten"}, "SMOLLM2_STEPS='ten' is not a positive integer"),
        ([], {"SMOLLM2_MAX_REC": "0"}, "SMOLLM2_MAX_REC='0' is not a positive integer"),
        ([], {"SMOLLM2_CORE": "7-13;18-22"}, "SMOLLM2_CORE='7-13;18-22' is not a layer list like 0-6 or 0,1,2"),
        ([], {"SMOLLM2_LR": "fast"}, "SMOLLM2_LR='fast' is not a number"),
        ([], {"SMOLLM2_LOSS_RECS": "1,,4"}, "SMOLLM2_LOSS_RECS='1,,4' is not a comma-separated list of positive integers"),
        ([], {"SMOLLM2_PROMPT": ""}, "SMOLLM2_PROMPT is empty"),
    ],
)
def test_smollm2_quickstart_rejects_bad_input(tmp_path, args, env, message):
    out = tmp_path / "out"
    proc = run_smollm2_quickstart(*(args or [str(out)]), **env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not out.exists()  # refused before anything is written


def test_smollm2_quickstart_reports_finished_folder_without_work(tmp_path):
    """Every stage's output present: nothing reruns, and the summary that is there is printed."""
    out = tmp_path / "qs"
    markers = ["base/config.json", "data/python_docs/python_docs_data.json",
               "packed/llama_huginn_preprocessed_data_packed_wrapped/base/train/dataset",
               "packed/llama_huginn_preprocessed_data_packed_wrapped/base/held_out/dataset",
               "parquet/shard-00000.parquet", "parquet/val", "models/recurrent-identity/config.json",
               "models/recurrent-default/config.json", "runs/recurrent/final_checkpoint/config.json",
               "runs/baseline/final_checkpoint/config.json", "loss_over_rec_eval/models/recurrent-default.json",
               "loss_over_rec_eval/recurrent/final_checkpoint.json", "loss_over_rec_eval/baseline/final_checkpoint.json",
               "generation.txt"]
    for marker in markers:
        path = out / marker
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if "." not in path.name or path.name == "dataset" else path.write_text("{}")
    (out / "summary.md").write_text("# the summary\n")
    proc = run_smollm2_quickstart(str(out), PYTHON="/nonexistent/python")  # a stage that ran would fail
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("skip ") == len(markers) + 1  # and the report
    assert "# the summary" in proc.stdout and "every stage was already done" in proc.stdout
