"""Write Python's documentation topics as real-prose text datasets, with a held-out split by topic.

    python utils/make_python_docs_data.py --save_name runs/python_docs [--held_out_fraction 0.1] [--seed 0]

The text is `pydoc_data.topics.topics` (the pages `help()` shows: the language reference's
sections on statements, operators, data model, ...; 79 topics, about 465k characters), which ships
with every CPython, so no download is needed. Each topic is one document. Writes
  train/      a `save_to_disk` dataset (columns `text`, `topic`) for preprocess_data_packing.py
  held_out/   the same for the held-out topics: documents never trained on
  python_docs_data.json   the settings and which topics went where
Topics overlap (the "compound" page holds the whole "if", "while", "try" pages), so topics that
share a paragraph form one group and a group is held out whole: no held-out paragraph is in the
training text. Groups are taken in a seeded order (--seed) while the held-out text stays within
--held_out_fraction of the characters; the same seed and Python version give the same split. Pack each folder, and make the held-out one the `val/` shard folder (docs/data.md).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from retrofit.atomic import atomic_directory

DONE = "python_docs_data.json"
MIN_SHARED_PARAGRAPH = 80  # characters; shorter shared lines are headings and boilerplate


def python_doc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {name: topics[name].strip() for name in sorted(topics) if topics[name].strip()}


def overlapping_groups(topics: dict[str, str], min_paragraph: int = MIN_SHARED_PARAGRAPH) -> list[list[str]]:
    """Topics joined into groups that share a paragraph of at least `min_paragraph` characters.

    Topics are sections of the language reference and overlap: "compound" holds the whole "if",
    "while", "try", ... pages. Holding out "if" alone would leave its text in the training data.
    """
    parent = {name: name for name in topics}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    first_holder: dict[str, str] = {}
    for name, text in topics.items():
        for paragraph in (p.strip() for p in text.split("\n\n")):
            if len(paragraph) >= min_paragraph:
                other = first_holder.setdefault(paragraph, name)
                parent[root(name)] = root(other)
    groups: dict[str, list[str]] = {}
    for name in topics:
        groups.setdefault(root(name), []).append(name)
    return sorted(sorted(group) for group in groups.values())


def held_out_topics(topics: dict[str, str], fraction: float, seed: int) -> list[str]:
    """Whole groups of overlapping topics, in a seeded order, each taken while the held-out text
    stays within `fraction` of all characters (the smallest group if none fits)."""
    groups = overlapping_groups(topics)
    random.Random(seed).shuffle(groups)
    size = {tuple(group): sum(len(topics[name]) for name in group) for group in groups}
    budget = fraction * sum(len(text) for text in topics.values())
    chosen, chars = [], 0
    for group in groups:
        if chars + size[tuple(group)] <= budget:
            chosen += group
            chars += size[tuple(group)]
    if not chosen:
        chosen = min(groups, key=lambda group: size[tuple(group)])
    return sorted(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save_name", required=True, help="output folder (train/, held_out/)")
    parser.add_argument("--held_out_fraction", type=float, default=0.1,
                        help="most of the characters held out, in whole groups of topics (0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out topic order (0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save_name")
    args = parser.parse_args(argv)
    if not 0 < args.held_out_fraction < 1:
        parser.error(f"--held_out_fraction must be in (0, 1), got {args.held_out_fraction}")
    out = Path(args.save_name)
    if out.exists() and not args.overwrite:
        print(f"error: --save_name {out} already exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    from datasets import Dataset

    topics = python_doc_topics()
    held_out = held_out_topics(topics, args.held_out_fraction, args.seed)
    train = [name for name in topics if name not in set(held_out)]
    if not train:
        print(f"error: --held_out_fraction {args.held_out_fraction} leaves no topic to train on", file=sys.stderr)
        return 2
    splits = {"train": train, "held_out": held_out}
    record = {"source": "pydoc_data.topics (CPython %d.%d.%d)" % sys.version_info[:3],
              "held_out_fraction": args.held_out_fraction, "seed": args.seed}
    with atomic_directory(out) as tmp:
        for split, names in splits.items():
            Dataset.from_dict({"text": [topics[n] for n in names], "topic": names}).save_to_disk(str(tmp / split))
            record[split] = {"topics": names, "characters": sum(len(topics[n]) for n in names)}
        (tmp / DONE).write_text(json.dumps(record, indent=2))
    for split in splits:
        print(f"{split}: {len(record[split]['topics'])} topics, {record[split]['characters']:,} characters -> {out / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
