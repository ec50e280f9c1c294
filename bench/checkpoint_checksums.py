"""What verified checkpoints cost: saving and loading a training state of --megabytes MB (float32
tensors shaped like weights + two Adam moments) with checksums against without, in the same run.

- save: `torch.save` alone (baseline) vs `save_training_state` (temp folder, torch.save, SHA-256 of
  the file into COMPLETE, rename);
- load: `torch.load(weights_only=True)` alone (baseline) vs `load_training_state` (checksums
  verified, then the same load).

    .venv/bin/python bench/checkpoint_checksums.py [--megabytes 512] [--dir /path/on/the/real/disk]

Prints wall times and ratios (best of --repeats); no absolute number is asserted anywhere. The
numbers depend on the disk and page cache: run it where the checkpoints live.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from retrofit.train import checkpoint as ckpt


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=512, help="size of the training state")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args(argv)

    per_tensor = 4 * 1024 * 1024  # 4 MB float32 tensors, a third each for weights / exp_avg / exp_avg_sq
    count = max(3, args.megabytes * 1024 * 1024 // per_tensor // 3 * 3)
    tensors = [torch.randn(per_tensor // 4) for _ in range(count)]
    third = count // 3
    state = {
        "model": {f"w{i}": t for i, t in enumerate(tensors[:third])},
        "optimizer": {"state": {i: {"exp_avg": tensors[third + i], "exp_avg_sq": tensors[2 * third + i].abs()}
                                for i in range(third)}},
        "optimizer_step": 1,
    }
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        plain = root / "plain.pt"
        save_plain = best_of(args.repeats, lambda: torch.save(state, plain))
        save_checked = best_of(args.repeats, lambda: ckpt.save_training_state(root / "checkpoint_1", state))
        load_plain = best_of(args.repeats, lambda: torch.load(plain, weights_only=True))
        load_checked = best_of(args.repeats, lambda: ckpt.load_training_state(root / "checkpoint_1"))
        size_mb = plain.stat().st_size / 2**20
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"training state: {size_mb:.0f} MB, best of {args.repeats}")
    print(f"save: torch.save {save_plain:.2f}s | with checksums {save_checked:.2f}s | ratio {save_checked / save_plain:.2f}x")
    print(f"load: torch.load {load_plain:.2f}s | verified {load_checked:.2f}s | ratio {load_checked / load_plain:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
