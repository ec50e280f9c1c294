"""Tiny real components for tests and benchmarks: HF base configs, recurrent configs, saved
models, packed parquet shards. Nothing is downloaded; shapes are small enough for 2 CPU cores.

Used by tests/conftest.py (the fixtures) and by the bench/ scripts that build throwaway runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

HF_FAMILIES = {"llama": ("LlamaConfig", 10000.0), "olmo2": ("Olmo2Config", 500000.0)}


def tiny_hf_config(family: str, vocab_size: int, **overrides):
    """A tiny HF base config of `family` ("llama" or "olmo2"): 8 layers, hidden 64, GQA 4/2,
    untied head, token ids bos 0 / eos 1 / pad 2 (the test tokenizer's)."""
    import transformers

    class_name, rope_theta = HF_FAMILIES[family]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=rope_theta,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    kwargs.update(overrides)
    return getattr(transformers, class_name)(**kwargs)


def tiny_llama_config(vocab_size: int, **overrides):
    return tiny_hf_config("llama", vocab_size, **overrides)


def tiny_olmo2_config(vocab_size: int, **overrides):
    return tiny_hf_config("olmo2", vocab_size, **overrides)


def save_hf_model(config, out_dir: Path, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    """Build a randomly initialised HF causal LM from `config` and save it (with a tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def tiny_raven_config(vocab_size: int, **overrides):
    """A tiny recurrent config: hidden 64, GQA 4/2, (1, 2, 1) layers, r = 4, k = 2."""
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
