"""Write a packed `save_to_disk` dataset as parquet shards for train.py.

    python utils/to_parquet.py --dataset_path DATA/.../dataset --dataset_save_dir DATA/parquet/my_data

gives DATA/parquet/my_data/shard-00000.parquet ... shard-00511.parquet and the last --val_shards
(default 4) shards in DATA/parquet/my_data/val/ (the original moved those by hand). Contiguous
shards, row groups of --row_group_size rows (train.py shuffles rows within a row group). Columns:
input_ids list<int32>, attention_mask list<int8> [, loss_mask list<int8>]. The folder is written
under a temp name and renamed at the end; an existing one is only replaced with --overwrite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from retrofit.data.rows import DataError
from retrofit.data.shards import DEFAULT_ROW_GROUP_SIZE, load_disk_table, write_parquet_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", required=True, help="packed dataset written by preprocess_data_packing.py")
    parser.add_argument("--dataset_save_dir", required=True, help="output folder of the parquet shards")
    parser.add_argument("--num_shards", type=int, default=516, help="total shards, validation included (516)")
    parser.add_argument("--val_shards", type=int, default=4, help="last shards, written to DIR/val/ (4)")
    parser.add_argument("--row_group_size", type=int, default=DEFAULT_ROW_GROUP_SIZE, help="rows per row group")
    parser.add_argument("--num_proc", type=int, default=1, help="processes writing shards in parallel (1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dataset_save_dir")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        table = load_disk_table(args.dataset_path, "dataset_path")
        paths = write_parquet_shards(
            table.num_rows,
            lambda a, b: table.slice(a, b - a),
            args.dataset_save_dir,
            num_shards=args.num_shards,
            val_shards=args.val_shards,
            row_group_size=args.row_group_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            num_proc=args.num_proc,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_train = len(paths) - args.val_shards
    print(
        f"wrote {table.num_rows:,} rows: {n_train} {'training ' if args.val_shards else ''}shards in {args.dataset_save_dir}"
        + (f", {args.val_shards} validation shards in {Path(args.dataset_save_dir) / 'val'}" if args.val_shards else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
