"""Turn a HF decoder checkpoint of a supported family (`FAMILIES`: Llama, Mistral, Qwen2, Qwen3,
OLMo-2) into a (prelude, recurrent block, coda) model, and verify it (retrofit/model/verification.py).

The family differences are data here (which HF norm becomes `norm_1`/`norm_2`, q/k norms, q/k/v
biases) plus config switches in the model; there is no second model class.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_directory, replace_directory
from ..errors import first_line
from .configuration_raven import RavenConfig
from .modeling_raven import RavenForCausalLM
# Re-exported: callers name presets through the converter.
from .presets import MIDDLE_DROP_RECIPE, PAPER, PRESET_DEFINITIONS, PRESETS, TINYLLAMA_RECIPE, Preset  # noqa: F401
from .verification import TOLERANCE, print_table, round_weights_like_saved, verification_input, verification_table



@dataclass(frozen=True)
class Family:
    name: str
    hf_model_types: tuple[str, ...]
    norm_placement: str
    qk_norm: str  # "none" | "whole" | "per_head" (RavenConfig.qk_norm)
    # HF per-layer key -> our per-layer key (besides the fused qkv and gate/up projections)
    layer_keys: tuple[tuple[str, str], ...]
    qkv_bias: bool = False  # q, k, v projections carry biases (fused into attn.Wqkv.bias)
    examples: str = ""  # bases of this family, for messages and docs


PRE_NORM_KEYS = (
    ("input_layernorm.weight", "norm_1.weight"),
    ("post_attention_layernorm.weight", "norm_2.weight"),
    ("self_attn.o_proj.weight", "attn.proj.weight"),
    ("mlp.down_proj.weight", "mlp.proj.weight"),
)
QK_NORM_KEYS = (
    ("self_attn.q_norm.weight", "attn.q_norm.weight"),
    ("self_attn.k_norm.weight", "attn.k_norm.weight"),
)

FAMILIES = {
    # SmolLM / SmolLM2 are Llama models (model_type "llama", tied embeddings).
    "llama": Family("llama", ("llama",), "pre", "none", PRE_NORM_KEYS,
                    examples="TinyLlama, Llama-3.2, SmolLM, SmolLM2"),
    # Mistral is the Llama layout plus an optional sliding window, refused when it is in use.
    "mistral": Family("mistral", ("mistral",), "pre", "none", PRE_NORM_KEYS,
                      examples="Mistral-7B-v0.2/v0.3 (no sliding window)"),
    "qwen2": Family("qwen2", ("qwen2",), "pre", "none", PRE_NORM_KEYS, qkv_bias=True,
                    examples="Qwen2, Qwen2.5"),
    "qwen3": Family("qwen3", ("qwen3",), "pre", "per_head", PRE_NORM_KEYS + QK_NORM_KEYS, examples="Qwen3 (dense)"),
    "olmo2": Family(
        "olmo2",
        ("olmo2",),
        "post",
        "whole",
        (
            ("post_attention_layernorm.weight", "norm_1.weight"),
            ("post_feedforward_layernorm.weight", "norm_2.weight"),
            ("self_attn.o_proj.weight", "attn.proj.weight"),
            ("mlp.down_proj.weight", "mlp.proj.weight"),
        ) + QK_NORM_KEYS,
        examples="OLMo-2",
    ),
}

# Architectures that look close but compute something this model does not: the converter names
# what is missing instead of converting them into something that would fail verification.
UNSUPPORTED_REASONS = {
    "gemma": "Gemma's RMSNorm scales by (1 + weight), embeddings are multiplied by sqrt(hidden_size) and the MLP is GeLU-gated",
    "gemma2": "Gemma's RMSNorm scales by (1 + weight), with extra pre/post-feedforward norms, logit soft-capping and sliding-window layers",
    "gemma3": "Gemma's RMSNorm scales by (1 + weight), with per-head q/k norms, sliding-window layers and a GeLU-gated MLP",
    "mixtral": "a mixture-of-experts MLP (this model has one dense SiLU-gated MLP per layer)",
    "qwen2_moe": "a mixture-of-experts MLP (this model has one dense SiLU-gated MLP per layer)",
    "qwen3_moe": "a mixture-of-experts MLP (this model has one dense SiLU-gated MLP per layer)",
    "olmoe": "a mixture-of-experts MLP (this model has one dense SiLU-gated MLP per layer)",
    "olmo": "OLMo-1's non-parametric LayerNorm (this model has RMSNorm with weights)",
    "phi3": "Phi-3's fused projections with a partial rotary embedding / sliding window",
    "smollm3": "SmolLM3 skips RoPE in every fourth layer (NoPE layers)",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConversionError(ValueError):
    """Bad input to the converter; the message names the bad value."""


@dataclass
class LayerChoice:
    prelude: list[int]
    core: list[int]
    coda: list[int]
    # Set for a preset: the base it was made for must have the same number of layers.
    preset: str | None = field(default=None, compare=False)

    @property
    def kept(self) -> list[int]:
        return self.prelude + self.core + self.coda

    def validate(self, num_layers: int) -> None:
        if self.preset is not None and PRESET_DEFINITIONS[self.preset].num_layers != num_layers:
            definition = PRESET_DEFINITIONS[self.preset]
            raise ConversionError(
                f"--preset {self.preset} is for {definition.base} ({definition.num_layers} layers), but this base has"
                f" {num_layers} layers; give --prelude_idx/--core_idx/--coda_idx instead (choose_split.py recommends them)"
            )
        for name, group in (("prelude", self.prelude), ("core", self.core), ("coda", self.coda)):
            bad = [i for i in group if not 0 <= i < num_layers]
            if bad:
                raise ConversionError(f"{name} index {bad[0]} out of range: the base model has {num_layers} layers (0-{num_layers - 1})")
        if not self.core:
            raise ConversionError("the recurrent block (--core_idx) must have at least one layer")
        seen: dict[int, str] = {}
        for name, group in (("prelude", self.prelude), ("core", self.core), ("coda", self.coda)):
            for i in group:
                if i in seen:
                    raise ConversionError(f"layer {i} is used twice ({seen[i]} and {name}); groups must not overlap")
                seen[i] = name
        # The model runs prelude, block, coda in that order, so the kept layers must keep the
        # base's order: otherwise the "base with dropped layers" it is checked against is not one.
        kept = self.kept
        for a, b in zip(kept, kept[1:]):
            if b < a:
                raise ConversionError(
                    f"layer {b} comes after layer {a} (prelude {self.prelude}, core {self.core}, coda {self.coda}):"
                    " each group must list increasing layers, and prelude < core < coda"
                )


def layer_choice(preset: str | None, prelude_idx, core_idx, coda_idx) -> LayerChoice:
    """Layer groups from a preset name or from explicit index lists (explicit ones win)."""
    if preset is not None:
        if preset not in PRESETS:
            raise ConversionError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        groups = [list(g) for g in PRESETS[preset]]
    else:
        groups = [None, None, None]
    for slot, explicit in enumerate((prelude_idx, core_idx, coda_idx)):
        if explicit is not None:
            groups[slot] = parse_indices(explicit)
    if any(g is None for g in groups):
        raise ConversionError("give --preset or all of --prelude_idx, --core_idx, --coda_idx")
    return LayerChoice(*groups, preset=preset)


def parse_indices(value) -> list[int]:
    """'0,1,2' / '0-3' / [0, 1] -> [0, 1, ...]; an empty string is an empty group."""
    if isinstance(value, (list, tuple, range)):
        return [int(v) for v in value]
    out: list[int] = []
    for part in str(value).replace(" ", "").split(","):
        if not part:
            continue
        try:
            lo, hi = (int(v) for v in part.split("-")) if "-" in part else (int(part), int(part))
        except ValueError:
            raise ConversionError(f"bad layer index list {value!r}: expected e.g. '0,1,2' or '10-17'") from None
        if hi < lo:
            raise ConversionError(f"reversed range {part!r} in {value!r}: write it low-high, e.g. '{hi}-{lo}'")
        out.extend(range(lo, hi + 1))
    return out


def supported_model_types() -> str:
    return ", ".join(t for f in FAMILIES.values() for t in f.hf_model_types)


def detect_family(hf_config) -> Family:
    """The family of a HF config, or a ConversionError naming what this model cannot compute."""
    model_type = getattr(hf_config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    reason = UNSUPPORTED_REASONS.get(model_type)
    if reason is None and (getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None)):
        reason = UNSUPPORTED_REASONS["mixtral"]
    detail = f": {reason}" if reason else ""
    raise ConversionError(f"unsupported architecture model_type={model_type!r}{detail}; supported: {supported_model_types()}")


def sliding_window_in_use(hf_config) -> str | None:
    """A description of the sliding-window attention `hf_config` applies, or None when it has none.

    Mistral applies `sliding_window` to every layer when it is set; Qwen2/Qwen3 only to the layers
    `layer_types` marks "sliding_attention" (`use_sliding_window`). A window at least as long as
    `max_position_embeddings` never masks anything and counts as none.
    """
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        sliding = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
        if sliding and window is not None and window < hf_config.max_position_embeddings:
            return f"sliding-window attention (sliding_window={window}) in layers {sliding[0]}-{sliding[-1]}"
        return None
    if window is not None and window < hf_config.max_position_embeddings:
        return f"sliding-window attention in every layer (sliding_window={window} < max_position_embeddings={hf_config.max_position_embeddings})"
    return None


def raven_config_from_hf(hf_config, choice: LayerChoice, family: Family, **overrides) -> RavenConfig:
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
    if attention_bias or mlp_bias:
        # Llama/Mistral/Qwen3's attention_bias also puts a bias on o_proj, which no family here has.
        raise ConversionError(f"unsupported: attention_bias={attention_bias}, mlp_bias={mlp_bias} (only Qwen2's q/k/v biases are converted)")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"unsupported hidden_act={act!r}; the recurrent model uses a SiLU-gated MLP")
    window = sliding_window_in_use(hf_config)
    if window:
        raise ConversionError(f"unsupported: {window}; the recurrent model attends to every earlier token (full causal attention)")
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_theta = rope.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConversionError(f"unsupported RoPE scaling rope_type={rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    kwargs = dict(
        n_embd=hf_config.hidden_size,
        n_heads=hf_config.num_attention_heads,
        num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=hf_config.intermediate_size,
        n_layers_in_prelude=len(choice.prelude),
        n_layers_in_recurrent_block=len(choice.core),
        n_layers_in_coda=len(choice.coda),
        norm_eps=hf_config.rms_norm_eps,
        vocab_size=hf_config.vocab_size,
        padded_vocab_size=hf_config.vocab_size,
        rope_theta=rope_theta,
        rope_parameters=rope if rope_type != "default" else None,
        max_position_embeddings=hf_config.max_position_embeddings,
        norm_placement=family.norm_placement,
        qk_norm=family.qk_norm,
        qkv_bias=family.qkv_bias,
        bos_token_id=hf_config.bos_token_id,
        eos_token_id=hf_config.eos_token_id,
        pad_token_id=getattr(hf_config, "pad_token_id", None),
        source_layers={"prelude": choice.prelude, "core_block": choice.core, "coda": choice.coda},
        source_family=family.name,
    )
    kwargs.update(overrides)
    return RavenConfig(**kwargs)


def map_state_dict(hf_model: nn.Module, choice: LayerChoice, family: Family) -> dict[str, torch.Tensor]:
    """HF weights -> our names; lm_head is copied from the embedding when the base ties them."""
    sd = hf_model.state_dict()
    out = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": hf_model.get_output_embeddings().weight.detach().clone(),
    }
    groups = (("prelude", choice.prelude), ("core_block", choice.core), ("coda", choice.coda))
    for group, indices in groups:
        for j, i in enumerate(indices):
            src, dst = f"model.layers.{i}.", f"transformer.{group}.{j}."
            out[dst + "attn.Wqkv.weight"] = torch.cat(
                [sd[src + f"self_attn.{p}_proj.weight"] for p in ("q", "k", "v")], dim=0
            )
            out[dst + "mlp.fc.weight"] = torch.cat([sd[src + "mlp.gate_proj.weight"], sd[src + "mlp.up_proj.weight"]], dim=0)
            if family.qkv_bias:
                out[dst + "attn.Wqkv.bias"] = torch.cat([sd[src + f"self_attn.{p}_proj.bias"] for p in ("q", "k", "v")], dim=0)
            for hf_key, our_key in family.layer_keys:
                out[dst + our_key] = sd[src + hf_key]
    return out


def init_adapter(adapter: nn.Linear, mode: str, seed: int = 0) -> None:
    """`default`: PyTorch's Linear init (the authors' choice). `identity`: [0 | I], so the adapter
    passes the prelude output through and the model equals the layer-dropped base at any depth."""
    with torch.no_grad():
        if mode == "default":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                adapter.reset_parameters()
        elif mode == "identity":
            h = adapter.out_features
            adapter.weight.zero_()
            adapter.weight[:, h:] = torch.eye(h, dtype=adapter.weight.dtype)
        else:
            raise ConversionError(f"unknown adapter_init {mode!r}; choose 'default' or 'identity'")


# config.json keys the conversion reads; a missing one would silently take a transformers default
# (e.g. 32 layers), so random layers would be converted and even pass the check.
REQUIRED_BASE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def load_base_config(model_name: str | os.PathLike):
    import json

    from transformers import AutoConfig

    local = Path(model_name)
    if local.exists():
        config_file = local / "config.json"
        if not config_file.exists():
            raise ConversionError(f"{model_name} has no config.json: not a HF model directory")
        try:
            raw = json.loads(config_file.read_text())
        except (OSError, ValueError) as err:
            raise ConversionError(f"{config_file} is not valid JSON ({first_line(err)}); re-download the model") from None
        if not isinstance(raw, dict):
            raise ConversionError(f"{config_file} is not a JSON object; re-download the model")
        supported = {t for family in FAMILIES.values() for t in family.hf_model_types}
        missing = [key for key in REQUIRED_BASE_KEYS if key not in raw]
        if missing and ("model_type" in missing or raw["model_type"] in supported):  # else: unsupported, said below
            raise ConversionError(f"{config_file} lacks {', '.join(missing)}: a complete HF config.json is needed (re-download the model)")
    try:
        return AutoConfig.from_pretrained(model_name)
    except (OSError, ValueError, KeyError) as err:
        raise ConversionError(f"cannot read the config of {model_name}: {first_line(err)}") from None


def load_base_model(model_name: str | os.PathLike) -> nn.Module:
    """The base in float32; unreadable weight files and weights that do not fit its config are
    ConversionErrors (a missing layer would otherwise be randomly initialised)."""
    from transformers import AutoModelForCausalLM

    from .loading import quiet_transformers_bars

    quiet_transformers_bars()
    try:
        base, info = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32, output_loading_info=True)
    except Exception as err:  # safetensors / torch raise many types for a truncated or garbage file
        raise ConversionError(
            f"cannot load the weights of {model_name} ({type(err).__name__}: {first_line(err)}); re-download them"
        ) from None
    problems = []
    for kind in ("missing_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or [])
        if keys:
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    if problems:
        raise ConversionError(f"the weights of {model_name} do not match its config.json ({'; '.join(problems)})")
    return base.eval()


def convert(
    model_name: str | os.PathLike,
    save_name: str | os.PathLike,
    choice: LayerChoice,
    *,
    family: str | None = None,
    dtype: str = "bfloat16",
    adapter_init: str = "default",
    overwrite: bool = False,
    mean_recurrence: int = 32,
    mean_backprop_depth: int = 8,
    seed: int = 0,
    verify: bool = True,
    tolerance: float = TOLERANCE,
) -> tuple[Path, list]:
    """Convert, save atomically, reload and verify. Returns (save dir, verification rows).

    Raises ConversionError on bad input or a failed verification; nothing is left at save_name
    unless everything passed.
    """
    save_path = check_save_target(model_name, save_name, "--save_name", dtype, overwrite)
    if adapter_init not in ("default", "identity"):
        raise ConversionError(f"unknown --adapter_init {adapter_init!r}; choose 'default' or 'identity'")
    for flag, value in (("--mean_recurrence", mean_recurrence), ("--mean_backprop_depth", mean_backprop_depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"{flag} must be a whole number >= 1, got {value!r}")
    # Everything that can be checked from config.json is checked before loading any weights.
    base_config = load_base_config(model_name)
    fam = FAMILIES[family] if family else detect_family(base_config)
    if family and base_config.model_type not in fam.hf_model_types:
        raise ConversionError(f"{model_name} is model_type={base_config.model_type!r}, not a {family} model; use the matching converter")
    choice.validate(base_config.num_hidden_layers)
    try:
        config = raven_config_from_hf(base_config, choice, fam, mean_recurrence=mean_recurrence, mean_backprop_depth=mean_backprop_depth)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConversionError):
            raise
        raise ConversionError(f"unsupported base config of {model_name}: {first_line(err)}") from None

    base = load_base_model(model_name)
    # Built on the meta device and given the mapped tensors directly: no random init of a
    # model-sized set of weights that would be overwritten anyway (time and peak memory).
    with torch.device("meta"):
        model = RavenForCausalLM(config)
    missing, unexpected = model.load_state_dict(map_state_dict(base, choice, fam), strict=False, assign=True)
    if set(missing) != {"transformer.adapter.weight"} or unexpected:
        raise ConversionError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    model.transformer.adapter.to_empty(device="cpu")
    init_adapter(model.transformer.adapter, adapter_init, seed)
    model = model.to(getattr(torch, dtype))

    save_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_path.name}.tmp-", dir=save_path.parent))
    try:
        model.save_pretrained(tmp)
        del model  # the check reloads from disk; at 1B scale the saved copy is GBs of peak memory
        tokenizer = load_tokenizer(model_name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        rows = []
        if verify:
            reloaded = RavenForCausalLM.from_pretrained(tmp, dtype=torch.float32)
            # Compare against the base with the same rounding the saved dtype applied to the weights.
            reference = round_weights_like_saved(base, getattr(torch, dtype))
            rows = verification_table(reloaded, reference, choice, verification_input(tokenizer, config.vocab_size))
            if not print_table(rows, tolerance):
                raise ConversionError(f"verification failed: a relative difference is above {tolerance:g} (table above)")
        replace_directory(tmp, save_path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return save_path, rows


def save_kept_layers(
    model_name: str | os.PathLike,
    save_name: str | os.PathLike,
    choice: LayerChoice,
    *,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    tolerance: float = TOLERANCE,
) -> Path:
    """Save the base with only the chosen layers, in order, as a plain HF model of its own class:
    the static baseline of a conversion (the same layers, no recurrence; train it with
    `train.py --non_recurrent_model=true`). Its logits equal the converted model's at one
    iteration with the identity adapter. Saved atomically; reloaded and compared with the
    in-memory model before it is renamed into place."""
    save_path = check_save_target(model_name, save_name, "--static_save_name", dtype, overwrite)
    base_config = load_base_config(model_name)
    detect_family(base_config)  # refuses what the converter refuses, with the same message
    choice.validate(base_config.num_hidden_layers)
    base = round_weights_like_saved(load_base_model(model_name), getattr(torch, dtype))
    base.model.layers = nn.ModuleList(base.model.layers[i] for i in choice.kept)
    for new_idx, layer in enumerate(base.model.layers):
        layer.self_attn.layer_idx = new_idx  # the KV cache is indexed by position in the stack
    base.config.num_hidden_layers = len(choice.kept)
    if getattr(base.config, "layer_types", None) is not None:
        base.config.layer_types = [base.config.layer_types[i] for i in choice.kept]
    input_ids = verification_input(load_tokenizer(model_name), base_config.vocab_size)
    with torch.no_grad():
        expected = base(input_ids=input_ids, use_cache=False).logits
    with atomic_directory(save_path) as tmp:
        base.to(getattr(torch, dtype)).save_pretrained(tmp)
        tokenizer = load_tokenizer(model_name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        reloaded = load_base_model(tmp)
        with torch.no_grad():
            diff = (reloaded(input_ids=input_ids, use_cache=False).logits - expected).abs().max().item()
        if diff > tolerance * max(1.0, expected.abs().max().item()):
            raise ConversionError(f"the saved static model's logits differ from the kept layers' by {diff:.3e}")
        print(f"static baseline: logits of the saved model vs the kept layers in memory, max |diff| {diff:.3e}")
    return save_path


def check_save_target(model_name, save_name, flag: str, dtype: str, overwrite: bool) -> Path:
    """The output folder given as `flag` and the saved dtype, checked before any work."""
    save_path = Path(save_name)
    check_output_path(model_name, save_path)
    if save_path.exists() and not overwrite:
        raise ConversionError(f"{flag} {save_path} already exists (pass --overwrite to replace it)")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConversionError(f"unsupported --dtype {dtype!r}; choose float32, bfloat16 or float16")
    return save_path


def check_output_path(model_name, save_path: Path) -> None:
    """The output must not be the base model, lie inside it, or contain it: writing (and with
    --overwrite, replacing) it would destroy the model being converted."""
    base = Path(model_name)
    if not base.exists():
        return  # a Hub id: nothing local to protect
    base, out = base.resolve(), save_path.resolve()
    if out == base or base in out.parents:
        raise ConversionError(
            f"--save_name {save_path} is {'the base model' if out == base else 'inside the base model folder'}"
            f" --model_name {model_name}; choose a folder outside it"
        )
    if out in base.parents:
        raise ConversionError(
            f"--save_name {save_path} contains the base model --model_name {model_name}; replacing it would delete"
            " the base model: choose another folder"
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_name):
    """The base model's tokenizer, or None (with a one-line warning) for a weights-only directory."""
    from transformers import AutoTokenizer

    local = Path(model_name)
    if local.is_dir() and not any((local / name).exists() for name in TOKENIZER_FILES):
        print(f"warning: no tokenizer files in {model_name}; saving the model without a tokenizer")
        return None
    try:
        return AutoTokenizer.from_pretrained(model_name)
    except (OSError, ValueError) as err:
        print(f"warning: could not load the tokenizer of {model_name} ({first_line(err)}); saving the model without one")
        return None


