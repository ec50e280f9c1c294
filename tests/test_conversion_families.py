"""Conversion beyond the paper's bases: SmolLM2 (Llama, tied), Mistral (no sliding window), Qwen2
(q/k/v biases), Qwen3 (per-head q/k norms), built with the real HF classes; unsupported
architectures refused with one line; presets; convert.py's family detection."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from tiny_components import FAMILY_OVERRIDES, save_hf_model, tiny_family_config

from retrofit.model.conversion import (
    MIDDLE_DROP_RECIPE,
    PAPER,
    PRESET_DEFINITIONS,
    TINYLLAMA_RECIPE,
    ConversionError,
    LayerChoice,
    convert,
    layer_choice,
    main,
)
from retrofit.model.modeling_raven import RavenForCausalLM
from retrofit.model.split import paper_shape

CHOICE = LayerChoice(prelude=[0, 1], core=[4, 5], coda=[6, 7])
FAMILY_SWITCHES = {  # what each family becomes in the one model file
    "smollm2": ("pre", "none", False),
    "mistral": ("pre", "none", False),
    "qwen2": ("pre", "none", True),
    "qwen3": ("pre", "per_head", False),
}


@pytest.fixture(scope="module")
def converted(tiny_family_dirs, tmp_path_factory) -> dict[str, tuple[Path, list]]:
    """Each family converted in float32 (verification on), default adapter, mean_recurrence 3."""
    root = tmp_path_factory.mktemp("converted_families")
    return {family: convert(base, root / family, CHOICE, dtype="float32", mean_recurrence=3)
            for family, base in tiny_family_dirs.items()}


@pytest.mark.parametrize("family", list(FAMILY_OVERRIDES))
def test_each_family_converts_exactly_in_float32(converted, family):
    out, rows = converted[family]
    assert [row.name for row in rows][:2] == ["embedding", "prelude.0 (layer 0)"] and rows[-1].name == "logits"
    assert len(rows) == 2 + len(CHOICE.kept)
    # float32 on CPU: the converted layers compute bit for bit what the base's do
    assert max(row.max_abs_diff for row in rows) == 0.0, [(r.name, r.max_abs_diff) for r in rows]
    config = json.loads((out / "config.json").read_text())
    assert (config["norm_placement"], config["qk_norm"], config["qkv_bias"]) == FAMILY_SWITCHES[family]
    assert config["source_family"] == ("llama" if family == "smollm2" else family)
    model = RavenForCausalLM.from_pretrained(out)
    has_bias = model.transformer.core_block[0].attn.Wqkv.bias is not None
    assert has_bias == (family == "qwen2") and model.transformer.core_block[0].attn.proj.bias is None
    if family == "qwen3":
        assert model.transformer.prelude[0].attn.q_norm.weight.shape == (32,)  # head_dim, not q_dim


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "smollm2"])
def test_identity_adapter_equals_layer_dropped_base_at_any_recurrence(tiny_family_dirs, tmp_path, family):
    """The verification table bypasses the adapter; with the [0 | I] adapter the full forward at
    any depth is the base with only the kept layers (HF's own forward as the reference)."""
    from transformers import AutoModelForCausalLM

    base_dir = tiny_family_dirs[family]
    out, _ = convert(base_dir, tmp_path / "rec", CHOICE, dtype="float32", adapter_init="identity", verify=False)
    model = RavenForCausalLM.from_pretrained(out).eval()
    model.config.init_values["std"] = 0.0
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base.model.layers = torch.nn.ModuleList(base.model.layers[i] for i in CHOICE.kept)
    base.config.num_hidden_layers = len(CHOICE.kept)
    if hasattr(base.config, "layer_types"):
        base.config.layer_types = [base.config.layer_types[i] for i in CHOICE.kept]
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(ids, use_cache=False).logits
        for r in (1, 4):
            torch.testing.assert_close(model(ids, num_steps=r).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_left_padded_batched_generation_equals_each_prompt_alone(converted, family):
    model = RavenForCausalLM.from_pretrained(converted[family][0]).eval()
    model.config.init_values["std"] = 0.0
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 5)]
    T = 7
    ids = torch.full((3, T), 2)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_steps=3, eos_token_id=None, pad_token_id=2)
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=6, num_steps=3, eos_token_id=None)
        assert torch.equal(alone[0, len(p):], batched[b, T:])


