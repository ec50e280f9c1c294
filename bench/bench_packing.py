"""Throughput of tokenize + pack: ours (preprocess_data_packing.process_data, numpy packing,
forked workers) against a plain `datasets.map` + Python-list packing baseline, same data, same
run, 1 and 2 worker processes. Both go from a save_to_disk text dataset to a save_to_disk packed
dataset of max_length + 1 rows. Then packing alone (already tokenized) in numpy vs Python lists.

    .venv/bin/python bench/bench_packing.py [--docs 6000] [--max_length 1024]

Prints tokens/s and the ratios; no absolute number is asserted anywhere.
"""

from __future__ import annotations

import argparse
import bisect
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from retrofit.data.packing import pack_best_fit, pack_wrapped, tokenize_texts  # noqa: E402
from retrofit.data.synthetic import arithmetic_problems, problem_text, train_tokenizer  # noqa: E402


def make_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of 1..40 word problems each (tens to ~2,000 tokens), like web text lengths."""
    rng = random.Random(seed)
    pool = [problem_text(p) for p in arithmetic_problems(2000, seed=seed)]
    return ["\n\n".join(rng.choices(pool, k=min(40, int(rng.expovariate(1 / 8)) + 1))) for _ in range(n_docs)]


def baseline(raw_dir: Path, out_dir: Path, tokenizer_dir: Path, seq_len: int, num_proc: int) -> int:
    """The plain way: datasets.map to tokenize (text + eos string), datasets.map to pack each
    batch with Python lists (wrapped, last chunk of a batch padded), save_to_disk."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.model_max_length = int(1e30)
    pad = tokenizer.pad_token_id

    def tokenize(batch):
        return {"input_ids": tokenizer([t.strip() + tokenizer.eos_token for t in batch["text"]])["input_ids"]}

    def pack(batch):
        stream = [tok for ids in batch["input_ids"] for tok in ids]
        rows = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
        masks = [[1] * len(r) + [0] * (seq_len - len(r)) for r in rows]
        rows = [r + [pad] * (seq_len - len(r)) for r in rows]
        return {"input_ids": rows, "attention_mask": masks}

    ds = datasets.load_from_disk(str(raw_dir))
    nproc = num_proc if num_proc > 1 else None
    tok = ds.map(tokenize, batched=True, batch_size=1024, num_proc=nproc, remove_columns=ds.column_names)
    n_tokens = sum(len(x) for x in tok.data.table.column("input_ids").to_pylist())
    packed = tok.map(pack, batched=True, batch_size=1024, num_proc=nproc, remove_columns=tok.column_names)
    packed.save_to_disk(str(out_dir))
    return n_tokens


def python_wrapped(token_lists, seq_len, pad):
    stream = [t for ids in token_lists for t in ids]
    rows = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    rows[-1] = rows[-1] + [pad] * (seq_len - len(rows[-1]))
    return rows


def python_best_fit(token_lists, seq_len, pad):
    """Best-fit decreasing with a sorted list of (free, bin) and bisect."""
    bins, free = [], []  # free: sorted [(free_slots, bin)]
    for ids in sorted(token_lists, key=len, reverse=True):
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len]
            i = bisect.bisect_left(free, (len(piece), -1))
            if i < len(free):
                room, b = free.pop(i)
            else:
                room, b = seq_len, len(bins)
                bins.append([])
            bins[b].extend(piece)
            if room - len(piece):
                bisect.insort(free, (room - len(piece), b))
    return [b + [pad] * (seq_len - len(b)) for b in bins]


def timed(fn, repeats: int = 1):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=6000)
    parser.add_argument("--max_length", type=int, default=1024)
    args = parser.parse_args(argv)
    seq_len = args.max_length + 1

    import datasets

    datasets.disable_caching()
    datasets.disable_progress_bars()
    from transformers import AutoTokenizer

    from retrofit.data.preprocess import process_data

    work = Path(tempfile.mkdtemp(prefix="bench_packing_"))
    try:
        corpus = make_corpus(args.docs)
        tokenizer_dir = work / "tokenizer"
        train_tokenizer(corpus[:500], tokenizer_dir, vocab_size=2048)
        raw = work / "raw"
        datasets.Dataset.from_dict({"text": corpus}).save_to_disk(str(raw))
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        n_tokens = len(tokenize_texts(tokenizer, corpus, tokenizer.eos_token_id).tokens)
        print(f"{args.docs:,} documents, {n_tokens:,} tokens, rows of {seq_len} tokens, {os.cpu_count()} CPUs\n")

        results = {}
        for num_proc in (1, 2):
            t_ours, _ = timed(
                lambda: process_data(
                    tokenizer_name=str(tokenizer_dir),
                    dataset_location=str(raw),
                    max_length=args.max_length,
                    num_proc=num_proc,
                    save_path=str(work / f"ours{num_proc}"),
                    progress=False,
                    overwrite=True,
                )
            )
            t_base, base_tokens = timed(
                lambda: baseline(raw, work / f"base{num_proc}", tokenizer_dir, seq_len, num_proc)
            )
            assert base_tokens == n_tokens, (base_tokens, n_tokens)  # same work on both sides
            results[num_proc] = (n_tokens / t_ours, n_tokens / t_base)

        print("tokenize + pack (wrapped), dataset on disk -> packed dataset on disk, tokens/s")
        print(f"{'workers':>8} {'ours':>14} {'datasets.map baseline':>22} {'ours / baseline':>16}")
        for num_proc, (ours, base) in results.items():
            print(f"{num_proc:>8} {ours:>14,.0f} {base:>22,.0f} {ours / base:>15.2f}x")
        print(
            f"2-worker / 1-worker scaling: ours {results[2][0] / results[1][0]:.2f}x,"
            f" baseline {results[2][1] / results[1][1]:.2f}x\n"
        )

        docs = tokenize_texts(tokenizer, corpus, tokenizer.eos_token_id)
        lists = [docs.tokens[a:b].tolist() for a, b in zip(docs.offsets[:-1], docs.offsets[1:])]
        print("packing only (already tokenized), tokens/s")
        for name, ours_fn, python_fn in (
            ("wrapped", lambda: pack_wrapped(docs, seq_len, 2), lambda: python_wrapped(lists, seq_len, 2)),
            ("best_fit", lambda: pack_best_fit(docs, seq_len, 2), lambda: python_best_fit(lists, seq_len, 2)),
        ):
            t_ours, rows = timed(ours_fn, repeats=3)
            t_py, py_rows = timed(python_fn, repeats=1)
            rows = rows[0] if isinstance(rows, tuple) else rows
            print(
                f"  {name:9s} numpy {n_tokens / t_ours:>14,.0f}   python lists {n_tokens / t_py:>12,.0f}"
                f"   ratio {t_py / t_ours:6.1f}x   rows {len(rows):,} vs {len(py_rows):,}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
