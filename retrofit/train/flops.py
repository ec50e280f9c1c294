"""Parameter counts by part, effective parameters and training FLOPs.

Facts (docs/analysis.md, Parameters and FLOPs):
- N counts non-embedding parameters: no input embedding, no lm_head, no adapter (and, as in the
  authors' counter, no final norm of a recurrent model).
- Effective parameters at test recurrence r: N_prelude + N_coda + r * N_rec.
- One training step with mean recurrence r and backprop depth s costs
  6 * D * (N_prelude + N_coda + min(r, s) * N_rec) + 2 * D * max(r - s, 0) * N_rec,
  D = tokens per step: the k = min(r, s) iterations with grad cost forward + backward (6 N D), the
  n = r - k iterations without grad cost a forward only (2 N D).
- A static (non-recurrent) model costs 6 * N * D per step, N = all non-embedding parameters.
- LoRA deltas (`--lora.*`, docs/training.md) count as parameters of the part they adapt, once per
  application: a layer's delta runs wherever the layer runs, so the recurrent block's per-iteration
  cost is N_rec + one iteration's deltas (with per-iteration deltas only one of the D stored runs
  per iteration). This counts the delta matmuls x A^T B^T; a frozen base still pays its forward and
  the backward through it (the weight-gradient third of 6 N D is an upper bound then).
- A run's FLOPs sum the step cost over optimizer steps 1..checkpoint with the scheduled integer mean
  recurrence `retrofit.train.depth.RecurrenceSchedule.at(step)`, the paper's own counter's convention
  (it reproduces the paper's FLOPs columns exactly). Training runs the same schedule through
  `applied_at`, one step later for the mean recurrence, as the original's scheduler did.

Models are built on the meta device from config.json alone, so counting a 1B model costs no memory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from retrofit.train.depth import RecurrenceSchedule

# D of the paper's runs (the FLOPs columns of paper_plots/data); a run's own D is in its run.json.
DEFAULT_TOKENS_PER_STEP = 2**20
# RavenConfig.model_type, spelled out so that counting (and plotting) never imports transformers;
# tests/test_run_record.py checks the two agree.
RECURRENT_MODEL_TYPE = "huginn_raven"

# Parameter-name prefixes of the recurrent model (the authors' checkpoint naming).
RECURRENT_PARTS = {
    "embeddings": ("transformer.wte.", "lm_head."),
    "prelude": ("transformer.prelude.",),
    "recurrent_block": ("transformer.core_block.",),
    "coda": ("transformer.coda.",),
    "adapter": ("transformer.adapter.",),
}


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a model by part.

    For a recurrent model `layers` is 0; for a static (plain HF) model every non-embedding
    parameter (decoder layers and final norm) is in `layers` and the recurrent parts are 0.
    `other` holds what belongs to no part (the recurrent model's final norm).
    """

    recurrent: bool
    embeddings: int  # input embedding + lm_head
    prelude: int = 0
    recurrent_block: int = 0
    coda: int = 0
    adapter: int = 0
    layers: int = 0
    other: int = 0
    # LoRA deltas per application (one iteration's for the recurrent block) and all stored ones
    lora_prelude: int = 0
    lora_recurrent_block: int = 0
    lora_coda: int = 0
    lora_stored: int = 0

    @property
    def total(self) -> int:
        """Stored parameters (the recurrent block counted once)."""
        return (
            self.embeddings + self.prelude + self.recurrent_block + self.coda + self.adapter + self.layers + self.other
            + self.lora_stored
        )

    @property
    def applied_prelude(self) -> int:
        return self.prelude + self.lora_prelude

    @property
    def applied_recurrent_block(self) -> int:
        """Parameters one iteration applies (the block and that iteration's LoRA deltas)."""
        return self.recurrent_block + self.lora_recurrent_block

    @property
    def applied_coda(self) -> int:
        return self.coda + self.lora_coda

    def non_embedding(self, num_rec: int = 1) -> int:
        """N at test recurrence `num_rec`: the `effective_params` column of paper_plots/data."""
        if not self.recurrent:
            return self.layers
        if num_rec < 1:
            raise ValueError(f"num_rec must be >= 1, got {num_rec}")
        return self.applied_prelude + self.applied_coda + num_rec * self.applied_recurrent_block

    def as_dict(self) -> dict:
        out = {"recurrent": self.recurrent, **asdict(self)}
        out["total"] = self.total
        out["non_embedding_r1"] = self.non_embedding(1)
        return out