@pytest.mark.slow
def test_converted_checkpoints_load_with_trust_remote_code_outside_the_repo(converted, tmp_path):
    """A fresh interpreter, cwd outside the repo, no PYTHONPATH: only the copied files define the model."""
    expected, dirs = {}, {}
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    for family, (out, _) in converted.items():
        dirs[family] = shutil.copytree(out, tmp_path / "elsewhere" / family)
        model = RavenForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            expected[family] = model(ids, num_steps=2, initial_state=torch.zeros(1, 9, 64)).logits
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path = [p for p in sys.path if not p.startswith({str(ROOT)!r}) and 'work/main' not in p or 'site-packages' in p]
        from transformers import AutoModelForCausalLM
        out = {{}}
        for family, path in {json.dumps({f: str(p) for f, p in dirs.items()})}.items():
            m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
            assert type(m).__module__.startswith('transformers_modules'), type(m).__module__
            with torch.no_grad():
                out[family] = m(torch.tensor({ids.tolist()}), num_steps=2, initial_state=torch.zeros(1, 9, 64)).logits
        assert 'retrofit' not in sys.modules, 'loaded from the repo, not the copied files'
        torch.save(out, {str(tmp_path / 'logits.pt')!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    for family in converted:
        torch.testing.assert_close(got[family], expected[family], rtol=0, atol=0)


def unsupported_bases(root: Path, vocab: int) -> dict[str, tuple[Path, str]]:
    """Tiny real HF bases this model cannot compute, each with the words its refusal must contain."""
    from transformers import GemmaConfig, MixtralConfig

    small = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=256)
    cases = {
        "mistral_window": (tiny_family_config("mistral", vocab, sliding_window=16),
                           "sliding-window attention in every layer (sliding_window=16 < max_position_embeddings=256)"),
        "qwen2_window": (tiny_family_config("qwen2", vocab, use_sliding_window=True, sliding_window=16, max_window_layers=4),
                         "sliding-window attention (sliding_window=16) in layers 4-7"),
        "qwen3_attention_bias": (tiny_family_config("qwen3", vocab, attention_bias=True), "attention_bias=True"),
        "yarn": (tiny_family_config("qwen2", vocab, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                                     "original_max_position_embeddings": 64}),
                 "rope_type='yarn'"),
        "mixtral": (MixtralConfig(**small, num_local_experts=2, num_experts_per_tok=1), "model_type='mixtral': a mixture-of-experts MLP"),
        "gemma": (GemmaConfig(**small, head_dim=16), "model_type='gemma': Gemma's RMSNorm scales by (1 + weight)"),
    }
    return {name: (save_hf_model(config, root / name), words) for name, (config, words) in cases.items()}


def test_unsupported_architectures_are_refused_with_one_line(tmp_path, capsys, tokenizer):
    bases = unsupported_bases(tmp_path, len(tokenizer))
    capsys.readouterr()
    for name, (base, words) in bases.items():
        save = tmp_path / f"out_{name}"
        code = main(None, ["--model_name", str(base), "--save_name", str(save), "--prelude_idx", "0", "--core_idx", "1,2",
                           "--coda_idx", "3"])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, (name, err)
        assert "supported" in err or "unsupported" in err
        assert not save.exists() and not list(tmp_path.glob(f".out_{name}.tmp-*"))


def test_window_as_long_as_the_context_is_no_window(tmp_path, tokenizer):
    """Mistral's sliding_window >= max_position_embeddings masks nothing: converted and exact."""
    base = save_hf_model(tiny_family_config("mistral", len(tokenizer), sliding_window=256), tmp_path / "base", randomize=True)
    _, rows = convert(base, tmp_path / "rec", CHOICE, dtype="float32")
    assert max(row.max_abs_diff for row in rows) == 0.0


