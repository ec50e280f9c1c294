"""Train a retrofitted recurrent model (or a plain HF baseline) with a curriculum of recurrences.

    python train.py --model_name=DIR --preprocessed_data_path=PARQUET_DIR --is_parquet_dataset=true \
        --max_length=1024 --micro_batch_size=8 --batch_size=32 --max_steps=25000 --save_interval=1000 \
        --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.25 --muon.use_muon=true

Flag names and defaults are the original train.py's, so the paper's shell commands run unchanged;
`--config run.yaml` reads the same flags from YAML, `--device` picks cpu/cuda (auto by default).
Launch one process per GPU with `torchrun --nproc_per_node N train.py ...` or `srun python train.py ...`.

The run folder gets run.json (every setting, the resolved curriculum, tokens per step, world size,
package versions), metrics.jsonl and the checkpoints, each with its own copy of run.json.
Settings: retrofit/train/config.py; the loop: retrofit/train/trainer.py; outputs and resuming: docs/training.md.
"""

from __future__ import annotations

import sys

from retrofit.openmp import passive_openmp_wait

passive_openmp_wait()  # before torch starts OpenMP: --compile's kernels would slow the eager ops between them
from retrofit.train.config import parse_config  # noqa: E402
from retrofit.train.trainer import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)  # flags (and --config YAML) -> TrainConfig
    return run(cfg)  # validate, build the Trainer (data, model, optimizer, resume), train


if __name__ == "__main__":
    sys.exit(main())
