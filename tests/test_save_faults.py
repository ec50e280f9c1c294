"""Kills in every save phase (temp written, before rename, after rename; retrofit/train/faults.py),
spread over full, model-only, final and FSDP2 sharded saves: the run folder keeps
only good checkpoints, `--resume_path=auto` continues from the last good one, and the final
weights and metrics equal those of an uninterrupted run. Each killed run is a fork of the test
process that SIGKILLs itself at the phase (a real kill: no `finally` runs, temporaries stay)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retrofit.train import checkpoint as ckpt
from retrofit.train import faults


def run_train(args: list[str]) -> int:
    import train as train_module

    return train_module.main(args + ["--wandb_disabled=true"])


def run_killed_at(phase: str, args: list[str]) -> int:
    """train.py in a forked child with RETROFIT_FAULT_AT=phase; returns the signal that ended it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a process with threads
        pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        status = 99
        try:
            os.environ[faults.FAULT_ENV] = phase
            torch.set_num_threads(1)
            status = run_train(args)
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)


def stable_metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]



def reference_run(tmp_path_factory, args: list[str]) -> Path:
    """The uninterrupted 4-step run (checkpoint_2, checkpoint_4, model_only_chkpt_1..4, final_checkpoint)."""
    out = tmp_path_factory.mktemp("reference")
    assert run_train(args + [f"--out_path={out}", "--run_name=ref"]) == 0
    return out / "ref"


@pytest.fixture(scope="module")
def references(tmp_path_factory, base_args):
    """Uninterrupted runs by backend, built when first asked for."""
    built = {}

    def get(extra: tuple[str, ...]) -> Path:
        if extra not in built:
            built[extra] = reference_run(tmp_path_factory, base_args + list(extra))
        return built[extra]

    return get


# phase@count -> (the checkpoint --resume_path=auto must continue from, or None, and the folders
# that must be absent after the kill). With --save_interval=1: model_only after each step, full
# after steps 2 and 4, then final.
KILLS = {
    "full:temp_written@2": ("checkpoint_2", ["checkpoint_4"]),
    "full:before_rename@2": ("checkpoint_2", ["checkpoint_4"]),
    "full:after_rename@2": ("checkpoint_4", ["final_checkpoint"]),
    "full:before_rename@1": (None, ["checkpoint_2"]),
    "model_only:temp_written@3": ("checkpoint_2", ["model_only_chkpt_3"]),
    "model_only:after_rename@4": ("checkpoint_2", ["checkpoint_4"]),
    "final:before_rename": ("checkpoint_4", ["final_checkpoint"]),
    "final:after_rename": ("checkpoint_4", []),
    "fsdp full:before_rename@2": ("checkpoint_2", ["checkpoint_4"]),  # FSDP2's sharded checkpoints (one rank)
}


@pytest.mark.parametrize("phase", list(KILLS))
def test_a_kill_in_any_save_phase_resumes_to_the_uninterrupted_result(tmp_path, capsys, base_args, references, phase):
    resume_from, absent = KILLS[phase]
    extra = ("--fsdp=true",) if phase.startswith("fsdp ") else ()
    reference_run = references(extra)
    args = base_args + list(extra) + [f"--out_path={tmp_path}", "--run_name=r", "--resume_path=auto"]
    phase = phase.removeprefix("fsdp ")
    assert run_killed_at(phase, args) == signal.SIGKILL
    run = tmp_path / "r"
    for name in absent:
        assert not (run / name).exists(), name
    left = [p.name for p in run.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
    assert bool(left) == (not phase.split("@")[0].endswith("after_rename")), left  # a kill runs no cleanup
    capsys.readouterr()
    assert run_train(args) == 0
    printed = capsys.readouterr().out
    if resume_from is None:
        assert "no checkpoint in" in printed
    else:
        assert f"resumed from {run / resume_from} at optimizer step {resume_from.split('_')[1]}" in printed
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".run.lock"]  # no temporaries
    assert stable_metrics(run) == stable_metrics(reference_run)
    final, expected = (load_file(r / "final_checkpoint" / "model.safetensors") for r in (run, reference_run))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    for folder in ckpt.list_checkpoints(run):
        assert ckpt.verify_checkpoint(folder) is None


def test_fault_phases_are_checked():
    with pytest.raises(ValueError, match="RETROFIT_FAULT_AT='full:halfway'"):
        faults.parse_fault("full:halfway")
    with pytest.raises(ValueError, match="count after @"):
        faults.parse_fault("final:after_rename@0")
    assert faults.parse_fault("model_only:before_rename@3") == ("model_only:before_rename", 3)


def test_the_raise_action_stops_a_save_and_leaves_the_folder_clean(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.FAULT_ENV, "full:before_rename")
    monkeypatch.setenv(faults.ACTION_ENV, "raise")
    monkeypatch.setattr(faults, "_reached", faults.Counter())
    with pytest.raises(faults.InjectedFault):
        ckpt.save_training_state(tmp_path / "checkpoint_1", {"optimizer_step": 1, "w": torch.ones(2)})
    assert list(tmp_path.iterdir()) == []
    shutil.rmtree(tmp_path, ignore_errors=True)
