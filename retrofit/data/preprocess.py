"""A `save_to_disk` text dataset -> a packed `save_to_disk` dataset: the work of
preprocess_data_packing.py (whose docstring describes the modes and the output layout), here so
that other tools (bench/bench_packing.py) call it without importing a script.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from retrofit.atomic import atomic_directory
from retrofit.errors import first_line
from retrofit.data.stream import DEFAULT_SYSTEM_PROMPT  # the original's system prompt, shared with train.py
from retrofit.data.packing import PackConfig, PackStats, iter_packed_rows, special_token_ids
from retrofit.data.rows import DataError
from retrofit.data.shards import check_output_folder, load_disk_table


def output_dir(save_path: str, tokenizer_name: str, out_path: str, pack: bool, wrapped_packing: bool) -> Path:
    """The original's layout. A local tokenizer folder contributes only its name (not its whole path)."""
    packing_suffix = "_packed_wrapped" if wrapped_packing else ("_packed" if pack else "")
    tokenizer_tag = Path(tokenizer_name).name if Path(tokenizer_name).is_dir() else tokenizer_name
    return Path(save_path) / f"llama_huginn_preprocessed_data{packing_suffix}" / tokenizer_tag / out_path / "dataset"


def load_text_table(dataset_location: str, dataset_config: str | None, max_samples: int | None):
    """The dataset's Arrow table (memory-mapped, zero-copy), first max_samples rows."""
    # The original passed dataset_config to load_from_disk, where it did nothing; here it picks
    # the split of a multi-split DatasetDict.
    table = load_disk_table(dataset_location, "dataset_location", split=dataset_config, split_flag="--dataset_config")
    if max_samples is not None:
        if max_samples < 0:
            raise DataError(f"max_samples={max_samples} must be >= 0")
        table = table.slice(0, min(max_samples, table.num_rows))
    if table.num_rows == 0:
        raise DataError(f"dataset {dataset_location!r} has no rows" + (" (max_samples=0)" if max_samples == 0 else ""))
    return table


