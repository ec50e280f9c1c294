"""Robustness check (not a speed benchmark): bad inputs to train.py, the converters and
generate.py, each run in-process and classified as clear error (one `error:` line, non-zero exit),
traceback, silent (exit 0 or no message) or data loss (a watched run folder changed).

    .venv/bin/python bench/robustness_census.py

Prints one line per input and the counts per class."""
import contextlib, io, os, shutil, traceback
from pathlib import Path
os.environ.setdefault("OMP_NUM_THREADS", "1"); os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
from retrofit.testing import (pack_token_rows, save_raven_model, tiny_raven_config, write_token_parquet, save_hf_model,
                              tiny_llama_config)
from retrofit.data.synthetic import arithmetic_problems, problem_text, train_tokenizer
from transformers import AutoTokenizer
from retrofit.train.config import parse_config
from retrofit.train.trainer import run as run_training

import tempfile; W = Path(tempfile.mkdtemp(prefix="census-"))
corpus = [problem_text(p) for p in arithmetic_problems(400, seed=0)]
train_tokenizer(corpus, W / "tok", vocab_size=384); tok = AutoTokenizer.from_pretrained(W / "tok")
model = save_raven_model(tiny_raven_config(len(tok)), W / "model", W / "tok")
llama = save_hf_model(tiny_llama_config(len(tok)), W / "llama", W / "tok")
data = write_token_parquet(pack_token_rows(tok, corpus, 33), W / "data", num_shards=4, row_group_size=16)
base = [f"--model_name={model}", f"--preprocessed_data_path={data}", "--is_parquet_dataset=true", "--max_length=32",
        "--micro_batch_size=2", "--batch_size=2", "--max_steps=4", "--save_interval=1", "--wandb_disabled=true",
        "--mean_recurrence_schedule.turn_on=true", "--mean_recurrence_schedule.max_mean_rec=3"]

def snap(folder):
    return {str(p): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()} if Path(folder).exists() else {}

def run(args, watch=None):
    before = snap(watch) if watch else {}
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = run_training(parse_config(args))
    except SystemExit as e:
        code = e.code
    except Exception:
        return "traceback", traceback.format_exc().strip().splitlines()[-1]
    lines = [l for l in err.getvalue().splitlines() if l.startswith("error")]
    lost = watch and any(k in snap(watch) and snap(watch)[k] != v or k not in snap(watch) for k, v in before.items())
    if lost:
        return "data loss", (lines or [""])[0][:150]
    if code and lines:
        return "clear error", lines[-1][:160]
    return "silent", f"exit {code}"

# a finished reference run
ref = W / "runs" / "ref"
assert run_training(parse_config(base + [f"--out_path={W/'runs'}", "--run_name=ref"])) == 0
def fresh_copy(name, drop=()):
    d = W / "runs" / name; shutil.rmtree(d, ignore_errors=True); shutil.copytree(ref, d)
    for x in drop: shutil.rmtree(d / x)
    return d
