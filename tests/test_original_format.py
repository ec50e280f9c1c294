"""Checkpoints in the original release's format load exactly, with the original code's meaning.

The configs in tests/data/original_configs are the authors' config.json files for the paper's
three shapes (Huginn leftovers and all), with tiny sizes. Weights are random, saved under the
authors' key names. The reference is independent of this project's model: a real HF
LlamaForCausalLM / Olmo2ForCausalLM whose layer list is prelude + core_block * r + coda (the same
modules reused), with the adapter applied in a pre-hook of the first core layer. So embedding,
every layer, RoPE (incl. llama3 scaling), final norm and head are HF's own code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from retrofit.model.configuration_raven import RavenConfig
from retrofit.model.modeling_raven import RavenForCausalLM

DATA = Path(__file__).parent / "data" / "original_configs"
CONFIGS = {
    "tinyllama": "Recurrent-TinyLlama-4-8-4.config.json",
    "llama3": "Recurrent-Llama-3.2-4-6-4.config.json",
    "olmo2": "Recurrent-OLMo-2-1B-4-6-4.config.json",
}


def original_config(name: str) -> dict:
    return json.loads((DATA / CONFIGS[name]).read_text())


def hf_reference(name: str, seed: int = 0) -> nn.Module:
    """A random HF model with the config's dimensions and RoPE, one layer per distinct layer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Olmo2Config, Olmo2ForCausalLM

    c = original_config(name)
    rope = {"rope_type": "default", **(c.get("rope_scaling") or {}), "rope_theta": c["rope_theta"]}
    kwargs = dict(
        vocab_size=c["padded_vocab_size"], hidden_size=c["n_embd"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["n_layers_in_prelude"] + c["n_layers_in_recurrent_block"] + c["n_layers_in_coda"],
        num_attention_heads=c["n_heads"], num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
        rms_norm_eps=c["norm_eps"], max_position_embeddings=c["max_position_embeddings"], rope_parameters=rope,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = (Olmo2ForCausalLM(Olmo2Config(**kwargs)) if name == "olmo2" else LlamaForCausalLM(LlamaConfig(**kwargs)))
    with torch.no_grad():  # HF initialises norms to 1: make them random so a swapped norm shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model.eval()


def authors_state_dict(hf_model: nn.Module, name: str, adapter: torch.Tensor) -> dict[str, torch.Tensor]:
    """The HF weights under the authors' names (README of their release)."""
    c = original_config(name)
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    out = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "transformer.adapter.weight": adapter.clone(),
        "lm_head.weight": sd["lm_head.weight"],
    }
    groups = [("prelude", c["n_layers_in_prelude"]), ("core_block", c["n_layers_in_recurrent_block"]), ("coda", c["n_layers_in_coda"])]
    norms = ({"norm_1": "post_attention_layernorm", "norm_2": "post_feedforward_layernorm"} if name == "olmo2"
             else {"norm_1": "input_layernorm", "norm_2": "post_attention_layernorm"})
    i = 0
    for group, count in groups:
        for j in range(count):
            hf, ours = f"model.layers.{i}.", f"transformer.{group}.{j}."
            out[ours + "attn.Wqkv.weight"] = torch.cat([sd[hf + f"self_attn.{p}_proj.weight"] for p in "qkv"])
            out[ours + "attn.proj.weight"] = sd[hf + "self_attn.o_proj.weight"]
            out[ours + "mlp.fc.weight"] = torch.cat([sd[hf + "mlp.gate_proj.weight"], sd[hf + "mlp.up_proj.weight"]])
            out[ours + "mlp.proj.weight"] = sd[hf + "mlp.down_proj.weight"]
            for our_norm, hf_norm in norms.items():
                out[ours + f"{our_norm}.weight"] = sd[hf + f"{hf_norm}.weight"]
            if name == "olmo2":
                out[ours + "attn.q_norm.weight"] = sd[hf + "self_attn.q_norm.weight"]
                out[ours + "attn.k_norm.weight"] = sd[hf + "self_attn.k_norm.weight"]
            i += 1
    return out


@torch.no_grad()
def reference_logits(hf_model, name, adapter, input_ids, initial_state, r) -> torch.Tensor:
    """HF's own forward over prelude, r passes of the core layers and the coda, adapter in a hook."""
    c = original_config(name)
    p, k = c["n_layers_in_prelude"], c["n_layers_in_recurrent_block"]
    layers = list(hf_model.model.layers)
    prelude, core, coda = layers[:p], layers[p : p + k], layers[p + k :]
    state = {"calls": 0, "e": None}

    def save_prelude_output(_module, _args, output):
        state["e"] = output[0] if isinstance(output, tuple) else output

    def apply_adapter(_module, args):
        x = args[0]
        s = initial_state if state["calls"] == 0 else x
        state["calls"] += 1
        return (F.linear(torch.cat([s, state["e"]], dim=-1), adapter), *args[1:])

    hooks = [prelude[-1].register_forward_hook(save_prelude_output), core[0].register_forward_pre_hook(apply_adapter)]
    original, num_layers = hf_model.model.layers, hf_model.config.num_hidden_layers
    try:
        hf_model.model.layers = nn.ModuleList(prelude + core * r + coda)
        hf_model.config.num_hidden_layers = len(hf_model.model.layers)  # HF runs layers[:num_hidden_layers]
        logits = hf_model(input_ids=input_ids, use_cache=False).logits
    finally:
        hf_model.model.layers, hf_model.config.num_hidden_layers = original, num_layers
        for h in hooks:
            h.remove()
    assert state["calls"] == r
    return logits


def write_original_checkpoint(tmp_path: Path, name: str, seed: int = 0):
    """An original-format checkpoint dir: the authors' config.json + weights under their names."""
    hf_model = hf_reference(name, seed)
    h = original_config(name)["n_embd"]
    adapter = torch.randn(h, 2 * h, generator=torch.Generator().manual_seed(seed + 1)) / (2 * h) ** 0.5
    ckpt = tmp_path / f"Recurrent-{name}"
    ckpt.mkdir()
    shutil.copyfile(DATA / CONFIGS[name], ckpt / "config.json")
    save_file(authors_state_dict(hf_model, name, adapter), ckpt / "model.safetensors")
    return ckpt, hf_model, adapter


def inputs(name: str):
    c = original_config(name)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, c["vocab_size"], (2, 24), generator=gen)
    std = c["init_values"]["std"]
    s0 = torch.randn(2, 24, c["n_embd"], generator=gen).clamp(-3, 3) * std
    return ids, s0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_original_format_loads_and_computes_what_the_original_computes(tmp_path, name):
    from transformers import AutoModelForCausalLM

    ckpt, hf_model, adapter = write_original_checkpoint(tmp_path, name)
    direct = RavenForCausalLM.from_pretrained(ckpt).eval()
    auto = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    assert type(auto) is RavenForCausalLM
    c = original_config(name)
    for model in (direct, auto):
        assert model.config.rope_theta == c["rope_theta"]  # never rope_base (500000)
        assert model.config.rope_parameters["rope_type"] == (c.get("rope_scaling") or {}).get("rope_type", "default")
        assert (model.config.norm_placement, model.config.qk_norm) == (("post", "whole") if name == "olmo2" else ("pre", "none"))
        assert model.config.effective_expected_depth == c["n_layers_in_prelude"] + c["n_layers_in_coda"] + 32 * c["n_layers_in_recurrent_block"]
    ids, s0 = inputs(name)
    for r in (1, 4):
        expected = reference_logits(hf_model, name, adapter, ids, s0, r)
        with torch.no_grad():
            for model in (direct, auto):
                got = model(ids, num_steps=r, initial_state=s0).logits
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["llama3", "olmo2"])
def test_round_trip_keeps_logits_and_writes_both_rope_layouts(tmp_path, name):
    ckpt, _, _ = write_original_checkpoint(tmp_path, name)
    model = RavenForCausalLM.from_pretrained(ckpt).eval()
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    c = original_config(name)
    assert saved["rope_theta"] == c["rope_theta"]
    assert saved["rope_scaling"] == c.get("rope_scaling")  # the 4.51 layout (None for plain RoPE)
    assert saved["rope_parameters"]["rope_theta"] == c["rope_theta"]
    assert saved["norm_placement"] == ("post" if name == "olmo2" else "pre") and "layout_from_weights" not in saved
    reloaded = RavenForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids, s0 = inputs(name)
    with torch.no_grad():
        assert torch.equal(model(ids, num_steps=3, initial_state=s0).logits, reloaded(ids, num_steps=3, initial_state=s0).logits)


