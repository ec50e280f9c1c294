"""plot_evals.py on run folders holding lm-eval results files written by lm-eval's own writer.

The results JSONs are produced by lm_eval.loggers.EvaluationTracker.save_results_aggregated (the code
`lm_eval --output_path` runs), so file names, folder layout and keys are lm-eval 0.4.x's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import plot_evals
from conftest import PAPER_DATA
from retrofit.train.depth import MeanBackpropDepthSchedule, MeanRecurrenceSchedule, RecurrenceSchedule
from retrofit.train.flops import count_model_dir, training_flops
from retrofit.analysis.results import COLUMNS, NotLmEvalOutput, RunSpec, collect_run, read_jsonl

MAX_STEPS = 300
RECS = (1, 2, 4)


def accuracy(step: int, rec: int) -> float:
    return round(0.1 + step / 2000 + rec / 100, 6)


def write_lm_eval_results(output_path: Path, model_args, results: dict, group_subtasks: dict | None = None) -> Path:
    """Write a results file exactly as `lm_eval --output_path output_path` does."""
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(output_path))
    tracker.general_config_tracker.log_experiment_args(
        model_source="hf", model_args=model_args, system_instruction=None, chat_template=None,
        fewshot_as_multiturn=False)
    payload = {
        "results": results,
        "group_subtasks": group_subtasks or {task: [] for task in results},
        "configs": {task: {"task": task, "metadata": {"version": 1.0}} for task in results},
        "versions": {task: 1.0 for task in results},
        "n-shot": {task: 0 for task in results},
        "config": {"model": "hf", "model_args": model_args, "batch_size": 8, "limit": None},
        "git_hash": None,
        "date": 0.0,
    }
    tracker.save_results_aggregated(results=payload, samples=None)
    return next(output_path.rglob("results_*.json")) if output_path.suffix != ".json" else output_path


def task_results(step: int, rec: int) -> dict:
    a = accuracy(step, rec)
    return {
        "arc_easy": {"alias": "arc_easy", "acc,none": a - 0.05, "acc_stderr,none": 0.01,
                     "acc_norm,none": a, "acc_norm_stderr,none": 0.012},
        "gsm8k_cot_sean": {"alias": "gsm8k_cot_sean", "exact_match,strict-match": a / 2,
                           "exact_match_stderr,strict-match": 0.01, "exact_match,flexible-extract": a,
                           "exact_match_stderr,flexible-extract": 0.013},
        "mmlu": {"alias": "mmlu", "acc,none": a, "acc_stderr,none": 0.004},
        "mmlu_anatomy": {"alias": " - anatomy", "acc,none": 0.3, "acc_stderr,none": 0.04},
        "my_new_task": {"alias": "my_new_task", "bleu,none": 12.0},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    """A recurrent run (checkpoints 100, 200, final at 300; rec 1, 2, 4) and a static baseline run."""
    from tiny_components import tiny_llama_config
    from retrofit.model.configuration_raven import RavenConfig

    root = tmp_path_factory.mktemp("eval_runs")
    recurrent = root / "tiny_recurrent_run"
    for name, step in [("model_only_chkpt_100", 100), ("model_only_chkpt_200", 200), ("final_checkpoint", MAX_STEPS)]:
        checkpoint = recurrent / name
        RavenConfig(n_embd=64, n_heads=4, num_key_value_heads=2, intermediate_size=128, n_layers_in_prelude=1,
                    n_layers_in_recurrent_block=2, n_layers_in_coda=1, vocab_size=len(tokenizer),
                    mean_recurrence=4).save_pretrained(checkpoint)
        for rec in RECS:
            results = task_results(step, rec)
            subtasks = {"arc_easy": [], "gsm8k_cot_sean": [], "mmlu": ["mmlu_anatomy"], "my_new_task": []}
            if step == 200 and rec == 2:
                # Newer lm-eval CLIs store model_args as a dict; no mean_recurrence -> from rec_2/.
                write_lm_eval_results(checkpoint / "eval" / f"rec_{rec}", {"pretrained": str(checkpoint)}, results,
                                      subtasks)
            else:
                write_lm_eval_results(checkpoint / "eval" / f"rec_{rec}",
                                      f"pretrained={checkpoint},mean_recurrence={rec},trust_remote_code=True",
                                      results, subtasks)
    static = root / "tiny_static_run"
    for step in (100, 300):
        checkpoint = static / f"model_only_chkpt_{step}"
        tiny_llama_config(len(tokenizer)).save_pretrained(checkpoint)
        # --output_path given as a .json file: lm-eval writes {stem}_{timestamp}.json beside it.
        write_lm_eval_results(checkpoint / "eval" / "results.json", f"pretrained={checkpoint}",
                              {"arc_easy": task_results(step, 1)["arc_easy"]})
    return {"recurrent": recurrent, "static": static, "root": root}


def test_collect_run_reads_lm_eval_output(runs, caplog):
    spec = RunSpec(path=runs["recurrent"], label="tiny (1,2,1)", max_steps=MAX_STEPS, warmup=0.5,
                   warmup_type="1-sqrt", backprop_depth=2, tokens_per_step=4096)
    collected = collect_run(spec)
    rows = collected.rows
    # 3 checkpoints x 3 recurrences x 3 known tasks; mmlu's subtask is skipped quietly, the new task listed.
    assert len(rows) == 27
    assert collected.unknown_tasks == {"my_new_task"}
    assert {(r["chkpt"], r["num_rec"]) for r in rows} == {(s, r) for s in (100, 200, 300) for r in RECS}
    counts = count_model_dir(runs["recurrent"] / "model_only_chkpt_100")
    schedule = RecurrenceSchedule(MAX_STEPS, MeanRecurrenceSchedule(True, 0.5, 4, "1-sqrt"), MeanBackpropDepthSchedule(max_backprop=2))
    flops = training_flops(counts, [100, 200, 300], schedule, 4096)
    for r in rows:
        task_metric_value = accuracy(r["chkpt"], r["num_rec"])
        assert r["acc"] == pytest.approx(task_metric_value)  # acc_norm / flexible-extract, not acc / strict
        assert r["stderr"] == {"arc_easy": 0.012, "gsm8k_cot_sean": 0.013, "mmlu": 0.004}[r["task"]]
        assert r["train_rec"] == 4  # from the checkpoint's config.json
        assert r["effective_params"] == counts.non_embedding(r["num_rec"])
        assert r["FLOPs"] == flops[r["chkpt"]]
        assert r["model"] == "tiny (1,2,1)" and r["cooldown"] is False

    static_rows = collect_run(RunSpec(path=runs["static"], label="static")).rows
    static_counts = count_model_dir(runs["static"] / "model_only_chkpt_100")
    assert not static_counts.recurrent
    assert [(r["chkpt"], r["num_rec"], r["train_rec"]) for r in static_rows] == [(100, 1, 1), (300, 1, 1)]
    assert [r["FLOPs"] for r in static_rows] == [6 * static_counts.layers * 2**20 * s for s in (100, 300)]


def test_bad_inputs_give_clear_errors(runs, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    (empty / "model_only_chkpt_5").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no lm-eval results"):
        collect_run(RunSpec(path=empty))
    not_eval = tmp_path / "not_eval_run" / "eval" / "rec_2"
    not_eval.mkdir(parents=True)
    (not_eval / "results_x.json").write_text(json.dumps({"loss": 1.0}))
    with pytest.raises(NotLmEvalOutput, match="results_x.json is not lm-eval output"):
        collect_run(RunSpec(path=not_eval.parents[1]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_run(RunSpec(path=tmp_path / "missing"))
    for argv, message in [([str(empty), "--out_dir", str(tmp_path / "o")], "no lm-eval results"),
                          ([str(not_eval.parents[1]), "--out_dir", str(tmp_path / "o")], "not lm-eval output"),
                          ([str(runs["static"]), "--test_rec", "deep", "--out_dir", str(tmp_path / "o")], "--test_rec")]:
        assert plot_evals.main(argv) == 2
        assert message in capsys.readouterr().err


def test_output_path_files_directly_in_a_folder(runs, tmp_path):
    """`lm_eval --output_path folder/name.json` files sit directly in a folder; other JSONs there are
    skipped with a warning, while a non-lm-eval results*.json is an error (see above)."""
    folder = tmp_path / "loose_evals"
    checkpoint = runs["recurrent"] / "model_only_chkpt_200"
    for rec in (2, 4):
        write_lm_eval_results(folder / f"chkpt_200_rec{rec}.json", f"pretrained={checkpoint},mean_recurrence={rec}",
                              {"arc_easy": task_results(200, rec)["arc_easy"]})
    (folder / "notes.json").write_text(json.dumps({"comment": "not an eval"}))
    collected = collect_run(RunSpec(path=folder, max_steps=MAX_STEPS))
    assert [(r["chkpt"], r["num_rec"], r["acc"]) for r in collected.rows] == [
        (200, 2, accuracy(200, 2)), (200, 4, accuracy(200, 4))]
    assert any("notes.json is not lm-eval output" in w for w in collected.warnings)
    with pytest.raises(FileNotFoundError, match="notes.json"):
        only_notes = tmp_path / "only_notes"
        only_notes.mkdir()
        (only_notes / "notes.json").write_text("{}")
        collect_run(RunSpec(path=only_notes))


def test_plot_evals_cli_writes_table_and_figures(runs, tmp_path, caplog):
    runs_file = tmp_path / "runs.json"
    runs_file.write_text(json.dumps([
        {"path": str(runs["recurrent"]), "label": "recurrent (1,2,1)", "max_steps": MAX_STEPS, "warmup": 0.5,
         "warmup_type": "linear", "backprop_depth": 2},
        {"path": str(runs["static"]), "label": "static baseline"},
    ]))
    out = tmp_path / "plots"
    with caplog.at_level(logging.WARNING):
        assert plot_evals.main(["--runs_file", str(runs_file), "--out_dir", str(out), "--format", "png",
                                "--errorbars"]) == 0
    assert "my_new_task" in caplog.text  # unknown task: warned and skipped, by name
    table = read_jsonl(out / "results.jsonl")
    assert len(table) == 27 + 2
    assert all(list(row) == list(COLUMNS) for row in table)
    written = sorted(out.glob("*.png"))
    names = sorted(p.name for p in written)
    assert names == sorted(f"{task}_vs_{x}.png" for task in ("arc_easy", "gsm8k_cot_sean", "mmlu")
                           for x in ("num_rec", "chkpt", "FLOPs"))
    assert all(p.stat().st_size > 10_000 for p in written)
    assert not list(out.glob(".*"))  # no temp files left behind


def test_own_runs_and_paper_data_share_the_plots(runs, tmp_path):
    out = tmp_path / "mixed"
    assert plot_evals.main([str(runs["recurrent"]), "--labels", "mine", "--max_steps", str(MAX_STEPS),
                            "--jsonl", str(PAPER_DATA / "extend_prelude_coda.jsonl"),
                            "--out_dir", str(out), "--format", "pdf"]) == 0
    rows = read_jsonl(out / "results.jsonl")
    assert {r["model"] for r in rows} == {"mine", "4,8,4 (Train Recurrence=16)", "7,8,7 (Train Recurrence=16)"}
    assert (out / "gsm8k_cot_sean_vs_FLOPs.pdf").read_bytes().startswith(b"%PDF")
    assert (out / "minerva_math_vs_chkpt.pdf").exists()


def test_local_task_variants_and_run_json_are_read_without_warnings(runs, tmp_path):
    """docs/evaluation.md's gsm8k_cot_sean_local (a local copy of a known task) is scored with the
    known task's metric; the run.json train.py writes into every run folder and checkpoint is not
    mistaken for lm-eval output; a task that only shares a prefix with a known one stays unknown."""
    import shutil

    from retrofit.analysis.results import known_task, task_chance, task_metric, task_title
    from retrofit.train.run_record import build_run_record, write_run_record

    assert [known_task(t) for t in ("gsm8k_cot_sean_local", "quickstart_gsm8k_cot_sean", "mmlu_anatomy",
                                    "quickstart_arith_mc", "my_task_local")] == [
        "gsm8k_cot_sean", "gsm8k_cot_sean", None, "quickstart_arith_mc", None]
    assert task_metric("gsm8k_cot_sean_local") == "exact_match,flexible-extract"
    assert (task_title("gsm8k_cot_sean_local"), task_chance("arc_easy_local")) == ("GSM8K (local)", 0.25)

    run = shutil.copytree(runs["static"], tmp_path / "static_run_with_record")
    record = build_run_record(settings={}, schedule=None, model_type="llama", max_steps=MAX_STEPS, max_length=64,
                              world_size=1, micro_batches_per_step=1, batch_size=4, lr_schedule={})
    write_run_record(run, record)
    checkpoint = run / "model_only_chkpt_300"
    write_run_record(checkpoint, record, {"kind": "model_only", "step": 300})
    local = task_results(300, 1)["gsm8k_cot_sean"] | {"alias": "gsm8k_cot_sean_local"}
    write_lm_eval_results(checkpoint / "eval" / "math", f"pretrained={checkpoint}", {"gsm8k_cot_sean_local": local})
    collected = collect_run(RunSpec(path=run))
    assert ("gsm8k_cot_sean_local", 300, accuracy(300, 1)) in [(r["task"], r["chkpt"], r["acc"]) for r in collected.rows]
    assert not collected.unknown_tasks
    assert not collected.warnings, collected.warnings
