"""Shared fixtures: a tokenizer trained here and tiny real HF base models, built once per session.

Nothing is downloaded. Tests that need a different shape build their own model from a config.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Tiny models on a 2-core machine: one intra-op thread per process is several times faster than
# torch's default (thread hand-offs dominate such small matmuls, and subprocess tests such as DDP
# would oversubscribe the cores). Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The authors' published raw results, shipped with the repository (paper_plots/data/README.md).
PAPER_DATA = ROOT / "paper_plots" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from retrofit.data.synthetic import arithmetic_problems, problem_text, train_tokenizer  # noqa: E402
from tiny_components import (  # noqa: E402
    pack_token_rows,
    save_hf_model,
    FAMILY_OVERRIDES,
    save_raven_model,
    tiny_family_config,
    tiny_llama_config,
    tiny_olmo2_config,
    tiny_raven_config,
    write_token_parquet,
)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return [problem_text(p) for p in arithmetic_problems(400, seed=0)]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus, out, vocab_size=384)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    """A tiny random Llama (8 layers, GQA 4/2) saved in HF format with the test tokenizer."""
    out = tmp_path_factory.mktemp("tiny_llama")
    return save_hf_model(tiny_llama_config(len(tokenizer)), out, tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_olmo2_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tiny_olmo2")
    return save_hf_model(tiny_olmo2_config(len(tokenizer)), out, tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_family_dirs(tmp_path_factory, tokenizer_dir, tokenizer) -> dict[str, Path]:
    """Tiny random SmolLM2 / Mistral / Qwen2 / Qwen3 bases (random norms and biases), with the test tokenizer."""
    root = tmp_path_factory.mktemp("tiny_families")
    return {
        family: save_hf_model(tiny_family_config(family, len(tokenizer)), root / family, tokenizer_dir, randomize=True)
        for family in FAMILY_OVERRIDES
    }


@pytest.fixture(scope="session")
def train_raven_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    """A tiny random recurrent model (1 prelude, 2 recurrent, 1 coda layer; r=4, k=2)."""
    return save_raven_model(tiny_raven_config(len(tokenizer)), tmp_path_factory.mktemp("train_raven"), tokenizer_dir)


@pytest.fixture(scope="session")
def train_parquet_dir(tmp_path_factory, tokenizer, corpus) -> Path:
    """Packed rows of 33 tokens (max_length 32) in 4 parquet shards with row groups of 16."""
    rows = pack_token_rows(tokenizer, corpus, 33)
    return write_token_parquet(rows, tmp_path_factory.mktemp("train_parquet"), num_shards=4, row_group_size=16)


@pytest.fixture(scope="module")
def base_args(train_raven_dir, train_parquet_dir):
    """train.py flags of a 4-step curriculum run on the tiny recurrent model, saving every step
    (the run-safety and save-fault tests resume from these checkpoints)."""
    return [f"--model_name={train_raven_dir}", f"--preprocessed_data_path={train_parquet_dir}",
            "--is_parquet_dataset=true", "--max_length=32", "--micro_batch_size=2", "--batch_size=2",
            "--max_steps=4", "--save_interval=1", "--optim_config.lr=1e-3", "--mean_recurrence_schedule.turn_on=true",
            "--mean_recurrence_schedule.max_mean_rec=3", "--mean_recurrence_schedule.warmup=0.5"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and immune to a busy second core (restored after).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- evaluation fixtures (tests/test_eval_*.py) -----------------------------------------------
@pytest.fixture(scope="session")
def eval_run_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A run folder with `model_only_chkpt_10/`: the tiny Llama converted (prelude 0-1, recurrent
    block 4-5, coda 6-7), float32, with init_values.std = 0 so the initial state is zeros and every
    evaluation is deterministic (converted models default to Huginn's random state)."""
    import json

    from retrofit.model.conversion import LayerChoice, convert

    run = tmp_path_factory.mktemp("eval_run")
    ckpt = run / "model_only_chkpt_10"
    convert(tiny_llama_dir, ckpt, LayerChoice([0, 1], [4, 5], [6, 7]), dtype="float32", mean_recurrence=4)
    config = json.loads((ckpt / "config.json").read_text())
    config["init_values"]["std"] = 0.0
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    return run
