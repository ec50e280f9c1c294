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

The cases are tables, one section per tool (`SECTIONS`, in the order they run: later sections read
what earlier ones made); how a case runs and is classified, and the fixtures: bench/_census.py.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# _census first: it sets the environment (threads, offline) before torch loads, and puts this
# checkout and tests/ on sys.path (via bench/_common.py)
from _census import (HANG_SECONDS, MEMORY_CAP_BYTES, ROOT, Workspace, _on_alarm, build_workspace, classify, judge, load_cli,
                     run_shell)

import torch  # noqa: E402

from train import main as train_main  # noqa: E402  (train.py of this checkout)
from tiny_components import save_hf_model, tiny_llama_config  # noqa: E402


# ------------------------------------------------------------------------------------------------
# The cases: (name, thunk returning (kind, detail)), section by section
# ------------------------------------------------------------------------------------------------
Case = tuple  # (name, thunk)
GOOD_ROW = list(range(1, 34))  # one row of valid token ids (max_length 32 + 1)

# train.py: one flag with a value no run can use, each refused before any work
TRAIN_BAD_FLAGS = [
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
]


def train_case(name: str, args: list[str], expect: str = "error", watch=None, check=None) -> Case:
    return f"train: {name}", lambda: classify(lambda: train_main(args), expect, watch, check)


def train_flag_cases(ws: Workspace) -> list[Case]:
    train, llama = ws.train, ws.llama
    cases = [train_case(f"--{flag}={value}", train(f"--{flag}={value}")) for flag, value in TRAIN_BAD_FLAGS]
    if not torch.cuda.is_available():
        cases.append(train_case("--device=cuda without a GPU", train("--device=cuda")))
    for name, args in [
        ("--lora.num_iterations=0", ("--lora.rank=2", "--lora.per_iteration=true", "--lora.num_iterations=0")),
        ("--lora.num_iterations=1000000", ("--lora.rank=2", "--lora.per_iteration=true", "--lora.num_iterations=1000000")),
        ("--distill.alpha=-1", (f"--distill.teacher={llama}", "--distill.alpha=-1")),
        ("--lora.alpha=0", ("--lora.rank=2", "--lora.alpha=0")),
        ("--lora.merge_on_save without a rank", ("--lora.merge_on_save=true",)),
        ("--distill.temperature=0", (f"--distill.teacher={llama}", "--distill.temperature=0")),
        ("muon + ellis", ("--muon.use_muon=true", "--ellis_adam.enabled=true")),
        ("non_recurrent on a raven model", ("--non_recurrent_model=true", "--mean_recurrence_schedule.turn_on=false")),
        ("throttle with non_recurrent", (f"--model_name={llama}", "--non_recurrent_model=true", "--throttle=true",
                                         "--mean_recurrence_schedule.turn_on=false")),
        ("plain model without the flag", (f"--model_name={llama}",)),
        ("overwrite + resume", ("--overwrite=true", "--resume_path=auto")),
        ("parquet without max_steps or tokens", ("--max_steps=0",)),
        ("parquet_dataset_max_tokens=0", ("--max_steps=0", "--parquet_dataset_max_tokens=0")),
        ("max_samples with parquet", ("--max_samples=4",)),
    ]:
        cases.append(train_case(name, train(*args)))
    return cases


