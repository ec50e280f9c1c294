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

from retrofit.synthetic import arithmetic_problems, problem_text, train_tokenizer  # noqa: E402


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


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_olmo2_config(vocab_size: int, **overrides):
    from transformers import Olmo2Config

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    kwargs.update(overrides)
    return Olmo2Config(**kwargs)


# Tiny bases of the other supported families, built with the real HF classes (SmolLM2 is a Llama
# with tied embeddings; Mistral without a sliding window; Qwen2 with q/k/v biases; Qwen3 with
# per-head q/k norms and a head_dim that is not hidden_size / heads, as in the real Qwen3).
FAMILY_OVERRIDES = {
    "smollm2": dict(model_type="llama", tie_word_embeddings=True, num_attention_heads=8, num_key_value_heads=4,
                    head_dim=8, rope_theta=100000.0),
    "mistral": dict(model_type="mistral", sliding_window=None, rope_theta=1000000.0),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True, head_dim=32, rope_theta=1000000.0),
}


def tiny_family_config(family: str, vocab_size: int, **overrides):
    """A tiny config of `family` (FAMILY_OVERRIDES) with the shape of tiny_llama_config."""
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    kwargs.update(FAMILY_OVERRIDES[family])
    kwargs.update(overrides)
    model_type = kwargs.pop("model_type")
    theta = kwargs.pop("rope_theta")
    kwargs.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": theta})
    return AutoConfig.for_model(model_type, **kwargs)


def randomize_norms_and_biases(model, seed: int = 0) -> None:
    """HF initialises norm weights to 1 and biases to 0: a swapped norm or a dropped bias would
    not change the output. Random values make every converted tensor count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            elif name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def save_hf_model(config, out_dir: Path, tokenizer_dir: Path | None = None, seed: int = 0, randomize: bool = False) -> Path:
    """Build a randomly initialised HF causal LM from `config` and save it (with a tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if randomize:
        randomize_norms_and_biases(model, seed)
    model.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


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


# ---- training fixtures (tests/test_train_*.py) ------------------------------------------------
def pack_token_rows(tokenizer, texts, row_len: int) -> list[list[int]]:
    """Concatenate tokenized texts (each ending in EOS) and cut them into rows of row_len tokens."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return [stream[i : i + row_len] for i in range(0, len(stream) - row_len + 1, row_len)]


def write_token_parquet(rows, out_dir: Path, num_shards: int = 2, row_group_size: int = 16, masks=None) -> Path:
    """Parquet shards `shard-00000.parquet`... with `input_ids` and `attention_mask` list columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    masks = masks if masks is not None else [[1] * len(r) for r in rows]
    per_shard = -(-len(rows) // num_shards)
    for shard in range(num_shards):
        part = slice(shard * per_shard, (shard + 1) * per_shard)
        table = pa.table({"input_ids": rows[part], "attention_mask": masks[part]})
        pq.write_table(table, out_dir / f"shard-{shard:05d}.parquet", row_group_size=row_group_size)
    return out_dir


def tiny_raven_config(vocab_size: int, **overrides):
    from retrofit.configuration_raven import RavenConfig

    kwargs = dict(
        n_embd=64,
        n_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        n_layers_in_prelude=1,
        n_layers_in_recurrent_block=2,
        n_layers_in_coda=1,
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        mean_recurrence=4,
        mean_backprop_depth=2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    kwargs.update(overrides)
    return RavenConfig(**kwargs)


def save_raven_model(config, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer

    from retrofit.modeling_raven import RavenForCausalLM

    torch.manual_seed(seed)
    RavenForCausalLM(config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def train_raven_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    """A tiny random recurrent model (1 prelude, 2 recurrent, 1 coda layer; r=4, k=2)."""
    return save_raven_model(tiny_raven_config(len(tokenizer)), tmp_path_factory.mktemp("train_raven"), tokenizer_dir)


@pytest.fixture(scope="session")
def train_parquet_dir(tmp_path_factory, tokenizer, corpus) -> Path:
    """Packed rows of 33 tokens (max_length 32) in 4 parquet shards with row groups of 16."""
    rows = pack_token_rows(tokenizer, corpus, 33)
    return write_token_parquet(rows, tmp_path_factory.mktemp("train_parquet"), num_shards=4, row_group_size=16)


# ---- evaluation fixtures (tests/test_eval_*.py) -----------------------------------------------
@pytest.fixture(scope="session")
def eval_run_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A run folder with `model_only_chkpt_10/`: the tiny Llama converted (prelude 0-1, recurrent
    block 4-5, coda 6-7), float32, with init_values.std = 0 so the initial state is zeros and every
    evaluation is deterministic (converted models default to Huginn's random state)."""
    import json

    from retrofit.conversion import LayerChoice, convert

    run = tmp_path_factory.mktemp("eval_run")
    ckpt = run / "model_only_chkpt_10"
    convert(tiny_llama_dir, ckpt, LayerChoice([0, 1], [4, 5], [6, 7]), dtype="float32", mean_recurrence=4)
    config = json.loads((ckpt / "config.json").read_text())
    config["init_values"]["std"] = 0.0
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    return run