def count_parameters(model) -> ParamCounts:
    """Group a model's parameters by name prefix (recurrent model) or embeddings vs rest (HF model)."""
    names_and_sizes = [(name, p.numel()) for name, p in model.named_parameters(remove_duplicate=False)]
    if any(name.startswith("transformer.core_block.") for name, _ in names_and_sizes):
        sums = dict.fromkeys(RECURRENT_PARTS, 0)
        lora = dict.fromkeys(("lora_prelude", "lora_recurrent_block", "lora_coda", "lora_stored"), 0)
        other = 0
        for name, param in model.named_parameters(remove_duplicate=False):
            if ".lora_" not in name:
                continue
            # lora_A / lora_B stack D deltas along dim 0; one of them runs per application
            lora["lora_stored"] += param.numel()
            part = next(p for p in ("prelude", "recurrent_block", "coda") if name.startswith(RECURRENT_PARTS[p]))
            lora[f"lora_{part}"] += param.numel() // param.shape[0]
        for name, size in names_and_sizes:
            if ".lora_" in name:
                continue
            part = next((p for p, prefixes in RECURRENT_PARTS.items() if name.startswith(prefixes)), None)
            if part is None:
                other += size
            else:
                sums[part] += size
        return ParamCounts(recurrent=True, other=other, **sums, **lora)
    # A plain HF model: the embeddings are whatever the model says its input/output embeddings are,
    # so this works for any architecture's naming. A tied lm_head is counted once.
    embedding_ids = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            embedding_ids.update(id(p) for p in module.parameters())
    embeddings = layers = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embedding_ids:
            embeddings += p.numel()
        else:
            layers += p.numel()
    return ParamCounts(recurrent=False, embeddings=embeddings, layers=layers)


def read_config(model_dir: str | Path) -> dict:
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in model dir {str(model_dir)!r}")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None


def build_on_meta(model_dir: str | Path):
    """The model of `model_dir` with meta tensors (shapes only, no memory, no weights read)."""
    import torch

    config = read_config(model_dir)
    with torch.device("meta"):
        if config.get("model_type") == RECURRENT_MODEL_TYPE:
            from retrofit.model.configuration_raven import RavenConfig
            from retrofit.model.modeling_raven import RavenForCausalLM

            return RavenForCausalLM(RavenConfig.from_pretrained(model_dir))
        from transformers import AutoConfig, AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


@lru_cache(maxsize=64)
def _count_model_dir_cached(resolved_dir: str, config_mtime: float) -> ParamCounts:
    return count_parameters(build_on_meta(resolved_dir))