def train_path_cases(ws: Workspace) -> list[Case]:
    """Models, teachers, data and resume paths that do not exist, are broken or do not fit."""
    copy, folder, ref, root = ws.model_copy, ws.folder, ws.ref, ws.root
    return [train_case(name, ws.train(*extra)) for name, extra in [
        ("model path does not exist", ["--model_name=/no/such/model"]),
        ("model dir without config.json", [f"--model_name={folder('empty')}"]),
        ("hub id while offline", ["--model_name=org/not-here"]),
        ("model without weights", [f"--model_name={copy('raven_noweights', drop=['*.safetensors'])}"]),
        ("model without tokenizer files", [f"--model_name={copy('raven_notok', drop=['tokenizer*', 'special*'])}"]),
        ("config.json norm_eps NaN", [f"--model_name={copy('raven_nan', {'norm_eps': float('nan')})}"]),
        ("config.json rope_theta -1", [f"--model_name={copy('raven_rope', {'rope_theta': -1})}"]),
        ("config.json n_heads 0", [f"--model_name={copy('raven_heads', {'n_heads': 0})}"]),
        ("config.json mean_recurrence -2", [f"--model_name={copy('raven_meanrec', {'mean_recurrence': -2})}"]),
        ("teacher missing", ["--distill.teacher=/no/such/teacher"]),
        ("teacher without weights", [f"--distill.teacher={copy('llama_noweights', drop=['*.safetensors'])}"]),
        ("teacher with a broken config", [f"--distill.teacher={folder('llama_broken', {'config.json': b'{broken'})}"]),
        ("teacher with a smaller vocabulary",
         [f"--distill.teacher={save_hf_model(tiny_llama_config(16), root / 'llama_small', root / 'tok')}"]),
        ("garbage parquet", [f"--preprocessed_data_path={ws.garbage}"]),
        ("truncated parquet", [f"--preprocessed_data_path={ws.half}"]),
        ("empty data folder", [f"--preprocessed_data_path={folder('empty_data')}"]),
        ("data folder missing", [f"--preprocessed_data_path={root / 'none'}"]),
        ("packed folder missing", ["--is_parquet_dataset=false", f"--preprocessed_data_path={root / 'none'}"]),
        ("parquet without the flag", ["--is_parquet_dataset=false"]),
        ("max_length mismatch", ["--max_length=64"]),
        ("token id >= vocab", [f"--preprocessed_data_path={ws.ids_data('ids_big', GOOD_ROW[:-1] + [10**6])}"]),
        ("negative token id", [f"--preprocessed_data_path={ws.ids_data('ids_neg', [-3] + GOOD_ROW[1:])}"]),
        ("null token id", [f"--preprocessed_data_path={ws.ids_data('ids_null', [None] + GOOD_ROW[1:])}"]),
        ("batch larger than the data", ["--batch_size=4096"]),
        ("missing resume path", [f"--resume_path={root / 'nope'}"]),
        ("resume from model_only_chkpt", [f"--resume_path={ref / 'model_only_chkpt_2'}"]),
        ("resume from final_checkpoint", [f"--resume_path={ref / 'final_checkpoint'}"]),
        ("resume from the run folder", [f"--resume_path={ref}"]),
        ("read-only out_path", ["--out_path=/sys/census-out"]),
        ("out_path is a file", [f"--out_path={root / 'afile'}"]),
    ]]


def run_folder_cases(ws: Workspace) -> list[Case]:
    """Training into a finished run's folder (watched for loss): reruns and --overwrite with inputs inside."""
    runs, fresh_copy = ws.runs, ws.fresh_copy
    cases = [train_case("train into a finished run without resume", runs("rerun"), watch=fresh_copy("rerun"))]
    d = fresh_copy("inside")
    cases.append(train_case("--overwrite with --model_name inside the run",
                            runs("inside", f"--model_name={d / 'final_checkpoint'}", "--overwrite=true"), watch=d))
    d = fresh_copy("teacher_inside")
    cases.append(train_case("--overwrite with --distill.teacher inside the run",
                            runs("teacher_inside", f"--distill.teacher={d / 'model_only_chkpt_1'}", "--overwrite=true"),
                            watch=d))
    d = fresh_copy("data_inside")
    shutil.copytree(ws.data, d / "model_only_chkpt_7")
    cases.append(train_case("--overwrite with the data inside the run",
                            runs("data_inside", f"--preprocessed_data_path={d / 'model_only_chkpt_7'}", "--overwrite=true"),
                            watch=d))
    d = fresh_copy("linked")
    kept = ws.root / "kept_checkpoint_2"
    shutil.move(d / "checkpoint_2", kept)
    (d / "checkpoint_2").symlink_to(kept, target_is_directory=True)
    cases.append(train_case("--overwrite with a symlinked checkpoint", runs("linked", "--overwrite=true"), expect="accept",
                            check=lambda _: (kept / "training_state.pt").is_file()))
    return cases


