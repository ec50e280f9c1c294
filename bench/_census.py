"""The robustness census's machinery (bench/robustness_census.py holds the cases): run a case
in-process under an alarm and a memory cap, or a launcher as a subprocess, and classify what the
user sees; the fixtures every case reads (`Workspace`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
HANG_SECONDS = 60
MEMORY_CAP_BYTES = 8 << 30  # a case that grows without bound stops here instead of at the OOM killer

import signal  # noqa: E402

from transformers import AutoTokenizer  # noqa: E402

import _common  # noqa: E402,F401  (this checkout and tests/ on sys.path)
from retrofit.data.synthetic import arithmetic_problems, problem_text, train_tokenizer  # noqa: E402
from train import main as train_main  # noqa: E402  (train.py of this checkout)
from tiny_components import (  # noqa: E402
    pack_token_rows, save_hf_model, save_raven_model, tiny_llama_config, tiny_raven_config, write_token_parquet)


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so the code under test cannot swallow it."""


def _on_alarm(signum, frame):
    raise Hang()


def snapshot(folder) -> dict[str, bytes]:
    folder = Path(folder)
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def load_cli(path: Path):
    spec = importlib.util.spec_from_file_location(f"census_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def classify(call, expect: str, watch=None, check=None) -> tuple[str, str]:
    """Run `call()` (returns an exit status) in-process under the alarm and classify it."""
    before = snapshot(watch) if watch else {}
    err, out = io.StringIO(), io.StringIO()
    signal.alarm(HANG_SECONDS)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = call()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except Hang:
        return lost_or(("hang", f"still running after {HANG_SECONDS} s"), before, watch)
    except MemoryError:
        return lost_or(("hang", "ran out of the memory cap"), before, watch)
    except Exception:
        return lost_or(("traceback", traceback.format_exc().strip().splitlines()[-1][:160]), before, watch)
    finally:
        signal.alarm(0)
    return judge(code, err.getvalue(), out.getvalue(), expect, before, watch, check)


def lost_or(result: tuple[str, str], before, watch) -> tuple[str, str]:
    """Loss outranks how the program ended."""
    if watch and any(snapshot(watch).get(k) != v for k, v in before.items()):
        return "loss", f"a watched file changed or went ({result[1][:100]})"
    return result


def judge(code, err: str, out: str, expect: str, before, watch, check) -> tuple[str, str]:
    if lost_or(("", ""), before, watch)[0] == "loss":
        return "loss", "a watched file changed or went"
    if "Traceback (most recent call last)" in err:
        return "traceback", err.strip().splitlines()[-1][:160]
    lines = [line for line in err.splitlines() if "error" in line.lower() or line.startswith("usage:")]
    if expect == "accept":
        if code == 0 and (check is None or check(out + err)):
            return "accepted", "exit 0"
        return ("traceback" if code else "silent"), (lines or [f"exit {code}"])[-1][:160]
    if code and lines:
        return "clear error", lines[-1][:160]
    return "silent", f"exit {code}" + (f": {out.strip().splitlines()[-1][:100]}" if out.strip() else "")


def run_shell(script: Path, args: list[str], expect: str, env: dict | None = None) -> tuple[str, str]:
    try:
        proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=HANG_SECONDS,
                              env=dict(os.environ, **(env or {})), cwd=ROOT)
    except subprocess.TimeoutExpired:
        return "hang", f"still running after {HANG_SECONDS} s"
    return judge(proc.returncode, proc.stderr, proc.stdout, expect, {}, None, None)


# The fixtures every case reads
# ------------------------------------------------------------------------------------------------
@dataclass
class Workspace:
    """A tokenizer, a tiny recurrent model, a plain llama, parquet shards and a finished run (`ref`),
    under `root`; `base` is the train.py flags of that run."""

    root: Path
    model: Path
    llama: Path
    data: Path
    ref: Path
    base: list[str]
    garbage: Path  # a "parquet" shard of junk bytes
    half: Path  # a shard cut short

    def out(self, name: str) -> list[str]:
        return [f"--out_path={self.root / 'o'}", f"--run_name={name}"]

    def train(self, *extra: str) -> list[str]:
        """The reference run's flags plus `extra`, into a fresh run folder."""
        return self.base + list(extra) + self.out("a")

    def runs(self, name: str, *extra: str) -> list[str]:
        """The reference run's flags into runs/`name` (a copy of the finished run, from `fresh_copy`)."""
        return self.base + [f"--out_path={self.root / 'runs'}", f"--run_name={name}", *extra]

    def fresh_copy(self, name: str, drop=()) -> Path:
        target = self.root / "runs" / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(self.ref, target)
        for sub in drop:
            shutil.rmtree(target / sub)
        return target

    def folder(self, name: str, files: dict | None = None) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        for file_name, content in (files or {}).items():
            (path / file_name).write_bytes(content)
        return path

    def model_copy(self, name: str, config_changes: dict | None = None, drop=()) -> Path:
        target = self.root / name
        shutil.copytree(self.model if "raven" in name else self.llama, target)
        if config_changes is not None:
            config = json.loads((target / "config.json").read_text())
            config.update(config_changes)
            (target / "config.json").write_text(json.dumps(config))
        for pattern in drop:
            for path in target.glob(pattern):
                path.unlink()
        return target

    def ids_data(self, name: str, row: list) -> Path:
        return write_token_parquet([row] * 8, self.root / name, num_shards=1)


def build_workspace(root: Path) -> Workspace:
    corpus = [problem_text(p) for p in arithmetic_problems(400, seed=0)]
    train_tokenizer(corpus, root / "tok", vocab_size=384)
    tok = AutoTokenizer.from_pretrained(root / "tok")
    model = save_raven_model(tiny_raven_config(len(tok)), root / "model", root / "tok")
    llama = save_hf_model(tiny_llama_config(len(tok)), root / "llama", root / "tok")
    data = write_token_parquet(pack_token_rows(tok, corpus, 33), root / "data", num_shards=4, row_group_size=16)
    base = [f"--model_name={model}", f"--preprocessed_data_path={data}", "--is_parquet_dataset=true", "--max_length=32",
            "--micro_batch_size=2", "--batch_size=2", "--max_steps=4", "--save_interval=1", "--wandb_disabled=true",
            "--mean_recurrence_schedule.turn_on=true", "--mean_recurrence_schedule.max_mean_rec=3"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert train_main(base + [f"--out_path={root / 'runs'}", "--run_name=ref"]) == 0
    ws = Workspace(root=root, model=model, llama=llama, data=data, ref=root / "runs" / "ref", base=base,
                   garbage=root / "garbage", half=root / "half")
    ws.folder("garbage", {"s.parquet": b"junk" * 50})
    ws.folder("half", {"shard-00000.parquet": (data / "shard-00000.parquet").read_bytes()[:3000]})
    (root / "afile").write_text("x")
    return ws
