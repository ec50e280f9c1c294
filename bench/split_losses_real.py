"""Held-out loss right after conversion of layer splits of a real base (docs/model.md, presets and choose_split).

    python bench/split_losses_real.py [--quickstart_dir runs/quickstart_smollm2] [--num_sequences 16] [--sweep 4]

Reads the base (base/) and the held-out rows (parquet/val) that shells/quickstart_smollm2.sh wrote.
With the identity adapter at recurrence 1 a converted model is the base with only the kept layers
(tests/test_conversion.py), so each split is scored by running the base with those layers (one
load, no conversion): the splits of docs/model.md (choose_split.py's recommendation and worst for
--keep 26, the chosen middle drop, the TinyLlama placement, the old smollm2-135m-4-8-4 preset) and,
with --sweep N, every run of N consecutive layers dropped. Prints a table and writes
QUICKSTART_DIR/split_losses.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from retrofit.atomic import write_file_atomic
from retrofit.model.conversion import parse_indices
from retrofit.evaluate.loss_over_depth import inputs_and_labels, load_eval_rows, per_sequence_loss

# name -> kept base layers (prelude | recurrent block | coda), SmolLM2-135M's 30 layers.
NAMED_SPLITS = {
    "base, all 30 layers": "0-29",
    "choose_split --keep 26 recommended = paper-style (drops 7-10)": "0-6,11-22,23-29",
    "choose_split --keep 26 worst (drops 0,8,21,29)": "1-7,9-20,22-28",
    "chosen, smollm2-135m-7-12-7 (drops 14-17)": "0-6,7-13,18-22,23-29",
    "TinyLlama placement (4,18,4) (drops 4-7)": "0-3,8-25,26-29",
    "smollm2-135m-4-8-4 (16 kept)": "0-3,18-25,26-29",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart_dir", default="runs/quickstart_smollm2")
    parser.add_argument("--num_sequences", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--sweep", type=int, default=0, help="also drop every run of this many consecutive layers")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    out = Path(args.quickstart_dir)
    if not (out / "base/config.json").exists() or not (out / "parquet/val").exists():
        print(f"error: {out} has no base/ and parquet/val/: run bash shells/quickstart_smollm2.sh {out} first", file=sys.stderr)
        return 2
    rows, mask = load_eval_rows(str(out / "parquet/val"), args.num_sequences)
    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32).eval()
    layers = base.model.layers
    splits = {name: parse_indices(kept) for name, kept in NAMED_SPLITS.items()}
    n = len(layers)
    for start in range(n - args.sweep + 1) if args.sweep else ():
        splits[f"drop {start}-{start + args.sweep - 1}"] = [i for i in range(n) if not start <= i < start + args.sweep]
    results = {}
    for name, kept in tqdm(splits.items(), desc="splits", file=sys.stderr):
        base.model.layers = nn.ModuleList(layers[i] for i in kept)
        losses = []
        with torch.no_grad():
            for start in range(0, len(rows), args.batch_size):
                ids, attention, labels = inputs_and_labels(rows[start:start + args.batch_size], mask[start:start + args.batch_size])
                losses += per_sequence_loss(base(input_ids=ids, attention_mask=attention, use_cache=False).logits, labels).tolist()
        results[name] = sum(losses) / len(losses)
    for name, loss in results.items():
        print(f"{loss:8.3f}  {name}")
    write_file_atomic(out / "split_losses.json", json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
