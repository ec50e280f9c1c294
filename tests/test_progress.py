"""Progress bars (retrofit/progress.py) are drawn on stderr only when it is a terminal and not
turned off; then the training loop's step lines still reach stdout whole, once each. A terminal
is stood in for by a StringIO whose isatty() is True."""

from __future__ import annotations

import io
import sys

import pyarrow as pa
import pytest

from retrofit.data.shards import write_parquet_shards
from retrofit.progress import progress_shown
from retrofit.train.monitor import TrainingProgress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def on_terminal(monkeypatch) -> FakeTerminal:
    """Call in the test body: pytest's capture puts its own sys.stderr back after fixtures ran."""
    stderr = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    return stderr


def test_bars_only_on_a_terminal_and_when_enabled(monkeypatch):
    on_terminal(monkeypatch)
    assert progress_shown() and not progress_shown(enabled=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress_shown()


def _rows(n: int) -> pa.Table:
    return pa.table({"input_ids": [[i, i + 1, i + 2] for i in range(n)], "attention_mask": [[1, 1, 1]] * n})


@pytest.mark.parametrize("on_terminal", [True, False])
def test_parquet_writing_shows_a_bar_on_a_terminal_only(tmp_path, monkeypatch, on_terminal):
    stderr = FakeTerminal() if on_terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    table = _rows(8)
    write_parquet_shards(8, lambda a, b: table.slice(a, b - a), tmp_path / "out", num_shards=2, val_shards=0)
    assert ("parquet shards: 100%" in stderr.getvalue()) == on_terminal
    assert len(list((tmp_path / "out").glob("*.parquet"))) == 2


def test_training_progress_keeps_each_step_line_whole_on_stdout(capsys, monkeypatch):
    terminal = on_terminal(monkeypatch)
    progress = TrainingProgress(max_steps=3, start_step=1)
    for step in (2, 3):
        progress.show({"step": step, "loss": 1.5, "tokens_per_second": 1234.0}, f"step {step}/3 | loss 1.5000")
    progress.close()
    assert capsys.readouterr().out.splitlines() == ["step 2/3 | loss 1.5000", "step 3/3 | loss 1.5000"]
    drawn = terminal.getvalue()
    assert "train: 100%" in drawn and "3/3" in drawn and "loss=1.5000" in drawn and "tok_s=1,234" in drawn


def test_training_progress_off_the_terminal_is_the_plain_line(capsys, monkeypatch):
    printed = []
    progress = TrainingProgress(max_steps=3, start_step=0)
    progress.show({"step": 1, "loss": 1.0, "tokens_per_second": 1.0}, "step 1/3", log=printed.append)
    progress.close()
    assert printed == ["step 1/3"] and capsys.readouterr().err == ""
    on_terminal(monkeypatch)
    assert TrainingProgress(3, 0, enabled=False).bar.disable  # other ranks: no bar even on a terminal


def test_a_training_run_on_a_terminal_draws_the_bar_and_prints_every_step(tmp_path, capsys, monkeypatch, train_raven_dir,
                                                                           train_parquet_dir):
    import train as train_module

    terminal = on_terminal(monkeypatch)
    args = [f"--model_name={train_raven_dir}", f"--preprocessed_data_path={train_parquet_dir}", "--is_parquet_dataset=true",
            "--max_length=32", "--micro_batch_size=2", "--batch_size=2", "--max_steps=2", "--save_interval=-1",
            f"--out_path={tmp_path}", "--run_name=r", "--wandb_disabled=true"]
    assert train_module.main(args) == 0
    out = capsys.readouterr().out
    assert [line.split(" |")[0] for line in out.splitlines() if line.startswith("step ")] == ["step 1/2", "step 2/2"]
    assert "train: 100%" in terminal.getvalue() and "2/2" in terminal.getvalue()
