"""Packed rows on disk: `save_to_disk` datasets in, parquet shards out (and back in).

Shards are `shard-00000.parquet`, ... with the row columns of `retrofit.data.rows` as list<int32> ids
and list<int8> masks, in row groups of `DEFAULT_ROW_GROUP_SIZE` rows (train.py shuffles rows within
a row group). Output folders are written whole through `retrofit.atomic.atomic_directory`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from retrofit.atomic import atomic_directory
from retrofit.errors import first_line
from retrofit.data.rows import LOSS_MASK_COLUMN, ROW_COLUMNS, DataError, check_row_schema, check_rows
from retrofit.progress import progress_bar

DEFAULT_ROW_GROUP_SIZE = 1024  # rows; the training reader shuffles within a row group (~4 MB at 1025 tokens)


def check_output_folder(target: str | Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse to replace an existing, non-empty output folder (or a file) unless `overwrite`."""
    target = Path(target)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"output folder {str(target)!r} already exists (pass {flag} to replace it)")


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def list_parquet_files(folder: str | Path) -> list[Path]:
    """The `*.parquet` files of a folder in natural order (shard-2 before shard-10)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"parquet dataset folder {str(folder)!r} does not exist")
    files = sorted(folder.glob("*.parquet"), key=_natural_key)
    if not files:
        raise DataError(f"no *.parquet files in {str(folder)!r}")
    return files


def parquet_fingerprint(path: str | Path) -> str:
    """What identifies a parquet file's contents, cheaply: its size and a digest of its footer (the
    schema and every row group's row count, byte sizes, offsets and column statistics), read from
    the file's end; rewriting a shard with other rows changes it, renaming one does not."""
    import hashlib

    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size < 12:
                raise DataError(f"{path} is not a readable parquet file ({size} bytes); re-create or remove it")
            handle.seek(size - 8)
            tail = handle.read(8)
            footer_bytes = int.from_bytes(tail[:4], "little")
            if tail[4:] != b"PAR1" or footer_bytes > size - 12:
                raise DataError(f"{path} is not a readable parquet file (no parquet footer); re-create or remove it")
            handle.seek(size - 8 - footer_bytes)
            footer = handle.read(footer_bytes)
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or exc})") from None
    return f"{size}:{hashlib.sha1(footer).hexdigest()[:16]}"