def process_data(
    tokenizer_name: str = "smcleish/Recurrent-Llama-3.2-untrained",
    out_path: str | None = None,
    dataset_location: str | None = None,
    q_col: str = "text",
    a_col: str = "answer",
    dataset_config: str | None = "main",
    max_length: int = 1024,
    max_samples: int | None = None,
    take_loss_over_all_tokens: bool = False,
    num_proc: int | None = None,
    pack: bool = True,
    batch_size: int = 1024,
    wrapped_packing: bool = True,
    cache_path: str | None = None,
    save_path: str = ".",
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Tokenize and pack a dataset; returns the output folder.

    Args:
        tokenizer_name: Hub id or local folder of the tokenizer.
        out_path: Name of this dataset variant in the output path (default: the dataset folder's name).
        dataset_location: A dataset saved with save_to_disk (a Dataset or a DatasetDict).
        q_col: Text column; anything but "text" switches to chat mode (question column).
        a_col: Answer column (chat mode).
        dataset_config: Split to use when dataset_location is a DatasetDict with several splits.
        max_length: Rows are max_length + 1 tokens (inputs row[:-1], targets row[1:]).
        max_samples: Use only the first max_samples documents.
        take_loss_over_all_tokens: Chat mode: loss_mask = 1 on every real token, not only the answer.
        num_proc: Worker processes (default: all CPUs).
        pack: Pack documents into rows (best-fit when wrapped_packing is false); false = one per row.
        batch_size: Documents per work unit and per best-fit block.
        wrapped_packing: Concatenate all documents and cut into rows (needs pack=true).
        cache_path: Folder for the intermediate Arrow file (default: save_path).
        save_path: Root of the output folder.
        system_prompt: Chat mode system message ("" for none).
        overwrite: Replace an existing output folder.
        progress: Show progress bars.
    """
    check_packing_options(dataset_location, max_length, batch_size, pack, wrapped_packing)
    out_path = out_path or Path(dataset_location.rstrip("/")).name
    target = output_dir(save_path, tokenizer_name, out_path, pack, wrapped_packing)
    check_output_folder(target, overwrite, "--overwrite=true")

    tokenizer = load_packing_tokenizer(tokenizer_name)
    eos_id, pad_id = special_token_ids(tokenizer, tokenizer_name)
    cfg = PackConfig(
        seq_len=max_length + 1, mode="wrapped" if wrapped_packing else ("best_fit" if pack else "none"),
        q_col=q_col, a_col=a_col, system_prompt=system_prompt, take_loss_over_all_tokens=take_loss_over_all_tokens,
        batch_size=batch_size, eos_id=eos_id, pad_id=pad_id,
    )
    table = load_text_table(dataset_location, dataset_config, max_samples)
    num_proc = num_proc or os.cpu_count() or 1
    workers = min(num_proc, -(-table.num_rows // batch_size))  # never more workers than work units

    cache_dir = Path(cache_path or save_path) / "posttrain_huginn" / "processing_cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file = cache_dir / f"tmp_cache_packing_{out_path}.{os.getpid()}.arrow"
    stats = PackStats(seq_len=cfg.seq_len)
    start = time.perf_counter()
    try:
        write_packed_rows(cache_file, iter_packed_rows(table, tokenizer, cfg, num_proc=workers, progress=progress), stats)
        elapsed = time.perf_counter() - start
        save_packed_dataset(
            cache_file, target, overwrite, num_proc,
            settings=dict(
                tokenizer_name=tokenizer_name, dataset_location=dataset_location, q_col=q_col, a_col=a_col,
                max_length=max_length, max_samples=max_samples, packing=cfg.mode, batch_size=batch_size,
                take_loss_over_all_tokens=take_loss_over_all_tokens, eos_id=eos_id, pad_id=pad_id,
                docs=stats.docs, tokens=stats.tokens, rows=stats.rows, real_tokens=stats.real_tokens,
            ),
        )
    finally:
        remove_cache_file(cache_file)
    print(f"{stats.summary()}; {stats.tokens / elapsed:,.0f} tokens/s with {workers} process(es)")
    print(f"saved to {target}")
    return target


def remove_cache_file(cache_file: Path) -> None:
    """Delete the intermediate Arrow file, and its cache folders once they are empty."""
    cache_file.unlink(missing_ok=True)
    for folder in (cache_file.parent, cache_file.parent.parent):  # leave no empty cache folders behind
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()


def check_packing_options(dataset_location, max_length: int, batch_size: int, pack: bool, wrapped_packing: bool) -> None:
    if wrapped_packing and not pack:
        raise DataError("wrapped_packing=true needs pack=true (pass --wrapped_packing=false with --pack=false)")
    if max_length < 2:
        raise DataError(f"max_length={max_length} is too small; rows need max_length >= 2")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    if not dataset_location:
        raise DataError("--dataset_location is required (a folder written by save_to_disk)")


def load_packing_tokenizer(tokenizer_name: str):
    from retrofit.model.loading import load_saved_tokenizer

    try:
        tokenizer = load_saved_tokenizer(tokenizer_name)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load tokenizer {tokenizer_name!r} ({first_line(err)})") from None
    tokenizer.model_max_length = int(1e30)  # documents are longer than a row before packing
    return tokenizer


def write_packed_rows(arrow_file: Path, packed, stats: PackStats) -> None:
    """(rows, stats part) pairs from `iter_packed_rows` -> one Arrow stream file; `stats` adds up the parts."""
    import pyarrow as pa

    with pa.OSFile(str(arrow_file), "wb") as sink:
        writer = None
        for rows, part in packed:
            stats.add(part)
            if len(rows):
                batch = rows.to_arrow()
                writer = writer or pa.ipc.new_stream(sink, batch.schema)
                writer.write_batch(batch)
        writer.close()


def save_packed_dataset(arrow_file: Path, target: Path, overwrite: bool, num_proc: int, settings: dict):
    """Arrow stream file -> save_to_disk dataset at target (via a temp folder and a rename)."""
    import datasets

    dataset = datasets.Dataset.from_file(str(arrow_file))
    num_shards = max(1, -(-dataset.data.nbytes // (2 * 1024**3)))  # the original's max_shard_size="2GB"
    check_output_folder(target, overwrite, "--overwrite=true")  # again: packing takes a while
    with atomic_directory(target) as tmp:
        dataset.save_to_disk(
            str(tmp), num_shards=num_shards, num_proc=min(num_proc, num_shards) if num_shards > 1 else None
        )
        (tmp / "preprocess_settings.json").write_text(json.dumps(settings, indent=2) + "\n")