@pytest.mark.slow
def test_convert_py_detects_the_family_and_old_scripts_refuse_other_families(tiny_family_dirs, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "convert_pretrained_model" / "convert.py"), "--model_name", str(tiny_family_dirs["qwen3"]),
         "--save_name", str(tmp_path / "q3"), "--prelude_idx", "0,1", "--core_idx", "4-5", "--coda_idx", "6,7", "--dtype", "float32"],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "core_block.1 (layer 5)" in result.stdout and "verification passed" in result.stdout
    assert json.loads((tmp_path / "q3" / "config.json").read_text())["qk_norm"] == "per_head"
    result = subprocess.run(
        [sys.executable, str(ROOT / "convert_pretrained_model" / "convert_llama.py"), "--model_name", str(tiny_family_dirs["qwen2"]),
         "--save_name", str(tmp_path / "q2"), "--prelude_idx", "0", "--core_idx", "1", "--coda_idx", "2"],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "model_type='qwen2', not a llama model" in result.stderr
    assert not (tmp_path / "q2").exists()


def test_preset_for_another_base_size_is_refused(tiny_family_dirs, tmp_path, capsys):
    code = main(None, ["--model_name", str(tiny_family_dirs["qwen2"]), "--save_name", str(tmp_path / "out"),
                       "--preset", "qwen2.5-0.5b-4-8-4"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--preset qwen2.5-0.5b-4-8-4 is for Qwen/Qwen2.5-0.5B (24 layers), but this base has 8 layers" in err
    assert not (tmp_path / "out").exists()


def test_presets_follow_their_stated_recipe():
    for name, preset in PRESET_DEFINITIONS.items():
        choice = layer_choice(name, None, None, None)
        choice.validate(preset.num_layers)  # in range, ordered, no overlap
        n = preset.num_layers
        if preset.source == TINYLLAMA_RECIPE:
            assert (choice.prelude, choice.core, choice.coda) == ([0, 1, 2, 3], list(range(n - 12, n - 4)), list(range(n - 4, n)))
        elif preset.source == MIDDLE_DROP_RECIPE:
            # The paper drops 12-27% of its bases' layers; these drop 4, one run inside the recurrent block.
            dropped = sorted(set(range(n)) - set(choice.kept))
            assert 0.12 <= len(dropped) / n <= 0.27 and dropped == list(range(dropped[0], dropped[0] + 4)), name
            assert choice.core[0] < dropped[0] and dropped[-1] < choice.core[-1], name
            p, k, c = paper_shape(n - 4)
            assert (choice.prelude, choice.coda) == (list(range(p)), list(range(n - c, n))) and len(choice.core) == k
            assert name.endswith(f"-{p}-{k}-{c}"), name
        else:
            assert preset.source == PAPER, name
        assert name.startswith(("tinyllama", "llama", "olmo", "smollm2", "qwen2.5", "qwen3"))


def test_preset_bases_build_with_the_real_hf_classes_on_meta():
    """Each preset's stored sizes make a valid HF config of its family (counted on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from retrofit.model.conversion import FAMILIES

    for name, preset in PRESET_DEFINITIONS.items():
        model_type = FAMILIES[preset.family].hf_model_types[0]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **preset.base_config))
        assert len(model.model.layers) == preset.num_layers, name


def test_bases_of_the_supported_families_pass_old_qk_norm_configs(tmp_path):
    """Configs written before qk_norm took "none" | "whole" | "per_head" (booleans) still load."""
    from retrofit.model.configuration_raven import RavenConfig

    assert RavenConfig(qk_norm=True).qk_norm == "whole" and RavenConfig(qk_norm=False).qk_norm == "none"
    assert RavenConfig().qk_norm == "none" and RavenConfig(qk_norm="per_head").qk_norm == "per_head"
    with pytest.raises(ValueError, match="qk_norm must be one of none, whole, per_head"):
        RavenConfig(qk_norm="both")
    with pytest.raises(ValueError, match="qkv_bias must be true or false"):
        RavenConfig(qkv_bias="yes")


def test_llama_and_olmo_keep_their_converted_config(tiny_llama_dir, tmp_path):
    out, _ = convert(tiny_llama_dir, tmp_path / "rec", CHOICE, dtype="float32", verify=False)
    saved = json.loads((out / "config.json").read_text())
    assert (saved["norm_placement"], saved["qk_norm"], saved["qkv_bias"], saved["bias"]) == ("pre", "none", False, False)
    with pytest.raises(ConversionError, match="not a olmo2 model"):
        convert(tiny_llama_dir, tmp_path / "x", CHOICE, family="olmo2")


def test_param_counter_counts_presets_on_meta(capsys):
    """The paper's counts (docs/model.md) and the bases' published sizes, from the stored sizes alone."""
    import json

    from param_counter import main as param_counter

    assert param_counter(["--preset", "all", "--num_rec", "1", "32"]) == 0
    reports = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(reports) == set(PRESET_DEFINITIONS)
    converted = {name: r["converted"]["non_embedding_at_r1"] for name, r in reports.items()}
    assert converted["tinyllama-4-8-4"] == 704_708_608 and converted["llama-2-4-2"] == 486_572_032
    assert converted["llama-4-6-4"] == 851_501_056 and converted["olmo-4-6-4"] == 939_638_784
    assert reports["tinyllama-4-8-4"]["converted"]["effective_params"]["32"] == 704_708_608 + 31 * 352_354_304
    # whole bases: SmolLM2-360M's published 361,821,120 parameters; Qwen2.5-0.5B 0.49B, 0.36B non-embedding
    assert reports["smollm2-360m-4-8-4"]["base_model"]["total"] == 361_821_120
    assert round(reports["qwen2.5-0.5b-4-8-4"]["base_model"]["total"] / 1e9, 2) == 0.49
    assert round(reports["qwen2.5-0.5b-4-8-4"]["base_model"]["non_embedding_at_r1"] / 1e9, 2) == 0.36
    assert round(reports["qwen3-0.6b-4-8-4"]["base_model"]["non_embedding_at_r1"] / 1e9, 2) == 0.44
    assert param_counter(["--preset", "nonsense"]) == 2
    assert "error: unknown --preset 'nonsense'" in capsys.readouterr().err
