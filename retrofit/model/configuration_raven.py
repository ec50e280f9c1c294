"""Configuration of the depth-recurrent ("Raven" / Huginn layout) causal LM.

Key names follow the authors' released `Recurrent-*` checkpoints so their config.json files load
unchanged, with the meaning the authors' modeling code gives them (see docs/model.md, "Checkpoints in the
original release's format"):

- RoPE comes from `rope_theta` + `rope_scaling` (transformers 4.51 layout) or `rope_parameters`
  (transformers 5). `rope_base` is a Huginn-0125 leftover the retrofitted models never read; it is
  used only when a config has no `rope_theta`.
- Huginn-only keys (`block_size`, `effective_expected_depth`, `sampling_scheme`, ...) are accepted
  and ignored; the few that would change the computation are checked (`HUGINN_SUPPORTED_VALUES`).
- Three switches select the layer family of the base model:
  `norm_placement`: "pre" (Llama, Mistral, Qwen2/3, SmolLM: x + attn(norm_1(x))) or "post"
  (OLMo-2: x + norm_1(attn(x)));
  `qk_norm`: "none"; "whole" = RMSNorm over the full projected q and k before splitting into
  heads (OLMo-2); "per_head" = RMSNorm over each head's q and k, before RoPE (Qwen3). The
  booleans of older configs still load: true = "whole", false = "none";
  `qkv_bias`: a bias on the q, k and v projections only (Qwen2/Qwen2.5).
  The authors' OLMo configs carry neither `norm_placement` nor `qk_norm` (they ship a different
  modeling file instead); a config without both is marked `layout_from_weights` and
  `RavenForCausalLM.from_pretrained` picks the OLMo-2 layout when the checkpoint holds q/k norm
  weights.
- `lora` (None = off): low-rank deltas the model adds to the linear layers of the named parts,
  {"rank": R, "alpha": A, "targets": ["core_block", "prelude", "coda"], "num_deltas": D}. The
  recurrent block gets D deltas, one per iteration index (iterations >= D reuse the last); D = 1
  shares one delta across iterations. Prelude and coda run once, so they always have one delta.
- `exit_gate` (None = off): a learned exit gate on the latent state (`ExitGate` in layers_raven.py),
  {"iterations": N}: N per-iteration biases (iterations past N share the last). Trained as a separate
  stage on a frozen checkpoint (train_exit_gate.py); its weights exist only when this key is set.

Saved configs carry `rope_theta` and `rope_scaling` (the 4.51 layout, read by the authors' code and
Huginn's tools) beside `rope_parameters`.

This file must stay self-contained (only torch/transformers imports): it is copied next to saved
weights so a checkpoint loads with `trust_remote_code=True` on a machine without this repo.
"""

import math

from transformers import PretrainedConfig

DEFAULT_STATE_STD = 0.008703882797784892  # Huginn's sqrt(2 / (5 * 5280))
DEFAULT_ROPE_THETA = 50000.0
LORA_TARGETS = ("prelude", "core_block", "coda")
# Huginn keys whose other values this model does not compute; any other Huginn key is ignored.
HUGINN_SUPPORTED_VALUES = {
    "injection_type": ("linear",),
    "nonlin_name": ("SiLU",),
    "mlp_class_name": ("GatedMLP",),
}
QK_NORM_CHOICES = ("none", "whole", "per_head")


