"""Parquet shards (to_parquet), data mixes (mix_datasets) and the downloader's bookkeeping, on
real files: round trips through the training reader, realised mix proportions, and one-line
errors for corrupt or foreign parquet files and existing outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrofit.data.mixing import MixRequest, mix_order, parse_mix_spec, plan_mix
from retrofit.data.packing import Rows
from retrofit.data.rows import DataError
from retrofit.data.shards import write_parquet_shards

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 32


def run_cli(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def read_rows(folder: Path) -> Rows:
    files = sorted(folder.glob("*.parquet"))
    return Rows.from_arrow(pa.concat_tables([pq.read_table(f) for f in files]))


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory, tokenizer_dir, corpus) -> Path:
    """The corpus tokenized and wrap-packed by the real CLI function (a save_to_disk dataset)."""
    import datasets

    from retrofit.data.preprocess import process_data

    base = tmp_path_factory.mktemp("packed")
    datasets.Dataset.from_dict({"text": corpus}).save_to_disk(str(base / "raw"))
    return process_data(
        tokenizer_name=str(tokenizer_dir),
        dataset_location=str(base / "raw"),
        max_length=MAX_LENGTH,
        num_proc=1,
        save_path=str(base),
        progress=False,
    )


def test_to_parquet_round_trip_and_training_reader(tmp_path, packed_dir, capsys):
    import datasets

    from retrofit.data.stream import ParquetStream
    from utils.to_parquet import main

    out = tmp_path / "parquet"
    main(
        [
            "--dataset_path",
            str(packed_dir),
            "--dataset_save_dir",
            str(out),
            "--num_shards",
            "5",
            "--val_shards",
            "2",
            "--row_group_size",
            "64",
            "--num_proc",
            "2",
            "--no_progress",
        ]
    )
    original = Rows.from_arrow(datasets.load_from_disk(str(packed_dir)).data.table)
    train_files = sorted(out.glob("*.parquet"))
    val_files = sorted((out / "val").glob("*.parquet"))
    assert [f.name for f in train_files] == [f"shard-{i:05d}.parquet" for i in range(3)]
    assert [f.name for f in val_files] == ["shard-00003.parquet", "shard-00004.parquet"]
    # Train shards then val shards, in order, are exactly the packed dataset.
    back = Rows.concat([read_rows(out), read_rows(out / "val")])
    np.testing.assert_array_equal(back.input_ids, original.input_ids)
    np.testing.assert_array_equal(back.attention_mask, original.attention_mask)
    pf = pq.ParquetFile(train_files[0])
    assert pf.schema_arrow.field("input_ids").type.value_type == pa.int32()
    assert pf.schema_arrow.field("attention_mask").type.value_type == pa.int8()
    assert pf.num_row_groups > 1 and max(pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)) == 64
    # What train.py reads: rows of max_length + 1 from the training shards only.
    stream = ParquetStream(out, micro_batch_size=8, max_length=MAX_LENGTH, shuffle=False)
    batch = stream.next_batch()
    assert batch["input_ids"].shape == (8, MAX_LENGTH + 1)
    np.testing.assert_array_equal(batch["input_ids"].numpy(), original.input_ids[:8])
    # An existing output folder is kept unless --overwrite.
    assert main(["--dataset_path", str(packed_dir), "--dataset_save_dir", str(out), "--num_shards", "5", "--no_progress"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: output folder {str(out)!r} already exists (pass --overwrite to replace it)"
    )
    main(
        [
            "--dataset_path",
            str(packed_dir),
            "--dataset_save_dir",
            str(out),
            "--num_shards",
            "2",
            "--val_shards",
            "0",
            "--overwrite",
            "--no_progress",
        ]
    )
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.parquet", "shard-00001.parquet"]


def test_to_parquet_rejects_unpacked_rows(tmp_path, capsys):
    import datasets

    from utils.to_parquet import main

    ragged = tmp_path / "ragged"
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]], "attention_mask": [[1, 1, 1], [1, 1]]}).save_to_disk(
        str(ragged)
    )
    assert main(["--dataset_path", str(ragged), "--dataset_save_dir", str(tmp_path / "o"), "--num_shards", "1", "--val_shards", "0"]) == 2
    assert "row 1 of 'input_ids' has 2 tokens, expected 3" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written
    with pytest.raises(DataError, match="only 2 rows for num_shards=3"):
        write_parquet_shards(2, lambda a, b: None, tmp_path / "o", num_shards=3)


def marked_rows(marker: int, n: int, row_len: int = 9) -> pa.Table:
    """n rows whose first token says which source they came from and second token which row."""
    ids = np.zeros((n, row_len), dtype=np.int32)
    ids[:, 0], ids[:, 1] = marker, np.arange(n)
    return Rows(ids, np.ones_like(ids, dtype=np.int8)).to_arrow()


def test_mix_has_the_requested_proportions(tmp_path, capsys):
    import datasets

    from mix_datasets import main

    # Source A: a parquet folder; B: a save_to_disk dataset; C: a chat dataset with a loss_mask.
    table_a = pa.Table.from_batches([marked_rows(100, 600)])
    write_parquet_shards(600, lambda a, b: table_a.slice(a, b - a), tmp_path / "a", num_shards=3, progress=False)
    datasets.Dataset(pa.Table.from_batches([marked_rows(200, 500)])).save_to_disk(str(tmp_path / "b"))
    chat = marked_rows(300, 400)
    chat = pa.Table.from_batches([chat]).append_column("loss_mask", chat.column("attention_mask"))
    datasets.Dataset(chat).save_to_disk(str(tmp_path / "c"))
    config = tmp_path / "mix.yaml"
    config.write_text(
        f"out_dir: {tmp_path / 'mix'}\nseed: 42\nnum_shards: 6\nval_shards: 1\nrow_group_size: 50\nsources:\n"
        f"  - {{path: {tmp_path / 'a'}, fraction: 0.5}}\n  - {{path: {tmp_path / 'b'}, rows: 300}}\n"
        f"  - {tmp_path / 'c'}:0.2\n"
    )
    main(["--config", str(config), "--no_progress"])
    printed = capsys.readouterr().out
    # 300 fixed rows with fractions 0.5 + 0.2 -> 1000 rows: 500 from A, 300 from B, 200 from C.
    assert (
        "mix of 1,000 rows" in printed and " 50.000% " in printed and " 30.000% " in printed and " 20.000% " in printed
    )
    rows = Rows.concat([read_rows(tmp_path / "mix"), read_rows(tmp_path / "mix" / "val")])
    markers, counts = np.unique(rows.input_ids[:, 0], return_counts=True)
    assert dict(zip(markers.tolist(), counts.tolist())) == {100: 500, 200: 300, 300: 200}
    assert len({(m, i) for m, i in rows.input_ids[:, :2].tolist()}) == 1000  # sampled without replacement
    assert len(set(rows.input_ids[:100, 0].tolist())) == 3  # shuffled together
    # Sources without a loss_mask get loss on every real token; the chat source keeps its own.
    assert (rows.loss_mask == rows.attention_mask).all()
    assert sorted((tmp_path / "mix").iterdir())[0].name == "mix.json"


def test_plan_mix_rules():
    def req(rows=None, fraction=None, available=1000):
        return MixRequest("src", rows=rows, fraction=fraction, available=available)

    assert plan_mix([req(rows=100), req(rows="all", available=50)]) == [100, 50]
    assert plan_mix([req(fraction=0.25, available=100), req(fraction=0.75, available=1000)]) == [100, 300]
    assert plan_mix([req(fraction=0.5), req(fraction=0.5)], total_rows=10) == [5, 5]
    assert plan_mix([req(rows=600), req(fraction=0.4)]) == [600, 400]
    with pytest.raises(DataError, match="must sum to 1"):
        plan_mix([req(fraction=0.5), req(fraction=0.2)])
    with pytest.raises(DataError, match="asks for 2,000 rows but has 1,000"):
        plan_mix([req(rows=2000)])
    with pytest.raises(DataError, match=r"needs 1,500 rows \(fraction 0.6\) but it has 1,000"):
        plan_mix([req(rows=1000), req(fraction=0.6)])
    assert parse_mix_spec("/d/x:12800000").rows == 12800000
    assert parse_mix_spec("/d/x:25%").fraction == 0.25 and parse_mix_spec("/d/x:0.5").fraction == 0.5
    with pytest.raises(DataError, match="is not a row count"):
        parse_mix_spec("/d/x:lots")
    source, row = mix_order([3, 2], [10, 2], seed=42)
    again = mix_order([3, 2], [10, 2], seed=42)
    assert (source == again[0]).all() and (row == again[1]).all()
    assert sorted(row[source == 1].tolist()) == [0, 1] and len(set(row[source == 0].tolist())) == 3


def test_corrupt_and_foreign_parquet_fail_with_one_line(tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "shard-00000.parquet").write_bytes(b"PAR1 this is not really parquet")
    result = run_cli(
        ROOT / "mix_datasets.py", "--out_dir", tmp_path / "m", "--sources", f"{corrupt}:all", "--num_shards", "1"
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: {corrupt / 'shard-00000.parquet'} is not a readable parquet file"
    )

    from mix_datasets import main

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"], "score": [1, 2]}), foreign / "part-0.parquet")
    assert main(["--out_dir", str(tmp_path / "m"), "--sources", f"{foreign}:all", "--num_shards", "1"]) == 2
    assert not (tmp_path / "m").exists()


def test_foreign_parquet_message(tmp_path):
    from retrofit.data.shards import open_parquet

    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["a"]}), path)
    with pytest.raises(
        DataError, match=rf"{path} is not packed training rows: no column 'input_ids' \(columns: text\)"
    ):
        open_parquet(path)


def test_download_list_dry_run_and_resume(tmp_path):
    import datasets

    from utils.download_ds import DATASETS, download, is_complete

    listed = run_cli(ROOT / "utils" / "download_ds.py", "--list")
    assert listed.returncode == 0 and "nvidia/Nemotron-CC-Math-v1 (4plus)" in listed.stdout
    assert "HuggingFaceFW/fineweb-edu (sample-350BT)" in listed.stdout
    dry = run_cli(ROOT / "utils" / "download_ds.py", "--dataset_path", tmp_path, "--datasets", "sft-math", "--dry_run")
    assert (
        dry.returncode == 0
        and f"would fetch: nvidia/Nemotron-Pretraining-SFT-v1 (Nemotron-SFT-MATH) -> {tmp_path}" in dry.stdout
    )
    assert not (tmp_path / "datasets").exists()

    calls = []

    def local_loader(repo, config, split):  # stands in for the Hub: a real, tiny DatasetDict
        calls.append((repo, config, split))
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"]})})

    target = tmp_path / "datasets" / DATASETS["sft-math"].folder
    (target.parent / f".{target.name}.tmp-abcd").mkdir(parents=True)  # leftover of an interrupted run
    assert download("sft-math", tmp_path, loader=local_loader) == "saved"
    assert is_complete(target) and calls == [("nvidia/Nemotron-Pretraining-SFT-v1", "Nemotron-SFT-MATH", None)]
    assert download("sft-math", tmp_path, loader=local_loader) == "skipped" and len(calls) == 1
    assert not (target.parent / f".{target.name}.tmp-abcd").exists()
    assert datasets.load_from_disk(str(target))["train"]["text"] == ["a", "b"]