def open_parquet(path: str | Path, required=ROW_COLUMNS):
    """A pq.ParquetFile of packed rows (schema checked: `retrofit.data.rows.check_row_schema`), or a
    one-line DataError for a damaged, foreign or non-parquet file."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path} is not a readable parquet file ({first_line(exc)}); re-create or remove it") from None
    check_row_schema(parquet.schema_arrow, str(path), required)
    return parquet


def read_row_group(parquet, path: str | Path, index: int, columns: list[str] | None = None) -> pa.Table:
    """Row group `index` of an open parquet file, a damaged one reported by name."""
    try:
        return parquet.read_row_group(index, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{path}: row group {index} cannot be read ({first_line(exc)}); re-create or remove the file"
        ) from None


def first_row_groups(path: str | Path, num_rows: int, columns=("input_ids", "attention_mask")):
    """Yield (where, table) for the row groups that hold the first `num_rows` rows of a parquet
    file or a folder of shards (natural name order), the last one cut to size. Reads those of
    `columns` a file has; `input_ids` is required. `where` names the file and row group."""
    path = Path(path)
    have = 0
    for file in list_parquet_files(path) if path.is_dir() else [path]:
        parquet = open_parquet(file, required=("input_ids",))
        present = [c for c in columns if c in parquet.schema_arrow.names]
        for index in range(parquet.num_row_groups):
            if have >= num_rows:
                return
            table = read_row_group(parquet, file, index, present).slice(0, num_rows - have)
            if table.num_rows:
                have += table.num_rows
                yield f"{file} row group {index}", table


def load_disk_table(path: str | Path, what: str, split: str | None = None, split_flag: str | None = None) -> pa.Table:
    """The Arrow table (memory-mapped, zero-copy) of a `save_to_disk` dataset at `path`.

    A DatasetDict with one split is unwrapped; with several, `split` picks one (`split_flag` is the
    CLI flag that sets it, for the error message). `what` names the flag or source in errors.
    """
    import datasets

    if not Path(path).exists():
        raise DataError(f"{what} {str(path)!r} does not exist")
    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(f"{what} {str(path)!r} is not a save_to_disk dataset ({str(err).splitlines()[0]})") from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        if len(splits) == 1:
            dataset = dataset[splits[0]]
        elif split in dataset:
            dataset = dataset[split]
        else:
            how = f"pick one with {split_flag}" if split_flag else "give the folder of one split"
            raise DataError(f"{what} {str(path)!r} has splits {splits}; {how}")
    if dataset._indices is not None:
        dataset = dataset.flatten_indices()
    return dataset.data.table


def normalize_packed_table(table: pa.Table, where: str, with_loss_mask: bool | None = None) -> pa.Table:
    """Check the rows (`retrofit.data.rows.check_rows`) and keep only the row columns, as list<int32>
    ids and list<int8> masks. with_loss_mask=True adds `loss_mask` = attention_mask where it is
    missing (loss on every real token, what train.py does without one); False drops it."""
    check_rows(table, where)
    has_loss = LOSS_MASK_COLUMN in table.schema.names
    keep_loss = has_loss if with_loss_mask is None else with_loss_mask
    columns = {}
    for name in list(ROW_COLUMNS) + ([LOSS_MASK_COLUMN] if keep_loss else []):
        source = name if (name != LOSS_MASK_COLUMN or has_loss) else "attention_mask"
        value_type = pa.int32() if name == "input_ids" else pa.int8()
        columns[name] = table.column(source).cast(pa.list_(value_type))
    return pa.table(columns)


def shard_bounds(num_rows: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) of each shard; sizes differ by at most one row."""
    edges = [(i * num_rows) // num_shards for i in range(num_shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


_SHARD_JOB: dict = {}


def _write_shard(job: tuple[Path, int, int]) -> Path:
    """Write rows [lo, hi) to one parquet file, row group by row group."""
    import pyarrow.parquet as pq

    path, lo, hi = job
    read_rows, row_group_size, with_loss_mask = (
        _SHARD_JOB["read_rows"],
        _SHARD_JOB["row_group_size"],
        _SHARD_JOB["with_loss_mask"],
    )
    writer = None
    try:
        for a in range(lo, hi, row_group_size):
            b = min(a + row_group_size, hi)
            table = normalize_packed_table(read_rows(a, b), f"rows {a}..{b}", with_loss_mask)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            elif not table.schema.equals(writer.schema):
                raise DataError(f"rows {a}..{b} have columns {table.schema.names}, earlier rows {writer.schema.names}")
            writer.write_table(table, row_group_size=row_group_size)
    finally:
        if writer is not None:
            writer.close()
    return path


def write_parquet_shards(
    num_rows: int,
    read_rows: Callable[[int, int], pa.Table],
    out_dir: str | Path,
    num_shards: int,
    val_shards: int = 0,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    overwrite: bool = False,
    with_loss_mask: bool | None = None,
    progress: bool = True,
    extra_files: dict[str, str] | None = None,
    num_proc: int = 1,
) -> list[Path]:
    """Write rows [0, num_rows) as `shard-00000.parquet`... into out_dir; the last `val_shards`
    shards go to `out_dir/val/` (same names, so a shard keeps its index). `read_rows(a, b)`
    returns rows a..b as an Arrow table; `extra_files` {name: text} are written beside the
    shards. Shards are independent, so `num_proc` forked workers write them in parallel (the
    files do not depend on num_proc). Written to a temp folder, then renamed into place; an
    existing non-empty out_dir is only replaced with `overwrite`."""
    if num_shards < 1:
        raise DataError(f"num_shards={num_shards} must be >= 1")
    if not 0 <= val_shards < num_shards:
        raise DataError(f"val_shards={val_shards} must be in [0, num_shards={num_shards})")
    if row_group_size < 1:
        raise DataError(f"row_group_size={row_group_size} must be >= 1")
    if num_rows == 0:
        raise DataError("there are no rows to write")
    if num_rows < num_shards:
        raise DataError(f"only {num_rows} rows for num_shards={num_shards}; pass a smaller --num_shards")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    folders = ["val" if i >= num_shards - val_shards else "." for i in range(num_shards)]
    with atomic_directory(out_dir) as tmp:
        if val_shards:
            (tmp / "val").mkdir()
        jobs = [
            (tmp / folder / f"shard-{i:05d}.parquet", lo, hi)
            for i, (folder, (lo, hi)) in enumerate(zip(folders, shard_bounds(num_rows, num_shards)))
        ]
        _SHARD_JOB.update(read_rows=read_rows, row_group_size=row_group_size, with_loss_mask=with_loss_mask)
        bar = progress_bar(total=num_shards, unit="shard", desc="parquet shards", enabled=progress)
        try:
            if num_proc <= 1:
                for job in jobs:
                    _write_shard(job)
                    bar.update()
            else:
                import multiprocessing as mp

                # fork: workers inherit read_rows (and the memory-mapped tables behind it).
                with mp.get_context("fork").Pool(min(num_proc, num_shards)) as pool:
                    for _ in pool.imap_unordered(_write_shard, jobs):
                        bar.update()
        finally:
            bar.close()
            _SHARD_JOB.clear()
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return [Path(os.path.normpath(out_dir / folder / f"shard-{i:05d}.parquet")) for i, folder in enumerate(folders)]


def inspect_parquet_files(files: list[Path], max_length: int | None) -> int:
    """Check every file's schema and the first row group's rows; return max_length.

    Runs before any training work so bad data fails in seconds, not after model loading.
    """
    with_rows = [(path, parquet) for path in files if (parquet := open_parquet(path)).metadata.num_rows]
    if not with_rows:
        raise DataError(f"the parquet files in {str(files[0].parent)!r} hold no rows")
    path, parquet = with_rows[0]
    row_len = None if max_length is None else max_length + 1
    return check_rows(read_row_group(parquet, path, 0), f"{path} row group 0", row_len) - 1
