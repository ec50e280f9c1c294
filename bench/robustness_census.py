"""Robustness census (not a speed benchmark): bad inputs and faults for every CLI and launcher,
each classified by what the user sees:

- clear error: a non-zero exit with one `error:` line (argparse's usage + error line counts);
- accepted: a valid input that ran as it should (exit 0, and the case's own check holds);
- traceback: an exception escaped (or a valid input failed);
- silent: a bad input accepted (exit 0), or a refusal without any `error` line;
- hang: still running after HANG_SECONDS (or the memory cap was hit);
- loss: a watched folder (a finished run, an input) changed or lost files.

    .venv/bin/python bench/robustness_census.py [--only SUBSTRING]

Python CLIs run in-process (their `main(argv)`), the shell launchers as subprocesses. Prints one
line per case and the counts per class; exits 1 if anything is not a clear error or accepted.
Fault injections are cases too: a disk that fills or turns read-only during a save, a second
process started into a running run's folder, shards replaced under the same names, a checkpoint
renamed to another step. Kills in every save phase: bench/robustness_kills.py.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
HANG_SECONDS = 60
MEMORY_CAP_BYTES = 8 << 30  # a case that grows without bound stops here instead of at the OOM killer

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from retrofit.data.synthetic import arithmetic_problems, problem_text, train_tokenizer  # noqa: E402
import _common  # noqa: E402,F401  (this checkout and tests/ on sys.path)
from tiny_components import (  # noqa: E402
    pack_token_rows, save_hf_model, save_raven_model, tiny_llama_config, tiny_raven_config, write_token_parquet)
from retrofit.train import checkpoint as ckpt  # noqa: E402
from retrofit.train.config import parse_config  # noqa: E402
from retrofit.train.trainer import run as run_training  # noqa: E402


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the cases whose name contains this")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGALRM, _on_alarm)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, resource.getrlimit(resource.RLIMIT_AS)[1]))
    W = Path(tempfile.mkdtemp(prefix="census-"))
    try:
        return census(W, args.only)
    finally:
        shutil.rmtree(W, ignore_errors=True)


def census(W: Path, only: str | None) -> int:
    # ---- fixtures: a tokenizer, a tiny recurrent model, a plain llama, parquet shards, a finished run
    corpus = [problem_text(p) for p in arithmetic_problems(400, seed=0)]
    train_tokenizer(corpus, W / "tok", vocab_size=384)
    tok = AutoTokenizer.from_pretrained(W / "tok")
    model = save_raven_model(tiny_raven_config(len(tok)), W / "model", W / "tok")
    llama = save_hf_model(tiny_llama_config(len(tok)), W / "llama", W / "tok")
    rows = pack_token_rows(tok, corpus, 33)
    data = write_token_parquet(rows, W / "data", num_shards=4, row_group_size=16)
    base = [f"--model_name={model}", f"--preprocessed_data_path={data}", "--is_parquet_dataset=true", "--max_length=32",
            "--micro_batch_size=2", "--batch_size=2", "--max_steps=4", "--save_interval=1", "--wandb_disabled=true",
            "--mean_recurrence_schedule.turn_on=true", "--mean_recurrence_schedule.max_mean_rec=3"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert run_training(parse_config(base + [f"--out_path={W / 'runs'}", "--run_name=ref"])) == 0
    ref = W / "runs" / "ref"

    def fresh_copy(name, drop=()):
        target = W / "runs" / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ref, target)
        for sub in drop:
            shutil.rmtree(target / sub)
        return target

    def folder(name, files=None):
        path = W / name
        path.mkdir(parents=True, exist_ok=True)
        for file_name, content in (files or {}).items():
            (path / file_name).write_bytes(content)
        return path

    def model_copy(name, config_changes=None, drop=()):
        target = W / name
        shutil.copytree(model if "raven" in name else llama, target)
        if config_changes is not None:
            config = json.loads((target / "config.json").read_text())
            config.update(config_changes)
            (target / "config.json").write_text(json.dumps(config))
        for pattern in drop:
            for path in target.glob(pattern):
                path.unlink()
        return target

    def ids_data(name, row):
        return write_token_parquet([row] * 8, W / name, num_shards=1)

    garbage = folder("garbage", {"s.parquet": b"junk" * 50})
    half = folder("half", {"shard-00000.parquet": (data / "shard-00000.parquet").read_bytes()[:3000]})
    (W / "afile").write_text("x")
    good_row = list(range(1, 34))
    o = lambda name: [f"--out_path={W / 'o'}", f"--run_name={name}"]  # noqa: E731
    train = lambda *extra: base + list(extra) + o("a")  # noqa: E731

    # ---- train.py: flags (each refused before any work, or accepted) -----------------------------
    cases: list[tuple] = []  # (name, thunk returning (kind, detail))

    def train_case(name, args, expect="error", watch=None, check=None):
        cases.append((f"train: {name}", lambda: classify(lambda: run_training(parse_config(args)), expect, watch, check)))

    for flag, value in [
        ("optim_config.lr", "-1e-3"), ("optim_config.eps", "0"), ("optim_config.eps", "-1e-8"),
        ("optim_config.betas", "[1.0,0.95]"), ("optim_config.betas", "[0.9,1.0]"), ("optim_config.betas", "[-0.1,0.9]"),
        ("optim_config.betas", "[0.9,1.5]"), ("optim_config.weight_decay", "-0.1"), ("scheduler_args.min_lr_ratio", "-1"),
        ("scheduler_args.min_lr_ratio", "5"), ("scheduler_args.warmup", "1.5"), ("scheduler_args.warmup", "-0.1"),
        ("scheduler_args.cooldown", "-0.5"), ("max_steps", "-1"), ("seed", "-1"), ("seed", "4294967296"),
        ("save_n_mins_before_timeout", "-5"), ("mean_recurrence_schedule.max_mean_rec", "0"),
        ("mean_recurrence_schedule.max_mean_rec", "-3"), ("mean_recurrence_schedule.max_mean_rec", "1000000000"),
        ("mean_recurrence_schedule.warmup", "2"), ("mean_recurrence_schedule.warmup_type", "cubic"),
        ("mean_backprop_depth_schedule.start", "0"), ("mean_backprop_depth_schedule.max_backprop", "100000"),
        ("micro_batch_size", "0"), ("batch_size", "3"), ("batch_size", "-2"), ("save_interval", "0"),
        ("save_interval", "-2"), ("epochs", "0"), ("max_length", "0"), ("peak_tflops", "0"), ("peak_tflops", "-5"),
        ("muon.lr", "-1"), ("muon.weight_decay", "-1"), ("ellis_adam.eps", "0"), ("lora.rank", "-1"),
 ("device", "meta"), ("device", "gpu"), ("device", "cuda:7"),
        ("max_steps", "1e12"), ("max_steps", "abc"), ("foo", "1"), ("optim_config.lr", "nan"),
    ]:
        train_case(f"--{flag}={value}", train(f"--{flag}={value}"))
    if not torch.cuda.is_available():
        train_case("--device=cuda without a GPU", train("--device=cuda"))
    train_case("--lora.num_iterations=0", train("--lora.rank=2", "--lora.per_iteration=true", "--lora.num_iterations=0"))
    train_case("--lora.num_iterations=1000000",
               train("--lora.rank=2", "--lora.per_iteration=true", "--lora.num_iterations=1000000"))
    train_case("--distill.alpha=-1", train(f"--distill.teacher={llama}", "--distill.alpha=-1"))
    train_case("--lora.alpha=0", train("--lora.rank=2", "--lora.alpha=0"))
    train_case("--lora.merge_on_save without a rank", train("--lora.merge_on_save=true"))
    train_case("--distill.temperature=0", train(f"--distill.teacher={llama}", "--distill.temperature=0"))
    train_case("muon + ellis", train("--muon.use_muon=true", "--ellis_adam.enabled=true"))
    train_case("non_recurrent on a raven model", train("--non_recurrent_model=true", "--mean_recurrence_schedule.turn_on=false"))
    train_case("throttle with non_recurrent", train(f"--model_name={llama}", "--non_recurrent_model=true", "--throttle=true",
                                                     "--mean_recurrence_schedule.turn_on=false"))
    train_case("plain model without the flag", train(f"--model_name={llama}"))
    train_case("overwrite + resume", train("--overwrite=true", "--resume_path=auto"))
    train_case("parquet without max_steps or tokens", train("--max_steps=0"))
    train_case("parquet_dataset_max_tokens=0", train("--max_steps=0", "--parquet_dataset_max_tokens=0"))
    train_case("max_samples with parquet", train("--max_samples=4"))
    # ---- train.py: paths, models, data
    for name, extra in [
        ("model path does not exist", ["--model_name=/no/such/model"]),
        ("model dir without config.json", [f"--model_name={folder('empty')}"]),
        ("hub id while offline", ["--model_name=org/not-here"]),
        ("model without weights", [f"--model_name={model_copy('raven_noweights', drop=['*.safetensors'])}"]),
        ("model without tokenizer files", [f"--model_name={model_copy('raven_notok', drop=['tokenizer*', 'special*'])}"]),
        ("config.json norm_eps NaN", [f"--model_name={model_copy('raven_nan', {'norm_eps': float('nan')})}"]),
        ("config.json rope_theta -1", [f"--model_name={model_copy('raven_rope', {'rope_theta': -1})}"]),
        ("config.json n_heads 0", [f"--model_name={model_copy('raven_heads', {'n_heads': 0})}"]),
        ("config.json mean_recurrence -2", [f"--model_name={model_copy('raven_meanrec', {'mean_recurrence': -2})}"]),
        ("teacher missing", ["--distill.teacher=/no/such/teacher"]),
        ("teacher without weights", [f"--distill.teacher={model_copy('llama_noweights', drop=['*.safetensors'])}"]),
        ("teacher with a broken config", [f"--distill.teacher={folder('llama_broken', {'config.json': b'{broken'})}"]),
        ("teacher with a smaller vocabulary",
         [f"--distill.teacher={save_hf_model(tiny_llama_config(16), W / 'llama_small', W / 'tok')}"]),
        ("garbage parquet", [f"--preprocessed_data_path={garbage}"]),
        ("truncated parquet", [f"--preprocessed_data_path={half}"]),
        ("empty data folder", [f"--preprocessed_data_path={folder('empty_data')}"]),
        ("data folder missing", [f"--preprocessed_data_path={W / 'none'}"]),
        ("packed folder missing", ["--is_parquet_dataset=false", f"--preprocessed_data_path={W / 'none'}"]),
        ("parquet without the flag", ["--is_parquet_dataset=false"]),
        ("max_length mismatch", ["--max_length=64"]),
        ("token id >= vocab", [f"--preprocessed_data_path={ids_data('ids_big', good_row[:-1] + [10**6])}"]),
        ("negative token id", [f"--preprocessed_data_path={ids_data('ids_neg', [-3] + good_row[1:])}"]),
        ("null token id", [f"--preprocessed_data_path={ids_data('ids_null', [None] + good_row[1:])}"]),
        ("batch larger than the data", ["--batch_size=4096"]),
        ("missing resume path", [f"--resume_path={W / 'nope'}"]),
        ("resume from model_only_chkpt", [f"--resume_path={ref / 'model_only_chkpt_2'}"]),
        ("resume from final_checkpoint", [f"--resume_path={ref / 'final_checkpoint'}"]),
        ("resume from the run folder", [f"--resume_path={ref}"]),
        ("read-only out_path", ["--out_path=/sys/census-out"]),
        ("out_path is a file", [f"--out_path={W / 'afile'}"]),
    ]:
        train_case(name, train(*extra))
    # ---- train.py: run folders (watched for loss)
    runs = lambda name, *extra: base + [f"--out_path={W / 'runs'}", f"--run_name={name}", *extra]  # noqa: E731
    train_case("train into a finished run without resume", runs("rerun"), watch=fresh_copy("rerun"))
    d = fresh_copy("inside")
    train_case("--overwrite with --model_name inside the run",
               runs("inside", f"--model_name={d / 'final_checkpoint'}", "--overwrite=true"), watch=d)
    d = fresh_copy("teacher_inside")
    train_case("--overwrite with --distill.teacher inside the run",
               runs("teacher_inside", f"--distill.teacher={d / 'model_only_chkpt_1'}", "--overwrite=true"), watch=d)
    d = fresh_copy("data_inside")
    shutil.copytree(data, d / "model_only_chkpt_7")
    train_case("--overwrite with the data inside the run",
               runs("data_inside", f"--preprocessed_data_path={d / 'model_only_chkpt_7'}", "--overwrite=true"), watch=d)
    d = fresh_copy("linked")
    kept = W / "kept_checkpoint_2"
    shutil.move(d / "checkpoint_2", kept)
    (d / "checkpoint_2").symlink_to(kept, target_is_directory=True)
    train_case("--overwrite with a symlinked checkpoint", runs("linked", "--overwrite=true"), expect="accept",
               check=lambda _: (kept / "training_state.pt").is_file())
    d = fresh_copy("fin", drop=("checkpoint_2", "checkpoint_4"))
    train_case("auto-resume a finished run without checkpoints", runs("fin", "--resume_path=auto"), watch=d)
    d = fresh_copy("alldamaged", drop=("final_checkpoint",))
    for name in ("checkpoint_2", "checkpoint_4"):
        state = d / name / "training_state.pt"
        state.write_bytes(state.read_bytes()[:1000])
    train_case("auto-resume with every checkpoint damaged", runs("alldamaged", "--resume_path=auto"), watch=d)
    train_case("explicit resume of a damaged checkpoint", runs("alldamaged", f"--resume_path={d / 'checkpoint_4'}"), watch=d)
    d = fresh_copy("badmarker", drop=("final_checkpoint",))
    for name in ("checkpoint_2", "checkpoint_4"):
        (d / name / "COMPLETE").write_text("{not json")
    train_case("auto-resume with garbage COMPLETE markers", runs("badmarker", "--resume_path=auto"), watch=d)
    for flag, name in (("--batch_size=4", "batch_size"), ("--micro_batch_size=1", "micro_batch_size"),
                       ("--seed=5", "seed"), ("--max_steps=6", "max_steps"),
                       ("--mean_recurrence_schedule.max_mean_rec=4", "curriculum")):
        d = fresh_copy(f"chg_{name}", drop=("final_checkpoint", "checkpoint_4"))
        train_case(f"resume with changed {name}", runs(f"chg_{name}", "--resume_path=auto", flag), watch=d)
    d = fresh_copy("midbad", drop=("final_checkpoint",))
    metrics = d / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = "garbage"
    metrics.write_text("\n".join(lines) + "\n")
    train_case("metrics.jsonl with a garbage middle line", runs("midbad", "--resume_path=auto"), watch=d)
    for name in ("metrics.jsonl", "run.json"):
        d = fresh_copy(f"dir_{name}", drop=("final_checkpoint",))
        (d / name).unlink()
        (d / name).mkdir()
        train_case(f"{name} is a folder", runs(f"dir_{name}", "--resume_path=auto"))
    d = fresh_copy("misnamed", drop=("final_checkpoint",))
    shutil.copytree(d / "checkpoint_2", d / "checkpoint_9")
    train_case("fault: checkpoint_9 holding step 2", runs("misnamed", "--resume_path=auto"), expect="accept",
               check=lambda text: "resumed from" in text and "checkpoint_4 at optimizer step 4" in text)
    changed_data = W / "changed_data"
    shutil.copytree(data, changed_data)
    import pyarrow.parquet as pq

    for shard in changed_data.glob("*.parquet"):  # other rows, same names and row counts
        table = pq.read_table(shard)
        pq.write_table(table.take(list(range(table.num_rows))[::-1]), shard, row_group_size=16)
    d = fresh_copy("changed", drop=("final_checkpoint", "checkpoint_4"))
    train_case("fault: shards replaced under the same names",
               runs("changed", "--resume_path=auto", f"--preprocessed_data_path={changed_data}"), watch=d)
    # ---- train.py: accepted inputs (each a real tiny run)
    train_case("accept: a plain run", base + o("ok1"), expect="accept")
    train_case("accept: lr 0, min_lr_ratio 1, betas [0,0]", base + o("ok2") + [
        "--optim_config.lr=0", "--scheduler_args.min_lr_ratio=1", "--optim_config.betas=[0,0]"], expect="accept")
    train_case("accept: seed 0, weight decay 0, timeout margin 0", base + o("ok3") + [
        "--seed=0", "--optim_config.weight_decay=0", "--save_n_mins_before_timeout=0"], expect="accept")
    d = fresh_copy("resume_ok", drop=("final_checkpoint", "checkpoint_4"))
    train_case("accept: auto-resume", runs("resume_ok", "--resume_path=auto"), expect="accept")
    fresh_copy("overwrite_ok")
    train_case("accept: --overwrite=true", runs("overwrite_ok", "--overwrite=true"), expect="accept")
    train_case("accept: a teacher", base + o("ok4") + [f"--distill.teacher={llama}"], expect="accept")
    train_case("accept: max_steps 10**12 (stopped by the data)", base + o("ok5") + [
        "--max_steps=1000000000000", "--save_interval=-1", "--batch_size=32"], expect="accept")

    # ---- faults: disk full / read-only during a save, a second process into a running run
    def disk_fault(errno_value, message, name):
        def call():
            real_save, calls = torch.save, []

            def failing(obj, path, *a, **k):
                calls.append(path)
                if len(calls) == 2:
                    raise OSError(errno_value, message)
                return real_save(obj, path, *a, **k)

            torch.save = failing
            try:
                return run_training(parse_config(base + o(name)))
            finally:
                torch.save = real_save

        def checked():
            kind, detail = classify(call, "error")
            run_dir = W / "o" / name
            if kind == "clear error" and [p for p in run_dir.iterdir() if p.name.startswith(".")]:
                return "silent", "a temporary folder was left"
            if kind == "clear error":  # resumes from the last good checkpoint
                again = classify(lambda: run_training(parse_config(base + o(name) + ["--resume_path=auto"])), "accept")
                if again[0] != "accepted":
                    return again
            return kind, detail

        cases.append((f"fault: {message.lower()} during a save", checked))

    disk_fault(28, "No space left on device", "full")
    disk_fault(30, "Read-only file system", "readonly")

    def duplicate_start():
        out = W / "dup"
        args = [a for a in base if not a.startswith(("--max_steps", "--save_interval"))]
        args += ["--max_steps=100000", "--save_interval=-1", "--batch_size=2", f"--out_path={out}", "--run_name=d"]
        first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=ROOT)
        try:
            for line in first.stdout:
                if line.startswith("step 1/"):
                    break
            return classify(lambda: run_training(parse_config(args + ["--resume_path=auto"])), "error")
        finally:
            first.kill()
            first.wait()
            first.stdout.close()

    cases.append(("fault: a second process into a running run", duplicate_start))

    # ---- generate.py
    gen = load_cli(ROOT / "generate.py")
    for name, extra, expect in [
        ("--num_steps 0", ["--num_steps", "0"], "error"), ("--num_steps -1", ["--num_steps", "-1"], "error"),
        ("--num_steps 1e8", ["--num_steps", "100000000"], "error"), ("--adaptive -1", ["--adaptive", "-1"], "error"),
        ("--adaptive nan", ["--adaptive", "nan"], "error"), ("--dtype float128", ["--dtype", "float128"], "error"),
        ("--device meta", ["--device", "meta"], "error"), ("--device tpu", ["--device", "tpu"], "error"),
        ("--temperature 0", ["--sample", "--temperature", "0"], "error"), ("--top_p 1.5", ["--sample", "--top_p", "1.5"], "error"),
        ("--seed -1", ["--seed", "-1"], "error"), ("--max_new_tokens 0", ["--max_new_tokens", "0"], "error"),
        ("--compile with --adaptive", ["--compile", "--adaptive", "1e-3"], "error"),
        ("--criterion bogus", ["--criterion", "bogus"], "error"),
        ("accept: --num_steps 2", ["--num_steps", "2", "--max_new_tokens", "3"], "accept"),
        ("accept: --adaptive 0.5", ["--adaptive", "0.5", "--max_new_tokens", "3"], "accept"),
        ("accept: --sample", ["--sample", "--max_new_tokens", "3"], "accept"),
    ]:
        cases.append((f"generate: {name}", lambda extra=extra, expect=expect: classify(
            lambda: gen.main([str(model), "--prompt", "x", *extra]), expect)))
    if not torch.cuda.is_available():
        cases.append(("generate: --device cuda without a GPU", lambda: classify(
            lambda: gen.main([str(model), "--prompt", "x", "--device", "cuda"]), "error")))
    for name, target, extra in [
        ("missing model dir", W / "none", []), ("model without tokenizer files", W / "raven_notok", []),
        ("model without weights", W / "raven_noweights", []), ("config.json rope_theta -1", W / "raven_rope", []),
        ("--num_steps on a plain model", llama, ["--num_steps", "2"]),
    ]:
        cases.append((f"generate: {name}", lambda target=target, extra=extra: classify(
            lambda: gen.main([str(target), "--prompt", "x", *extra]), "error")))

    # ---- multi_recurrence_eval.py, choose_split.py, param_counter.py, plot_evals.py, mixers, converters
    mre = load_cli(ROOT / "multi_recurrence_eval.py")
    eval_out = ["--output_dir", str(W / "eval_out")]
    for name, argv, expect in [
        ("missing run dir", [str(W / "none"), "2", "--eval_file_path", str(data)], "error"),
        ("missing checkpoint", [str(ref), "99", "--eval_file_path", str(data)], "error"),
        ("missing eval file", [str(ref), "2", "--eval_file_path", str(W / "none")], "error"),
        ("garbage eval file", [str(ref), "2", "--eval_file_path", str(garbage)], "error"),
        ("--recurrences 0", [str(ref), "2", "--eval_file_path", str(data), "--recurrences", "0"], "error"),
        ("--recurrences abc", [str(ref), "2", "--eval_file_path", str(data), "--recurrences", "abc"], "error"),
        ("--recurrences 1e9", [str(ref), "2", "--eval_file_path", str(data), "--recurrences", "1000000000"], "error"),
        ("--num_sequences 0", [str(ref), "2", "--eval_file_path", str(data), "--num_sequences", "0"], "error"),
        ("--batch_size 0", [str(ref), "2", "--eval_file_path", str(data), "--batch_size", "0"], "error"),
        ("--batch_size -4", [str(ref), "2", "--eval_file_path", str(data), "--batch_size", "-4"], "error"),
        ("--dtype float128", [str(ref), "2", "--eval_file_path", str(data), "--dtype", "float128"], "error"),
        ("--device meta", [str(ref), "2", "--eval_file_path", str(data), "--device", "meta"], "error"),
        ("--adaptive_threshold -1", [str(ref), "2", "--eval_file_path", str(data), "--adaptive_threshold", "-1"], "error"),
        ("--adaptive_criterion bogus", [str(ref), "2", "--eval_file_path", str(data), "--adaptive_criterion", "bogus"], "error"),
        ("token id >= vocab", [str(ref), "2", "--eval_file_path", str(W / "ids_big"), "--recurrences", "1"], "error"),
        ("negative token id", [str(ref), "2", "--eval_file_path", str(W / "ids_neg"), "--recurrences", "1"], "error"),
        ("null token id", [str(ref), "2", "--eval_file_path", str(W / "ids_null"), "--recurrences", "1"], "error"),
        ("accept: two depths", [str(ref), "2", "--eval_file_path", str(data), "--recurrences", "1,2",
                                "--num_sequences", "8", "--batch_size", "4"], "accept"),
    ]:
        cases.append((f"multi_recurrence_eval: {name}", lambda argv=argv, expect=expect: classify(
            lambda: mre.main(argv + eval_out + (["--device", "cpu"] if "--device" not in argv else [])), expect)))
    if not torch.cuda.is_available():
        cases.append(("multi_recurrence_eval: --device cuda without a GPU", lambda: classify(
            lambda: mre.main([str(ref), "2", "--eval_file_path", str(data), "--device", "cuda"] + eval_out), "error")))

    split = load_cli(ROOT / "choose_split.py")
    split_base = ["--model_name", str(llama), "--data", str(data), "--num_sequences", "4", "--max_length", "16",
                  "--no_progress"]
    for name, argv, expect in [
        ("missing model", ["--model_name", str(W / "none"), "--data", str(data), "--keep", "4"], "error"),
        ("missing data", ["--model_name", str(llama), "--data", str(W / "none"), "--keep", "4"], "error"),
        ("garbage data", ["--model_name", str(llama), "--data", str(garbage), "--keep", "4"], "error"),
        ("--keep 0", split_base + ["--keep", "0"], "error"), ("--keep 99", split_base + ["--keep", "99"], "error"),
        ("--shape 0,0,0", split_base + ["--shape", "0,0,0"], "error"), ("--shape a,b", split_base + ["--shape", "a,b"], "error"),
        ("--num_sequences 0", split_base + ["--keep", "4", "--num_sequences", "0"], "error"),
        ("--max_length 0", split_base + ["--keep", "4", "--max_length", "0"], "error"),
        ("--batch_size 0", split_base + ["--keep", "4", "--batch_size", "0"], "error"),
        ("--dtype float128", split_base + ["--keep", "4", "--dtype", "float128"], "error"),
        ("--device meta", split_base + ["--keep", "4", "--device", "meta"], "error"),
        ("--top 0", split_base + ["--keep", "4", "--top", "0"], "error"),
        ("token id >= vocab", ["--model_name", str(llama), "--data", str(W / "ids_big"), "--keep", "4", "--no_progress"], "error"),
        ("negative token id", ["--model_name", str(llama), "--data", str(W / "ids_neg"), "--keep", "4", "--no_progress"], "error"),
        ("null token id", ["--model_name", str(llama), "--data", str(W / "ids_null"), "--keep", "4", "--no_progress"], "error"),
        ("a recurrent model", ["--model_name", str(model), "--data", str(data), "--keep", "4", "--no_progress"], "error"),
        ("accept: --keep 4", split_base + ["--keep", "4"], "accept"),
    ]:
        cases.append((f"choose_split: {name}", lambda argv=argv, expect=expect: classify(lambda: split.main(argv), expect)))

    counter = load_cli(ROOT / "param_counter.py")
    no_layers = folder("cfg_nolayers", {"config.json": json.dumps({"model_type": "llama", "hidden_size": 64}).encode()})
    for name, argv, expect in [
        ("missing model", [str(W / "none")], "error"), ("config without layer counts", [str(no_layers)], "error"),
        ("--num_rec 0", [str(model), "--num_rec", "0"], "error"), ("--num_rec -4", [str(model), "--num_rec", "-4"], "error"),
        ("--checkpoint -1", [str(ref / "final_checkpoint"), "--checkpoint", "-1"], "error"),
        ("--tokens_per_step -5", [str(model), "--checkpoint", "2", "--max_steps", "4", "--tokens_per_step", "-5"], "error"),
        ("--max_steps 0", [str(model), "--checkpoint", "2", "--max_steps", "0"], "error"),
        ("--warmup 2", [str(model), "--checkpoint", "2", "--max_steps", "4", "--warmup", "2"], "error"),
        ("--preset bogus", ["--preset", "bogus"], "error"), ("no model and no preset", [], "error"),
        ("accept: a model", [str(model)], "accept"), ("accept: a run's checkpoint", [str(ref / "final_checkpoint")], "accept"),
    ]:
        cases.append((f"param_counter: {name}", lambda argv=argv, expect=expect: classify(lambda: counter.main(argv), expect)))

    plots = load_cli(ROOT / "plot_evals.py")
    for name, argv, expect in [
        ("missing run", [str(W / "none"), "--out_dir", str(W / "plots")], "error"),
        ("nothing to plot", ["--out_dir", str(W / "plots")], "error"),
        ("out_dir is a file", [str(ref), "--out_dir", str(W / "afile")], "error"),
        ("--max_steps -1", [str(ref), "--out_dir", str(W / "plots"), "--max_steps", "-1"], "error"),
        ("--warmup 3", [str(ref), "--out_dir", str(W / "plots"), "--warmup", "3"], "error"),
        ("--runs_file missing", ["--runs_file", str(W / "none.json"), "--out_dir", str(W / "plots")], "error"),
        ("--runs_file garbage", ["--runs_file", str(W / "afile"), "--out_dir", str(W / "plots")], "error"),
        ("--jsonl missing", ["--jsonl", str(W / "none.jsonl"), "--out_dir", str(W / "plots")], "error"),
    ]:
        cases.append((f"plot_evals: {name}", lambda argv=argv, expect=expect: classify(lambda: plots.main(argv), expect)))

    mix = load_cli(ROOT / "mix_datasets.py")
    for name, argv in [
        ("missing config", ["--config", str(W / "none.yaml")]), ("config is garbage", ["--config", str(W / "afile")]),
        ("no sources", ["--out_dir", str(W / "mix")]),
        ("--num_shards 0", ["--config", str(W / "afile"), "--num_shards", "0"]),
        ("--num_proc 0", ["--out_dir", str(W / "mix"), "--num_proc", "0"]),
        ("out_dir exists", ["--out_dir", str(data)]),
    ]:
        cases.append((f"mix_datasets: {name}", lambda argv=argv: classify(lambda: mix.main(argv), "error", watch=data)))

    pack = load_cli(ROOT / "preprocess_data_packing.py")
    for name, argv in [
        ("no arguments", []), ("missing tokenizer", ["--tokenizer", str(W / "none"), "--out_dir", str(W / "packed")]),
        ("output over the data", ["--tokenizer", str(W / "tok"), "--out_dir", str(data)]),
        ("--max_length 0", ["--tokenizer", str(W / "tok"), "--out_dir", str(W / "packed"), "--max_length", "0"]),
    ]:
        cases.append((f"preprocess_data_packing: {name}", lambda argv=argv: classify(lambda: pack.main(argv), "error", watch=data)))

    from retrofit.model.conversion import main as convert_main

    layers = ["--prelude_idx", "0", "--core_idx", "1", "--coda_idx", "2", "--dtype", "float32", "--overwrite"]
    lm = W / "models" / "llama"
    shutil.copytree(llama, lm)
    for name, argv in [
        ("output == input", ["--model_name", str(lm), "--save_name", str(lm), *layers]),
        ("output inside input", ["--model_name", str(lm), "--save_name", str(lm / "rec"), *layers]),
        ("output contains input", ["--model_name", str(lm), "--save_name", str(W / "models"), *layers]),
        ("existing output without --overwrite", ["--model_name", str(lm), "--save_name", str(data), *layers[:-1]]),
        ("missing model", ["--model_name", str(W / "none"), "--save_name", str(W / "conv"), *layers]),
        ("layer index out of range", ["--model_name", str(lm), "--save_name", str(W / "conv"), "--prelude_idx", "0",
                                      "--core_idx", "99", "--coda_idx", "2", "--dtype", "float32"]),
        ("--dtype float128", ["--model_name", str(lm), "--save_name", str(W / "conv"), "--prelude_idx", "0", "--core_idx",
                              "1", "--coda_idx", "2", "--dtype", "float128"]),
        ("--mean_recurrence 0", ["--model_name", str(lm), "--save_name", str(W / "conv"), *layers, "--mean_recurrence", "0"]),
    ]:
        cases.append((f"convert: {name}", lambda argv=argv: classify(lambda: convert_main("llama", argv), "error", watch=lm)))

    # ---- launchers (subprocesses)
    submit, evalsh, tinyllama = ROOT / "shells" / "_submit.sh", ROOT / "shells" / "eval.sh", ROOT / "shells" / "tinyllama.sh"
    cluster_env = {"SCHEDULER": "slurm", "GPUS_PER_NODE": "1", "MACHINE_CONFIG": "", "LOG_DIR": str(W / "logs")}
    for name, argv, env, expect in [
        ("MAX_REQUEUES=abc", ["--dry-run", "--", "python", "train.py"], {"MAX_REQUEUES": "abc"}, "error"),
        ("MAX_REQUEUES=-1", ["--dry-run", "--", "python", "train.py"], {"MAX_REQUEUES": "-1"}, "error"),
        ("CPUS_PER_TASK=abc", ["--dry-run", "--", "python", "train.py"], {"CPUS_PER_TASK": "abc"}, "error"),
        ("CPU_JOB_CPUS=0", ["--cpu", "--dry-run", "--", "python", "train.py"], {"CPU_JOB_CPUS": "0"}, "error"),
        ("SIGNAL_LEAD_SECONDS=x", ["--dry-run", "--", "python", "train.py"], {"SIGNAL_LEAD_SECONDS": "x"}, "error"),
        ("--nodes 0", ["--nodes", "0", "--dry-run", "--", "python", "train.py"], {}, "error"),
        ("--gpus two", ["--gpus", "two", "--dry-run", "--", "python", "train.py"], {}, "error"),
        ("--time 90", ["--time", "90", "--dry-run", "--", "python", "train.py"], {}, "error"),
        ("--scheduler pbs", ["--scheduler", "pbs", "--dry-run", "--", "python", "train.py"], {}, "error"),
        ("no command", ["--dry-run"], {}, "error"),
        ("SCHEDULER unset", ["--dry-run", "--", "python", "train.py"], {"SCHEDULER": ""}, "error"),
        ("accept: a dry run", ["--dry-run", "--", "python", "train.py"], {}, "accept"),
    ]:
        cases.append((f"_submit.sh: {name}", lambda argv=argv, env=env, expect=expect: run_shell(
            submit, argv, expect, dict(cluster_env, **env))))
    ckpt_dir = ref / "final_checkpoint"
    for name, argv in [
        ("--limit 0", ["--limit", "0", str(ckpt_dir)]), ("--limit abc", ["--limit", "abc", str(ckpt_dir)]),
        ("--batch_size abc", ["--batch_size", "abc", str(ckpt_dir)]), ("--batch_size 0", ["--batch_size", "0", str(ckpt_dir)]),
        ("--recurrences 0", ["--recurrences", "0", str(ckpt_dir)]), ("--groups bogus", ["--groups", "bogus", str(ckpt_dir)]),
        ("missing checkpoint", [str(W / "none")]), ("no checkpoint", []),
    ]:
        cases.append((f"eval.sh: {name}", lambda argv=argv: run_shell(evalsh, argv, "error")))
    for name, argv in [("unknown experiment", ["no-such-experiment", "--dry-run"]), ("no experiment", [])]:
        cases.append((f"tinyllama.sh: {name}", lambda argv=argv: run_shell(tinyllama, argv, "error", cluster_env)))

    # ---- run them
    results = []
    for name, thunk in cases:
        if only and only not in name:
            continue
        start = time.monotonic()
        kind, detail = thunk()
        results.append((name, kind, detail))
        print(f"{kind:11s} | {name:58s} | {detail} ({time.monotonic() - start:.0f}s)", flush=True)
    counts = Counter(kind for _, kind, _ in results)
    print(dict(counts), len(results), "cases")
    return 0 if set(counts) <= {"clear error", "accepted"} else 1


if __name__ == "__main__":
    sys.exit(main())
