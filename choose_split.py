"""Recommend which base layers become prelude, recurrent block and coda (retrofit/model/split.py).

    python choose_split.py --model_name models/SmolLM2-360M --data data/parquet/val --keep 16
    python choose_split.py --model_name models/TinyLlama --data sample.txt --shape 4,8,4 --plot split.png

One pass over --num_sequences rows of sample data (a parquet folder or file, a datasets
save_to_disk folder, or a text file), no gradient: per layer the block influence 1 - cos(in, out),
and for every contiguous block of layers the angular distance arccos(cos(in, out)) / pi. Prints a
table per layer, the best splits of the requested shape (with the paper-style split and the worst
one for comparison), and the recommended split as converter flags ready to paste:

    python convert_pretrained_model/convert.py --model_name ... --save_name ... --prelude_idx 0-3 --core_idx ...

--keep N uses the paper's proportions (prelude = coda = round(N / 4) layers, the rest recurrent:
(2,4,2) for 8, (4,6,4) for 14, (4,8,4) for 16); --shape p,k,c sets them. --dtype bfloat16 halves
memory for large bases (the statistics are computed in float32 either way).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from retrofit.data.rows import DataError, check_token_ids
from retrofit.train.distributed import LaunchError, resolve_device
from retrofit.model.split import (
    SplitError,
    layer_table,
    load_sample_rows,
    measure,
    paper_shape,
    paper_style_split,
    plot,
    rank_splits,
    report,
    splits_table,
    write_json,
)


def parse_shape(value: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise SplitError(f"--shape {value!r}: expected three whole numbers p,k,c, e.g. 4,8,4") from None
    if len(shape) != 3 or min(shape) < 1:
        raise SplitError(f"--shape {value!r}: expected three whole numbers >= 1, p,k,c, e.g. 4,8,4")
    return shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model_name", required=True, help="local HF model dir (any family convert.py supports)")
    parser.add_argument("--data", required=True, help="parquet folder/file, save_to_disk folder, or text file")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--keep", type=int, help="number of layers to keep, shaped with the paper's proportions")
    group.add_argument("--shape", help="prelude,recurrent,coda layer counts, e.g. 4,8,4")
    parser.add_argument("--num_sequences", type=int, default=256, help="sample rows (default 256)")
    parser.add_argument("--max_length", type=int, default=512, help="tokens per row at most (default 512)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto (cuda if present, the default), cpu or cuda[:N]")
    parser.add_argument("--dtype", default=None, help="float32 (default on CPU) or bfloat16 (default on GPU)")
    parser.add_argument("--plot", help="write the figure here (.png or .pdf)")
    parser.add_argument("--out_json", help="write every statistic and the full ranking here")
    parser.add_argument("--top", type=int, default=5, help="splits listed (default 5)")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from retrofit.model.loading import quiet_transformers_bars

        device = resolve_device(args.device)
        dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise SplitError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16")
        if args.plot and Path(args.plot).suffix.lower() not in (".png", ".pdf"):
            raise SplitError(f"--plot {args.plot}: use a .png or .pdf file name")
        if args.batch_size < 1:
            raise SplitError(f"--batch_size must be >= 1, got {args.batch_size}")
        if args.top < 1:
            raise SplitError(f"--top must be >= 1 (splits listed), got {args.top}")
        shape = parse_shape(args.shape) if args.shape else paper_shape(args.keep)
        if not (Path(args.model_name) / "config.json").is_file():
            raise SplitError(f"--model_name {args.model_name} has no config.json: not a HF model directory")
        base_config = AutoConfig.from_pretrained(args.model_name)
        num_layers = base_config.num_hidden_layers
        if sum(shape) > num_layers:
            raise SplitError(f"shape {shape} keeps {sum(shape)} layers but {args.model_name} has only {num_layers}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model_name)
        except (OSError, ValueError):
            tokenizer = None
        ids, mask = load_sample_rows(args.data, tokenizer, args.num_sequences, args.max_length)
        check_token_ids(ids, base_config.vocab_size, args.data)  # before the weights load
        quiet_transformers_bars()
        model = AutoModelForCausalLM.from_pretrained(args.model_name, dtype=getattr(torch, dtype)).to(device).eval()
        print(f"{args.model_name}: {num_layers} layers; {ids.shape[0]} sequences, {int(mask.sum())} tokens from {args.data}",
              file=sys.stderr)
        stats = measure(model, ids, mask, args.batch_size, progress=not args.no_progress)
    except (SplitError, DataError, OSError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    ranked = rank_splits(stats, shape)
    paper = paper_style_split(stats.num_layers, shape, stats)
    print(layer_table(stats))
    print()
    print(f"shape (prelude, recurrent, coda) = {shape}, {len(ranked)} candidate splits; score = summed angular "
          "distance of the dropped runs (lower is better)")
    print(splits_table(ranked, paper, args.top))
    print()
    print("recommended converter flags:")
    print(f"  {ranked[0].flags()}")
    if args.plot:
        print(f"plot: {plot(stats, ranked, paper, args.plot)}")
    if args.out_json:
        print(f"statistics: {write_json(args.out_json, report(stats, shape, ranked, paper))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