def count_preset(name: str) -> tuple[ParamCounts, ParamCounts]:
    """(base, converted) parameter counts of a conversion preset (retrofit.model.conversion.PRESET_DEFINITIONS),
    both built on the meta device from the preset's stored base sizes: no download, no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from retrofit.model.conversion import FAMILIES, PRESET_DEFINITIONS, layer_choice, raven_config_from_hf
    from retrofit.model.modeling_raven import RavenForCausalLM

    if name not in PRESET_DEFINITIONS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_DEFINITIONS)}")
    preset = PRESET_DEFINITIONS[name]
    family = FAMILIES[preset.family]
    hf_config = AutoConfig.for_model(family.hf_model_types[0], **preset.base_config)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(hf_config)
        converted = RavenForCausalLM(raven_config_from_hf(hf_config, layer_choice(name, None, None, None), family))
    return count_parameters(base), count_parameters(converted)


def count_model_dir(model_dir: str | Path) -> ParamCounts:
    """Parameter counts of the model in `model_dir` (reads only config.json)."""
    config_path = Path(model_dir).resolve() / "config.json"
    config = read_config(model_dir)
    # A config without its sizes builds with its class's defaults (a 32-layer Llama): count nothing then.
    sizes = (("num_hidden_layers", "n_layer", "n_layers", "num_layers"), ("hidden_size", "n_embd", "d_model"))
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    if config.get("model_type") != "huginn_raven":
        missing = [names[0] for names in sizes if not any(name in config for name in names)]
        if missing:
            raise ValueError(f"{config_path} does not give {', '.join(missing)}: the counts would be the class defaults")
    return _count_model_dir_cached(str(config_path.parent), config_path.stat().st_mtime)


def step_flops(counts: ParamCounts, mean_rec: int, backprop_depth: int, tokens: int) -> int:
    """FLOPs of one optimizer step over `tokens` tokens (exact integer)."""
    if not counts.recurrent:
        return 6 * tokens * counts.layers
    with_grad = min(mean_rec, backprop_depth)
    without_grad = max(mean_rec - backprop_depth, 0)
    return (
        6 * tokens * (counts.applied_prelude + counts.applied_coda + with_grad * counts.applied_recurrent_block)
        + 2 * tokens * without_grad * counts.applied_recurrent_block
    )


def micro_batch_flops(counts: ParamCounts, num_steps: tuple[int, int] | None, tokens: int) -> int:
    """FLOPs of one forward + backward over `tokens` tokens at the depth it drew: `step_flops` with
    mean recurrence n + k and backprop depth k, i.e. 6 D (N_prelude + N_coda + k N_rec) + 2 D n N_rec
    (6 N D for a static model, `num_steps` None)."""
    if num_steps is None:
        return step_flops(counts, 1, 1, tokens)
    n, k = num_steps
    return step_flops(counts, n + k, k, tokens)


# Dense BF16 tensor-core peak (TFLOP/s, no sparsity) from NVIDIA's datasheets, matched against
# torch.cuda.get_device_name(); longest name first so "H100 PCIe" wins over "H100".
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "GH200": 989.0,
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}


def peak_tflops_of(device_name: str) -> float | None:
    """The table's peak for a GPU name such as 'NVIDIA H100 80GB HBM3', or None if unknown."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def model_flops_utilization(flops: float, seconds: float, peak_tflops_per_device: float | None, devices: int = 1) -> float | None:
    """Achieved model FLOPs over the devices' peak; None when no peak is known (e.g. a CPU run)."""
    if not peak_tflops_per_device or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops_per_device * 1e12 * devices)


def training_flops(
    counts: ParamCounts,
    checkpoints: int | Iterable[int],
    schedule: RecurrenceSchedule | None = None,
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
):
    """Training FLOPs spent up to each checkpoint (sum over steps 1..checkpoint).

    `schedule=None` means a static model (6 N D per step). Returns an int for an int checkpoint,
    else a dict checkpoint -> FLOPs, computed in one pass up to the largest checkpoint.
    """
    single = isinstance(checkpoints, int)
    wanted = sorted({checkpoints} if single else set(checkpoints))
    if wanted and wanted[0] < 0:
        raise ValueError(f"checkpoint steps must be >= 0, got {wanted[0]}")
    if counts.recurrent and schedule is None:
        raise ValueError("a recurrent model needs a recurrence schedule to count training FLOPs")
    result = {}
    if not counts.recurrent or schedule is None:
        result = {c: c * step_flops(counts, 1, 1, tokens_per_step) for c in wanted}
    else:
        # Warmup-stable: once both curricula are over, every step costs the same, so the tail is a
        # product (same values as stepping, since the cost comes from schedule.at either way).
        stable_from = schedule.stable_from()
        stable_cost = step_flops(counts, *schedule.at(stable_from), tokens_per_step)
        total, step, cost_cache = 0, 0, {}
        for checkpoint in wanted:
            while step < min(checkpoint, stable_from - 1):
                step += 1
                mean_rec, depth = schedule.at(step)
                key = (mean_rec, depth)
                if key not in cost_cache:
                    cost_cache[key] = step_flops(counts, mean_rec, depth, tokens_per_step)
                total += cost_cache[key]
            if checkpoint > step:
                total += (checkpoint - step) * stable_cost
                step = checkpoint
            result[checkpoint] = total
    return result[checkpoints] if single else result


def summed_mean_recurrence(schedule: RecurrenceSchedule, last_step: int) -> int:
    """Sum of the scheduled mean recurrence over steps 1..last_step (the curriculum's cost in iterations)."""
    return sum(schedule.at(step)[0] for step in range(1, last_step + 1))
