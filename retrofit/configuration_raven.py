"""Configuration of the depth-recurrent ("Raven" / Huginn layout) causal LM.

Key names follow the authors' released `Recurrent-*` checkpoints so their config.json files load
unchanged. Two switches select the layer family of the base model:

- `norm_placement`: "pre" (Llama: x + attn(norm_1(x))) or "post" (OLMo-2: x + norm_1(attn(x))).
- `qk_norm`: RMSNorm on the full projected q and k before splitting into heads (OLMo-2).

This file must stay self-contained (only torch/transformers imports): it is copied next to saved
weights so a checkpoint loads with `trust_remote_code=True` on a machine without this repo.
"""

from transformers import PretrainedConfig

DEFAULT_STATE_STD = 0.008703882797784892  # Huginn's sqrt(2 / (5 * 5280))


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
        rope_theta: float = 50000.0,
        rope_scaling: dict | None = None,
        max_position_embeddings: int = 4096,
        tie_embeddings: bool = False,
        bias: bool = False,
        qk_bias: bool = False,
        norm_placement: str = "pre",
        qk_norm: bool = False,
        mean_recurrence: int = 32,
        mean_backprop_depth: int = 8,
        init_values: dict | None = None,
        initializer_range: float = 0.02,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        # Huginn's configs carry `rope_base`; ours carry `rope_theta`. Accept both.
        rope_theta = kwargs.pop("rope_base", rope_theta)
        kwargs.pop("tie_word_embeddings", None)  # `tie_embeddings` is the authoritative key
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
        # transformers 5 keeps RoPE settings in `rope_parameters`; the authors' configs use
        # `rope_theta` + `rope_scaling`. Store the merged form, accept either on load.
        rope_parameters = kwargs.pop("rope_parameters", None) or rope_scaling or {}
        self.rope_parameters = {"rope_type": "default", **rope_parameters, "rope_theta": self.rope_theta}
        self.max_position_embeddings = max_position_embeddings
        self.tie_embeddings = tie_embeddings
        self.bias = bias
        self.qk_bias = qk_bias
        self.norm_placement = norm_placement
        self.qk_norm = qk_norm
        self.mean_recurrence = mean_recurrence
        self.mean_backprop_depth = mean_backprop_depth
        self.init_values = {"std": DEFAULT_STATE_STD, "embed_scale": 1.0, **(init_values or {})}
        self.initializer_range = initializer_range
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_embeddings,
            **kwargs,
        )
        self.validate()

    def validate(self):
        """Fail early with a message naming the bad value."""
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
        if int(self.mean_recurrence) < 1:
            raise ValueError(f"mean_recurrence must be >= 1, got {self.mean_recurrence}")

    @property
    def num_hidden_layers(self) -> int:
        """Distinct layers (prelude + recurrent block + coda), as HF tooling expects."""
        return self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda

    @property
    def effective_expected_depth(self) -> int:
        return self.n_layers_in_prelude + self.n_layers_in_coda + self.mean_recurrence * self.n_layers_in_recurrent_block