def resume_cases(ws: Workspace) -> list[Case]:
    """Resuming from checkpoints that are gone, damaged, misnamed or written with other settings."""
    runs, fresh_copy = ws.runs, ws.fresh_copy
    d = fresh_copy("fin", drop=("checkpoint_2", "checkpoint_4"))
    cases = [train_case("auto-resume a finished run without checkpoints", runs("fin", "--resume_path=auto"), watch=d)]
    d = fresh_copy("alldamaged", drop=("final_checkpoint",))
    for name in ("checkpoint_2", "checkpoint_4"):
        state = d / name / "training_state.pt"
        state.write_bytes(state.read_bytes()[:1000])
    cases.append(train_case("auto-resume with every checkpoint damaged", runs("alldamaged", "--resume_path=auto"), watch=d))
    cases.append(train_case("explicit resume of a damaged checkpoint",
                            runs("alldamaged", f"--resume_path={d / 'checkpoint_4'}"), watch=d))
    d = fresh_copy("badmarker", drop=("final_checkpoint",))
    for name in ("checkpoint_2", "checkpoint_4"):
        (d / name / "COMPLETE").write_text("{not json")
    cases.append(train_case("auto-resume with garbage COMPLETE markers", runs("badmarker", "--resume_path=auto"), watch=d))
    for flag, name in (("--batch_size=4", "batch_size"), ("--micro_batch_size=1", "micro_batch_size"),
                       ("--seed=5", "seed"), ("--max_steps=6", "max_steps"),
                       ("--mean_recurrence_schedule.max_mean_rec=4", "curriculum")):
        d = fresh_copy(f"chg_{name}", drop=("final_checkpoint", "checkpoint_4"))
        cases.append(train_case(f"resume with changed {name}", runs(f"chg_{name}", "--resume_path=auto", flag), watch=d))
    d = fresh_copy("midbad", drop=("final_checkpoint",))
    metrics = d / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = "garbage"
    metrics.write_text("\n".join(lines) + "\n")
    cases.append(train_case("metrics.jsonl with a garbage middle line", runs("midbad", "--resume_path=auto"), watch=d))
    for name in ("metrics.jsonl", "run.json"):
        d = fresh_copy(f"dir_{name}", drop=("final_checkpoint",))
        (d / name).unlink()
        (d / name).mkdir()
        cases.append(train_case(f"{name} is a folder", runs(f"dir_{name}", "--resume_path=auto")))
    return cases + resume_fault_cases(ws)


def resume_fault_cases(ws: Workspace) -> list[Case]:
    """A checkpoint renamed to another step; shards replaced under the same names."""
    import pyarrow.parquet as pq

    d = ws.fresh_copy("misnamed", drop=("final_checkpoint",))
    shutil.copytree(d / "checkpoint_2", d / "checkpoint_9")
    cases = [train_case("fault: checkpoint_9 holding step 2", ws.runs("misnamed", "--resume_path=auto"), expect="accept",
                        check=lambda text: "resumed from" in text and "checkpoint_4 at optimizer step 4" in text)]
    changed_data = ws.root / "changed_data"
    shutil.copytree(ws.data, changed_data)
    for shard in changed_data.glob("*.parquet"):  # other rows, same names and row counts
        table = pq.read_table(shard)
        pq.write_table(table.take(list(range(table.num_rows))[::-1]), shard, row_group_size=16)
    d = ws.fresh_copy("changed", drop=("final_checkpoint", "checkpoint_4"))
    cases.append(train_case("fault: shards replaced under the same names",
                            ws.runs("changed", "--resume_path=auto", f"--preprocessed_data_path={changed_data}"), watch=d))
    return cases


def train_accept_cases(ws: Workspace) -> list[Case]:
    """Valid inputs, each a real tiny run."""
    base, out = ws.base, ws.out
    cases = [
        train_case("accept: a plain run", base + out("ok1"), expect="accept"),
        train_case("accept: lr 0, min_lr_ratio 1, betas [0,0]", base + out("ok2") + [
            "--optim_config.lr=0", "--scheduler_args.min_lr_ratio=1", "--optim_config.betas=[0,0]"], expect="accept"),
        train_case("accept: seed 0, weight decay 0, timeout margin 0", base + out("ok3") + [
            "--seed=0", "--optim_config.weight_decay=0", "--save_n_mins_before_timeout=0"], expect="accept"),
    ]
    ws.fresh_copy("resume_ok", drop=("final_checkpoint", "checkpoint_4"))
    cases.append(train_case("accept: auto-resume", ws.runs("resume_ok", "--resume_path=auto"), expect="accept"))
    ws.fresh_copy("overwrite_ok")
    cases += [
        train_case("accept: --overwrite=true", ws.runs("overwrite_ok", "--overwrite=true"), expect="accept"),
        train_case("accept: a teacher", base + out("ok4") + [f"--distill.teacher={ws.llama}"], expect="accept"),
        train_case("accept: max_steps 10**12 (stopped by the data)", base + out("ok5") + [
            "--max_steps=1000000000000", "--save_interval=-1", "--batch_size=32"], expect="accept"),
    ]
    return cases


