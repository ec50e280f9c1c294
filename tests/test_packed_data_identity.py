"""Packed (`save_to_disk`) training data carries a content digest in every checkpoint, so resuming
on data rewritten with the same row count is refused in one line instead of training on other
rows (retrofit/data/stream.py: packed_content_digest)."""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from retrofit.data.rows import DataError
from retrofit.data.shards import list_parquet_files
from retrofit.data.stream import PackedDatasetStream, packed_content_digest


def run_train(args: list[str]) -> int:
    import train as train_module

    return train_module.main(args + ["--wandb_disabled=true"])


@pytest.fixture(scope="module")
def packed_table(train_parquet_dir):
    return pq.read_table(list_parquet_files(train_parquet_dir)[0])


def test_the_digest_sees_a_changed_row_and_ignores_a_copy(packed_table):
    ds = datasets.Dataset(packed_table).with_format("numpy")
    assert packed_content_digest(ds) == packed_content_digest(datasets.Dataset(packed_table.slice(0)).with_format("numpy"))
    rows = packed_table.to_pydict()
    rows["input_ids"][-1] = rows["input_ids"][-1][::-1]  # the last row is always sampled
    changed = datasets.Dataset.from_dict(rows).with_format("numpy")
    assert len(changed) == len(ds) and packed_content_digest(changed) != packed_content_digest(ds)


def test_a_stream_refuses_the_state_of_other_rows_with_the_same_count(packed_table):
    stream = PackedDatasetStream(datasets.Dataset(packed_table), 2, seed=3)
    stream.next_batch()
    state = stream.state_dict()
    order = np.random.default_rng(0).permutation(len(packed_table))
    shuffled = PackedDatasetStream(datasets.Dataset(packed_table.take(order)), 2, seed=3)
    with pytest.raises(DataError, match=f"the same {len(packed_table)} rows but other contents"):
        shuffled.load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "content_digest"}  # a checkpoint from before the digest
    shuffled.load_state_dict(older)
    assert shuffled.position == {"epoch": 0, "row": 2}


def test_resume_on_rewritten_packed_data_is_refused_in_one_line(tmp_path, capsys, train_raven_dir, packed_table):
    data = tmp_path / "packed"
    datasets.Dataset(packed_table).save_to_disk(str(data))
    args = [f"--model_name={train_raven_dir}", f"--preprocessed_data_path={data}", "--max_length=32",
            "--micro_batch_size=2", "--batch_size=2", "--max_steps=3", "--save_interval=1",
            f"--out_path={tmp_path}", "--run_name=r", "--resume_path=auto"]
    assert run_train(args) == 0
    (tmp_path / "r" / "final_checkpoint").rename(tmp_path / "first_final")  # then auto-resume takes checkpoint_2
    order = np.random.default_rng(0).permutation(len(packed_table))
    rewritten = tmp_path / "rewritten"
    datasets.Dataset(packed_table.take(order)).save_to_disk(str(rewritten))
    capsys.readouterr()
    args = [a.replace(str(data), str(rewritten)) for a in args]
    assert run_train(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "dataset holds other rows than when the checkpoint was written" in errors[0], errors
    assert "--ignore_past_parquet_dataset=true" in errors[0]
    assert run_train(args + ["--ignore_past_parquet_dataset=true"]) == 0