def main(default_family: str | None, argv: list[str] | None = None) -> int:
    """CLI shared by convert.py (family from the base's config.json: `default_family=None`),
    convert_llama.py and convert_olmo.py (that family only)."""
    import argparse
    import sys

    what = f"HF {default_family}" if default_family else f"HF ({', '.join(FAMILIES)}; detected from config.json)"
    parser = argparse.ArgumentParser(
        description=f"Convert a {what} model into a (prelude, recurrent block, coda) model and verify it."
    )
    parser.add_argument("--model_name", required=True, help="local HF model dir or Hub id (download first with utils/download_to_local.py)")
    parser.add_argument("--save_name", required=True, help="output directory")
    parser.add_argument("--preset", choices=list(PRESETS), help="a named layer choice: the paper's, or (4,8,4) for common bases (docs/model.md)")
    parser.add_argument("--prelude_idx", help="base layers for the prelude, e.g. 0,1,2,3 or 0-3")
    parser.add_argument("--core_idx", help="base layers for the recurrent block, e.g. 10-17")
    parser.add_argument("--coda_idx", help="base layers for the coda, e.g. 18-21")
    parser.add_argument("--dtype", default="bfloat16", help="saved dtype: float32, bfloat16 (default) or float16")
    parser.add_argument("--adapter_init", default="default", help="default (PyTorch Linear init, as the authors) or identity ([0 | I])")
    parser.add_argument("--mean_recurrence", type=int, default=32, help="test-time recurrence stored in the config")
    parser.add_argument("--mean_backprop_depth", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the default adapter init")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save_name")
    parser.add_argument("--no_verify", action="store_true", help="skip the hidden-state verification")
    parser.add_argument("--static_save_name", help="also save the base with only the kept layers as a plain HF model"
                        " (the static baseline: same layers, no recurrence)")
    args = parser.parse_args(argv)
    try:
        choice = layer_choice(args.preset, args.prelude_idx, args.core_idx, args.coda_idx)
        if args.static_save_name and Path(args.static_save_name).exists() and not args.overwrite:  # before any work
            raise ConversionError(f"--static_save_name {args.static_save_name} already exists (pass --overwrite to replace it)")
        if not Path(args.model_name).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConversionError(f"--model_name {args.model_name} does not exist locally and HF_HUB_OFFLINE=1")
        path, _ = convert(
            args.model_name,
            args.save_name,
            choice,
            family=default_family,
            dtype=args.dtype,
            adapter_init=args.adapter_init,
            overwrite=args.overwrite,
            mean_recurrence=args.mean_recurrence,
            mean_backprop_depth=args.mean_backprop_depth,
            seed=args.seed,
            verify=not args.no_verify,
        )
        if args.static_save_name:
            save_kept_layers(args.model_name, args.static_save_name, choice, dtype=args.dtype, overwrite=args.overwrite)
    except (ConversionError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"saved recurrent model to {path} (prelude {choice.prelude}, recurrent {choice.core}, coda {choice.coda})")
    return 0
