"""shells/eval.sh and the stock lm-eval CLI on converted checkpoints, with local task files.

Four real `python -m lm_eval` runs (through shells/eval.sh, started together so they share the
two cores): the converted model at mean_recurrence 1 and 4 with batch size 4, again at 4 with
batch size 1, and the non-recurrent base Llama. Each runs a multiple-choice task
(tests/data/arith_mc.yaml, loglikelihoods) and gsm8k_cot_sean on local GSM8K rows
(tests/data/gsm8k_cot_sean_local.yaml, generate_until), with --limit 3. The checkpoint has
init_values.std = 0, so results are deterministic and comparable across batch sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

EVAL_SH = ROOT / "shells" / "eval.sh"
LOCAL_TASKS = "arith_mc_local,gsm8k_cot_sean_local"


def eval_env() -> dict:
    env = dict(os.environ, PYTHON=sys.executable, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def eval_sh_args(*args, batch_size: int = 4) -> list[str]:
    """eval.sh on the local tasks (zero-shot group), run from the repo root (tests/data paths)."""
    return ["bash", str(EVAL_SH), "--groups", "zeroshot", "--zeroshot_tasks", LOCAL_TASKS,
            "--include_path", "tests/data", "--batch_size", str(batch_size), "--limit", "3", "--device", "cpu",
            *map(str, args)]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, eval_run_dir, tiny_llama_dir):
    """Run the four lm-eval evaluations concurrently; return their checkpoint dirs and logs."""
    root = tmp_path_factory.mktemp("lm_eval_runs")
    sweep = root / "run" / "model_only_chkpt_10"
    batch1 = root / "run_bs1" / "model_only_chkpt_10"
    baseline = root / "baseline" / "final_checkpoint"
    for src, dst in ((eval_run_dir / "model_only_chkpt_10", sweep), (eval_run_dir / "model_only_chkpt_10", batch1),
                     (tiny_llama_dir, baseline)):
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("eval"))
    jobs = {
        "sweep": eval_sh_args("--recurrences", "1,4", sweep, "--", "--log_samples"),
        "batch1": eval_sh_args("--recurrences", "4", batch1, "--", "--log_samples", batch_size=1),
        "baseline": eval_sh_args("--non_recurrent", baseline, "--", "--log_samples"),
    }
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=eval_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in jobs.items()}
    logs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"eval.sh ({name}) failed:\n{logs[name][-4000:]}"
    return {"sweep": sweep, "batch1": batch1, "baseline": baseline, "logs": logs}


def results_file(folder: Path) -> tuple[Path, dict]:
    files = sorted(folder.rglob("results_*.json"))
    assert len(files) == 1, f"expected one results JSON under {folder}, found {files}"
    return files[0], json.loads(files[0].read_text())


def samples(folder: Path, task: str) -> list[dict]:
    (file,) = folder.rglob(f"samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in file.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["doc_id"])


def loglikelihoods(rows) -> list[float]:
    return [float(choice[0][0]) for row in rows for choice in row["resps"]]


@pytest.mark.slow
def test_one_json_per_recurrence_in_the_plot_layout(evaluated):
    from retrofit.analysis.results import checkpoint_from, recurrence_from

    sweep = evaluated["sweep"]
    assert len(list((sweep / "eval").rglob("results_*.json"))) == 2
    for rec in (1, 4):
        path, data = results_file(sweep / "eval" / f"rec_{rec}" / "zeroshot")
        assert checkpoint_from(path, data) == (10, False)  # what plot_evals.py reads from this layout
        args = data["config"]["model_args"]
        assert args["pretrained"] == str(sweep) and int(args["mean_recurrence"]) == rec
        assert args["add_bos_token"] is True and args["dtype"] == "float32"
        assert recurrence_from(data, path) == rec
        assert set(data["results"]) == {"arith_mc_local", "gsm8k_cot_sean_local"}
        assert "exact_match,flexible-extract" in data["results"]["gsm8k_cot_sean_local"]
        assert data["n-shot"]["gsm8k_cot_sean_local"] == 1


@pytest.mark.slow
def test_results_depend_on_the_recurrence(evaluated):
    rec1 = samples(evaluated["sweep"] / "eval" / "rec_1", "arith_mc_local")
    rec4 = samples(evaluated["sweep"] / "eval" / "rec_4", "arith_mc_local")
    assert len(rec1) == len(rec4) == 3
    differences = [abs(a - b) for a, b in zip(loglikelihoods(rec1), loglikelihoods(rec4))]
    assert min(differences) > 1e-4


@pytest.mark.slow
def test_batch_size_does_not_change_results(evaluated):
    """Batch 4 right-pads loglikelihood inputs and left-pads generation prompts; batch 1 pads nothing."""
    batched = evaluated["sweep"] / "eval" / "rec_4"
    single = evaluated["batch1"] / "eval" / "rec_4"
    for a, b in zip(loglikelihoods(samples(batched, "arith_mc_local")), loglikelihoods(samples(single, "arith_mc_local"))):
        assert a == pytest.approx(b, abs=1e-4)
    gen_batched = samples(batched, "gsm8k_cot_sean_local")
    gen_single = samples(single, "gsm8k_cot_sean_local")
    assert [r["resps"] for r in gen_batched] == [r["resps"] for r in gen_single]
    assert any(r["resps"][0][0].strip() for r in gen_batched)  # it did generate text
    # Prompts are gsm8k_cot_sean's 1-shot chain-of-thought prompt.
    assert all(r["arguments"]["gen_args_0"]["arg_0"].endswith("\nA: Let's think step by step.") for r in gen_batched)
    assert results_file(batched)[1]["results"] == results_file(single)[1]["results"]


@pytest.mark.slow
def test_non_recurrent_baseline(evaluated):
    path, data = results_file(evaluated["baseline"] / "eval" / "non_recurrent" / "zeroshot")
    assert "mean_recurrence" not in data["config"]["model_args"]
    assert 0 <= data["results"]["arith_mc_local"]["acc,none"] <= 1
    assert "+ " in evaluated["logs"]["baseline"] and "mean_recurrence" not in evaluated["logs"]["baseline"]


@pytest.mark.slow
def test_finished_runs_are_skipped(evaluated):
    sweep = evaluated["sweep"]
    out = subprocess.run(eval_sh_args("--recurrences", "1,4", sweep), cwd=ROOT, env=eval_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("skip: ") == 2 and "done: 0 lm_eval runs, 2 skipped" in out.stdout
    # A different --limit is a different evaluation: not skipped (dry run: nothing executes).
    out = subprocess.run(eval_sh_args("--recurrences", "1,4", "--limit", "2", "--dry_run", sweep), cwd=ROOT,
                         env=eval_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.count("+ ") == 2 and "skip" not in out.stdout


def test_default_sweep_is_the_papers(tmp_path, eval_run_dir):
    """Without options: recurrences 1..32, the zero-shot list, and gsm8k_cot_sean + minerva_math 1-shot at max_length 1024."""
    ckpt = eval_run_dir / "model_only_chkpt_10"
    out = subprocess.run(["bash", str(EVAL_SH), "--dry_run", str(ckpt)], cwd=tmp_path, env=eval_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    commands = [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == 12
    for i, rec in enumerate((1, 2, 4, 8, 16, 32)):
        zero, math = commands[2 * i], commands[2 * i + 1]
        base = f"pretrained={ckpt},mean_recurrence={rec},trust_remote_code=True,add_bos_token=True,dtype=float32"
        assert f"--model_args {base} " in zero and f"--output_path {ckpt}/eval/rec_{rec}/zeroshot" in zero
        assert "--tasks lambada_openai,hellaswag,arc_easy,arc_challenge,mmlu,openbookqa,piqa,social_iqa,winogrande,asdiv " in zero
        assert "--batch_size auto" in zero and "--num_fewshot" not in zero
        assert f"--model_args {base},max_length=1024 " in math and "--tasks gsm8k_cot_sean,minerva_math " in math
        assert "--num_fewshot 1" in math and "--batch_size 32" in math
        assert f"--include_path {ROOT}/eval_yamls " in zero


@pytest.mark.parametrize("args,message", [
    (["{missing}"], "checkpoint directory {missing} does not exist"),
    (["{empty}"], "has no config.json"),
    (["--recurrences", "1,0", "{ckpt}"], "recurrence 0 is < 1"),
    (["--recurrences", "two", "{ckpt}"], "recurrence 'two' is not an integer"),
    (["--groups", "fewshot", "{ckpt}"], "unknown task group 'fewshot'"),
    (["--bogus", "{ckpt}"], "unknown option --bogus"),
    (["--device", "gpu0", "{ckpt}"], "--device=gpu0 is not a device; use auto, cpu, cuda or cuda:N"),
    ([], "no checkpoint directory given"),
    (["--limit", "0", "{ckpt}"], "--limit 0 evaluates no document"),
    (["--batch_size", "abc", "{ckpt}"], "--batch_size 'abc' must be a positive integer, auto or auto:N"),
])
def test_eval_sh_errors(tmp_path, eval_run_dir, args, message):
    paths = {"missing": tmp_path / "missing", "empty": tmp_path, "ckpt": eval_run_dir / "model_only_chkpt_10"}
    args = [a.format(**paths) for a in args]
    out = subprocess.run(["bash", str(EVAL_SH), *args], env=eval_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and message.format(**paths) in out.stderr


def test_gsm8k_cot_sean_on_local_rows(monkeypatch):
    """The task yaml loads through lm-eval's TaskManager, renders its 1-shot prompt and scores a
    chain-of-thought answer with flexible-extract (no model, no Hub)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(ROOT / "tests" / "data"), include_defaults=False)
    monkeypatch.chdir(ROOT)  # data_files are relative to the repo root
    task = manager.load(["gsm8k_cot_sean_local"])["tasks"]["gsm8k_cot_sean_local"]
    docs = list(task.test_docs())
    assert len(docs) == 6
    prompt = task.fewshot_context(docs[0], num_fewshot=1)
    assert prompt == (
        "Q: There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
        "there will be 21 trees. How many trees did the grove workers plant today?\nA: Let's think step by step. "
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
        "been 21 - 15 = 6. The answer is 6.\n\n"
        f"Q: {docs[0]['question']}\nA: Let's think step by step."
    )
    answer = docs[0]["answer"].split("####")[-1].strip()
    assert task.doc_to_target(docs[0]) == answer
    assert task.config.generation_kwargs["until"] == ["Q:", "</s>", "<|im_end|>"]

    task.build_all_requests(limit=2, rank=0, world_size=1)
    completions = [f" So the total is {answer}. The answer is {answer}.", " I think it is 1234."]
    for instance, text in zip(task.instances, completions):
        instance.resps = [text]
    task.apply_filters()
    scores = [task.process_results(inst.doc, [inst.filtered_resps["flexible-extract"]])["exact_match"]
              for inst in task.instances]
    assert scores == [1.0, 0.0]


