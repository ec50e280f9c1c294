"""Look inside the loop: read out every iteration of the recurrent block (docs/evaluation.md, Inside the loop).

    python inspect_recurrence.py CKPT (--text TEXT [--text TEXT ...] | --data PARQUET [--num_sequences N])
                                 [--num_steps R] [--out DIR] [--overwrite] [--device auto] [--seed S]

For every token and every iteration i = 1..R the coda and head read out the state after iteration
i (a logit lens): the top-1 next token, the entropy of the distribution p_i, KL(p_R || p_i) to the
last iteration's distribution and the rank of the actual next token. Writes into DIR (default
recurrence_inspection/; an existing DIR is kept unless --overwrite):

    readout.json   per sequence, per token, per iteration: top1_id, top1, entropy, kl_to_final, target_rank
    heatmap.png    tokens x iterations coloured by KL to the final iteration (top-1 tokens written in
                   when the grid is small) and by entropy
    pca.png        the latent states s_1..s_R of every token on the first two principal components

e.g. on the quickstart's recurrent model:

    python inspect_recurrence.py runs/quickstart/runs/recurrent/final_checkpoint --num_steps 16 \
        --text $'Q: Ava has 23 books. Ava buys 30 more and then gives away 9. How many books does Ava have now?\nA:'

--text is tokenized as is (with BOS where the tokenizer adds it; no chat template). --data reads the
first N rows (default 4) of a parquet shard or folder (`input_ids`, packed or of any lengths) and
inspects each row's real tokens (`attention_mask` 1, where the column exists). Each
sequence starts from its own seeded random state (--seed), so its table is the same alone or in
a batch with others.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from retrofit.train.depth import MAX_RECURRENCE

DEFAULT_OUT = "recurrence_inspection"
DEFAULT_DATA_SEQUENCES = 4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="recurrent checkpoint folder (config.json, weights, tokenizer)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="text to inspect (repeat for several sequences)")
    source.add_argument("--data", metavar="PARQUET", help="parquet file (or folder of them) with an input_ids column")
    parser.add_argument("--num_sequences", type=int, default=None,
                        help=f"with --data: the first N rows (default {DEFAULT_DATA_SEQUENCES})")
    parser.add_argument("--num_steps", type=int, default=None, help="iterations R (default: the config's mean_recurrence)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of each sequence's random initial state")
    args = parser.parse_args(argv)
    if not (Path(args.checkpoint) / "config.json").is_file():
        parser.error(f"checkpoint {args.checkpoint} has no config.json: not a model folder")
    for index, text in enumerate(args.text or []):
        if not text.strip():
            parser.error(f"--text number {index + 1} is empty")
    if args.data is not None and not Path(args.data).exists():
        parser.error(f"--data {args.data} does not exist")
    if args.num_sequences is not None and args.data is None:
        parser.error("--num_sequences applies to --data only")
    if args.num_sequences is not None and args.num_sequences < 1:
        parser.error(f"--num_sequences must be >= 1, got {args.num_sequences}")
    if args.num_steps is not None and not 1 <= args.num_steps <= MAX_RECURRENCE:
        parser.error(f"--num_steps must be in [1, {MAX_RECURRENCE}] (iterations of the recurrent block), got {args.num_steps}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if Path(args.out).exists() and not args.overwrite:
        parser.error(f"output folder {args.out} exists (--overwrite to replace it)")
    return args


def read_sequences(args, tokenizer) -> tuple[list[list[int]], list[str]]:
    """Token ids of each sequence to inspect and a label saying where it came from."""
    if args.text is not None:
        sequences = [tokenizer(text).input_ids for text in args.text]
        for index, ids in enumerate(sequences):
            if not ids:
                raise ValueError(f"--text number {index + 1} gives no tokens")
        return sequences, [f"text {index}" for index in range(len(sequences))]
    from retrofit.evaluate.logit_lens import read_parquet_sequences

    sequences = read_parquet_sequences(args.data, args.num_sequences or DEFAULT_DATA_SEQUENCES)
    return sequences, [f"row {index}" for index in range(len(sequences))]


def write_outputs(args, tables, sources, tokenizer, num_steps: int) -> Path:
    """readout.json, heatmap.png and pca.png in a temporary folder renamed to --out at the end."""
    from retrofit.analysis.lens_figures import LensPanel, write_figures
    from retrofit.atomic import atomic_directory, write_json_atomic
    from retrofit.evaluate.logit_lens import READOUT_DEFINITIONS, sequence_record, token_texts

    records = [sequence_record(i, source, lens, tokenizer) for i, (source, lens) in enumerate(zip(sources, tables))]
    panels = [
        LensPanel(title=f"Sequence {i} ({source})", tokens=token_texts(tokenizer, lens.token_ids),
                  top1=[[tok["iterations"][it]["top1"] for tok in record["tokens"]] for it in range(num_steps)],
                  entropy=lens.entropy, kl_to_final=lens.kl_to_final, states=lens.states)
        for i, (source, lens, record) in enumerate(zip(sources, tables, records))
    ]
    table = {"checkpoint": str(args.checkpoint), "num_steps": num_steps, "seed": args.seed,
             "definitions": READOUT_DEFINITIONS, "sequences": records}
    with atomic_directory(args.out) as tmp:
        write_json_atomic(tmp / "readout.json", table, indent=1)
        write_figures(panels, tmp)
    return Path(args.out)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from retrofit.data.rows import DataError
    from retrofit.errors import first_line
    from retrofit.evaluate.logit_lens import InspectError, inspect_sequences, summary_lines
    from retrofit.model.loading import load_saved_model, load_saved_tokenizer
    from retrofit.train.distributed import LaunchError, resolve_device

    start = time.perf_counter()
    try:
        device = resolve_device(args.device)
        try:
            tokenizer = load_saved_tokenizer(args.checkpoint)
            model = load_saved_model(args.checkpoint, torch.float32).to(device).eval()
        except (OSError, ValueError, KeyError, TypeError) as exc:  # no tokenizer files, no weights, bad config
            raise InspectError(f"{args.checkpoint} does not load: {first_line(exc)[:300]}") from None
        if not hasattr(model, "recur"):
            raise InspectError(f"{args.checkpoint} is not a recurrent model (model_type {model.config.model_type!r})")
        sequences, sources = read_sequences(args, tokenizer)
        num_steps = args.num_steps or int(model.config.mean_recurrence)
        tables = inspect_sequences(model, sequences, num_steps, seed=args.seed)
        out = write_outputs(args, tables, sources, tokenizer, num_steps)
    except (InspectError, DataError, LaunchError, ValueError) as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(tables)))
    tokens = sum(len(t.token_ids) for t in tables)
    print(f"{len(tables)} sequences, {tokens} tokens, {num_steps} iterations, {time.perf_counter() - start:.1f}s"
          f" -> {out}/readout.json, heatmap.png, pca.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
