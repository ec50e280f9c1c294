"""Train a retrofitted recurrent model (or a plain HF baseline) with a curriculum of recurrences.

    python train.py --model_name=DIR --preprocessed_data_path=PARQUET_DIR --is_parquet_dataset=true \
        --max_length=1024 --micro_batch_size=8 --batch_size=32 --max_steps=25000 --save_interval=1000 \
        --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.25 --muon.use_muon=true

Flag names and defaults are the original train.py's, so the paper's shell commands run unchanged;
`--config run.yaml` reads the same flags from YAML, `--device` picks cpu/cuda (auto by default).
Launch one process per GPU with `torchrun --nproc_per_node N train.py ...` or `srun python train.py ...`.

The run folder gets run.json (every setting, the resolved curriculum, tokens per step, world size,
package versions), metrics.jsonl and the checkpoints, each with its own copy of run.json.
Settings: retrofit/train/config.py; the run folder's claim: retrofit/train/run_claim.py; the loop:
retrofit/train/trainer.py; outputs and resuming: docs/training.md.
"""

from __future__ import annotations

import sys

from retrofit.openmp import passive_openmp_wait

passive_openmp_wait()  # before torch starts OpenMP: --compile's kernels would slow the eager ops between them
from retrofit.data.rows import DataError  # noqa: E402
from retrofit.errors import ConfigError  # noqa: E402
from retrofit.train import distributed as dist_utils  # noqa: E402
from retrofit.train.checkpoint import CheckpointError, TrainingError  # noqa: E402
from retrofit.train.config import check_model_name, parse_config  # noqa: E402
from retrofit.train.run_claim import claim_run_dir, release_run_dir  # noqa: E402
from retrofit.train.trainer import Trainer  # noqa: E402

USER_ERRORS = (ConfigError, DataError, CheckpointError, dist_utils.LaunchError)


def main(argv: list[str] | None = None) -> int:
    """Parse and check the flags, claim the run folder, build the Trainer (data, model, optimizer,
    resume), train, release the folder. A setting the user can fix: one `error:` line, exit status
    2; a run that cannot go on (TrainingError): one `error:` line, exit status 1."""
    cfg = parse_config(argv)  # flags (and --config YAML) -> TrainConfig
    try:
        cfg.validate()
        check_model_name(cfg.model_name)  # before the claim: a typo never touches (or --overwrite clears) a run
        env = dist_utils.setup(cfg.device, single_process_group=cfg.fsdp)  # FSDP needs a group, even of one
        claimed = claim_run_dir(cfg, env)  # the lock is held until release_run_dir below
        if claimed and env.is_main:
            print(claimed, flush=True)
        trainer = Trainer(cfg, env)
        trainer.print(trainer.describe())
        try:
            message = trainer.train()
        finally:
            trainer.metrics.close()
            trainer.watcher.close()
            trainer.progress.close()
        trainer.print(message)
        return 0
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        release_run_dir(cfg)
        dist_utils.cleanup()


if __name__ == "__main__":
    sys.exit(main())
