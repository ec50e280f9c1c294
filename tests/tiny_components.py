"""Tiny real components for tests and benchmarks: HF base configs, recurrent configs, saved
models, packed parquet shards. Nothing is downloaded; shapes are small enough for 2 CPU cores.

Used by tests/conftest.py (the fixtures; pytest puts tests/ on sys.path, so `from tiny_components
import ...`) and by the bench/ scripts that build throwaway runs (bench/_common.py puts tests/ on
their sys.path).
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
    """A tiny config of `family` (FAMILY_OVERRIDES) with the shape of tiny_hf_config."""
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
    """Build a randomly initialised HF causal LM from `config` and save it (with a tokenizer);
    `randomize` also gives norms and biases random values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if randomize:
        randomize_norms_and_biases(model, seed)
    model.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def tiny_raven_config(vocab_size: int, **overrides):
    """A tiny recurrent config: hidden 64, GQA 4/2, (1, 2, 1) layers, r = 4, k = 2."""
    from retrofit.model.configuration_raven import RavenConfig

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

    from retrofit.model.modeling_raven import RavenForCausalLM

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


def write_tiny_gguf(path: str | Path, tokenizer_dir: str | Path, arch: str = "llama", layers: int = 2, hidden: int = 32,
                    heads: int = 4, kv_heads: int = 2, ffn: int = 64, seed: int = 0) -> Path:
    """A tiny float32 GGUF file in llama.cpp's layout: random weights of a Llama-shaped model of
    architecture `arch` (tied embeddings: no output.weight) and the byte-level BPE tokenizer of
    `tokenizer_dir` (its tokenizer.json: vocabulary, merges, special tokens, chat template)."""
    import json

    import gguf
    import numpy as np

    from retrofit.data.synthetic import CHAT_TEMPLATE

    spec = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    tokens = [token for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])]
    special = {added["content"]: added["id"] for added in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(special["<s>"])
    writer.add_eos_token_id(special["</s>"])
    writer.add_pad_token_id(special["<pad>"])
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def weight(*shape, offset=0.0):
        return (offset + 0.1 * rng.standard_normal(shape)).astype(np.float32)

    kv = kv_heads * (hidden // heads)
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    for i in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                            ("ffn_down", (hidden, ffn))):
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", weight(hidden, offset=1.0))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", weight(hidden, offset=1.0))
    writer.add_tensor("output_norm.weight", weight(hidden, offset=1.0))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# What a user must never see on stderr from a documented command: transformers' remote-code
# prompt, a traceback, or a deprecation warning the user cannot act on.
STDERR_NOISE = ("custom code", "Traceback", "deprecated", "DeprecationWarning", "FutureWarning", "[y/N]")


def stderr_noise(stderr: str) -> list[str]:
    """The lines of `stderr` holding any of STDERR_NOISE (empty when it is clean)."""
    return [line for line in stderr.splitlines() if any(marker in line for marker in STDERR_NOISE)]
