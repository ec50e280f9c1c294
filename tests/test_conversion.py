"""Conversion of real (tiny, randomly initialised) HF Llama / OLMo-2 models, and its CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from retrofit.model.conversion import ConversionError, LayerChoice, convert, layer_choice, parse_indices
from retrofit.model.modeling_raven import RavenForCausalLM
from tiny_components import save_hf_model, tiny_hf_config, tiny_llama_config

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 500000.0,
}
CHOICE = LayerChoice(prelude=[0, 1], core=[4, 5], coda=[6, 7])


def run_cli(script: str, *args: str) -> subprocess.CompletedProcess:
    """The real script in a fresh interpreter (slow: used once per script)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "convert_pretrained_model" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def run_main(capsys, family: str, *args: str) -> tuple[int, str, str]:
    """The converters' shared CLI in-process (what both scripts call), for the many error cases."""
    from retrofit.model.conversion import main

    code = main(family, list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def load_script(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llama3_gqa_dir(tmp_path_factory, tokenizer_dir, tokenizer):
    """A Llama-3.2-like model: GQA, llama3 rope scaling, tied embeddings (converted models untie)."""
    cfg = tiny_llama_config(len(tokenizer), rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)
    return save_hf_model(cfg, tmp_path_factory.mktemp("llama3"), tokenizer_dir)


@pytest.fixture(scope="module")
def tinyllama_shaped_dir(tmp_path_factory, tokenizer_dir, tokenizer):
    """TinyLlama's shape scaled down: 22 layers, 8:1 query/kv heads, rope theta 1e4."""
    cfg = tiny_llama_config(len(tokenizer), num_hidden_layers=22, hidden_size=64, num_attention_heads=8,
                            num_key_value_heads=1, intermediate_size=176)
    return save_hf_model(cfg, tmp_path_factory.mktemp("tinyllama"), tokenizer_dir)


def max_diffs(rows):
    return {row.name: row.max_abs_diff for row in rows}


@pytest.mark.parametrize("base_fixture,family,choice", [
    ("llama3_gqa_dir", "llama", CHOICE),
    ("tinyllama_shaped_dir", "llama", layer_choice("tinyllama-4-8-4", None, None, None)),
    ("tiny_olmo2_dir", "olmo2", CHOICE),
])
def test_conversion_is_exact(request, tmp_path, base_fixture, family, choice, capsys):
    base_dir = request.getfixturevalue(base_fixture)
    out, rows = convert(base_dir, tmp_path / "rec", choice, family=family, dtype="float32")
    diffs = max_diffs(rows)
    assert len(rows) == 2 + len(choice.kept)  # embedding, every kept layer, logits
    assert max(diffs.values()) < 1e-5, diffs
    printed = capsys.readouterr().out
    assert "verification passed" in printed and "logits" in printed
    assert (out / "modeling_raven.py").exists() and (out / "tokenizer.json").exists()
    model = RavenForCausalLM.from_pretrained(out)
    assert model.config.n_layers_in_recurrent_block == len(choice.core)
    assert model.config.source_layers["core_block"] == choice.core
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()  # untied


def test_tied_base_gets_lm_head_copied_from_embedding(llama3_gqa_dir, tmp_path):
    out, _ = convert(llama3_gqa_dir, tmp_path / "rec", CHOICE, dtype="float32", verify=False)
    model = RavenForCausalLM.from_pretrained(out)
    torch.testing.assert_close(model.lm_head.weight, model.transformer.wte.weight)


@pytest.mark.parametrize("base_fixture", ["llama3_gqa_dir", "tiny_olmo2_dir"])
def test_identity_adapter_equals_layer_dropped_base_at_any_recurrence(request, tmp_path, base_fixture):
    from transformers import AutoModelForCausalLM

    base_dir = request.getfixturevalue(base_fixture)
    out, _ = convert(base_dir, tmp_path / "rec", CHOICE, dtype="float32", adapter_init="identity", verify=False)
    model = RavenForCausalLM.from_pretrained(out).eval()
    model.config.init_values["std"] = 0.0
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base.model.layers = torch.nn.ModuleList(base.model.layers[i] for i in CHOICE.kept)
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = base(ids, use_cache=False).logits
        for r in (1, 4, 16):
            # With [0 | I], the state is ignored: every iteration re-applies the block to the prelude output.
            torch.testing.assert_close(model(ids, num_steps=r).logits, expected, atol=1e-4, rtol=1e-4)


def test_static_save_name_is_the_kept_layers_as_a_plain_model(llama3_gqa_dir, tmp_path, capsys):
    """--static_save_name: the static baseline of a conversion, a plain HF model of the base's class whose
    logits (with or without the KV cache) equal the identity-adapter conversion's at one iteration."""
    from transformers import AutoModelForCausalLM

    args = ["--model_name", str(llama3_gqa_dir), "--save_name", str(tmp_path / "rec"), "--prelude_idx", "0-1",
            "--core_idx", "4,5", "--coda_idx", "6-7", "--dtype", "float32", "--adapter_init", "identity",
            "--static_save_name", str(tmp_path / "static")]
    code, out, err = run_main(capsys, None, *args)
    assert code == 0, err
    assert "static baseline: logits of the saved model vs the kept layers in memory, max |diff| 0.000e+00" in out
    static = AutoModelForCausalLM.from_pretrained(tmp_path / "static", dtype=torch.float32).eval()
    assert type(static).__name__ == "LlamaForCausalLM" and static.config.num_hidden_layers == 6
    assert [layer.self_attn.layer_idx for layer in static.model.layers] == list(range(6))
    model = RavenForCausalLM.from_pretrained(tmp_path / "rec").eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(ids, num_steps=1).logits
        torch.testing.assert_close(static(ids, use_cache=False).logits, expected, atol=1e-4, rtol=1e-4)
        prefix = static(ids[:, :8], use_cache=True)  # the renumbered layers index the cache correctly
        step = static(ids[:, 8:], past_key_values=prefix.past_key_values, use_cache=True).logits
        torch.testing.assert_close(step, expected[:, 8:], atol=1e-4, rtol=1e-4)
    # An existing static folder is refused before any work, and kept.
    (tmp_path / "static2").mkdir()
    capsys.readouterr()
    code, _, err = run_main(capsys, None, *args[:3], str(tmp_path / "rec2"), *args[4:-1], str(tmp_path / "static2"))
    assert code == 2 and err.strip() == f"error: --static_save_name {tmp_path / 'static2'} already exists (pass --overwrite to replace it)"
    assert not (tmp_path / "rec2").exists()


def test_labels_follow_hf_convention_on_a_converted_model(tiny_llama_dir, tmp_path):
    """`labels=input_ids` is shifted inside, as in HF (the original's aligned labels scored copying
    the input); aligned labels, as the trainer makes them, go in `shift_labels` for both models."""
    from transformers import AutoModelForCausalLM

    from retrofit.data.rows import inputs_and_labels

    out, _ = convert(tiny_llama_dir, tmp_path / "rec", CHOICE, dtype="float32", adapter_init="identity", verify=False)
    model = RavenForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    base.model.layers = torch.nn.ModuleList(base.model.layers[i] for i in CHOICE.kept)
    rows = torch.randint(3, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(rows)
    mask[1, 9:] = 0  # a right-padded row, as the packers write
    inputs, _, labels = inputs_and_labels(rows, mask)
    with torch.no_grad():
        ours_hf_way = model(inputs, labels=inputs, num_steps=2).loss
        torch.testing.assert_close(ours_hf_way, base(inputs, labels=inputs).loss, atol=1e-5, rtol=1e-5)
        logits = model(inputs, num_steps=2).logits
        next_token = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), inputs[:, 1:].flatten())
        torch.testing.assert_close(ours_hf_way, next_token)
        # The original's reading of the same call (labels aligned): the loss of copying the input.
        copy_loss = model(inputs, shift_labels=inputs, num_steps=2).loss
        torch.testing.assert_close(copy_loss, torch.nn.functional.cross_entropy(logits.flatten(0, 1), inputs.flatten()))
        assert not torch.isclose(copy_loss, ours_hf_way, rtol=1e-4, atol=0)

        trainer_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        ours = model(input_ids=inputs, labels=labels, shift_labels=labels, num_steps=2).loss
        torch.testing.assert_close(ours, trainer_loss)
        theirs = base(input_ids=inputs, labels=labels, shift_labels=labels).loss
        torch.testing.assert_close(theirs, trainer_loss, atol=1e-5, rtol=1e-5)


def test_default_adapter_is_pytorch_linear_init_and_seeded(tiny_llama_dir, tmp_path):
    a, _ = convert(tiny_llama_dir, tmp_path / "a", CHOICE, dtype="float32", verify=False)
    b, _ = convert(tiny_llama_dir, tmp_path / "b", CHOICE, dtype="float32", verify=False, seed=1)
    wa = RavenForCausalLM.from_pretrained(a).transformer.adapter.weight
    wb = RavenForCausalLM.from_pretrained(b).transformer.adapter.weight
    bound = 1 / (2 * 64) ** 0.5  # kaiming-uniform(a=sqrt(5)) bound of nn.Linear: 1/sqrt(fan_in)
    assert wa.abs().max() <= bound and wa.abs().max() > 0.9 * bound
    assert not torch.equal(wa, wb)


def test_bfloat16_conversion_verifies(tiny_llama_dir, tmp_path):
    out, rows = convert(tiny_llama_dir, tmp_path / "bf16", CHOICE, dtype="bfloat16")
    assert max(row.max_abs_diff for row in rows) < 1e-5
    assert RavenForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def massive_activation_base(family: str, width: int, out: Path, vocab: int) -> Path:
    """A random base of the given width, 4 layers, whose residual stream carries a few dims of
    magnitude >= 100 (as real LMs' "massive activations"): those embedding columns are set to 150."""
    config = tiny_hf_config(family, vocab, hidden_size=width, intermediate_size=width, num_hidden_layers=4,
                  num_attention_heads=width // 64 if width >= 256 else 4, num_key_value_heads=max(1, width // 256) if width >= 256 else 2)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(width)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :3] = 150.0
    model.save_pretrained(out)
    return out


WIDTH_CHOICE = LayerChoice(prelude=[0], core=[2], coda=[3])  # layer 1 dropped


@pytest.mark.parametrize("family", ["llama", "olmo2"])
# 1024 and 2048 are real model widths (TinyLlama 2048): about a minute on 2 cores, so slow.
@pytest.mark.parametrize("width", [64, 256, *(pytest.param(w, marks=pytest.mark.slow) for w in (1024, 2048))])
def test_verification_passes_in_every_dtype_at_every_width(tmp_path, family, width, capsys):
    """The reference rounds only the weights to the saved dtype (not the RoPE buffers), and the
    tolerance is relative: both matter for bf16/fp16 and for hidden states in the hundreds."""
    base = massive_activation_base(family, width, tmp_path / "base", vocab=128)
    for dtype in ("float32", "bfloat16", "float16"):
        out, rows = convert(base, tmp_path / dtype, WIDTH_CHOICE, family=family, dtype=dtype)
        hidden = [row for row in rows if row.name != "logits"]
        assert min(row.max_abs_reference for row in hidden) >= 100  # massive activations everywhere
        assert all(row.passes() for row in rows)
        assert max(row.relative_diff for row in rows) < 1e-5, [(r.name, r.relative_diff) for r in rows]
        assert RavenForCausalLM.from_pretrained(out).dtype == getattr(torch, dtype)
    table = capsys.readouterr().out
    assert "max |diff|   max |ref|  relative  ok" in table and "verification passed" in table


def test_old_reference_rounding_rope_buffers_would_fail(tiny_olmo2_dir, tmp_path):
    """Why the reference must not round buffers: with the RoPE inverse frequencies in bf16 the
    reference itself is off, far beyond the tolerance, so a correct conversion would be refused."""
    from transformers import AutoModelForCausalLM

    from retrofit.model.verification import round_weights_like_saved, verification_input, verification_table

    out, _ = convert(tiny_olmo2_dir, tmp_path / "rec", CHOICE, dtype="bfloat16")
    ours = RavenForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = verification_input(None, ours.config.vocab_size)
    base = AutoModelForCausalLM.from_pretrained(tiny_olmo2_dir, dtype=torch.float32)
    everything_rounded = verification_table(ours, base.to(torch.bfloat16).float(), CHOICE, ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_olmo2_dir, dtype=torch.float32)
    weights_rounded = verification_table(ours, round_weights_like_saved(base, torch.bfloat16), CHOICE, ids)
    assert not all(row.passes() for row in everything_rounded)
    assert all(row.passes() for row in weights_rounded)


@pytest.mark.slow
def test_cli_llama_and_olmo_print_the_table(tiny_llama_dir, tiny_olmo2_dir, tmp_path):
    for script, base in (("convert_llama.py", tiny_llama_dir), ("convert_olmo.py", tiny_olmo2_dir)):
        result = run_cli(script, "--model_name", str(base), "--save_name", str(tmp_path / script),
                         "--prelude_idx", "0,1", "--core_idx", "4-5", "--coda_idx", "6,7", "--dtype", "float32")
        assert result.returncode == 0, result.stderr
        assert "core_block.1 (layer 5)" in result.stdout and "verification passed" in result.stdout
        assert (tmp_path / script / "model.safetensors").exists()


@pytest.mark.parametrize("args,message", [
    (["--prelude_idx", "0", "--core_idx", "1,9", "--coda_idx", "2"], "core index 9 out of range"),
    (["--prelude_idx", "0,1", "--core_idx", "1,2", "--coda_idx", "3"], "layer 1 is used twice"),
    (["--prelude_idx", "0", "--core_idx", "", "--coda_idx", "3"], "at least one layer"),
    (["--prelude_idx", "0"], "give --preset or all of"),
    (["--prelude_idx", "0", "--core_idx", "a", "--coda_idx", "3"], "bad layer index list"),
    (["--prelude_idx", "1-0", "--core_idx", "4", "--coda_idx", "5"], "reversed range '1-0'"),
    (["--prelude_idx", "4", "--core_idx", "1,2", "--coda_idx", "5"], "layer 1 comes after layer 4"),
    (["--prelude_idx", "0", "--core_idx", "3,2", "--coda_idx", "5"], "layer 2 comes after layer 3"),
    (["--preset", "llama-2-4-2", "--mean_recurrence", "0"], "--mean_recurrence must be a whole number >= 1, got 0"),
    (["--preset", "llama-2-4-2", "--mean_backprop_depth", "-2"], "--mean_backprop_depth must be a whole number >= 1, got -2"),
])
def test_cli_rejects_bad_layer_choices(tiny_llama_dir, tmp_path, args, message, capsys):
    save = tmp_path / "out"
    code, _, err = run_main(capsys, "llama", "--model_name", str(tiny_llama_dir), "--save_name", str(save), *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not save.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_cli_refuses_to_overwrite_and_keeps_existing(tiny_llama_dir, tmp_path, capsys):
    save = tmp_path / "existing"
    save.mkdir()
    (save / "keep.txt").write_text("mine")
    args = ["--model_name", str(tiny_llama_dir), "--save_name", str(save), "--prelude_idx", "0",
            "--core_idx", "1", "--coda_idx", "2", "--dtype", "float32"]
    code, _, err = run_main(capsys, "llama", *args)
    assert code == 2 and "already exists" in err
    assert (save / "keep.txt").read_text() == "mine"
    assert run_main(capsys, "llama", *args, "--overwrite")[0] == 0
    assert (save / "model.safetensors").exists() and not (save / "keep.txt").exists()


def test_cli_refuses_an_output_that_is_or_holds_the_base_model(tiny_llama_dir, tmp_path, tokenizer_dir, capsys):
    import shutil

    base = tmp_path / "models" / "base"
    shutil.copytree(tiny_llama_dir, base)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    layers = ["--prelude_idx", "0", "--core_idx", "1", "--coda_idx", "2", "--dtype", "float32", "--overwrite"]
    for save, message in ((base, "is the base model"), (base / "rec", "inside the base model folder"),
                          (tmp_path / "models", "contains the base model")):
        code, _, err = run_main(capsys, "llama", "--model_name", str(base), "--save_name", str(save), *layers)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_cli_errors_for_wrong_family_missing_files_and_bad_dtype(tiny_llama_dir, tiny_olmo2_dir, tmp_path, capsys):
    common = ["--prelude_idx", "0", "--core_idx", "1", "--coda_idx", "2"]
    code, _, err = run_main(capsys, "llama", "--model_name", str(tiny_olmo2_dir), "--save_name", str(tmp_path / "w"), *common)
    assert code == 2 and "not a llama model" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_main(capsys, "llama", "--model_name", str(empty), "--save_name", str(tmp_path / "m"), *common)
    assert code == 2 and "no config.json" in err
    code, _, err = run_main(capsys, "llama", "--model_name", str(tiny_llama_dir), "--save_name", str(tmp_path / "d"),
                            *common, "--dtype", "float8")
    assert code == 2 and "float8" in err
    assert not any(p.name in {"w", "m", "d"} for p in tmp_path.iterdir())


def broken_copy(base: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(base, dest)
    return dest


def test_cli_refuses_broken_base_files_with_one_line(tiny_llama_dir, tmp_path, capsys):
    """Truncated / garbage weights, a config.json missing model_type or sizes (which transformers
    would fill with defaults: 32 layers, so --core_idx 10,11 on an 8-layer base converted random
    layers), a config.json that is not JSON: one line naming the problem, exit 2, nothing written."""
    import json

    cases = {}
    truncated = broken_copy(tiny_llama_dir, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases[truncated] = ("cannot load the weights of", ["--prelude_idx", "0", "--core_idx", "1", "--coda_idx", "2"])
    garbage = broken_copy(tiny_llama_dir, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"not a safetensors file at all" * 10)
    cases[garbage] = ("cannot load the weights of", ["--prelude_idx", "0", "--core_idx", "1", "--coda_idx", "2"])
    for key in ("model_type", "num_hidden_layers", "hidden_size"):
        base = broken_copy(tiny_llama_dir, tmp_path / f"no_{key}")
        config = json.loads((base / "config.json").read_text())
        del config[key]
        (base / "config.json").write_text(json.dumps(config))
        cases[base] = (f"lacks {key}", ["--prelude_idx", "0", "--core_idx", "10,11", "--coda_idx", "12"])
    not_json = broken_copy(tiny_llama_dir, tmp_path / "not_json")
    (not_json / "config.json").write_text("{ truncated")
    cases[not_json] = ("is not valid JSON", ["--prelude_idx", "0", "--core_idx", "1", "--coda_idx", "2"])
    for base, (message, layers) in cases.items():
        save = tmp_path / f"out_{base.name}"
        code, _, err = run_main(capsys, "llama", "--model_name", str(base), "--save_name", str(save), *layers)
        assert code == 2, (base.name, err)
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, (base.name, err)
        assert not save.exists() and not list(tmp_path.glob(f".out_{base.name}.tmp-*"))


def test_weights_missing_a_layer_are_refused(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    base = broken_copy(tiny_llama_dir, tmp_path / "base")
    weights = load_file(base / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.7.")}, base / "model.safetensors")
    with pytest.raises(ConversionError, match=r"do not match its config.json \(missing keys: model\.layers\.7\."):
        convert(base, tmp_path / "out", CHOICE, dtype="float32")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path, tokenizer_dir):
    from transformers import GPT2Config

    base = save_hf_model(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100), tmp_path / "gpt2")
    with pytest.raises(ConversionError, match="unsupported architecture model_type='gpt2'"):
        convert(base, tmp_path / "out", LayerChoice([0], [1], []))


def test_presets_match_the_paper():
    assert layer_choice("tinyllama-4-8-4", None, None, None) == LayerChoice(
        [0, 1, 2, 3], list(range(10, 18)), [18, 19, 20, 21])
    assert layer_choice("llama-2-4-2", None, None, None).core == [10, 11, 12, 13]
    assert layer_choice("olmo-4-6-4", None, None, "15").coda == [15]  # explicit indices override
    assert parse_indices("0-2,5") == [0, 1, 2, 5]


def test_untie_embeds_cli(tmp_path, tokenizer_dir, tokenizer, capsys):
    base = save_hf_model(tiny_llama_config(len(tokenizer), tie_word_embeddings=True), tmp_path / "tied", tokenizer_dir)
    untie = load_script(ROOT / "utils" / "untie_embeds_hf.py")
    assert untie.main(["--model_name", str(base), "--save_name", str(tmp_path / "u")]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "u")
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, model.model.embed_tokens.weight)
    capsys.readouterr()
    assert untie.main(["--model_name", str(base), "--save_name", str(tmp_path / "u")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_download_to_local_arguments(capsys):
    download = load_script(ROOT / "utils" / "download_to_local.py")
    assert download.main(["--model_name", "olmo", "--save_dir", "models", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "allenai/OLMo-2-0425-1B (revision stage1-step1907359-tokens4001B) -> models/OLMo-2-0425-1B-step1907359" in out
    with pytest.raises(SystemExit) as exit_info:
        download.main(["--model_name", "nonsense"])
    assert exit_info.value.code == 2 and "nonsense" in capsys.readouterr().err


def test_verification_catches_a_wrong_mapping(tiny_llama_dir, tmp_path, monkeypatch):
    """If the weight map were wrong, the table flags it and nothing is saved."""
    import retrofit.model.conversion as conversion

    real = conversion.map_state_dict

    def broken(model, choice, family):
        sd = real(model, choice, family)
        key = "transformer.core_block.0.mlp.proj.weight"
        sd[key] = sd[key] * 1.01
        return sd

    monkeypatch.setattr(conversion, "map_state_dict", broken)
    with pytest.raises(ConversionError, match="verification failed"):
        convert(tiny_llama_dir, tmp_path / "bad", CHOICE, dtype="float32")
    assert not (tmp_path / "bad").exists() and not list(Path(tmp_path).glob(".bad.tmp-*"))
