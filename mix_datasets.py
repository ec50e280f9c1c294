"""Mix several packed datasets into one shuffled set of parquet shards (the paper's data mix).

Each source is a packed `save_to_disk` dataset (preprocess_data_packing.py) or a folder of parquet
shards (utils/to_parquet.py), with how much of it to take: a row count, `all`, or a fraction =
that source's share of the final mix. A seeded sample of each source is shuffled together (seed
42) and written as shard-00000.parquet ... with the last --val_shards shards in OUT/val/.

    python mix_datasets.py --out_dir data/parquet/fineweb_nemotron_mix \\
        --sources data/fineweb/dataset:12800000 data/nemotron_sft_general/dataset:12800000 \\
                  data/nemotron_sft_math/dataset:12800000

or with a YAML file (command-line flags override it):

    # mix.yaml
    out_dir: data/parquet/fineweb_nemotron_mix
    seed: 42
    sources:
      - {path: data/fineweb/dataset, fraction: 0.5}
      - {path: data/nemotron_sft_math/dataset, fraction: 0.5}

    python mix_datasets.py --config mix.yaml

Fractions: with fixed-count sources of R rows and fractions summing to F < 1 the mix has
R / (1 - F) rows; if every source is a fraction (summing to 1) the mix is --total_rows rows, or
the largest mix no source runs short of. The realised rows and shares are printed and saved to
OUT/mix.json. If any source has a `loss_mask` column, sources without one get loss_mask =
attention_mask (loss on all their tokens).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from retrofit.data.mixing import MixRequest, gather_rows, mix_order, parse_mix_spec, plan_mix
from retrofit.data.rows import LOSS_MASK_COLUMN, DataError
from retrofit.data.shards import (
    DEFAULT_ROW_GROUP_SIZE,
    check_output_folder,
    load_disk_table,
    normalize_packed_table,
    open_parquet,
    read_row_group,
    write_parquet_shards,
)


def parquet_to_arrow(files: list[Path], arrow_path: Path):
    """Parquet shards -> one memory-mapped Arrow table (streamed row group by row group, so a
    source bigger than memory is fine); every file is checked first."""
    import pyarrow as pa

    parquet_files = [open_parquet(f) for f in files]
    writer, schema = None, None
    with pa.OSFile(str(arrow_path), "wb") as sink:
        for path, pf in zip(files, parquet_files):
            for index in range(pf.num_row_groups):
                table = normalize_packed_table(read_row_group(pf, path, index), f"{path} row group {index}")
                if writer is None:
                    writer, schema = pa.ipc.new_stream(sink, table.schema), table.schema
                elif not table.schema.equals(schema):
                    raise DataError(f"{path} has columns {table.schema.names}, unlike the files before it")
                writer.write_table(table)
        if writer is None:
            raise DataError(f"the parquet files of {files[0].parent} hold no rows")
        writer.close()
    return pa.ipc.open_stream(pa.memory_map(str(arrow_path))).read_all()


def load_source(path: str, cache_dir: Path, index: int):
    """Arrow table of a mix source: a save_to_disk dataset, a parquet folder, or one parquet file."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"mix source {path!r} does not exist")
    if p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
        table = load_disk_table(p, "mix source")
    else:
        files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        if not files:
            raise DataError(f"mix source {path!r} is neither a save_to_disk dataset nor a folder of *.parquet files")
        table = parquet_to_arrow(files, cache_dir / f"source-{index}.arrow")
    # Check columns and row length on the first rows only (the writer checks every row group).
    normalize_packed_table(table.slice(0, 16), f"mix source {path}")
    return table


