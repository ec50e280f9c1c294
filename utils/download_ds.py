"""Download the paper's raw datasets from the Hugging Face Hub and save them with save_to_disk.

    python utils/download_ds.py --dataset_path DATA                       # all of them
    python utils/download_ds.py --dataset_path DATA --datasets nemotron-math sft-math
    python utils/download_ds.py --list                                    # what is available
    python utils/download_ds.py --dataset_path DATA --dry_run             # what would be fetched

Each dataset goes to DATA/datasets/<name> (the layout the original used). Resumable: a dataset
that is already saved completely is skipped, and each one is saved to a temp folder and renamed
into place, so an interrupted run never leaves a half-written dataset under the final name. The
Nvidia datasets are gated: accept their licence on the Hub and log in (`hf auth login`) first.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from retrofit.atomic import atomic_directory, remove_leftovers


@dataclass(frozen=True)
class HubDataset:
    repo: str
    config: str | None
    split: str | None  # None keeps every split (a DatasetDict)
    folder: str  # under DATASET_PATH/datasets/
    about: str


DATASETS = {
    "fineweb-edu": HubDataset(
        "HuggingFaceFW/fineweb-edu", "sample-350BT", "train", "fineweb_edu-350b", "FineWeb-Edu, 350B-token sample"
    ),
    "nemotron-math": HubDataset(
        "nvidia/Nemotron-CC-Math-v1",
        "4plus",
        None,
        "Nemotron-CC-Math-v1-4plus",
        "Nemotron-CC-Math-v1, 4plus quality (gated)",
    ),
    "sft-general": HubDataset(
        "nvidia/Nemotron-Pretraining-SFT-v1",
        "Nemotron-SFT-General",
        None,
        "Nemotron-Pretraining-SFT-v1-General",
        "Nemotron pretraining SFT, general (gated)",
    ),
    "sft-code": HubDataset(
        "nvidia/Nemotron-Pretraining-SFT-v1",
        "Nemotron-SFT-Code",
        None,
        "Nemotron-Pretraining-SFT-v1-Code",
        "Nemotron pretraining SFT, code (gated)",
    ),
    "sft-math": HubDataset(
        "nvidia/Nemotron-Pretraining-SFT-v1",
        "Nemotron-SFT-MATH",
        None,
        "Nemotron-Pretraining-SFT-v1-Math",
        "Nemotron pretraining SFT, math (gated)",
    ),
}


def is_complete(folder: Path) -> bool:
    """save_to_disk writes its metadata files last, so their presence marks a finished save."""
    if (folder / "dataset_dict.json").exists():
        import json

        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        return all(is_complete(folder / split) for split in splits)
    return (folder / "state.json").exists() and (folder / "dataset_info.json").exists()


def download(name: str, root: Path, num_proc: int | None = None, cache_dir: str | None = None, loader=None) -> str:
    """Fetch one dataset into root/datasets/<folder>; returns "saved" or "skipped".
    `loader(repo, config, split)` defaults to datasets.load_dataset (tests pass a local one)."""
    spec = DATASETS[name]
    target = root / "datasets" / spec.folder
    if is_complete(target):
        return "skipped"
    if target.exists():
        raise ValueError(f"{target} exists but is not a complete save_to_disk dataset; remove it and rerun")
    if loader is None:
        import datasets

        def loader(repo, config, split):
            return datasets.load_dataset(repo, config, split=split, num_proc=num_proc, cache_dir=cache_dir)

    dataset = loader(spec.repo, spec.config, spec.split)
    remove_leftovers(target.parent, target.name)  # our own leftovers of an interrupted save
    with atomic_directory(target) as tmp:
        dataset.save_to_disk(str(tmp), num_proc=num_proc)
    return "saved"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dataset_path", "--dataset-path", dest="dataset_path", help="root folder; datasets go to ROOT/datasets/"
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        metavar="NAME",
        default=list(DATASETS),
        help=f"subset of {list(DATASETS)} (default: all)",
    )
    parser.add_argument("--list", action="store_true", help="list the available datasets and exit")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="print what would be fetched and exit")
    parser.add_argument("--num_proc", type=int, default=None, help="processes for download/prepare and save")
    parser.add_argument("--cache_dir", default=None, help="HF datasets cache (default: HF_DATASETS_CACHE)")
    args = parser.parse_args(argv)

    if args.list:
        for name, spec in DATASETS.items():
            config = f" ({spec.config})" if spec.config else ""
            print(f"{name:14s} {spec.repo}{config} -> datasets/{spec.folder}   {spec.about}")
        return 0
    unknown = [n for n in args.datasets if n not in DATASETS]
    if unknown:
        print(f"error: unknown dataset(s) {unknown}; choose from {list(DATASETS)}", file=sys.stderr)
        return 2
    if not args.dataset_path:
        print("error: --dataset_path is required", file=sys.stderr)
        return 2
    root = Path(args.dataset_path)
    for name in args.datasets:
        spec = DATASETS[name]
        target = root / "datasets" / spec.folder
        config = f" ({spec.config})" if spec.config else ""
        if args.dry_run:
            state = "already saved, skip" if is_complete(target) else "would fetch"
            print(f"{state}: {spec.repo}{config} -> {target}")
            continue
        print(f"{name}: {spec.repo}{config} -> {target}", flush=True)
        try:
            status = download(name, root, args.num_proc, args.cache_dir)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"  {status}: {target}")
    print("done" if not args.dry_run else "dry run: nothing fetched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