# ---- faults: disk full / read-only during a save, a second process into a running run
def disk_fault_case(ws: Workspace, errno_value: int, message: str, name: str) -> Case:
    """The second torch.save of a run fails with `errno_value`: one error line, no temporary folder
    left, and --resume_path=auto then finishes the run."""
    args = ws.base + ws.out(name)

    def call():
        real_save, calls = torch.save, []

        def failing(obj, path, *a, **k):
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno_value, message)
            return real_save(obj, path, *a, **k)

        torch.save = failing
        try:
            return train_main(args)
        finally:
            torch.save = real_save

    def checked():
        kind, detail = classify(call, "error")
        run_dir = ws.root / "o" / name
        if kind == "clear error" and [p for p in run_dir.iterdir() if p.name.startswith(".")]:
            return "silent", "a temporary folder was left"
        if kind == "clear error":  # resumes from the last good checkpoint
            again = classify(lambda: train_main(args + ["--resume_path=auto"]), "accept")
            if again[0] != "accepted":
                return again
        return kind, detail

    return f"fault: {message.lower()} during a save", checked


def duplicate_start(ws: Workspace) -> tuple[str, str]:
    """A second train.py into the folder of a run that is training: refused."""
    args = [a for a in ws.base if not a.startswith(("--max_steps", "--save_interval"))]
    args += ["--max_steps=100000", "--save_interval=-1", "--batch_size=2", f"--out_path={ws.root / 'dup'}", "--run_name=d"]
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=ROOT)
    try:
        for line in first.stdout:
            if line.startswith("step 1/"):
                break
        return classify(lambda: train_main(args + ["--resume_path=auto"]), "error")
    finally:
        first.kill()
        first.wait()
        first.stdout.close()


def fault_cases(ws: Workspace) -> list[Case]:
    return [disk_fault_case(ws, 28, "No space left on device", "full"),
            disk_fault_case(ws, 30, "Read-only file system", "readonly"),
            ("fault: a second process into a running run", lambda: duplicate_start(ws))]


# generate.py on the tiny recurrent model: (name, extra argv, expect)
GENERATE_FLAG_CASES = [
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
]


def generate_cases(ws: Workspace) -> list[Case]:
    gen = load_cli(ROOT / "generate.py")

    def case(name, target, extra, expect="error"):
        return f"generate: {name}", lambda: classify(lambda: gen.main([str(target), "--prompt", "x", *extra]), expect)

    cases = [case(name, ws.model, extra, expect) for name, extra, expect in GENERATE_FLAG_CASES]
    if not torch.cuda.is_available():
        cases.append(case("--device cuda without a GPU", ws.model, ["--device", "cuda"]))
    root = ws.root  # the broken models train_path_cases made
    for name, target, extra in [
        ("missing model dir", root / "none", []), ("model without tokenizer files", root / "raven_notok", []),
        ("model without weights", root / "raven_noweights", []), ("config.json rope_theta -1", root / "raven_rope", []),
        ("--num_steps on a plain model", ws.llama, ["--num_steps", "2"]),
    ]:
        cases.append(case(name, target, extra))
    return cases