def read_config(args) -> dict:
    cfg = dict(seed=42, num_shards=516, val_shards=4, row_group_size=DEFAULT_ROW_GROUP_SIZE, sources=[])
    if args.config:
        import yaml

        try:
            loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise DataError(f"cannot read mix config {args.config!r} ({str(err).splitlines()[0]})") from None
        unknown = set(loaded) - {
            "out_dir",
            "seed",
            "num_shards",
            "val_shards",
            "row_group_size",
            "total_rows",
            "sources",
            "cache_path",
        }
        if unknown:
            raise DataError(f"mix config {args.config!r} has unknown keys {sorted(unknown)}")
        cfg.update(loaded)
    for key in ("out_dir", "seed", "num_shards", "val_shards", "row_group_size", "total_rows", "cache_path"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.sources:
        cfg["sources"] = args.sources
    requests = []
    for item in cfg["sources"]:
        if isinstance(item, str):
            requests.append(parse_mix_spec(item))
        elif isinstance(item, dict) and "path" in item and (("rows" in item) != ("fraction" in item)):
            requests.append(MixRequest(str(item["path"]), rows=item.get("rows"), fraction=item.get("fraction")))
        else:
            raise DataError(f"mix source {item!r} needs a path and exactly one of rows / fraction")
    cfg["sources"] = requests
    if not cfg.get("out_dir") and not args.dry_run:
        raise DataError("--out_dir is required")
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with out_dir, seed, num_shards, val_shards, sources")
    parser.add_argument(
        "--sources", nargs="+", metavar="PATH:AMOUNT", help="PATH:ROWS, PATH:all, PATH:0.25 or PATH:25%%"
    )
    parser.add_argument("--out_dir", "--dataset_save_dir", dest="out_dir", help="output folder of the parquet shards")
    parser.add_argument("--seed", type=int, help="sampling and shuffling seed (42)")
    parser.add_argument("--num_shards", type=int, help="total shards, validation included (516)")
    parser.add_argument("--val_shards", type=int, help="last shards, written to OUT/val/ (4)")
    parser.add_argument("--row_group_size", type=int, help=f"rows per parquet row group ({DEFAULT_ROW_GROUP_SIZE})")
    parser.add_argument("--total_rows", type=int, help="size of the mix when every source is a fraction")
    parser.add_argument("--cache_path", help="folder for Arrow copies of parquet sources (default: beside out_dir)")
    parser.add_argument("--num_proc", type=int, default=1, help="processes writing shards in parallel (1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    parser.add_argument("--dry_run", action="store_true", help="print the plan, write nothing")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)

    cache_root = None
    try:
        cfg = read_config(args)
        if not cfg["sources"]:
            raise DataError("no mix sources (pass --sources or a config with sources)")
        out_dir = Path(cfg["out_dir"]) if cfg.get("out_dir") else None
        if out_dir is not None and not args.dry_run:
            check_output_folder(out_dir, args.overwrite)
        base = Path(cfg.get("cache_path") or (out_dir.parent if out_dir else Path.cwd()))
        base.mkdir(parents=True, exist_ok=True)
        cache_root = Path(tempfile.mkdtemp(prefix=".mix-cache-", dir=base))
        tables = [load_source(req.path, cache_root, i) for i, req in enumerate(cfg["sources"])]
        row_lens = {req.path: len(t.column("input_ids")[0]) for req, t in zip(cfg["sources"], tables) if t.num_rows}
        if len(set(row_lens.values())) > 1:
            raise DataError(f"sources have different row lengths (max_length + 1): {row_lens}")
        for req, table in zip(cfg["sources"], tables):
            req.available = table.num_rows
        counts = plan_mix(cfg["sources"], cfg.get("total_rows"))
        total = sum(counts)
        report = []
        print(f"mix of {total:,} rows (seed {cfg['seed']}):")
        for req, n in zip(cfg["sources"], counts):
            share = n / total
            print(f"  {share:8.3%}  {n:>12,} of {req.available:>12,} rows  ({req.describe()})  {req.path}")
            report.append(dict(path=req.path, requested=req.describe(), available=req.available, rows=n, share=share))
        if args.dry_run:
            return 0
        with_loss_mask = any(LOSS_MASK_COLUMN in t.schema.names for t in tables)
        source, row = mix_order(counts, [t.num_rows for t in tables], seed=cfg["seed"])
        write_parquet_shards(
            total,
            lambda a, b: gather_rows(tables, source[a:b], row[a:b], with_loss_mask),
            out_dir,
            num_shards=cfg["num_shards"],
            val_shards=cfg["val_shards"],
            row_group_size=cfg["row_group_size"],
            overwrite=args.overwrite,
            with_loss_mask=with_loss_mask,
            progress=not args.no_progress,
            num_proc=args.num_proc,
            extra_files={"mix.json": json.dumps(dict(seed=cfg["seed"], rows=total, sources=report), indent=2) + "\n"},
        )
        print(
            f"wrote {cfg['num_shards'] - cfg['val_shards']} training shards to {out_dir}"
            + (f" and {cfg['val_shards']} validation shards to {out_dir / 'val'}" if cfg["val_shards"] else "")
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if cache_root is not None:
            shutil.rmtree(cache_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
