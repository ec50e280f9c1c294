"""Two fault cases of bench/robustness_census.py that need more setup than a line of its table:
packed (`save_to_disk`) data rewritten with the same row count before a resume, and SIGTERM to a
2-process `shells/_submit.sh --local` run. The census classifies what they return."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def packed_data_rewritten(W: Path, parquet_dir: Path, base: list[str], out: list[str], train_main) -> int:
    """Train 4 steps on a packed copy of one shard, then resume from checkpoint_2 on the same rows
    reversed (same count): returns the resume's exit status (2 with one line is right)."""
    import datasets
    import pyarrow.parquet as pq

    rows = pq.read_table(parquet_dir / "shard-00000.parquet")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        datasets.Dataset(rows).save_to_disk(str(W / "packed"))
        datasets.Dataset(rows.take(list(range(rows.num_rows))[::-1])).save_to_disk(str(W / "packed_rewritten"))
        args = [a for a in base if not a.startswith(("--preprocessed_data_path", "--is_parquet_dataset"))] + out
        assert train_main(args + [f"--preprocessed_data_path={W / 'packed'}"]) == 0
    flags = dict(a.removeprefix("--").split("=", 1) for a in out)  # --out_path=..., --run_name=...
    run_dir = Path(flags["out_path"]) / flags["run_name"]
    for name in ("final_checkpoint", "checkpoint_4"):
        shutil.rmtree(run_dir / name)
    return train_main(args + [f"--preprocessed_data_path={W / 'packed_rewritten'}", "--resume_path=auto"])


def sigterm_to_local_torchrun(train_args: list[str], judge, hang_seconds: int) -> tuple[str, str]:
    """A long 2-rank run through `_submit.sh --local`, SIGTERM to the launcher after step 1: exit 0,
    one `stopped by SIGTERM` line and no traceback is right."""
    args = [a for a in train_args if not a.startswith(("--max_steps", "--save_interval"))]
    args += ["--max_steps=100000", "--save_interval=-1", "--device=cpu"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    command = ["bash", str(ROOT / "shells" / "_submit.sh"), "--local", "--gpus", "2", "--", "python", "train.py", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        for line in proc.stdout:
            if line.startswith("step 1/"):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=hang_seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return "hang", f"still running after {hang_seconds} s"
    return judge(proc.returncode, err, out, "accept", {}, None, lambda text: "stopped by SIGTERM" in text)
