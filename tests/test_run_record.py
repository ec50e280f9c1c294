"""run.json: train.py records the run (settings, resolved curriculum, tokens per step, world size,
versions) in the run folder and every checkpoint; param_counter.py and plot_evals.py read it and
give the paper-formula FLOPs with no curriculum flags. Plotting and counting stay import-light."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

MAX_STEPS, MAX_REC = 4, 3
TOKENS_PER_STEP = 4 * 32  # batch_size x world_size x max_length


def curriculum_run_args(model_dir, data_dir, out) -> list[str]:
    """Both curricula on: mean recurrence 1-sqrt over half the run to 3, backprop depth 1 -> 2 linearly."""
    return [
        f"--model_name={model_dir}", f"--preprocessed_data_path={data_dir}", "--is_parquet_dataset=true",
        "--max_length=32", "--micro_batch_size=2", "--batch_size=4", f"--max_steps={MAX_STEPS}", "--save_interval=1",
        "--mean_recurrence_schedule.turn_on=true", "--mean_recurrence_schedule.warmup=0.5",
        f"--mean_recurrence_schedule.max_mean_rec={MAX_REC}", "--mean_recurrence_schedule.warmup_type=1-sqrt",
        "--mean_backprop_depth_schedule.turn_on=true", "--mean_backprop_depth_schedule.warmup=0.5",
        "--mean_backprop_depth_schedule.max_backprop=2", "--optim_config.lr=1e-3", "--wandb_disabled=true",
        f"--out_path={out}", "--run_name=curriculum",
    ]


@pytest.fixture(scope="module")
def curriculum_run(tmp_path_factory, train_raven_dir, train_parquet_dir):
    import train

    out = tmp_path_factory.mktemp("run_record")
    args = curriculum_run_args(train_raven_dir, train_parquet_dir, out)
    assert train.main(args) == 0
    return out / "curriculum", args


def paper_formula_flops(model_dir: Path, schedule, checkpoint: int, tokens_per_step: int) -> int:
    """docs/analysis.md, written out: sum over steps u = 1..checkpoint of
    6 D (N_prelude + N_coda + min(r_u, s_u) N_rec) + 2 D max(r_u - s_u, 0) N_rec, (r_u, s_u) = schedule.at(u)."""
    from retrofit.train.flops import count_model_dir

    counts = count_model_dir(model_dir)
    total = 0
    for u in range(1, checkpoint + 1):
        r, s = schedule.at(u)
        total += 6 * tokens_per_step * (counts.prelude + counts.coda + min(r, s) * counts.recurrent_block)
        total += 2 * tokens_per_step * max(r - s, 0) * counts.recurrent_block
    return total


def test_run_json_records_the_run_in_every_checkpoint(curriculum_run):
    import torch

    from retrofit.train import checkpoint as ckpt
    from retrofit.model.configuration_raven import RavenConfig
    from retrofit.train.depth import MeanBackpropDepthSchedule, MeanRecurrenceSchedule, RecurrenceSchedule
    from retrofit.train.config import parse_config

    run_dir, args = curriculum_run
    record = json.loads((run_dir / "run.json").read_text())
    assert "checkpoint" not in record
    assert record["settings"] == json.loads(json.dumps(dataclasses.asdict(parse_config(args))))
    assert (record["max_steps"], record["max_length"], record["world_size"]) == (MAX_STEPS, 32, 1)
    assert (record["tokens_per_step"], record["micro_batches_per_step"]) == (TOKENS_PER_STEP, 2)
    assert record["recurrent"] and record["model_type"] == RavenConfig.model_type
    assert record["versions"]["torch"] == torch.__version__
    assert record["lr_schedule"] == {"warmup_steps": 1, "decay_steps": 1, "min_lr_ratio": 0.001, "lr_step_offset": 0}
    # the resolved schedule: both curricula as the flags gave them
    schedule = RecurrenceSchedule.from_dict(record["schedule"])
    assert schedule == RecurrenceSchedule(MAX_STEPS, MeanRecurrenceSchedule(True, 0.5, MAX_REC, "1-sqrt"),
                                          MeanBackpropDepthSchedule(True, 0.5, 2, 1, "linear"))
    # the curriculum as data is what training ran, step by step
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ran = [[m["step"], m["mean_recurrence"], m["mean_backprop_depth"]] for m in metrics]
    applied = record["curriculum"]["applied"]
    expanded = [[u, *next(p[1:] for p in reversed(applied) if p[0] <= u)] for u in range(1, MAX_STEPS + 1)]
    assert expanded == ran
    assert record["curriculum"]["counted"] == schedule.change_points(applied=False)
    assert all(m["total_tokens"] == m["step"] * TOKENS_PER_STEP for m in metrics)

    # every save holds its copy, saying which save it is; the full checkpoints checksum it
    saves = {f"model_only_chkpt_{s}": ("model_only", s) for s in range(1, MAX_STEPS + 1)}
    saves.update({"checkpoint_2": ("full", 2), "checkpoint_4": ("full", 4), "final_checkpoint": ("final", MAX_STEPS)})
    for name, (kind, step) in saves.items():
        copy = json.loads((run_dir / name / "run.json").read_text())
        assert copy.pop("checkpoint") == {"kind": kind, "step": step}, name
        assert copy == record, name
    for name in ("checkpoint_2", "checkpoint_4"):
        assert "run.json" in json.loads((run_dir / name / "COMPLETE").read_text())["files"]
        assert ckpt.verify_checkpoint(run_dir / name) is None
    assert not list(run_dir.glob(".run.json*"))  # no temporaries left


def test_param_counter_reads_run_json_for_paper_formula_flops(curriculum_run, capsys):
    import param_counter
    from retrofit.train.run_record import read_run_record, record_schedule

    run_dir, _ = curriculum_run
    schedule = record_schedule(read_run_record(run_dir))
    for name, step in (("model_only_chkpt_2", 2), ("final_checkpoint", MAX_STEPS)):
        assert param_counter.main([str(run_dir / name)]) == 0  # no flags at all
        training = json.loads(capsys.readouterr().out)["training"]
        assert (training["checkpoint"], training["tokens_per_step"]) == (step, TOKENS_PER_STEP)
        assert training["FLOPs"] == paper_formula_flops(run_dir / name, schedule, step, TOKENS_PER_STEP)
        assert training["run_record"] == str(run_dir / name / "run.json")
    # the backprop-depth curriculum is part of the replay: capped at depth 1 all along, more of the
    # iterations run without grad (2 N D instead of 6 N D), so the same checkpoint costs less
    assert training["schedule"]["mean_backprop_depth_schedule"]["turn_on"]
    assert param_counter.main([str(run_dir / "final_checkpoint"), "--backprop_depth", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["FLOPs"] < training["FLOPs"]
    # flags override the record: twice the tokens per step, twice the FLOPs
    assert param_counter.main([str(run_dir / "final_checkpoint"), "--tokens_per_step", str(2 * TOKENS_PER_STEP)]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["FLOPs"] == 2 * training["FLOPs"]


def write_results(checkpoint: Path, rec: int, acc: float) -> None:
    """A results file as lm-eval writes it (the keys plot_evals.py reads) under shells/eval.sh's layout."""
    folder = checkpoint / "eval" / f"rec_{rec}" / "math" / checkpoint.name
    folder.mkdir(parents=True)
    (folder / "results_2026-01-01T00-00-00.json").write_text(json.dumps({
        "results": {"quickstart_arith_mc": {"acc,none": acc, "acc_stderr,none": 0.05}},
        "config": {"model_args": f"pretrained={checkpoint},mean_recurrence={rec}"},
    }))


