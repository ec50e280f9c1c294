"""shells/quickstart.sh end to end: the real scripts on a shrunken configuration, then a rerun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from utils.quickstart_summary import markdown_table as table
from utils.quickstart_summary import summary_figures

pytestmark = pytest.mark.slow  # runs the whole pipeline through bash

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["data", "pack", "parquet", "pretrain", "convert", "train_recurrent", "train_baseline",
          "val_loss_recurrent", "val_loss_static", "lm_eval_rec_2", "lm_eval_baseline", "report"]
TASKS = ["quickstart_gsm8k_cot_sean", "quickstart_arith_mc"]

# Every knob shrunk: tiny corpus, width 32, 3 steps per run, 3 documents per lm-eval task.
SMALL = dict(
    QUICKSTART_NUM_PROBLEMS="400", QUICKSTART_NUM_TEST="12", QUICKSTART_HIDDEN="32",
    QUICKSTART_PRETRAIN_STEPS="3", QUICKSTART_STEPS="3", QUICKSTART_BATCH="4", QUICKSTART_MAX_LENGTH="64",
    QUICKSTART_MAX_REC="2", QUICKSTART_BACKPROP="1", QUICKSTART_LOSS_RECS="1,2,4", QUICKSTART_EVAL_RECS="2",
    QUICKSTART_LIMIT="3", QUICKSTART_VAL_SEQUENCES="8",
)


def run_quickstart(out: Path, **env_overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **SMALL, **env_overrides}
    return subprocess.run(["bash", str(ROOT / "shells" / "quickstart.sh"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    first = run_quickstart(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return out, first




def mean_loss(path: Path, rec: int) -> float:
    losses = [x for batch in json.loads(path.read_text())[str(rec)] for x in batch]
    return sum(losses) / len(losses)


def test_quickstart_writes_summary_and_plots(quickstart_run):
    out, first = quickstart_run
    summary = (out / "summary.md").read_text()
    assert summary in first.stdout  # printed as well as written
    for stage in STAGES:
        assert re.search(rf"\] {stage} done in [0-9.]+s", first.stdout), stage

    training = {row[0]: row for row in table(summary, "Training")[1:]}
    assert set(training) == {"pretrained (static)", "recurrent", "baseline (static)"}
    tokens_per_step = 4 * 64
    for run in ("recurrent", "baseline (static)"):
        assert training[run][2] == "3" and training[run][3] == f"{3 * tokens_per_step:,}"
    # FLOPs as param_counter.py counts them from the checkpoint's run.json, which holds the
    # curriculum the script typed once (1-sqrt over half the steps to QUICKSTART_MAX_REC, the
    # converted model's backprop depth QUICKSTART_BACKPROP) and the tokens per step.
    from retrofit.train.depth import MeanBackpropDepthSchedule, MeanRecurrenceSchedule, RecurrenceSchedule
    from retrofit.analysis.reporting import flops_report

    counted = flops_report(out / "runs/recurrent/final_checkpoint")
    expected = RecurrenceSchedule(3, MeanRecurrenceSchedule(True, 0.5, 2, "1-sqrt"), MeanBackpropDepthSchedule(max_backprop=1))
    assert counted["schedule"] == expected.as_dict()
    assert (counted["checkpoint"], counted["tokens_per_step"]) == (3, tokens_per_step)
    assert float(training["recurrent"][4]) == pytest.approx(counted["FLOPs"], rel=1e-3)
    assert not (out / "plot_runs.json").exists()  # the later stages read run.json instead
    for run in ("pretrain", "recurrent", "baseline"):
        assert json.loads((out / "runs" / run / "run.json").read_text())["tokens_per_step"] == tokens_per_step
    # Resumable checkpoints were written along the way (a fifth of a run, at least every step).
    assert (out / "runs/recurrent/checkpoint_2/COMPLETE").exists()
    last = json.loads((out / "runs/baseline/metrics.jsonl").read_text().splitlines()[-1])
    assert float(training["baseline (static)"][5]) == pytest.approx(last["loss"], abs=1e-3)

    losses = table(summary, "Validation loss vs test recurrence")
    assert losses[0] == ["run", "r=1", "r=2", "r=4"]
    rows = {row[0]: row for row in losses[1:]}
    assert set(rows) == {"recurrent", "baseline (static)", "pretrained (static)"}
    loss_file = out / "loss_over_rec_eval/recurrent/final_checkpoint.json"
    for i, rec in enumerate([1, 2, 4], start=1):
        assert float(rows["recurrent"][i]) == pytest.approx(mean_loss(loss_file, rec), abs=1e-3)
    assert float(rows["baseline (static)"][1]) == pytest.approx(
        mean_loss(out / "loss_over_rec_eval/baseline/final_checkpoint.json", 1), abs=1e-3)
    assert "random initial state" in summary  # the converted config keeps Huginn's std

    accuracy = table(summary, "lm-eval accuracy")
    assert accuracy[0] == ["task", "recurrent r=2", "baseline (static)"]
    assert [row[0].split("`")[1] for row in accuracy[1:]] == TASKS
    for row in accuracy[1:]:
        for value in row[1:]:
            assert 0.0 <= float(value.split("%")[0]) <= 100.0, row

    plots = out / "plots"
    for name in ["loss_vs_num_rec"] + [f"{task}_vs_{x}" for task in TASKS for x in ("num_rec", "chkpt", "FLOPs")]:
        for fmt in ("png", "pdf"):
            assert (plots / f"{name}.{fmt}").stat().st_size > 0, name
            assert f"plots/{name}.png" in summary
    plotted = [json.loads(line) for line in (plots / "results.jsonl").read_text().splitlines()]
    assert sorted((r["model"].split()[0], r["num_rec"], r["task"]) for r in plotted) == sorted(
        (model, rec, task) for task in TASKS for model, rec in (("recurrent", 2), ("baseline", 1)))
    times = table(summary, "Stage wall times")
    assert {row[0] for row in times[1:]} >= set(STAGES[:-1]) | {"train", "val_loss", "lm_eval"}

    # The figures the README quotes from a default run's summary (tests/test_docs.py holds the README
    # to bench/quickstart_summary.md) read the same way from this run's summary.
    figures = summary_figures(summary)
    assert figures["loss_r1"] == float(rows["recurrent"][1])
    assert figures["loss_lowest"] == min(float(c) for c in rows["recurrent"][1:])
    assert figures["loss_baseline"] == float(rows["baseline (static)"][1])
    assert figures["gsm8k_baseline"] == float(accuracy[1][2].split("%")[0])
    assert set(figures["seconds"]) >= set(STAGES[:-1])


def test_quickstart_rerun_skips_every_stage(quickstart_run):
    out, _ = quickstart_run
    summary_file = out / "summary.md"
    before = summary_file.stat().st_mtime_ns
    again = run_quickstart(out)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in STAGES:
        assert re.search(rf"skip {stage}: ", again.stdout), stage
    assert " done in " not in again.stdout
    assert "every stage was already done" in again.stdout
    assert summary_file.stat().st_mtime_ns == before
    assert summary_file.read_text() in again.stdout

    # A lost output is redone, and only that stage (plus the report that depends on it) runs.
    (out / "loss_over_rec_eval/baseline/final_checkpoint.json").unlink()
    redo = run_quickstart(out)
    assert redo.returncode == 0, redo.stderr[-3000:]
    ran = set(re.findall(r"\] (\w+) done in", redo.stdout))
    assert ran == {"val_loss_static", "report"}, redo.stdout
    assert "val_loss (both) done in" in redo.stdout
    assert (out / "loss_over_rec_eval/baseline/final_checkpoint.json").exists()


def test_quickstart_rejects_bad_knob(tmp_path):
    bad = run_quickstart(tmp_path / "out", QUICKSTART_STEPS="ten")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: QUICKSTART_STEPS='ten' is not a positive integer"
