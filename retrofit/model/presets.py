"""Named layer choices ("presets") for common bases: the paper's choices and choices that keep a
paper-like fraction of a base's layers, each with the base's sizes so a converted model can be
counted without its weights (`param_counter.py --preset`). docs/model.md lists them with their
measured losses."""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class Preset:
    """A named layer choice for one base model, with the base's sizes (config.json values) so the
    converted model can be counted without the weights (`param_counter.py --preset`)."""

    base: str  # Hub id of the base model
    family: str
    groups: tuple  # prelude, recurrent block, coda: 0-based base layer indices (ranges or lists)
    base_config: dict  # sizes of the base (HF config keys)
    source: str  # where the choice comes from (docs/model.md, Layer choices)

    @property
    def num_layers(self) -> int:
        return self.base_config["num_hidden_layers"]


def base_sizes(hidden, intermediate, layers, heads, kv_heads, vocab, tied, head_dim=None) -> dict:
    sizes = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=tied)
    if head_dim is not None:
        sizes["head_dim"] = head_dim
    return sizes


PAPER = "the paper's choice (McLeish et al., 2025)"
# The paper's TinyLlama recipe at (4,8,4): the first 4 layers are the prelude, the last 4 the coda,
# the 8 layers right before the coda the recurrent block; the early-middle layers are dropped.
TINYLLAMA_RECIPE = "the paper's TinyLlama recipe (4,8,4): prelude = first 4, recurrent block = the 8 before the last 4, coda = last 4"


def recipe_4_8_4(num_layers: int) -> tuple[range, range, range]:
    return range(0, 4), range(num_layers - 12, num_layers - 4), range(num_layers - 4, num_layers)


# Kept fraction like the paper's (it drops 12-27% of its bases' layers): 4 layers dropped from the
# middle of the stack, inside the recurrent block, prelude = coda = a quarter of the kept layers.
# Measured on SmolLM2-135M-Instruct (docs/model.md, Presets for common bases): dropping 4 layers right after a
# quarter-size prelude (the TinyLlama placement) costs far more loss than dropping them mid-stack.
MIDDLE_DROP_RECIPE = ("paper-like fraction: 4 middle layers dropped inside the recurrent block, prelude = coda = a"
                      " quarter of the kept layers")


def recipe_middle_drop(num_layers: int, drop: int = 4) -> tuple[range | list[int], ...]:
    from .split import paper_shape

    prelude, _, coda = paper_shape(num_layers - drop)
    first_dropped = round(num_layers * 14 / 30)  # SmolLM2-135M's measured best run, 14-17 of 30, scaled
    core = [*range(prelude, first_dropped), *range(first_dropped + drop, num_layers - coda)]
    return range(prelude), core, range(num_layers - coda, num_layers)


SMOLLM2_135M = base_sizes(576, 1536, 30, 9, 3, 49152, True)
SMOLLM2_360M = base_sizes(960, 2560, 32, 15, 5, 49152, True)
SMOLLM2_1_7B = base_sizes(2048, 8192, 24, 32, 32, 49152, True)
QWEN2_5_0_5B = base_sizes(896, 4864, 24, 14, 2, 151936, True)
QWEN2_5_1_5B = base_sizes(1536, 8960, 28, 12, 2, 151936, True)
QWEN3_0_6B = base_sizes(1024, 3072, 28, 16, 8, 151936, True, head_dim=128)
QWEN3_1_7B = base_sizes(2048, 6144, 28, 16, 8, 151936, True, head_dim=128)

