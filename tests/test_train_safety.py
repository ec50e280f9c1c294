"""Runs never lose work: train.py refuses to overwrite a run, checkpoints are checksummed and
verified, auto-resume falls back past damaged ones, non-finite states are never saved,
metrics.jsonl survives kills, changed settings are refused on resume, and user mistakes end in
one `error:` line. Real tiny runs (in-process where possible), real files damaged on disk."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT  # noqa: E402

from retrofit.train import checkpoint as ckpt
from retrofit.train import run_claim
from tiny_components import save_raven_model, tiny_raven_config  # noqa: E402
from retrofit.train.monitor import MetricsLogger

TRAIN = str(ROOT / "train.py")


def run_train(args: list[str]) -> int:
    import train as train_module

    return train_module.main(args + ["--wandb_disabled=true"])


def error_lines(capsys) -> tuple[list[str], str]:
    captured = capsys.readouterr()
    return [line for line in captured.err.splitlines() if line.startswith("error: ")], captured.out + captured.err


def read_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stable_metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "final_checkpoint" / "model.safetensors")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}



@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, base_args):
    """A 4-step run with checkpoint_2, checkpoint_4, model_only_chkpt_1..4 and final_checkpoint."""
    out = tmp_path_factory.mktemp("finished")
    assert run_train(base_args + [f"--out_path={out}", "--run_name=ref"]) == 0
    return out / "ref"


def copy_run(finished_run: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(finished_run, target)
    return target


# ---------------------------------------------------------------------------------------------
# Checkpoint files: checksums, weights_only, RNG state, non-finite values
# ---------------------------------------------------------------------------------------------
def damage(path: Path, kind: str) -> None:
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "4 bytes overwritten":
        middle = len(data) // 2
        data[middle : middle + 4] = bytes(4 - i for i in range(4)) if data[middle : middle + 4] != bytes([4, 3, 2, 1]) else b"abcd"
    elif kind == "one bit flipped":
        data[len(data) // 3] ^= 0x01
    else:
        raise ValueError(kind)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["truncated", "4 bytes overwritten", "one bit flipped"])
def test_checksums_catch_damage(tmp_path, kind):
    state = {"optimizer_step": 2, "model": {"w": torch.arange(1000, dtype=torch.float32)}}
    ckpt.save_training_state(tmp_path / "checkpoint_2", state)
    marker = json.loads((tmp_path / "checkpoint_2" / ckpt.COMPLETE_MARKER).read_text())
    assert set(marker["files"]) == {ckpt.STATE_FILE} and len(marker["files"][ckpt.STATE_FILE]["sha256"]) == 64
    assert ckpt.verify_checkpoint(tmp_path / "checkpoint_2") is None
    damage(tmp_path / "checkpoint_2" / ckpt.STATE_FILE, kind)
    problem = ckpt.verify_checkpoint(tmp_path / "checkpoint_2")
    assert problem is not None and ckpt.STATE_FILE in problem
    with pytest.raises(ckpt.CheckpointError, match="does not verify"):
        ckpt.load_training_state(tmp_path / "checkpoint_2")


def test_latest_checkpoint_is_the_newest_that_verifies(tmp_path):
    for step in (2, 4, 6):
        ckpt.save_training_state(tmp_path / f"checkpoint_{step}", {"optimizer_step": step})
    damage(tmp_path / "checkpoint_6" / ckpt.STATE_FILE, "one bit flipped")
    (tmp_path / "checkpoint_8").mkdir()  # a copy cut short: no COMPLETE marker
    assert ckpt.list_checkpoints(tmp_path) == [tmp_path / f"checkpoint_{s}" for s in (8, 6, 4, 2)]
    # --resume_path=auto takes them in this order and skips those that do not verify: 4 is the newest good one
    assert [ckpt.verify_checkpoint(tmp_path / f"checkpoint_{s}") is None for s in (8, 6, 4)] == [False, False, True]
    assert "no COMPLETE marker" in ckpt.verify_checkpoint(tmp_path / "checkpoint_8")
    (tmp_path / "checkpoint_4" / ckpt.COMPLETE_MARKER).write_text('{"optimizer_step": 4}\n')  # the old format
    assert "lists no checksums" in ckpt.verify_checkpoint(tmp_path / "checkpoint_4")


class RunsCode:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hostile file is a plain pickle
def test_training_state_from_someone_else_cannot_run_code(tmp_path):
    marker = tmp_path / "code_ran"
    folder = tmp_path / "checkpoint_2"
    folder.mkdir()
    with open(folder / ckpt.STATE_FILE, "wb") as handle:
        pickle.dump({"optimizer_step": 2, "payload": RunsCode(str(marker))}, handle)
    ckpt.write_complete_marker(folder, optimizer_step=2)  # checksums match: only loading can refuse it
    with pytest.raises(ckpt.CheckpointError, match="does not load"):
        ckpt.load_training_state(folder)
    assert not marker.exists()


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    ckpt.save_training_state(tmp_path / "checkpoint_1", {"optimizer_step": 1, "rng": [ckpt.capture_rng_state()]})
    expected = (random.random(), float(np.random.normal()), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ckpt.restore_rng_state(ckpt.load_training_state(tmp_path / "checkpoint_1")["rng"][0])
    again = (random.random(), float(np.random.normal()), torch.rand(3))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def test_non_finite_entries_names_the_tensors():
    state = {"model": {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])},
             "optimizer": {"state": {0: {"exp_avg_sq": torch.tensor([float("inf")]), "step": torch.tensor(3)}}},
             "lr": float("nan"), "ids": torch.tensor([1, 2])}
    assert ckpt.non_finite_entries(state) == ["model.b", "optimizer.state.0.exp_avg_sq", "lr"]
    assert ckpt.non_finite_entries({"model": {"a": torch.ones(2)}, "step": 3}) == []


# ---------------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------------
def test_metrics_truncation_drops_a_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # killed mid-write
    logger = MetricsLogger(path, wandb_kwargs=None)
    assert logger.truncate_after(2) == 1
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert logger.truncate_after(0) == 2 and path.read_text() == ""
    path.write_text('{"step": 1}\ngarbage\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        logger.truncate_after(2)


# ---------------------------------------------------------------------------------------------
# A run folder that holds a run is never overwritten by accident
# ---------------------------------------------------------------------------------------------
def test_refuses_to_train_over_a_run_unless_asked(tmp_path, capsys, base_args, finished_run):
    run = copy_run(finished_run, tmp_path, "ref")
    before = snapshot(run)
    assert run_train(base_args + [f"--out_path={tmp_path}", "--run_name=ref"]) == 2
    errors, _ = error_lines(capsys)
    assert len(errors) == 1 and "already holds a run" in errors[0]
    assert "--resume_path=auto" in errors[0] and "--overwrite=true" in errors[0]
    assert snapshot(run) == before

    # --overwrite=true must not delete the model it is about to train
    inside = ["--model_name=" + str(run / "final_checkpoint")]
    assert run_train(base_args + inside + [f"--out_path={tmp_path}", "--run_name=ref", "--overwrite=true"]) == 2
    errors, _ = error_lines(capsys)
    assert len(errors) == 1 and "would delete --model_name" in errors[0]
    assert snapshot(run) == before
    assert run_train(base_args + [f"--out_path={tmp_path}", "--run_name=ref", "--overwrite=true",
                                  "--resume_path=auto"]) == 2
    assert "pass only one" in error_lines(capsys)[0][0]

    # asked: the old run is deleted first, then a fresh run; metrics hold one run, not two
    (run / "checkpoint_6").mkdir()  # something only the old run had
    assert run_train(base_args + [f"--out_path={tmp_path}", "--run_name=ref", "--overwrite=true"]) == 0
    _, printed = error_lines(capsys)
    assert "--overwrite=true: deleted the previous run" in printed
    assert read_steps(run) == [1, 2, 3, 4] and not (run / "checkpoint_6").exists()
    assert stable_metrics(run) == stable_metrics(finished_run)


def test_auto_resume_of_a_finished_run_without_full_checkpoint_is_refused(tmp_path, capsys, base_args, finished_run):
    run = copy_run(finished_run, tmp_path, "ref")
    for path in run.glob("checkpoint_*"):
        shutil.rmtree(path)
    before = snapshot(run)
    assert run_train(base_args + [f"--out_path={tmp_path}", "--run_name=ref", "--resume_path=auto"]) == 2
    errors, _ = error_lines(capsys)
    assert len(errors) == 1 and "finished run" in errors[0]
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------
# Auto-resume verifies, falls back, never restarts silently
# ---------------------------------------------------------------------------------------------
def _verified_but_unloadable(path: Path) -> None:
    path.write_bytes(b"not a torch file at all")
    ckpt.write_complete_marker(path.parent, optimizer_step=4)


def _verified_but_nan(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    next(iter(state["model"].values())).view(-1)[0] = float("nan")
    torch.save(state, path)
    ckpt.write_complete_marker(path.parent, optimizer_step=4)


DAMAGE = {
    "truncated": ("does not verify", lambda p: damage(p, "truncated")),
    "4 bytes overwritten": ("does not verify", lambda p: damage(p, "4 bytes overwritten")),
    "one bit flipped": ("does not match its checksum", lambda p: damage(p, "one bit flipped")),
    "COMPLETE deleted": ("no COMPLETE marker", lambda p: (p.parent / ckpt.COMPLETE_MARKER).unlink()),
    "verifies but does not load": ("does not load", _verified_but_unloadable),
    "verifies but holds NaN": ("holds non-finite values", _verified_but_nan),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_auto_resume_skips_a_damaged_newest_checkpoint(tmp_path, capsys, base_args, finished_run, kind):
    reason, apply_damage = DAMAGE[kind]
    run = copy_run(finished_run, tmp_path, "ref")
    shutil.rmtree(run / "final_checkpoint")
    apply_damage(run / "checkpoint_4" / ckpt.STATE_FILE)
    assert run_train(base_args + [f"--out_path={tmp_path}", "--run_name=ref", "--resume_path=auto"]) == 0
    _, printed = error_lines(capsys)
    skip_line = next(line for line in printed.splitlines() if "skipping checkpoint_4" in line)
    assert reason in skip_line
    assert f"resumed from {run / 'checkpoint_2'} at optimizer step 2" in printed
    # steps 3 and 4 are redone exactly: same metrics, same final weights, a good checkpoint_4 again
    assert stable_metrics(run) == stable_metrics(finished_run)
    reference, resumed = final_weights(finished_run), final_weights(run)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert ckpt.verify_checkpoint(run / "checkpoint_4") is None


def test_no_verified_checkpoint_is_an_error_not_a_fresh_start(tmp_path, capsys, base_args, finished_run):
    run = copy_run(finished_run, tmp_path, "ref")
    shutil.rmtree(run / "final_checkpoint")
    damage(run / "checkpoint_4" / ckpt.STATE_FILE, "truncated")
    damage(run / "checkpoint_2" / ckpt.STATE_FILE, "one bit flipped")
    before = snapshot(run)
    assert run_train(base_args + [f"--out_path={tmp_path}", "--run_name=ref", "--resume_path=auto"]) == 2
    errors, _ = error_lines(capsys)
    assert len(errors) == 1 and "no checkpoint" in errors[0] and "verifies" in errors[0]
    assert "checkpoint_4 (" in errors[0] and "checkpoint_2 (" in errors[0]
    assert snapshot(run) == before
    # an explicit --resume_path to a damaged checkpoint is an error too (no fallback)
    assert run_train(base_args + [f"--out_path={tmp_path}", "--run_name=ref",
                                  f"--resume_path={run / 'checkpoint_4'}"]) == 2
    errors, _ = error_lines(capsys)
    assert len(errors) == 1 and "checkpoint_4: does not verify" in errors[0]


def test_resume_with_changed_settings_is_refused(tmp_path, capsys, base_args, finished_run):
    run = copy_run(finished_run, tmp_path, "ref")
    shutil.rmtree(run / "final_checkpoint")
    shutil.rmtree(run / "checkpoint_4")
    before = snapshot(run)
    changed = ["--batch_size=4", "--seed=5", "--max_steps=6", "--mean_recurrence_schedule.max_mean_rec=4"]
    assert run_train(base_args + [f"--out_path={tmp_path}", "--run_name=ref", "--resume_path=auto"] + changed) == 2
    errors, _ = error_lines(capsys)
    assert len(errors) == 1, errors
    for expected in ("batch_size 2 -> 4", "seed 74 -> 5", "max_steps 4 -> 6", "mean_recurrence_schedule.max_mean_rec 3 -> 4"):
        assert expected in errors[0], expected
    assert "micro_batch_size 2 ->" not in errors[0]
    assert snapshot(run) == before
    # --ignore_past_scheduler=true keeps its meaning (restart the LR schedule) and so allows a longer run
    assert run_train(base_args + [f"--out_path={tmp_path}", "--run_name=ref", "--resume_path=auto", "--max_steps=5",
                                  "--ignore_past_scheduler=true"]) == 0
    assert read_steps(run) == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------
# Non-finite values are never saved
# ---------------------------------------------------------------------------------------------
def test_nan_weights_are_never_saved(tmp_path, capsys, tokenizer, tokenizer_dir, train_parquet_dir):
    from retrofit.model.modeling_raven import RavenForCausalLM

    model_dir = save_raven_model(tiny_raven_config(len(tokenizer)), tmp_path / "model", tokenizer_dir)
    model = RavenForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    model.save_pretrained(model_dir)

    def train(run_name: str) -> int:
        return run_train([f"--model_name={model_dir}", f"--preprocessed_data_path={train_parquet_dir}",
                          "--is_parquet_dataset=true", "--max_steps=3", f"--out_path={tmp_path}", f"--run_name={run_name}"])

    assert train("nan") == 1
    errors, _ = error_lines(capsys)
    assert len(errors) == 1 and "non-finite loss at optimizer step 1" in errors[0]
    assert "not saving checkpoint_0" in errors[0] and "lm_head.weight" in errors[0]
    assert not list((tmp_path / "nan").glob("checkpoint_*"))

    # finite but huge weights overflow the logits: the loss is not finite, the weights are, so the
    # weights from before the step are saved (and verify)
    with torch.no_grad():
        model.lm_head.weight[3] = 3e38
    model.save_pretrained(model_dir)
    assert train("overflow") == 1
    errors, _ = error_lines(capsys)
    assert len(errors) == 1 and "non-finite loss at optimizer step 1" in errors[0]
    assert "the weights before this step are in" in errors[0]
    assert ckpt.load_training_state(tmp_path / "overflow" / "checkpoint_0")["optimizer_step"] == 0


def test_non_finite_optimizer_state_is_never_saved(tmp_path, base_args):
    from retrofit.train import distributed as dist_utils
    from retrofit.train.config import parse_config
    from retrofit.train.trainer import Trainer, TrainingError

    from retrofit.train.run_claim import claim_run_dir, release_run_dir

    cfg = parse_config(base_args + ["--max_steps=1", f"--out_path={tmp_path}", "--run_name=inf",
                                                 "--wandb_disabled=true"])
    env = dist_utils.setup("cpu")
    claim_run_dir(cfg, env)  # as run() does before it builds the Trainer
    trainer = Trainer(cfg, env)
    try:
        assert trainer.train().startswith("finished at step 1")
    finally:
        trainer.metrics.close()
        trainer.watcher.close()
        release_run_dir(cfg)
    # an overflowed second moment (finite weights): the full checkpoint is refused, nothing written
    state = next(iter(trainer.optimizer.state.values()))
    state["exp_avg_sq"].view(-1)[0] = float("inf")
    with pytest.raises(TrainingError, match=r"not saving checkpoint_1 .*optimizer\.state\.\d+\.exp_avg_sq"):
        trainer.save_full_checkpoint()
    assert not list((tmp_path / "inf").glob("checkpoint_*")) and not list((tmp_path / "inf").glob(".checkpoint_*"))


# ---------------------------------------------------------------------------------------------
# User mistakes: one `error:` line, exit status 2, nothing written
# ---------------------------------------------------------------------------------------------
def _garbage_parquet(tmp_path):
    folder = tmp_path / "garbage"
    folder.mkdir()
    (folder / "shard-00000.parquet").write_bytes(b"PAR1 this is not parquet" * 10)
    return folder


def _read_only_out(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if _can_mkdir(str(folder / "probe")):  # root ignores permissions: sysfs refuses new folders even to root
        if Path("/sys").is_dir() and not _can_mkdir("/sys/retrofit-out"):
            return Path("/sys/retrofit-out")
        pytest.skip("no read-only folder available")
    return folder


def _can_mkdir(path: str) -> bool:
    try:
        os.mkdir(path)
    except OSError:
        return False
    os.rmdir(path)
    return True


def _folder_in_run(tmp_path, name):
    (tmp_path / "out" / "r" / name).mkdir(parents=True)
    return ["--resume_path=auto"]


MISTAKES = {
    "model path does not exist": (lambda t, a: ["--model_name=/no/such/model"], "--model_name=/no/such/model does not exist"),
    "garbage parquet file": (lambda t, a: [f"--preprocessed_data_path={_garbage_parquet(t)}"],
                             "shard-00000.parquet is not a readable parquet file"),
    "parquet without the flag": (lambda t, a: ["--is_parquet_dataset=false"], "pass --is_parquet_dataset=true"),
    "max_mean_rec 0": (lambda t, a: ["--mean_recurrence_schedule.max_mean_rec=0"], "max_mean_rec=0 must be >= 1"),
    "missing resume path": (lambda t, a: [f"--resume_path={t / 'nope'}"], "nope: does not exist"),
    "resume from a model-only folder": (lambda t, a: [f"--resume_path={a}"], "holds model weights only"),
    "cuda without a GPU": (lambda t, a: ["--device=cuda"], "--device=cuda but no CUDA device is visible"),
    "unknown device": (lambda t, a: ["--device=gpu"], "--device=gpu is not a device"),
    "read-only out_path": (lambda t, a: [f"--out_path={_read_only_out(t)}"], "cannot write to --out_path"),
    "beta2 of 1": (lambda t, a: ["--optim_config.betas=[0.9,1.0]"], "--optim_config.betas[1]=1.0 must be in [0, 1)"),
    "negative beta1": (lambda t, a: ["--optim_config.betas=[-0.1,0.95]"], "betas[0]=-0.1 must be in [0, 1)"),
    "eps 0": (lambda t, a: ["--optim_config.eps=0"], "--optim_config.eps=0.0 must be > 0"),
    "negative lr": (lambda t, a: ["--optim_config.lr=-1e-3"], "--optim_config.lr=-0.001 must be >= 0"),
    "negative weight decay": (lambda t, a: ["--optim_config.weight_decay=-0.1"], "weight_decay=-0.1 must be >= 0"),
    "min_lr_ratio -1": (lambda t, a: ["--scheduler_args.min_lr_ratio=-1"], "min_lr_ratio=-1.0 must be in [0, 1]"),
    "min_lr_ratio 5": (lambda t, a: ["--scheduler_args.min_lr_ratio=5"], "min_lr_ratio=5.0 must be in [0, 1]"),
    "negative seed": (lambda t, a: ["--seed=-1"], "--seed=-1 must be in [0, 4294967295]"),
    "negative timeout margin": (lambda t, a: ["--save_n_mins_before_timeout=-5"], "save_n_mins_before_timeout=-5.0 must be >= 0"),
    "meta device": (lambda t, a: ["--device=meta"], "--device=meta is not a device"),
    "mean recurrence 1e9": (lambda t, a: ["--mean_recurrence_schedule.max_mean_rec=1000000000"], "more than 1024 recurrent"),
    "lora iterations 1e6": (lambda t, a: ["--lora.rank=2", "--lora.per_iteration=true", "--lora.num_iterations=1000000"],
                            "--lora.num_iterations=1000000 must be in [1, 1024]"),
    "metrics.jsonl is a folder": (lambda t, a: _folder_in_run(t, "metrics.jsonl"), "metrics.jsonl is not a file"),
    "run.json is a folder": (lambda t, a: _folder_in_run(t, "run.json"), "run.json is not a file"),
    "teacher inside nothing": (lambda t, a: [f"--distill.teacher={t}"], "is not a model folder with config.json"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_user_mistakes_are_one_line_errors(tmp_path, capsys, base_args, train_raven_dir, mistake):
    if mistake == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    make_args, message = MISTAKES[mistake]
    out = tmp_path / "out"
    args = base_args + [f"--out_path={out}", "--run_name=r"] + make_args(tmp_path, train_raven_dir)
    assert run_train(args) == 2
    errors, _ = error_lines(capsys)
    assert len(errors) == 1 and message in errors[0], errors
    written = [p for p in out.rglob("*")] if out.exists() else []
    assert not [p for p in written if p.is_file()]


# ---------------------------------------------------------------------------------------------
# kill -9 before the first checkpoint, in a real process
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_before_first_checkpoint_then_auto_resume_has_each_step_once(tmp_path, base_args):
    args = [a for a in base_args if not a.startswith(("--save_interval", "--max_steps"))]
    args += ["--max_steps=6", "--save_interval=-1", f"--out_path={tmp_path}", "--run_name=k", "--resume_path=auto",
             "--wandb_disabled=true"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("step 2/6"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    metrics = tmp_path / "k" / "metrics.jsonl"
    logged = read_steps(tmp_path / "k")  # steps 1, 2 and maybe more before the kill landed
    assert logged == list(range(1, len(logged) + 1)) and len(logged) >= 2
    assert not list((tmp_path / "k").glob("checkpoint_*"))
    with metrics.open("a") as handle:  # as if the kill had hit the next write half-way
        handle.write(f'{{"step": {len(logged) + 1}, "data_st')
    done = subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no checkpoint in" in done.stdout and f"dropped {len(logged) + 1} record(s) after step 0" in done.stdout
    assert read_steps(tmp_path / "k") == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# One process per run folder: a lock held for the run's life, stale locks taken over and reported
# ---------------------------------------------------------------------------------------------
HOLD_LOCK = (
    "import sys; from retrofit.train.run_claim import RunFolderLock;"
    " RunFolderLock.acquire(sys.argv[1]); print('locked', flush=True); sys.stdin.read()"
)


def test_a_second_process_into_a_locked_run_folder_is_refused(tmp_path, capsys, base_args):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_train(base_args + [f"--out_path={tmp_path}", "--run_name=r"]) == 2
        errors, _ = error_lines(capsys)
        assert len(errors) == 1 and "in use by another training process" in errors[0], errors
        assert f"pid {holder.pid} on host" in errors[0]
        assert not (run_dir / "metrics.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind with the dead holder's name in it
        holder.wait(timeout=30)
        holder.stdout.close()
    assert (run_dir / run_claim.LOCK_FILE).is_file()
    assert run_train(base_args + [f"--out_path={tmp_path}", "--run_name=r", "--max_steps=1"]) == 0
    _, printed = error_lines(capsys)
    assert f"took over the lock of a run that died without releasing it (pid {holder.pid}" in printed
    assert not (run_dir / run_claim.LOCK_FILE).exists()  # released when the run ended
    assert read_steps(run_dir) == [1]


def test_lock_without_flock_tells_a_dead_holder_from_a_live_one(tmp_path):
    import socket

    lock = run_claim.RunFolderLock(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    lock.path.write_text(json.dumps({"pid": int(dead.stdout), "host": host, "started": 1.0}))
    lock._take_without_flock()
    assert "died without releasing it" in lock.stale_note
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    alive = run_claim.RunFolderLock(tmp_path)
    lock.path.write_text(json.dumps({"pid": os.getppid(), "host": host, "started": run_claim.process_start_time(os.getppid())}))
    with pytest.raises(ckpt.ConfigError, match=f"pid {os.getppid()} on host"):
        alive._take_without_flock()
    assert lock.path.is_file()  # a live holder's lock is left alone


# ---------------------------------------------------------------------------------------------
# --overwrite=true deletes outputs only, all of them or none
# ---------------------------------------------------------------------------------------------
def test_overwrite_never_deletes_an_input_named_by_any_flag(tmp_path, capsys, base_args, finished_run, train_raven_dir):
    run = copy_run(finished_run, tmp_path, "ref")
    shutil.copytree(train_raven_dir, run / "model_only_chkpt_9")  # a teacher kept inside the run folder
    before = snapshot(run)
    teacher = run / "model_only_chkpt_9"
    assert run_train(base_args + [f"--out_path={tmp_path}", "--run_name=ref", "--overwrite=true",
                                  f"--distill.teacher={teacher}"]) == 2
    errors, _ = error_lines(capsys)
    assert len(errors) == 1 and f"would delete --distill.teacher={teacher}" in errors[0], errors
    assert snapshot(run) == before


def test_overwrite_removes_a_symlinked_checkpoint_as_a_link_only(tmp_path, capsys, base_args, finished_run):
    run = copy_run(finished_run, tmp_path, "ref")
    elsewhere = tmp_path / "kept" / "checkpoint_2"
    elsewhere.parent.mkdir()
    shutil.move(run / "checkpoint_2", elsewhere)
    (run / "checkpoint_2").symlink_to(elsewhere, target_is_directory=True)
    kept = snapshot(elsewhere)
    assert run_train(base_args + [f"--out_path={tmp_path}", "--run_name=ref", "--overwrite=true"]) == 0
    assert read_steps(run) == [1, 2, 3, 4] and not (run / "checkpoint_2").is_symlink()
    assert snapshot(elsewhere) == kept  # what the link pointed to is untouched
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # nothing left aside


def test_overwrite_that_cannot_move_a_target_deletes_nothing(tmp_path, monkeypatch, base_args, finished_run):
    from retrofit.train.config import parse_config

    run = copy_run(finished_run, tmp_path, "ref")
    before = snapshot(run)
    real_replace = os.replace

    def replace_failing_on_metrics(src, dst):  # an OS refusal half-way through (EBUSY, EPERM, ...)
        if Path(src).name == "metrics.jsonl":
            raise PermissionError(13, "Permission denied")
        return real_replace(src, dst)

    cfg = parse_config(base_args + [f"--out_path={tmp_path}", "--run_name=ref", "--overwrite=true"])
    monkeypatch.setattr(run_claim.os, "replace", replace_failing_on_metrics)
    with pytest.raises(run_claim.ConfigError, match="cannot delete .*metrics.jsonl .*nothing was deleted"):
        run_claim.prepare_run_dir(cfg)
    assert snapshot(run) == before and not (run / run_claim.LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------
# Which checkpoint, which data: names and contents are checked, not trusted
# ---------------------------------------------------------------------------------------------
def test_a_checkpoint_named_for_another_step_is_skipped(tmp_path, capsys, base_args, finished_run):
    run = copy_run(finished_run, tmp_path, "ref")
    shutil.rmtree(run / "final_checkpoint")
    shutil.copytree(run / "checkpoint_2", run / "checkpoint_9")  # holds step 2 under a newer name
    assert "named for step 9 but holds optimizer step 2" in ckpt.verify_checkpoint(run / "checkpoint_9")
    assert ckpt.list_checkpoints(run)[:2] == [run / "checkpoint_9", run / "checkpoint_4"]
    assert run_train(base_args + [f"--out_path={tmp_path}", "--run_name=ref", "--resume_path=auto"]) == 0
    _, printed = error_lines(capsys)
    assert "skipping checkpoint_9: does not verify: it is named for step 9 but holds optimizer step 2" in printed
    assert f"resumed from {run / 'checkpoint_4'} at optimizer step 4" in printed
    # a marker rewritten to match the name does not help: the training state itself says step 2
    shutil.rmtree(run / "final_checkpoint")
    ckpt.write_complete_marker(run / "checkpoint_9", optimizer_step=9)
    assert ckpt.verify_checkpoint(run / "checkpoint_9") is None
    assert run_train(base_args + [f"--out_path={tmp_path}", "--run_name=ref", "--resume_path=auto"]) == 0
    _, printed = error_lines(capsys)
    assert "skipping checkpoint_9: it is named for step 9 but holds optimizer step 2" in printed
    assert f"resumed from {run / 'checkpoint_4'} at optimizer step 4" in printed


def test_resume_on_shards_rewritten_under_the_same_names_is_refused(tmp_path, capsys, base_args, finished_run,
                                                                    train_parquet_dir):
    import pyarrow.parquet as pq

    run = copy_run(finished_run, tmp_path, "ref")
    shutil.rmtree(run / "final_checkpoint")
    data = tmp_path / "data"
    shutil.copytree(train_parquet_dir, data)
    shard = sorted(data.glob("*.parquet"))[-1]
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 1), shard, row_group_size=16)  # one row fewer, same name
    args = [a for a in base_args if not a.startswith("--preprocessed_data_path")]
    before = snapshot(run)
    assert run_train(args + [f"--preprocessed_data_path={data}", f"--out_path={tmp_path}", "--run_name=ref",
                             "--resume_path=auto"]) == 2
    errors, _ = error_lines(capsys)
    assert len(errors) == 1 and f"{shard} holds other data than when the checkpoint was written" in errors[0], errors
    assert snapshot(run) == before


def test_a_batch_larger_than_the_data_trains_nothing_and_says_so(tmp_path, capsys, base_args):
    args = [a for a in base_args if not a.startswith(("--batch_size", "--max_steps"))]
    assert run_train(args + ["--batch_size=4096", "--max_steps=3", f"--out_path={tmp_path}", "--run_name=r"]) == 2
    errors, _ = error_lines(capsys)
    assert len(errors) == 1 and "the data ends before the first optimizer step" in errors[0], errors
    assert not (tmp_path / "r" / "final_checkpoint").exists()


def test_run_record_of_a_huge_max_steps_is_written_at_once():
    from retrofit.train.depth import MeanBackpropDepthSchedule, MeanRecurrenceSchedule, RecurrenceSchedule

    def schedule(max_steps, warmup):
        return RecurrenceSchedule(
            max_steps=max_steps,
            mean_recurrence_schedule=MeanRecurrenceSchedule(turn_on=True, warmup=warmup, max_mean_rec=4),
            mean_backprop_depth_schedule=MeanBackpropDepthSchedule(turn_on=True, warmup=warmup, max_backprop=3, start=2),
        )

    small = schedule(40, 0.25)
    for applied, value_at in ((True, small.applied_at), (False, small.at)):  # the same points as every step's value
        every = [[step, *value_at(step)] for step in range(1, 41)]
        expected = [point for i, point in enumerate(every) if i == 0 or point[1:] != every[i - 1][1:]]
        assert small.change_points(applied) == expected
    points = schedule(10**12, 0.25).change_points()  # a 2.5e11-step warmup, bisected instead of walked
    assert len(points) < 12 and points[-1][0] == 10**12  # the backprop depth drops to its floor on the last step


# ---------------------------------------------------------------------------------------------
# Inputs that used to end in tracebacks: one `error:` line each
# ---------------------------------------------------------------------------------------------
def _model_with_config(tmp_path, model_dir, **changes):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))  # json writes NaN as NaN, which json.loads reads back
    return copy


def _teacher_without_weights(tmp_path, model_dir):
    copy = tmp_path / "teacher"
    shutil.copytree(model_dir, copy)
    for weights in copy.glob("*.safetensors"):
        weights.unlink()
    return copy


def _teacher_with_broken_config(tmp_path, model_dir):
    copy = tmp_path / "teacher"
    shutil.copytree(model_dir, copy)
    (copy / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    return copy


def _without_tokenizer(tmp_path, model_dir):
    copy = tmp_path / "no_tokenizer"
    shutil.copytree(model_dir, copy)
    for path in copy.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            path.unlink()
    return copy


def _small_vocab_teacher(tmp_path, tokenizer_dir):
    from tiny_components import save_hf_model, tiny_llama_config

    return save_hf_model(tiny_llama_config(vocab_size=16), tmp_path / "teacher", tokenizer_dir)


def _parquet_with_ids(tmp_path, rows_from):
    from tiny_components import write_token_parquet

    return write_token_parquet(rows_from(), tmp_path / "bad_ids", num_shards=1)


ROW = list(range(1, 34))  # max_length 32 + 1
LOAD_MISTAKES = {
    "norm_eps NaN": (lambda t, m, k: [f"--model_name={_model_with_config(t, m, norm_eps=float('nan'))}"],
                     "norm_eps must be a finite number > 0, got nan"),
    "rope_theta -1": (lambda t, m, k: [f"--model_name={_model_with_config(t, m, rope_theta=-1)}"],
                      "rope_theta must be a finite number > 0, got -1"),
    "teacher without weights": (lambda t, m, k: [f"--distill.teacher={_teacher_without_weights(t, m)}"],
                                "--distill.teacher=" + "{t}/teacher does not load"),
    "teacher with a broken config": (lambda t, m, k: [f"--distill.teacher={_teacher_with_broken_config(t, m)}"],
                                     "{t}/teacher does not load"),
    "model without tokenizer files": (lambda t, m, k: [f"--model_name={_without_tokenizer(t, m)}"],
                                      "cannot load the tokenizer of --model_name="),
    "teacher with a smaller vocabulary": (lambda t, m, k: [f"--distill.teacher={_small_vocab_teacher(t, k)}"],
                                          "embeds 16 tokens but the tokenizer of --model_name has"),
    "token id >= vocab": (lambda t, m, k: [f"--preprocessed_data_path={_parquet_with_ids(t, lambda: [ROW[:-1] + [10**6]] * 8)}"],
                          "token id 1000000 in the data (data step 1) is outside the model's vocabulary"),
    "negative token id": (lambda t, m, k: [f"--preprocessed_data_path={_parquet_with_ids(t, lambda: [[-3] + ROW[1:]] * 8)}"],
                          "token id -3 in the data (data step 1) is outside the model's vocabulary"),
    "null token id": (lambda t, m, k: [f"--preprocessed_data_path={_parquet_with_ids(t, lambda: [[None] + ROW[1:]] * 8)}"],
                      "column 'input_ids' holds null values"),
}


@pytest.mark.parametrize("mistake", list(LOAD_MISTAKES))
def test_bad_models_and_data_are_one_line_errors(tmp_path, capsys, base_args, train_raven_dir, tokenizer_dir, mistake):
    make_args, message = LOAD_MISTAKES[mistake]
    extra = make_args(tmp_path, train_raven_dir, tokenizer_dir)
    replaced = {a.split("=")[0] for a in extra}
    args = [a for a in base_args if a.split("=")[0] not in replaced]
    assert run_train(args + extra + [f"--out_path={tmp_path / 'out'}", "--run_name=r"]) == 2
    errors, _ = error_lines(capsys)
    assert len(errors) == 1 and message.format(t=tmp_path) in errors[0], errors
    assert not (tmp_path / "out" / "r" / "final_checkpoint").exists()


# ---------------------------------------------------------------------------------------------
# A disk that fills up or turns read-only during a save: one line, no temporary left, resumable
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [(28, "No space left on device"), (30, "Read-only file system")])
def test_a_save_the_disk_refuses_ends_in_one_line_and_resumes_from_the_last_good_one(
        tmp_path, capsys, monkeypatch, base_args, finished_run, error):
    real_save = torch.save
    calls = []

    def save_then_fail(obj, path, *args, **kwargs):  # the second full checkpoint (step 4) hits the fault half-written
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"partial")
            raise OSError(error[0], error[1])
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save_then_fail)
    args = base_args + [f"--out_path={tmp_path}", "--run_name=r"]
    assert run_train(args) == 1
    errors, _ = error_lines(capsys)
    run = tmp_path / "r"
    assert len(errors) == 1 and f"cannot save {run / 'checkpoint_4'} ({error[1]}): it needs about" in errors[0], errors
    assert "--resume_path=auto continues from checkpoint_2" in errors[0] and "GB free" in errors[0]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary folder, no lock left
    assert not (run / "checkpoint_4").exists() and ckpt.verify_checkpoint(run / "checkpoint_2") is None
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert run_train(args + ["--resume_path=auto"]) == 0
    assert stable_metrics(run) == stable_metrics(finished_run)