def test_plot_evals_run_dir_without_curriculum_flags(curriculum_run, tmp_path):
    import plot_evals
    from retrofit.analysis.results import read_jsonl
    from retrofit.train.run_record import read_run_record, record_schedule

    run_dir, _ = curriculum_run
    for name in ("model_only_chkpt_2", "final_checkpoint"):
        for rec in (1, MAX_REC):
            write_results(run_dir / name, rec, 0.25 + rec / 100)
    schedule = record_schedule(read_run_record(run_dir))
    try:
        assert plot_evals.main([str(run_dir), "--out_dir", str(tmp_path / "plots"), "--format", "png"]) == 0
        rows = read_jsonl(tmp_path / "plots" / "results.jsonl")
        assert sorted((r["chkpt"], r["num_rec"]) for r in rows) == [(2, 1), (2, MAX_REC), (MAX_STEPS, 1), (MAX_STEPS, MAX_REC)]
        for r in rows:
            assert r["train_rec"] == MAX_REC  # the curriculum's final mean recurrence, from run.json
            checkpoint = run_dir / ("final_checkpoint" if r["chkpt"] == MAX_STEPS else f"model_only_chkpt_{r['chkpt']}")
            assert r["FLOPs"] == paper_formula_flops(checkpoint, schedule, r["chkpt"], TOKENS_PER_STEP)
        # a flag overrides the record: no curriculum (constant mean recurrence 3) costs more
        assert plot_evals.main([str(run_dir), "--warmup", "0", "--out_dir", str(tmp_path / "flat"), "--format", "png"]) == 0
        flat = {(r["chkpt"], r["num_rec"]): r["FLOPs"] for r in read_jsonl(tmp_path / "flat" / "results.jsonl")}
        assert all(flat[(r["chkpt"], r["num_rec"])] > r["FLOPs"] for r in rows)
    finally:
        for name in ("model_only_chkpt_2", "final_checkpoint"):
            shutil.rmtree(run_dir / name / "eval")