def qk_norm_choice(value) -> str:
    """`qk_norm` as one of QK_NORM_CHOICES; the booleans of older configs map to "whole" / "none"."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "whole"
    if isinstance(value, str) and value in QK_NORM_CHOICES:
        return value
    raise ValueError(f"qk_norm must be one of {', '.join(QK_NORM_CHOICES)} (or true/false), got {value!r}")


def whole_number(value, name: str, minimum: int = 1) -> int:
    """`value` as an int >= minimum; 4, 4.0 and "4" are accepted, 2.5, "abc", True and 0 are not."""
    number = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        number = int(value.strip())
    if number is None or number < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return number


def normalise_lora(lora: dict | None) -> dict | None:
    """The `lora` config entry with defaults filled in and every value checked (None: no LoRA)."""
    if not lora:
        return None
    if not isinstance(lora, dict):
        raise ValueError(f"lora must be a dict such as {{'rank': 8}}, got {lora!r}")
    unknown = set(lora) - {"rank", "alpha", "targets", "num_deltas"}
    if unknown:
        raise ValueError(f"lora has unknown key(s) {sorted(unknown)} (known: rank, alpha, targets, num_deltas)")
    rank = whole_number(lora.get("rank"), "lora.rank")
    alpha = lora.get("alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"lora.alpha must be a positive number, got {alpha!r}")
    targets = lora.get("targets", ["core_block"])
    targets = [targets] if isinstance(targets, str) else list(targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets:
        raise ValueError(f"lora.targets must be a non-empty subset of {list(LORA_TARGETS)}, got {targets!r}")
    targets = [t for t in LORA_TARGETS if t in targets]  # one canonical order
    num_deltas = whole_number(lora.get("num_deltas", 1), "lora.num_deltas")
    return {"rank": rank, "alpha": float(alpha), "targets": targets, "num_deltas": num_deltas}


def normalise_exit_gate(exit_gate: dict | None) -> dict | None:
    """The `exit_gate` config entry with defaults filled in and checked (None: no gate)."""
    if not exit_gate:
        return None
    if not isinstance(exit_gate, dict):
        raise ValueError(f"exit_gate must be a dict such as {{'iterations': 32}}, got {exit_gate!r}")
    unknown = set(exit_gate) - {"iterations"}
    if unknown:
        raise ValueError(f"exit_gate has unknown key(s) {sorted(unknown)} (known: iterations)")
    return {"iterations": whole_number(exit_gate.get("iterations", 32), "exit_gate.iterations")}


def merged_rope_parameters(rope_parameters: dict | None, rope_scaling: dict | None, rope_theta: float) -> dict:
    """transformers 5 keeps RoPE settings in `rope_parameters`; the authors' configs use
    `rope_theta` + `rope_scaling`. Store the merged form, accept either on load. A saved config
    carries both forms (equal); `rope_parameters` wins if they ever differ."""
    merged = dict(rope_parameters or rope_scaling or {})
    if "type" in merged and "rope_type" not in merged:  # transformers < 4.45 spelling
        merged["rope_type"] = merged.pop("type")
    merged.pop("rope_theta", None)  # `rope_theta` is the one value
    return {"rope_type": "default", **merged, "rope_theta": rope_theta}


class RavenConfig(PretrainedConfig):
    model_type = "huginn_raven"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Names other tools (lm-eval, accelerate, our param counter) look for.
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_heads",
        "rms_norm_eps": "norm_eps",
    }

    def __init__(
        self,
        n_embd: int = 5280,
        n_heads: int = 55,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 17920,
        n_layers_in_prelude: int = 2,
        n_layers_in_recurrent_block: int = 4,
        n_layers_in_coda: int = 2,
        norm_eps: float = 1e-6,
        vocab_size: int = 65536,
        padded_vocab_size: int | None = None,
        rope_theta: float | None = None,
        rope_scaling: dict | None = None,
        max_position_embeddings: int = 4096,
        tie_embeddings: bool = False,
        bias: bool = False,
        qk_bias: bool = False,
        norm_placement: str | None = None,
        qk_norm: str | bool | None = None,
        qkv_bias: bool = False,
        mean_recurrence: int = 32,
        mean_backprop_depth: int = 8,
        init_values: dict | None = None,
        initializer_range: float = 0.02,
        lora: dict | None = None,
        exit_gate: dict | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        # `rope_theta` is what the retrofitted models read; Huginn-0125's own `rope_base` only counts
        # when there is no `rope_theta` (the authors' configs carry both, rope_base always 500000).
        rope_base = kwargs.pop("rope_base", None)
        if rope_theta is None:
            rope_theta = rope_base if rope_base is not None else DEFAULT_ROPE_THETA
        kwargs.pop("tie_word_embeddings", None)  # `tie_embeddings` is the authoritative key
        # Values derived from other keys (e.g. Huginn's `effective_expected_depth`) are properties here.
        for key in [k for k in kwargs if isinstance(getattr(type(self), k, None), property)]:
            if getattr(type(self), key).fset is None:
                kwargs.pop(key)
        # The authors' OLMo configs carry no layout switch: the weights decide (see from_pretrained).
        self.layout_from_weights = norm_placement is None and qk_norm is None
        norm_placement = "pre" if norm_placement is None else norm_placement
        self.n_embd = n_embd
        self.n_heads = n_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else n_heads
        self.head_dim = head_dim if head_dim is not None else n_embd // n_heads
        self.intermediate_size = intermediate_size
        self.n_layers_in_prelude = n_layers_in_prelude
        self.n_layers_in_recurrent_block = n_layers_in_recurrent_block
        self.n_layers_in_coda = n_layers_in_coda
        self.norm_eps = norm_eps
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size if padded_vocab_size is not None else vocab_size
        self.rope_theta = float(rope_theta)
        self.rope_parameters = merged_rope_parameters(kwargs.pop("rope_parameters", None), rope_scaling, self.rope_theta)
        self.max_position_embeddings = max_position_embeddings
        self.tie_embeddings = tie_embeddings
        self.bias = bias
        self.qk_bias = qk_bias
        self.norm_placement = norm_placement
        self.qk_norm = qk_norm  # normalised (and checked) by validate()
        self.qkv_bias = qkv_bias
        self.mean_recurrence = mean_recurrence
        self.mean_backprop_depth = mean_backprop_depth
        self.init_values = {"std": DEFAULT_STATE_STD, "embed_scale": 1.0, **(init_values or {})}
        self.initializer_range = initializer_range
        self.lora = normalise_lora(lora)
        self.exit_gate = normalise_exit_gate(exit_gate)
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_embeddings,
            **kwargs,
        )
        self.validate()

    def validate(self):
        """Fail early with a message naming the bad value (also run when a model is built, after
        from_pretrained has applied overrides such as lm-eval's `mean_recurrence=R`)."""
        self.mean_recurrence = whole_number(self.mean_recurrence, "mean_recurrence")
        self.mean_backprop_depth = whole_number(self.mean_backprop_depth, "mean_backprop_depth")
        for key, supported in HUGINN_SUPPORTED_VALUES.items():
            value = getattr(self, key, None)
            if value is not None and value not in supported:
                raise ValueError(f"{key}={value!r} is not supported by this model (supported: {', '.join(supported)})")
        for key in ("n_embd", "n_heads", "intermediate_size", "vocab_size", "head_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key in ("norm_eps", "rope_theta"):  # NaN or <= 0 would load and run, producing NaN or garbage
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
        self.qk_norm = qk_norm_choice(self.qk_norm)
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"qkv_bias must be true or false, got {self.qkv_bias!r}")
        if self.norm_placement not in ("pre", "post"):
            raise ValueError(f"norm_placement must be 'pre' or 'post', got {self.norm_placement!r}")
        if self.n_heads % self.num_key_value_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.n_layers_in_recurrent_block < 1:
            raise ValueError(f"n_layers_in_recurrent_block must be >= 1, got {self.n_layers_in_recurrent_block}")
        if self.qk_bias:
            raise ValueError("qk_bias=True (Huginn-0125's extra q/k bias) is not supported by this model")
        if self.tie_embeddings:
            raise ValueError("tie_embeddings=True is not supported: recurrent models keep an untied lm_head")

    def lora_deltas(self, part: str) -> int:
        """How many deltas each LoRA layer of `part` holds (0: no LoRA there)."""
        if not self.lora or part not in self.lora["targets"]:
            return 0
        return self.lora["num_deltas"] if part == "core_block" else 1

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("layout_from_weights", None)  # a load-time fact, never saved: saved configs state the layout
        if out.get("exit_gate") is None:
            out.pop("exit_gate", None)  # configs without a gate stay as they were before the key existed
        # The 4.51 layout beside `rope_parameters`: `rope_scaling` without the base (null for plain RoPE).
        scaling = {k: v for k, v in (self.rope_parameters or {}).items() if k != "rope_theta"}
        out["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
        out["rope_theta"] = self.rope_theta
        return out

    @property
    def num_hidden_layers(self) -> int:
        """Distinct layers (prelude + recurrent block + coda), as HF tooling expects."""
        return self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda

    @property
    def effective_expected_depth(self) -> int:
        return self.n_layers_in_prelude + self.n_layers_in_coda + self.mean_recurrence * self.n_layers_in_recurrent_block
