"""A 2-process torchrun launched the documented way (`shells/_submit.sh --local`) and stopped with
SIGTERM ends with status 0 and one line, no traceback, and leaves a checkpoint that verifies
(retrofit/train/stoppable_torchrun.py). Real gloo ranks on CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT

from retrofit.train import checkpoint as ckpt
from retrofit.train.stoppable_torchrun import child_pids


def test_child_pids_lists_only_this_process_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in child_pids()
        assert os.getpid() not in child_pids()
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_sigterm_to_a_local_two_process_run_saves_and_exits_0(tmp_path, train_raven_dir, train_parquet_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FLUX_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    command = [
        "bash", str(ROOT / "shells" / "_submit.sh"), "--local", "--gpus", "2", "--",
        "python", "train.py", f"--model_name={train_raven_dir}", f"--preprocessed_data_path={train_parquet_dir}",
        "--is_parquet_dataset=true", "--max_length=32", "--micro_batch_size=1", "--batch_size=1", "--max_steps=1000",
        "--save_interval=-1", "--device=cpu", "--wandb_disabled=true", f"--out_path={tmp_path}", "--run_name=stop",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        for line in proc.stdout:
            if line.startswith("step 2/"):
                proc.send_signal(signal.SIGTERM)  # the launcher itself, as a scheduler or `kill` would
                break
        rest = proc.stdout.read()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    err = "".join(stderr)
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    stop_lines = [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    assert len(stop_lines) == 1 and "every rank exited 0" in stop_lines[0]
    assert "save a full checkpoint and exit" in rest
    saved = ckpt.list_checkpoints(tmp_path / "stop")
    assert len(saved) == 1 and ckpt.verify_checkpoint(saved[0]) is None
    assert not (tmp_path / "stop" / "final_checkpoint").exists()


@pytest.mark.slow
def test_a_failing_rank_still_fails_with_torchrun_summary_and_no_traceback():
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "retrofit.train.stoppable_torchrun", "--standalone", "--nproc_per_node",
                           "1", "--no-python", "python", "-c", "import sys; sys.exit(3)"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    assert "exitcode  : 3" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