def test_one_definition_of_the_curriculum_settings():
    """train.py's flag groups are the curriculum classes that counting and plotting use, defaults included."""
    from retrofit.train import depth
    from retrofit.analysis.results import RunSpec
    from retrofit.train.config import TrainConfig

    cfg = TrainConfig()
    assert type(cfg.mean_recurrence_schedule) is depth.MeanRecurrenceSchedule
    assert type(cfg.mean_backprop_depth_schedule) is depth.MeanBackpropDepthSchedule
    assert cfg.mean_recurrence_schedule.warmup == 0.1  # the original's flag default
    # no separate defaults elsewhere: the counters leave unset values to run.json / train.py's defaults
    assert RunSpec(path=".").warmup is None


def test_counting_without_run_json_follows_train_py_defaults(tmp_path, tokenizer):
    """No run.json: a run is what train.py's defaults do on this model config (no curriculum;
    the config's mean_recurrence and mean_backprop_depth), unless a flag says otherwise."""
    from retrofit.model.configuration_raven import RavenConfig
    from retrofit.train.depth import MeanBackpropDepthSchedule, MeanRecurrenceSchedule, RecurrenceSchedule
    from retrofit.analysis.reporting import flops_report

    model = tmp_path / "model"
    RavenConfig(n_embd=64, n_heads=4, num_key_value_heads=2, intermediate_size=128, n_layers_in_prelude=1,
                n_layers_in_recurrent_block=2, n_layers_in_coda=1, vocab_size=len(tokenizer), mean_recurrence=4,
                mean_backprop_depth=2).save_pretrained(model)
    constant = RecurrenceSchedule(10, MeanRecurrenceSchedule(max_mean_rec=4), MeanBackpropDepthSchedule(max_backprop=2))
    assert flops_report(model, 10, max_steps=10, tokens_per_step=8)["FLOPs"] == paper_formula_flops(model, constant, 10, 8)
    ramp = RecurrenceSchedule(10, MeanRecurrenceSchedule(True, 0.5, 4, "linear"), MeanBackpropDepthSchedule(max_backprop=2))
    report = flops_report(model, 10, max_steps=10, tokens_per_step=8, warmup=0.5)
    assert report["FLOPs"] == paper_formula_flops(model, ramp, 10, 8) and report["run_record"] is None
    with pytest.raises(ValueError, match="--max_steps"):
        flops_report(model, 10)


def test_plotting_and_counting_import_neither_torch_nor_transformers():
    code = """
import importlib.util, sys
import retrofit.analysis.plotting, retrofit.analysis.results, retrofit.analysis.reporting, retrofit.train.run_record, retrofit.train.flops, retrofit.train.depth
import plot_evals, param_counter
for name in ("plot", "scheduling_options"):
    spec = importlib.util.spec_from_file_location("paper_plots_" + name, "paper_plots/" + name + ".py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_counting_knows_the_recurrent_model_type_without_importing_transformers():
    """flops.py spells the model type out (it must not import transformers); it is the config's."""
    from retrofit.model.configuration_raven import RavenConfig
    from retrofit.train.flops import RECURRENT_MODEL_TYPE

    assert RECURRENT_MODEL_TYPE == RavenConfig.model_type