@pytest.mark.slow
def test_lm_eval_on_a_converted_qwen3_is_batch_independent(tmp_path, tiny_family_dirs):
    """A new family through the same path: Qwen3 (per-head q/k norms) converted, then eval.sh at
    recurrence 2 with batch 4 (padded) and batch 1, concurrently; same scores and generations."""
    from retrofit.model.conversion import LayerChoice, convert

    ckpt = tmp_path / "qwen3_run" / "model_only_chkpt_10"
    convert(tiny_family_dirs["qwen3"], ckpt, LayerChoice([0, 1], [4, 5], [6, 7]), dtype="float32", mean_recurrence=2)
    config = json.loads((ckpt / "config.json").read_text())
    config["init_values"]["std"] = 0.0
    (ckpt / "config.json").write_text(json.dumps(config))
    single = tmp_path / "qwen3_bs1" / "model_only_chkpt_10"
    shutil.copytree(ckpt, single)
    jobs = {"batched": eval_sh_args("--recurrences", "2", ckpt, "--", "--log_samples"),
            "single": eval_sh_args("--recurrences", "2", single, "--", "--log_samples", batch_size=1)}
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=eval_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in jobs.items()}
    logs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"eval.sh ({name}) failed:\n{logs[name][-4000:]}"
    batched, alone = ckpt / "eval" / "rec_2", single / "eval" / "rec_2"
    assert results_file(batched)[1]["config"]["model_args"]["mean_recurrence"] in (2, "2")
    for a, b in zip(loglikelihoods(samples(batched, "arith_mc_local")), loglikelihoods(samples(alone, "arith_mc_local"))):
        assert a == pytest.approx(b, abs=1e-4)
    assert [r["resps"] for r in samples(batched, "gsm8k_cot_sean_local")] == [r["resps"] for r in samples(alone, "gsm8k_cot_sean_local")]
    assert results_file(batched)[1]["results"] == results_file(alone)[1]["results"]


def test_eval_prepends_bos_as_training_rows_begin(tokenizer_dir, tmp_path):
    """eval.sh's `--add_bos_token auto`: BOS when the tokenizer adds it (the packed rows have it) or
    when BOS is EOS (OLMo-2's document separator); not for a BOS no text starts with (SmolLM2-Instruct's
    chat marker <|im_start|>), nor without a BOS."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from retrofit.evaluate.loss_over_depth import eval_prepends_bos

    assert eval_prepends_bos(AutoTokenizer.from_pretrained(tokenizer_dir))  # adds <s> itself, like Llama's
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    spec["post_processor"] = None  # a tokenizer that adds no BOS, like SmolLM2's and OLMo-2's
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))

    def variant(**special):
        return PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), **special)

    assert not eval_prepends_bos(variant(bos_token="<|im_start|>", eos_token="<|im_end|>"))
    assert eval_prepends_bos(variant(bos_token="</s>", eos_token="</s>"))
    assert not eval_prepends_bos(variant(eos_token="</s>"))