# The paper's layer choices, paper-like choices for common small bases, and the (4,8,4) presets
# these bases had first (kept under their names: users typed them; they keep only about half of
# these bases' layers, see docs/model.md).
PRESET_DEFINITIONS = {
    "tinyllama-4-8-4": Preset("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "llama",
                              (range(0, 4), range(10, 18), range(18, 22)),
                              base_sizes(2048, 5632, 22, 32, 4, 32000, False), PAPER),
    "llama-2-4-2": Preset("meta-llama/Llama-3.2-1B", "llama", (range(0, 2), range(10, 14), range(14, 16)),
                          base_sizes(2048, 8192, 16, 32, 8, 128256, True, head_dim=64), PAPER),
    "llama-4-6-4": Preset("meta-llama/Llama-3.2-1B", "llama", (range(0, 4), range(6, 12), range(12, 16)),
                          base_sizes(2048, 8192, 16, 32, 8, 128256, True, head_dim=64), PAPER),
    "olmo-4-6-4": Preset("allenai/OLMo-2-0425-1B", "olmo2", (range(0, 4), range(6, 12), range(12, 16)),
                         base_sizes(2048, 8192, 16, 16, 16, 100352, False), PAPER),
    "smollm2-135m-7-12-7": Preset("HuggingFaceTB/SmolLM2-135M", "llama", recipe_middle_drop(30), SMOLLM2_135M, MIDDLE_DROP_RECIPE),
    "smollm2-360m-7-14-7": Preset("HuggingFaceTB/SmolLM2-360M", "llama", recipe_middle_drop(32), SMOLLM2_360M, MIDDLE_DROP_RECIPE),
    "smollm2-1.7b-5-10-5": Preset("HuggingFaceTB/SmolLM2-1.7B", "llama", recipe_middle_drop(24), SMOLLM2_1_7B, MIDDLE_DROP_RECIPE),
    "qwen2.5-0.5b-5-10-5": Preset("Qwen/Qwen2.5-0.5B", "qwen2", recipe_middle_drop(24), QWEN2_5_0_5B, MIDDLE_DROP_RECIPE),
    "qwen2.5-1.5b-6-12-6": Preset("Qwen/Qwen2.5-1.5B", "qwen2", recipe_middle_drop(28), QWEN2_5_1_5B, MIDDLE_DROP_RECIPE),
    "qwen3-0.6b-6-12-6": Preset("Qwen/Qwen3-0.6B-Base", "qwen3", recipe_middle_drop(28), QWEN3_0_6B, MIDDLE_DROP_RECIPE),
    "qwen3-1.7b-6-12-6": Preset("Qwen/Qwen3-1.7B-Base", "qwen3", recipe_middle_drop(28), QWEN3_1_7B, MIDDLE_DROP_RECIPE),
    "smollm2-135m-4-8-4": Preset("HuggingFaceTB/SmolLM2-135M", "llama", recipe_4_8_4(30), SMOLLM2_135M, TINYLLAMA_RECIPE),
    "smollm2-360m-4-8-4": Preset("HuggingFaceTB/SmolLM2-360M", "llama", recipe_4_8_4(32), SMOLLM2_360M, TINYLLAMA_RECIPE),
    "smollm2-1.7b-4-8-4": Preset("HuggingFaceTB/SmolLM2-1.7B", "llama", recipe_4_8_4(24), SMOLLM2_1_7B, TINYLLAMA_RECIPE),
    "qwen2.5-0.5b-4-8-4": Preset("Qwen/Qwen2.5-0.5B", "qwen2", recipe_4_8_4(24), QWEN2_5_0_5B, TINYLLAMA_RECIPE),
    "qwen2.5-1.5b-4-8-4": Preset("Qwen/Qwen2.5-1.5B", "qwen2", recipe_4_8_4(28), QWEN2_5_1_5B, TINYLLAMA_RECIPE),
    "qwen3-0.6b-4-8-4": Preset("Qwen/Qwen3-0.6B-Base", "qwen3", recipe_4_8_4(28), QWEN3_0_6B, TINYLLAMA_RECIPE),
    "qwen3-1.7b-4-8-4": Preset("Qwen/Qwen3-1.7B-Base", "qwen3", recipe_4_8_4(28), QWEN3_1_7B, TINYLLAMA_RECIPE),
}
# name -> (prelude, recurrent block, coda) ranges
PRESETS = {name: preset.groups for name, preset in PRESET_DEFINITIONS.items()}