def multi_recurrence_eval_cases(ws: Workspace) -> list[Case]:
    mre = load_cli(ROOT / "multi_recurrence_eval.py")
    root, ref, data = ws.root, str(ws.ref), ws.data
    eval_out = ["--output_dir", str(root / "eval_out")]
    on = [ref, "2", "--eval_file_path", str(data)]  # the reference run's checkpoint 2 on the training data
    cases = []
    for name, argv, expect in [
        ("missing run dir", [str(root / "none"), "2", "--eval_file_path", str(data)], "error"),
        ("missing checkpoint", [ref, "99", "--eval_file_path", str(data)], "error"),
        ("missing eval file", [ref, "2", "--eval_file_path", str(root / "none")], "error"),
        ("garbage eval file", [ref, "2", "--eval_file_path", str(ws.garbage)], "error"),
        ("--recurrences 0", on + ["--recurrences", "0"], "error"),
        ("--recurrences abc", on + ["--recurrences", "abc"], "error"),
        ("--recurrences 1e9", on + ["--recurrences", "1000000000"], "error"),
        ("--num_sequences 0", on + ["--num_sequences", "0"], "error"),
        ("--batch_size 0", on + ["--batch_size", "0"], "error"),
        ("--batch_size -4", on + ["--batch_size", "-4"], "error"),
        ("--dtype float128", on + ["--dtype", "float128"], "error"),
        ("--device meta", on + ["--device", "meta"], "error"),
        ("--adaptive_threshold -1", on + ["--adaptive_threshold", "-1"], "error"),
        ("--adaptive_criterion bogus", on + ["--adaptive_criterion", "bogus"], "error"),
        ("token id >= vocab", [ref, "2", "--eval_file_path", str(root / "ids_big"), "--recurrences", "1"], "error"),
        ("negative token id", [ref, "2", "--eval_file_path", str(root / "ids_neg"), "--recurrences", "1"], "error"),
        ("null token id", [ref, "2", "--eval_file_path", str(root / "ids_null"), "--recurrences", "1"], "error"),
        ("accept: two depths", on + ["--recurrences", "1,2", "--num_sequences", "8", "--batch_size", "4"], "accept"),
    ]:
        cases.append((f"multi_recurrence_eval: {name}", lambda argv=argv, expect=expect: classify(
            lambda: mre.main(argv + eval_out + (["--device", "cpu"] if "--device" not in argv else [])), expect)))
    if not torch.cuda.is_available():
        cases.append(("multi_recurrence_eval: --device cuda without a GPU", lambda: classify(
            lambda: mre.main(on + ["--device", "cuda"] + eval_out), "error")))
    return cases


def choose_split_cases(ws: Workspace) -> list[Case]:
    split = load_cli(ROOT / "choose_split.py")
    root, llama, data = ws.root, str(ws.llama), str(ws.data)
    split_base = ["--model_name", llama, "--data", data, "--num_sequences", "4", "--max_length", "16", "--no_progress"]
    keep = split_base + ["--keep", "4"]
    cases = []
    for name, argv, expect in [
        ("missing model", ["--model_name", str(root / "none"), "--data", data, "--keep", "4"], "error"),
        ("missing data", ["--model_name", llama, "--data", str(root / "none"), "--keep", "4"], "error"),
        ("garbage data", ["--model_name", llama, "--data", str(ws.garbage), "--keep", "4"], "error"),
        ("--keep 0", split_base + ["--keep", "0"], "error"), ("--keep 99", split_base + ["--keep", "99"], "error"),
        ("--shape 0,0,0", split_base + ["--shape", "0,0,0"], "error"), ("--shape a,b", split_base + ["--shape", "a,b"], "error"),
        ("--num_sequences 0", keep + ["--num_sequences", "0"], "error"),
        ("--max_length 0", keep + ["--max_length", "0"], "error"),
        ("--batch_size 0", keep + ["--batch_size", "0"], "error"),
        ("--dtype float128", keep + ["--dtype", "float128"], "error"),
        ("--device meta", keep + ["--device", "meta"], "error"),
        ("--top 0", keep + ["--top", "0"], "error"),
        ("token id >= vocab", ["--model_name", llama, "--data", str(root / "ids_big"), "--keep", "4", "--no_progress"], "error"),
        ("negative token id", ["--model_name", llama, "--data", str(root / "ids_neg"), "--keep", "4", "--no_progress"], "error"),
        ("null token id", ["--model_name", llama, "--data", str(root / "ids_null"), "--keep", "4", "--no_progress"], "error"),
        ("a recurrent model", ["--model_name", str(ws.model), "--data", data, "--keep", "4", "--no_progress"], "error"),
        ("accept: --keep 4", keep, "accept"),
    ]:
        cases.append((f"choose_split: {name}", lambda argv=argv, expect=expect: classify(lambda: split.main(argv), expect)))
    return cases