def test_weights_the_model_would_not_use_or_lacks_are_errors_naming_them(tmp_path):
    from safetensors.torch import load_file

    ckpt, _, _ = write_original_checkpoint(tmp_path, "tinyllama")
    weights = load_file(ckpt / "model.safetensors")
    extra = dict(weights, **{"transformer.core_block.0.attn.q_norm.weight": torch.ones(64)})
    # an OLMo-only tensor in a checkpoint whose config states the Llama layout explicitly
    config = original_config("tinyllama") | {"norm_placement": "pre", "qk_norm": False}
    (ckpt / "config.json").write_text(json.dumps(config))
    save_file(extra, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"does not use: transformer\.core_block\.0\.attn\.q_norm\.weight"):
        RavenForCausalLM.from_pretrained(ckpt)
    missing = {k: v for k, v in weights.items() if k != "transformer.coda.3.mlp.fc.weight"}
    save_file(missing, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks: transformer\.coda\.3\.mlp\.fc\.weight"):
        RavenForCausalLM.from_pretrained(ckpt)


def test_huginn_keys_ignored_and_the_ones_that_change_the_math_checked():
    c = original_config("tinyllama")
    config = RavenConfig(**c)
    assert config.rope_theta == 10000.0 and config.block_size == 4096 and config.layout_from_weights
    with pytest.raises(ValueError, match="injection_type='add'"):
        RavenConfig(**(c | {"injection_type": "add"}))
    # a Huginn-0125 config without rope_theta still gets its rope_base
    assert RavenConfig(**{k: v for k, v in c.items() if k != "rope_theta"}).rope_theta == 500000.0


@pytest.mark.parametrize("value", [0, -3, 2.5, "abc", True])
def test_loading_with_a_bad_depth_fails(tmp_path, value):
    ckpt, _, _ = write_original_checkpoint(tmp_path, "tinyllama")
    with pytest.raises(ValueError, match=f"mean_recurrence must be a whole number >= 1, got {value!r}"):
        RavenForCausalLM.from_pretrained(ckpt, mean_recurrence=value)
    assert RavenForCausalLM.from_pretrained(ckpt, mean_recurrence=4.0).config.mean_recurrence == 4


@pytest.fixture
def saved_with_tokenizer(tmp_path, tokenizer_dir):
    """An original-format checkpoint re-saved by this project (modeling files beside it) + a tokenizer."""
    from transformers import AutoTokenizer

    ckpt, _, _ = write_original_checkpoint(tmp_path, "tinyllama")
    out = tmp_path / "saved"
    RavenForCausalLM.from_pretrained(ckpt).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("value", [0, -3, 2.5, "abc"])
def test_lm_eval_model_args_with_a_bad_depth_fail_to_load(saved_with_tokenizer, value):
    """lm-eval's HF backend hands `mean_recurrence` from --model_args (parsed to int/float/str) to
    from_pretrained: a depth that is not a whole number >= 1 must stop it, not score 0 iterations."""
    from lm_eval.models.huggingface import HFLM

    with pytest.raises(ValueError, match=f"mean_recurrence must be a whole number >= 1, got {value!r}"):
        HFLM(pretrained=str(saved_with_tokenizer), trust_remote_code=True, device="cpu", mean_recurrence=value)
    assert HFLM(pretrained=str(saved_with_tokenizer), trust_remote_code=True, device="cpu",
                mean_recurrence=3).model.config.mean_recurrence == 3


@pytest.mark.slow
def test_lm_eval_cli_exits_non_zero_naming_the_bad_depth(saved_with_tokenizer, tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={saved_with_tokenizer},mean_recurrence=2.5,trust_remote_code=True", "--tasks", "arc_easy",
         "--device", "cpu", "--limit", "1", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert result.returncode != 0
    assert "mean_recurrence must be a whole number >= 1, got 2.5" in result.stderr
    assert not (tmp_path / "out").exists()