(W / "empty").mkdir(); (W / "garbage").mkdir(); (W / "garbage" / "s.parquet").write_bytes(b"junk" * 50)
half = W / "half"; half.mkdir(); b = (data / "shard-00000.parquet").read_bytes(); (half / "shard-00000.parquet").write_bytes(b[: len(b) // 2])
(W / "afile").write_text("x")
o = lambda name: [f"--out_path={W/'o'}", f"--run_name={name}"]
cases = [
    ("model path does not exist", base + ["--model_name=/no/such/model"] + o("a")),
    ("model dir without config.json", base + [f"--model_name={W/'empty'}"] + o("a")),
    ("hub id while offline", base + ["--model_name=org/not-here"] + o("a")),
    ("garbage parquet", base + [f"--preprocessed_data_path={W/'garbage'}"] + o("a")),
    ("truncated parquet", base + [f"--preprocessed_data_path={half}"] + o("a")),
    ("parquet without flag", base + ["--is_parquet_dataset=false"] + o("a")),
    ("max_mean_rec=0", base + ["--mean_recurrence_schedule.max_mean_rec=0"] + o("a")),
    ("max_mean_rec=-3", base + ["--mean_recurrence_schedule.max_mean_rec=-3"] + o("a")),
    ("max_backprop=0", base + ["--mean_backprop_depth_schedule.turn_on=true", "--mean_backprop_depth_schedule.max_backprop=0"] + o("a")),
    ("backprop start=0", base + ["--mean_backprop_depth_schedule.start=0"] + o("a")),
    ("missing resume path", base + [f"--resume_path={W/'nope'}"] + o("a")),
    ("resume from model_only_chkpt", base + [f"--resume_path={ref/'model_only_chkpt_2'}"] + o("a")),
    ("resume from final_checkpoint", base + [f"--resume_path={ref/'final_checkpoint'}"] + o("a")),
    ("resume from the run folder", base + [f"--resume_path={ref}"] + o("a")),
    ("device=cuda without GPU", base + ["--device=cuda"] + o("a")),
    ("device=gpu", base + ["--device=gpu"] + o("a")),
    ("read-only out_path", base + ["--out_path=/sys/census-out"]),
    ("out_path is a file", base + [f"--out_path={W/'afile'}"]),
    ("batch not multiple", base + ["--batch_size=3"] + o("a")),
    ("micro_batch_size=0", base + ["--micro_batch_size=0"] + o("a")),
    ("max_steps=-1", base + ["--max_steps=-1"] + o("a")),
    ("save_interval=0", base + ["--save_interval=0"] + o("a")),
    ("warmup_type bogus", base + ["--mean_recurrence_schedule.warmup_type=cubic"] + o("a")),
    ("warmup+cooldown>1", base + ["--scheduler_args.warmup=0.6", "--scheduler_args.cooldown=0.6"] + o("a")),
    ("empty data folder", base + [f"--preprocessed_data_path={W/'empty'}"] + o("a")),
    ("parquet folder missing", base + [f"--preprocessed_data_path={W/'none'}"] + o("a")),
    ("packed folder missing", base + ["--is_parquet_dataset=false", f"--preprocessed_data_path={W/'none'}"] + o("a")),
    ("max_length mismatch", base + ["--max_length=64"] + o("a")),
    ("muon + ellis", base + ["--muon.use_muon=true", "--use_ellis_adam.use_ellis_adam=true"] + o("a")),
    ("non_recurrent on raven", base + ["--non_recurrent_model=true", "--mean_recurrence_schedule.turn_on=false"] + o("a")),
    ("plain model without flag", base + [f"--model_name={llama}"] + o("a")),
    ("epochs=0", base + ["--epochs=0"] + o("a")),
    ("unknown flag", base + ["--foo=1"] + o("a")),
    ("max_steps=abc", base + ["--max_steps=abc"] + o("a")),
    ("overwrite + resume", base + ["--overwrite=true", "--resume_path=auto"] + o("a")),
]
results = [(name, *run(args)) for name, args in cases]
# run-folder cases, watching for data loss
d = fresh_copy("rerun"); results.append(("train into a finished run without resume", *run(base + [f"--out_path={W/'runs'}", "--run_name=rerun"], watch=d)))
d = fresh_copy("inside"); results.append(("--overwrite with --model_name inside the run", *run(base + [f"--model_name={d/'final_checkpoint'}", "--overwrite=true", f"--out_path={W/'runs'}", "--run_name=inside"], watch=d)))
d = fresh_copy("fin", drop=("checkpoint_2", "checkpoint_4")); results.append(("auto-resume a finished run w/o checkpoints", *run(base + [f"--out_path={W/'runs'}", "--run_name=fin", "--resume_path=auto"], watch=d)))
d = fresh_copy("alldamaged", drop=("final_checkpoint",))
for c in ("checkpoint_2", "checkpoint_4"):
    p = d / c / "training_state.pt"; p.write_bytes(p.read_bytes()[:1000])
results.append(("auto-resume with every checkpoint damaged", *run(base + [f"--out_path={W/'runs'}", "--run_name=alldamaged", "--resume_path=auto"], watch=d)))
results.append(("explicit resume of a damaged checkpoint", *run(base + [f"--out_path={W/'runs'}", "--run_name=alldamaged", f"--resume_path={d/'checkpoint_4'}"], watch=d)))
d = fresh_copy("badmarker", drop=("final_checkpoint",)); (d/"checkpoint_4"/"COMPLETE").write_text("{not json")
(d/"checkpoint_2"/"COMPLETE").write_text("{not json")
results.append(("auto-resume, COMPLETE markers garbage", *run(base + [f"--out_path={W/'runs'}", "--run_name=badmarker", "--resume_path=auto"], watch=d)))
for flag, name in (("--batch_size=4", "batch_size"), ("--micro_batch_size=1", "micro_batch_size"), ("--seed=5", "seed"),
                   ("--max_steps=6", "max_steps"), ("--mean_recurrence_schedule.max_mean_rec=4", "curriculum")):
    d = fresh_copy("chg", drop=("final_checkpoint", "checkpoint_4"))
    results.append((f"resume with changed {name}", *run(base + [f"--out_path={W/'runs'}", "--run_name=chg", "--resume_path=auto", flag], watch=d)))
d = fresh_copy("midbad", drop=("final_checkpoint",)); m = d / "metrics.jsonl"; lines = m.read_text().splitlines(); lines[1] = "garbage"; m.write_text("\n".join(lines) + "\n")
results.append(("metrics.jsonl with a garbage middle line", *run(base + [f"--out_path={W/'runs'}", "--run_name=midbad", "--resume_path=auto"], watch=d)))

# converter, generate
from retrofit.model.conversion import main as convert_main
def run_cli(fn, args, watch=None):
    before = snap(watch) if watch else {}
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = fn(args)
    except SystemExit as e:
        code = e.code
    except Exception:
        return "traceback", traceback.format_exc().strip().splitlines()[-1]
    if watch and snap(watch) != before:
        return "data loss", ""
    lines = [l for l in err.getvalue().splitlines() if "error" in l]
    return ("clear error", lines[-1][:160]) if code and lines else ("silent", f"exit {code}")
layers = ["--prelude_idx", "0", "--core_idx", "1", "--coda_idx", "2", "--dtype", "float32", "--overwrite"]
lm = W / "models" / "llama"; shutil.copytree(llama, lm)
for name, save in (("convert: output == input", lm), ("convert: output inside input", lm / "rec"), ("convert: output contains input", W / "models")):
    results.append((name, *run_cli(lambda a: convert_main("llama", a), ["--model_name", str(lm), "--save_name", str(save), *layers], watch=lm)))
results.append(("convert: existing output w/o --overwrite", *run_cli(lambda a: convert_main("llama", a), ["--model_name", str(lm), "--save_name", str(W / "data"), *layers[:-1]])))
import importlib.util
spec = importlib.util.spec_from_file_location("gen", ROOT / "generate.py"); gen = importlib.util.module_from_spec(spec); spec.loader.exec_module(gen)
results.append(("generate: missing model dir", *run_cli(gen.main, [str(W/'none'), "--prompt", "x"])))
results.append(("generate: --num_steps 0", *run_cli(gen.main, [str(model), "--prompt", "x", "--num_steps", "0"])))

from collections import Counter
for name, kind, detail in results:
    print(f"{kind:12s} | {name:48s} | {detail}")
print(Counter(k for _, k, _ in results), len(results))
shutil.rmtree(W, ignore_errors=True)