def counting_and_plotting_cases(ws: Workspace) -> list[Case]:
    """param_counter.py and plot_evals.py."""
    counter, plots = load_cli(ROOT / "param_counter.py"), load_cli(ROOT / "plot_evals.py")
    root, model, ref = ws.root, str(ws.model), ws.ref
    no_layers = ws.folder("cfg_nolayers", {"config.json": json.dumps({"model_type": "llama", "hidden_size": 64}).encode()})
    cases = []
    for name, argv, expect in [
        ("missing model", [str(root / "none")], "error"), ("config without layer counts", [str(no_layers)], "error"),
        ("--num_rec 0", [model, "--num_rec", "0"], "error"), ("--num_rec -4", [model, "--num_rec", "-4"], "error"),
        ("--checkpoint -1", [str(ref / "final_checkpoint"), "--checkpoint", "-1"], "error"),
        ("--tokens_per_step -5", [model, "--checkpoint", "2", "--max_steps", "4", "--tokens_per_step", "-5"], "error"),
        ("--max_steps 0", [model, "--checkpoint", "2", "--max_steps", "0"], "error"),
        ("--warmup 2", [model, "--checkpoint", "2", "--max_steps", "4", "--warmup", "2"], "error"),
        ("--preset bogus", ["--preset", "bogus"], "error"), ("no model and no preset", [], "error"),
        ("accept: a model", [model], "accept"), ("accept: a run's checkpoint", [str(ref / "final_checkpoint")], "accept"),
    ]:
        cases.append((f"param_counter: {name}", lambda argv=argv, expect=expect: classify(lambda: counter.main(argv), expect)))
    plot_dir = ["--out_dir", str(root / "plots")]
    for name, argv in [
        ("missing run", [str(root / "none")] + plot_dir), ("nothing to plot", plot_dir),
        ("out_dir is a file", [str(ref), "--out_dir", str(root / "afile")]),
        ("--max_steps -1", [str(ref)] + plot_dir + ["--max_steps", "-1"]),
        ("--warmup 3", [str(ref)] + plot_dir + ["--warmup", "3"]),
        ("--runs_file missing", ["--runs_file", str(root / "none.json")] + plot_dir),
        ("--runs_file garbage", ["--runs_file", str(root / "afile")] + plot_dir),
        ("--jsonl missing", ["--jsonl", str(root / "none.jsonl")] + plot_dir),
    ]:
        cases.append((f"plot_evals: {name}", lambda argv=argv: classify(lambda: plots.main(argv), "error")))
    return cases


def data_tool_cases(ws: Workspace) -> list[Case]:
    """mix_datasets.py and preprocess_data_packing.py, the training data watched for loss."""
    mix, pack = load_cli(ROOT / "mix_datasets.py"), load_cli(ROOT / "preprocess_data_packing.py")
    root, data = ws.root, ws.data
    cases = []
    for name, argv in [
        ("missing config", ["--config", str(root / "none.yaml")]), ("config is garbage", ["--config", str(root / "afile")]),
        ("no sources", ["--out_dir", str(root / "mix")]),
        ("--num_shards 0", ["--config", str(root / "afile"), "--num_shards", "0"]),
        ("--num_proc 0", ["--out_dir", str(root / "mix"), "--num_proc", "0"]),
        ("out_dir exists", ["--out_dir", str(data)]),
    ]:
        cases.append((f"mix_datasets: {name}", lambda argv=argv: classify(lambda: mix.main(argv), "error", watch=data)))
    tok = str(root / "tok")
    for name, argv in [
        ("no arguments", []), ("missing tokenizer", ["--tokenizer", str(root / "none"), "--out_dir", str(root / "packed")]),
        ("output over the data", ["--tokenizer", tok, "--out_dir", str(data)]),
        ("--max_length 0", ["--tokenizer", tok, "--out_dir", str(root / "packed"), "--max_length", "0"]),
    ]:
        cases.append((f"preprocess_data_packing: {name}",
                      lambda argv=argv: classify(lambda: pack.main(argv), "error", watch=data)))
    return cases


