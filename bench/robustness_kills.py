"""Robustness check (not a speed benchmark): a tiny curriculum run is killed with SIGKILL at
random steps and relaunched with --resume_path=auto until it finishes; before some relaunches the
newest checkpoint is damaged (truncated, 4 bytes overwritten, one bit flipped). The final weights
and metrics.jsonl must equal an uninterrupted run's, bit for bit.

    .venv/bin/python bench/robustness_kills.py [--kills 6] [--seed 0]

Prints one line per launch and a summary; exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from retrofit.data.synthetic import arithmetic_problems, problem_text, train_tokenizer  # noqa: E402
import _common  # noqa: E402,F401  (this checkout and tests/ on sys.path)
from tiny_components import pack_token_rows, save_raven_model, tiny_raven_config, write_token_parquet  # noqa: E402


def damage(path: Path, kind: str) -> None:
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "4 bytes overwritten":
        data[len(data) // 2 : len(data) // 2 + 4] = b"\x00\xff\x00\xff"
    else:  # one bit flipped
        data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def stable_metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_second"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="robustness-"))
    try:
        corpus = [problem_text(p) for p in arithmetic_problems(400, seed=0)]
        train_tokenizer(corpus, work / "tok", vocab_size=384)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(work / "tok")
        model = save_raven_model(tiny_raven_config(len(tokenizer)), work / "model", work / "tok")
        data = write_token_parquet(pack_token_rows(tokenizer, corpus, 33), work / "data", num_shards=4, row_group_size=16)
        flags = [f"--model_name={model}", f"--preprocessed_data_path={data}", "--is_parquet_dataset=true",
                 "--max_length=32", "--micro_batch_size=2", "--batch_size=4", "--max_steps=16", "--save_interval=1",
                 "--mean_recurrence_schedule.turn_on=true", "--mean_recurrence_schedule.max_mean_rec=4",
                 "--mean_recurrence_schedule.warmup=0.5", "--muon.use_muon=true", "--muon.lr=0.001",
                 "--optim_config.lr=5e-4", "--wandb_disabled=true", f"--out_path={work}", "--resume_path=auto"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        train = [sys.executable, str(ROOT / "train.py")]
        subprocess.run(train + flags + ["--run_name=full"], check=True, capture_output=True, env=env, cwd=ROOT)

        run, launches, kills, damaged = work / "split", 0, 0, []
        while not (run / "final_checkpoint").exists():
            launches += 1
            if kills < args.kills:
                checkpoints = sorted(run.glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]))
                # damage the newest only while an older one remains: with none left to fall back
                # to, the run stops with an error (tested in tests/test_train_safety.py)
                if len(checkpoints) >= 2 and launches % 2 == 0:
                    kind = ["truncated", "4 bytes overwritten", "one bit flipped"][len(damaged) % 3]
                    damage(checkpoints[-1] / "training_state.pt", kind)
                    damaged.append(f"{checkpoints[-1].name}: {kind}")
                stop_after = rng.randint(1, 4)
                proc = subprocess.Popen(train + flags + ["--run_name=split"], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
                seen, notes = 0, []
                for line in proc.stdout:
                    if "skipping" in line or "resumed from" in line:
                        notes.append(line.strip())
                    if line.startswith("step "):
                        seen += 1
                        if seen == stop_after:
                            proc.send_signal(signal.SIGKILL)
                            break
                proc.wait()
                proc.stdout.close()
                if proc.returncode not in (0, -signal.SIGKILL):
                    print(f"launch {launches} failed with exit {proc.returncode}: {notes}")
                    return 1
                kills += proc.returncode == -signal.SIGKILL
                print(f"launch {launches}: killed after {seen} step(s); {' | '.join(notes) or 'fresh start'}")
            else:
                done = subprocess.run(train + flags + ["--run_name=split"], capture_output=True, text=True, env=env, cwd=ROOT)
                notes = [line for line in done.stdout.splitlines() if "skipping" in line or "resumed from" in line]
                print(f"launch {launches}: ran to the end (exit {done.returncode}); {' | '.join(notes)}")
                if done.returncode:
                    print(done.stderr[-2000:])
                    return 1
        a, b = load_file(work / "full" / "final_checkpoint" / "model.safetensors"), load_file(run / "final_checkpoint" / "model.safetensors")
        same_weights = all(torch.equal(a[k], b[k]) for k in a)
        same_metrics = stable_metrics(work / "full") == stable_metrics(run)
        print(f"{kills} SIGKILLs, {len(damaged)} damaged checkpoints ({'; '.join(damaged)}), {launches} launches:"
              f" final weights identical: {same_weights}, metrics identical: {same_metrics}")
        return 0 if same_weights and same_metrics else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
