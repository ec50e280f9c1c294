"""The names in a run folder, `{out_path}/{run_name}/` (the original's): the checkpoint manager
(retrofit/train/checkpoint.py) writes them; evaluation and the results table find checkpoints by
them. Torch-free, so counting and plotting can import it."""

from __future__ import annotations

import re

FULL_CHECKPOINT_PREFIX = "checkpoint_"
MODEL_ONLY_PREFIX = "model_only_chkpt_"
FINAL_CHECKPOINT = "final_checkpoint"
METRICS_FILE = "metrics.jsonl"
FULL_CHECKPOINT_RE = re.compile(rf"^{FULL_CHECKPOINT_PREFIX}(\d+)$")
RUN_OUTPUT_RE = re.compile(
    rf"^({FULL_CHECKPOINT_PREFIX}\d+|{MODEL_ONLY_PREFIX}\d+|{FINAL_CHECKPOINT}|metrics\.jsonl|run\.json)$"
)


def full_checkpoint_name(step: int) -> str:
    return f"{FULL_CHECKPOINT_PREFIX}{step}"


def model_only_name(step: int) -> str:
    return f"{MODEL_ONLY_PREFIX}{step}"