def convert_cases(ws: Workspace) -> list[Case]:
    """The converter on a copy of the plain llama (watched for loss)."""
    from retrofit.model.conversion import main as convert_main

    root = ws.root
    layers = ["--prelude_idx", "0", "--core_idx", "1", "--coda_idx", "2", "--dtype", "float32", "--overwrite"]
    lm = root / "models" / "llama"
    shutil.copytree(ws.llama, lm)
    into = ["--model_name", str(lm), "--save_name", str(root / "conv")]
    cases = []
    for name, argv in [
        ("output == input", ["--model_name", str(lm), "--save_name", str(lm), *layers]),
        ("output inside input", ["--model_name", str(lm), "--save_name", str(lm / "rec"), *layers]),
        ("output contains input", ["--model_name", str(lm), "--save_name", str(root / "models"), *layers]),
        ("existing output without --overwrite", ["--model_name", str(lm), "--save_name", str(ws.data), *layers[:-1]]),
        ("missing model", ["--model_name", str(root / "none"), "--save_name", str(root / "conv"), *layers]),
        ("layer index out of range", into + ["--prelude_idx", "0", "--core_idx", "99", "--coda_idx", "2", "--dtype", "float32"]),
        ("--dtype float128", into + ["--prelude_idx", "0", "--core_idx", "1", "--coda_idx", "2", "--dtype", "float128"]),
        ("--mean_recurrence 0", into + [*layers, "--mean_recurrence", "0"]),
    ]:
        cases.append((f"convert: {name}", lambda argv=argv: classify(lambda: convert_main("llama", argv), "error", watch=lm)))
    return cases


# shells/_submit.sh --dry-run: (name, argv, environment changes, expect)
SUBMIT_CASES = [
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
]


def launcher_cases(ws: Workspace) -> list[Case]:
    """The shell launchers, as subprocesses."""
    submit, evalsh, tinyllama = ROOT / "shells" / "_submit.sh", ROOT / "shells" / "eval.sh", ROOT / "shells" / "tinyllama.sh"
    cluster_env = {"SCHEDULER": "slurm", "GPUS_PER_NODE": "1", "MACHINE_CONFIG": "", "LOG_DIR": str(ws.root / "logs")}
    cases = [(f"_submit.sh: {name}", lambda argv=argv, env=env, expect=expect: run_shell(
        submit, argv, expect, dict(cluster_env, **env))) for name, argv, env, expect in SUBMIT_CASES]
    ckpt_dir = str(ws.ref / "final_checkpoint")
    for name, argv in [
        ("--limit 0", ["--limit", "0", ckpt_dir]), ("--limit abc", ["--limit", "abc", ckpt_dir]),
        ("--batch_size abc", ["--batch_size", "abc", ckpt_dir]), ("--batch_size 0", ["--batch_size", "0", ckpt_dir]),
        ("--recurrences 0", ["--recurrences", "0", ckpt_dir]), ("--groups bogus", ["--groups", "bogus", ckpt_dir]),
        ("missing checkpoint", [str(ws.root / "none")]), ("no checkpoint", []),
    ]:
        cases.append((f"eval.sh: {name}", lambda argv=argv: run_shell(evalsh, argv, "error")))
    for name, argv in [("unknown experiment", ["no-such-experiment", "--dry-run"]), ("no experiment", [])]:
        cases.append((f"tinyllama.sh: {name}", lambda argv=argv: run_shell(tinyllama, argv, "error", cluster_env)))
    return cases


def late_fault_cases(ws: Workspace) -> list[Case]:
    """Issue 23's later faults (set up in bench/robustness_faults.py)."""
    from robustness_faults import packed_data_rewritten, sigterm_to_local_torchrun

    return [("fault: packed data rewritten with the same row count", lambda: classify(
                lambda: packed_data_rewritten(ws.root, ws.data, ws.base, ws.out("packed"), train_main),
                "error")),
            ("fault: SIGTERM to a 2-process _submit.sh --local run", lambda: sigterm_to_local_torchrun(
                ws.base + ws.out("term"), judge, HANG_SECONDS))]


# In this order: later sections read what earlier ones made (the broken models, the ids_* data).
SECTIONS = (train_flag_cases, train_path_cases, run_folder_cases, resume_cases, train_accept_cases, fault_cases,
            generate_cases, multi_recurrence_eval_cases, choose_split_cases, counting_and_plotting_cases,
            data_tool_cases, convert_cases, launcher_cases, late_fault_cases)


def census(root: Path, only: str | None) -> int:
    """Build the fixtures and every case, run those whose name contains `only`, print one line each
    and the counts per class; 0 when every case is a clear error or accepted."""
    ws = build_workspace(root)
    cases = [case for section in SECTIONS for case in section(ws)]
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the cases whose name contains this")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGALRM, _on_alarm)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, resource.getrlimit(resource.RLIMIT_AS)[1]))
    root = Path(tempfile.mkdtemp(prefix="census-"))
    try:
        return census(root, args.only)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
