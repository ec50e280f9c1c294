"""A depth-recurrent causal LM in the Raven / Huginn layout, for retrofitted decoder LMs.

    e = prelude(wte(x))                                  # a few early layers, run once
    s_0 ~ TruncNormal(0, std^2, +-3 std)                 # random initial latent state
    s_i = core_block(adapter(cat([s_{i-1}, e])))         # the recurrent block, r times
    logits = lm_head(ln_f(coda(s_r)))                    # a few late layers, run once

Training uses truncated backprop: `num_steps=(n, k)` runs n iterations without grad, then k with
grad. One implementation covers every supported layer family (Llama, Mistral, SmolLM, Qwen2/2.5,
Qwen3, OLMo-2) through three config switches (`norm_placement`, `qk_norm`, `qkv_bias`). Parameter
names follow the authors' released checkpoints.

This file and the ones it imports relatively (configuration_raven.py, layers_raven.py: the layers
and depth sampler, generation_raven.py: decoding, exits_raven.py: adaptive exit, speculative_raven.py:
speculative decoding) are self-contained (torch + transformers only) and copied next to saved weights, so a checkpoint loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` anywhere. It keeps its own KV
cache and decode loop instead of transformers' cache classes, whose internals changed between
releases and broke the original code twice.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_raven import RavenConfig, normalise_exit_gate, normalise_lora
from .generation_raven import RavenGenerationMixin
from .layers_raven import (
    AttentionContext,
    Block,
    ExitGate,
    KVCache,
    LoRALinear,
    RMSNorm,
    rope_inverse_frequencies,
    sample_num_steps,
)

# The files of the model's code, copied beside saved weights (`save_pretrained`).
MODEL_CODE_FILES = (
    "modeling_raven.py", "configuration_raven.py", "layers_raven.py", "generation_raven.py", "exits_raven.py",
    "speculative_raven.py",
)

# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


@dataclass
class RavenCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    log_ppl: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: KVCache | None = None  # transformers >= 5.2 renames `past_key_values` to `cache` here
    latent_states: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    stats: dict | None = None


RavenCausalLMOutput.past_key_values = property(lambda self: self.cache)


class RavenPreTrainedModel(PreTrainedModel):
    config_class = RavenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Fresh weights (init_from_scratch, or keys missing from a checkpoint): small normal init
        # for matrices, ones for norms. The adapter gets PyTorch's default Linear init, as in the
        # authors' release; conversion sets it explicitly.
        std = self.config.initializer_range
        if isinstance(module, ExitGate):
            module.reset_parameters()
        elif isinstance(module, LoRALinear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            module.reset_lora_parameters()
        elif isinstance(module, nn.Linear):
            if module is getattr(getattr(self, "transformer", None), "adapter", None):
                module.reset_parameters()
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint directory before loading it (the authors' OLMo checkpoints state their layout
# only through their weights)
# ----------------------------------------------------------------------------------------------

HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
QK_NORM_SUFFIXES = ("attn.q_norm.weight", "attn.k_norm.weight")


def locate_checkpoint_file(path, name: str, load_kwargs: dict) -> str | None:
    """Local path of `name` in a checkpoint dir or Hub repo, or None when it has no such file."""
    subfolder = load_kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        candidate = os.path.join(path, subfolder, name)
        return candidate if os.path.isfile(candidate) else None
    try:
        from transformers.utils import cached_file

        hub = {k: load_kwargs[k] for k in HUB_KWARGS if k in load_kwargs}
        return cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub)
    except Exception:  # no network, no such repo: from_pretrained will report it properly
        return None


def checkpoint_weight_names(path, load_kwargs: dict) -> set[str] | None:
    """Names of the tensors a checkpoint stores, read from file headers / index files only;
    None when there is no readable weight file (from_pretrained then gives its own error)."""
    for name in WEIGHT_FILES:
        found = locate_checkpoint_file(path, name, load_kwargs)
        if found is None:
            continue
        try:
            if name.endswith(".index.json"):
                with open(found) as f:
                    return set(json.load(f)["weight_map"])
            if name.endswith(".safetensors"):
                with open(found, "rb") as f:  # 8-byte little-endian header size, then a JSON header
                    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
                return {k for k in header if k != "__metadata__"}
            return set(torch.load(found, map_location="meta", weights_only=True, mmap=True))
        except Exception:
            return None
    return None


def config_states_layout(path, load_kwargs: dict) -> bool:
    """Whether the checkpoint's config.json sets `norm_placement` or `qk_norm` itself."""
    found = locate_checkpoint_file(path, "config.json", load_kwargs)
    if found is None:
        return True
    try:
        with open(found) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return True  # from_pretrained reports the broken file
    return "norm_placement" in saved or "qk_norm" in saved


def describe_keys(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:6])
    return shown + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")



class RavenForCausalLM(RavenGenerationMixin, RavenPreTrainedModel):
    _tied_weights_keys = {}
    # RoPE tables are recomputed from the config; checkpoints that also stored them load fine.
    _keys_to_ignore_on_load_unexpected = [r"freqs_cis$", r"rotary_emb\.inv_freq$"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained` with two additions.

        - A config.json without `norm_placement` / `qk_norm` (the authors' OLMo release) gets the
          OLMo-2 layout when the weights hold q/k norm tensors, the Llama layout otherwise.
        - Strict weights: a checkpoint tensor the model would not use, or a model weight the
          checkpoint lacks, is a ValueError naming the keys (never a silent drop or random init).
        """
        config = kwargs.get("config")
        if config is None or isinstance(config, RavenConfig):
            unstated = config.layout_from_weights if config is not None else not config_states_layout(
                pretrained_model_name_or_path, kwargs
            )
            names = checkpoint_weight_names(pretrained_model_name_or_path, kwargs) if unstated else None
            if names is not None and any(n.endswith(QK_NORM_SUFFIXES) for n in names):
                layout = {"norm_placement": "post", "qk_norm": "whole"}
                if config is not None:
                    config = copy.deepcopy(config)
                    for key, value in layout.items():
                        setattr(config, key, value)
                    config.layout_from_weights = False
                    kwargs["config"] = config
                else:
                    kwargs.update(layout)  # applied to the loaded config like any config override
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        problems = []
        if info.get("unexpected_keys"):
            problems.append(f"weights the model does not use: {describe_keys(info['unexpected_keys'])}")
        if info.get("missing_keys"):
            problems.append(f"weights the checkpoint lacks: {describe_keys(info['missing_keys'])}")
        if problems:
            raise ValueError(
                f"checkpoint {pretrained_model_name_or_path} does not match its config "
                f"(norm_placement={model.config.norm_placement!r}, qk_norm={model.config.qk_norm!r}, qkv_bias={model.config.qkv_bias}): "
                + "; ".join(problems)
            )
        return (model, info) if want_info else model

    def __init__(self, config: RavenConfig):
        config.validate()  # again: from_pretrained applies overrides (e.g. mean_recurrence=R) after __init__
        super().__init__(config)
        h = config.n_embd
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, h),
                prelude=nn.ModuleList(Block(config) for _ in range(config.n_layers_in_prelude)),
                adapter=nn.Linear(2 * h, h, bias=False),
                core_block=nn.ModuleList(Block(config) for _ in range(config.n_layers_in_recurrent_block)),
                coda=nn.ModuleList(Block(config) for _ in range(config.n_layers_in_coda)),
                ln_f=RMSNorm(h, config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(h, config.padded_vocab_size, bias=False)
        # RoPE frequencies are derived from the config, never saved: kept out of the module's
        # buffers so meta-device loading (transformers 5) cannot leave them uninitialised.
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.step = 0  # counts training forwards that sampled their own depth
        # Recompute each grad iteration of the recurrent block in backward instead of keeping its
        # activations (training only; set by the trainer, not saved).
        self.activation_checkpointing = False
        self._core_lora_layers: list[LoRALinear] = []
        self._install_lora()
        # The learned exit gate (config `exit_gate`; train_exit_gate.py): no weights without it.
        self.exit_gate = ExitGate(config) if config.exit_gate else None
        self.post_init()

    # -- HF plumbing ---------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights + config, and copy this file and the config file beside them (auto_map)."""
        self.config.auto_map = {
            "AutoConfig": "configuration_raven.RavenConfig",
            "AutoModelForCausalLM": "modeling_raven.RavenForCausalLM",
        }
        self.config.architectures = ["RavenForCausalLM"]
        super().save_pretrained(save_directory, *args, **kwargs)
        here = Path(__file__).resolve().parent
        for name in MODEL_CODE_FILES:
            if (here / name).resolve() != (Path(save_directory) / name).resolve():
                shutil.copyfile(here / name, Path(save_directory) / name)

    # -- LoRA ------------------------------------------------------------------------------------

    def add_lora(self, rank: int, alpha: float | None = None, targets=("core_block",), num_deltas: int = 1) -> None:
        """Add low-rank deltas (zero at first) to every linear layer of `targets` and record them
        in the config, so a saved checkpoint rebuilds them wherever it is loaded."""
        if self.config.lora:
            raise ValueError(f"this model already has LoRA deltas ({self.config.lora})")
        self.config.lora = normalise_lora(
            {"rank": rank, "alpha": alpha if alpha is not None else rank, "targets": list(targets), "num_deltas": num_deltas}
        )
        self._install_lora()

    def _install_lora(self) -> None:
        for part in ("prelude", "core_block", "coda"):
            num_deltas = self.config.lora_deltas(part)
            if not num_deltas:
                continue
            for block in self.transformer[part]:
                for parent in list(block.modules()):
                    for name, child in list(parent.named_children()):
                        if type(child) is nn.Linear:
                            lora = LoRALinear.from_linear(child, self.config.lora["rank"], self.config.lora["alpha"], num_deltas)
                            setattr(parent, name, lora)
        self._core_lora_layers = [m for m in self.transformer.core_block.modules() if isinstance(m, LoRALinear)]

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if ".lora_" in name]

    def freeze_base_weights(self) -> None:
        """Train only the LoRA deltas."""
        if not self.config.lora:
            raise ValueError("freeze_base_weights needs LoRA deltas (add_lora first)")
        for name, param in self.named_parameters():
            param.requires_grad_(".lora_" in name)

    def merge_lora_(self) -> list[str]:
        """Fold every single delta (shared across iterations, prelude, coda) into its base weight, in
        place; per-iteration deltas of the recurrent block stay. Returns the parts merged."""
        if not self.config.lora:
            return []
        merged = [part for part in self.config.lora["targets"] if self.config.lora_deltas(part) == 1]
        for part in merged:
            for block in self.transformer[part]:
                for parent in list(block.modules()):
                    for name, child in list(parent.named_children()):
                        if isinstance(child, LoRALinear):
                            setattr(parent, name, child.merged())
        remaining = [t for t in self.config.lora["targets"] if t not in merged]
        self.config.lora = dict(self.config.lora, targets=remaining) if remaining else None
        self._core_lora_layers = [m for m in self.transformer.core_block.modules() if isinstance(m, LoRALinear)]
        return merged

    def add_exit_gate(self, iterations: int = 32) -> None:
        """A fresh exit gate (p_stop = 1/2 everywhere), recorded in the config so it saves and loads."""
        self.config.exit_gate = normalise_exit_gate({"iterations": iterations})
        weight = self.lm_head.weight
        self.exit_gate = ExitGate(self.config).to(device=weight.device, dtype=weight.dtype)
        self.exit_gate.reset_parameters()

    def exit_probability(self, state: torch.Tensor, previous_state: torch.Tensor, iteration) -> torch.Tensor:
        """(B, T) probability in [0, 1] that each token stops after recurrent iteration `iteration`
        (1-based: an int, or each token's as a tensor), which took `previous_state` to `state` (ExitGate)."""
        if self.exit_gate is None:
            raise ValueError("this checkpoint has no exit gate (config exit_gate is null): train one with train_exit_gate.py")
        return torch.sigmoid(self.exit_gate(state, previous_state, iteration))

    # -- building blocks of the forward pass (also used by conversion checks and depth sweeps) --

    def attention_context(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> AttentionContext:
        """RoPE tables and the attention mask for a call on `input_ids` (B, T).

        `attention_mask` (B, past + T), 1 = real token, covers cached tokens too. Positions count
        real tokens only, so a left-padded sequence gets the same positions as it would alone.
        """
        B, T = input_ids.shape
        device = input_ids.device
        past = cache.seen_tokens if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != past + T:
            raise ValueError(
                f"attention_mask has length {attention_mask.shape[-1]}, expected {past + T} (cached {past} + new {T})"
            )
        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None and padded:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        if position_ids is None:
            cos, sin = self.rope_tables(past + T, device)
            cos, sin = cos[past : past + T, None], sin[past : past + T, None]  # (T, 1, D), broadcast over B
        else:
            cos, sin = self.rope_at(position_ids)

        mask = None
        if padded or (past > 0 and T > 1):
            q_pos = torch.arange(past, past + T, device=device)
            k_pos = torch.arange(past + T, device=device)
            mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # causal, (1, 1, T, past + T)
            if padded:
                mask = mask & attention_mask.bool()[:, None, None, :]
                # A padding query would attend to nothing (NaN in SDPA): let it see itself.
                mask = mask | (k_pos[None, :] == q_pos[:, None])[None, None]
        return AttentionContext(cos=cos, sin=sin, mask=mask, cache=cache, past_length=past)

    def rope_tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (`apply_rope`) of positions 0 .. >= length-1, (P, head_dim).

        Computed once per device and dtype and grown by doubling, so a decode step only indexes
        them, and every call (cached or not) reads the same numbers for the same position.
        """
        dtype = self.transformer.wte.weight.dtype
        key = (torch.device(device), dtype)
        tables = self._rope_tables.get(key)
        if tables is None or tables[0].shape[0] < length:
            size = max(256, 1 << (max(length, 1) - 1).bit_length())
            inv_freq = rope_inverse_frequencies(self.config).to(device)
            freqs = torch.arange(size, device=device).float()[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            sin = emb.sin()
            half = sin.shape[-1] // 2
            signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
            tables = self._rope_tables[key] = (emb.cos().to(dtype), signed_sin.to(dtype))
        return tables

    def rope_at(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin at `position_ids` (B, T), shaped (B, T, 1, head_dim)."""
        cos, sin = self.rope_tables(int(position_ids.max()) + 1, position_ids.device)
        flat = position_ids.reshape(-1)
        shape = (*position_ids.shape, 1, cos.shape[-1])
        return cos.index_select(0, flat).view(shape), sin.index_select(0, flat).view(shape)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(input_ids)
        scale = self.config.init_values.get("embed_scale", 1.0)
        return x * scale if scale != 1.0 else x

    def run_prelude(self, x: torch.Tensor, ctx: AttentionContext, hidden: list | None = None) -> torch.Tensor:
        for j, layer in enumerate(self.transformer.prelude):
            x = layer(x, ctx, ctx.cache.slot("prelude", j) if ctx.cache else None)
            if hidden is not None:
                hidden.append(x)
        return x

    def initial_state(self, prelude_out: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """s_0 ~ TruncNormal(0, std^2, +-3 std), std read from the config at call time (0 -> zeros)."""
        std = float(self.config.init_values.get("std", 0.0))
        state = torch.zeros_like(prelude_out)
        if std > 0:
            nn.init.trunc_normal_(state, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
            scale = self.config.init_values.get("embed_scale", 1.0)
            if scale != 1.0:
                state = state * scale
        return state

    def adapter_parts(self, prelude_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split adapter(cat([s, e])) = s @ W_s^T + e @ W_e^T and project e once per forward.

        The prelude output is the same at every iteration, so its half of the adapter is computed
        once instead of r times, and no (B, T, 2h) concatenation is materialised per iteration.
        """
        weight = self.transformer.adapter.weight
        h = weight.shape[0]
        return weight[:, :h].contiguous(), F.linear(prelude_out, weight[:, h:])

    def recur(
        self,
        state: torch.Tensor,
        prelude_out: torch.Tensor,
        ctx: AttentionContext,
        iteration: int,
        hidden: list | None = None,
        adapter_parts: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One pass of the recurrent block: core_block(adapter(cat([state, prelude_out]))).

        Pass `adapter_parts=self.adapter_parts(prelude_out)` when iterating many times.
        """
        w_state, embed_proj = adapter_parts if adapter_parts is not None else self.adapter_parts(prelude_out)
        for layer in self._core_lora_layers:  # per-iteration LoRA: this iteration's delta
            layer.delta_index = iteration
        x = torch.addmm(embed_proj.reshape(-1, embed_proj.shape[-1]), state.reshape(-1, state.shape[-1]), w_state.t())
        x = x.view(state.shape)
        for j, layer in enumerate(self.transformer.core_block):
            x = layer(x, ctx, ctx.cache.slot("core", j, iteration) if ctx.cache else None)
            if hidden is not None:
                hidden.append(x)
        return x

    def run_coda(self, x: torch.Tensor, ctx: AttentionContext, hidden: list | None = None) -> torch.Tensor:
        """Coda layers and the final norm; returns the normalised hidden state fed to lm_head."""
        for j, layer in enumerate(self.transformer.coda):
            x = layer(x, ctx, ctx.cache.slot("coda", j) if ctx.cache else None)
            if hidden is not None:
                hidden.append(x)
        return self.transformer.ln_f(x)

    def resolve_num_steps(self, num_steps) -> tuple[int, int]:
        """(n, k) from None | int | (n, k); None samples in training mode, else mean_recurrence."""
        if num_steps is None:
            if self.training:
                self.step += 1
                return sample_num_steps(
                    int(self.config.mean_recurrence), int(self.config.mean_backprop_depth), self.step
                )
            return int(self.config.mean_recurrence), 0
        if isinstance(num_steps, (tuple, list)) or (torch.is_tensor(num_steps) and num_steps.numel() == 2):
            n, k = (int(v) for v in num_steps)
        else:
            n, k = int(num_steps), 0
        if n < 0 or k < 0 or n + k < 1:
            raise ValueError(f"num_steps must give at least one iteration, got (n={n}, k={k})")
        return n, k

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_steps=None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        initial_state: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        return_dict: bool = True,
        shift_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> RavenCausalLMOutput:
        """The loss follows HF's causal LMs: `labels` are shifted inside (`labels=input_ids` scores
        the next token, as every HF tool expects), and `shift_labels` takes labels already aligned
        with the logits (`shift_labels[t]` is the target of position t; it wins over `labels`), as
        HF's ForCausalLM loss does. The authors' Huginn code took `labels` aligned, without the
        shift: pass such labels as `shift_labels`. -100 marks targets that are not scored.

        `logits_to_keep=m > 0` computes logits for the last m positions only (decoding).
        """
        n, k = self.resolve_num_steps(num_steps)
        past_key_values = kwargs.pop("cache", past_key_values)
        if use_cache and past_key_values is None:
            past_key_values = KVCache()
        ctx = self.attention_context(input_ids, attention_mask, position_ids, past_key_values)
        hidden = [] if output_hidden_states else None
        x, state = self.run_layers(input_ids, ctx, n, k, initial_state, hidden)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)

        loss = log_ppl = None
        if shift_labels is None and labels is not None:
            shift_labels = F.pad(labels[..., 1:], (0, 1), value=-100)  # position t predicts labels[t + 1]
        if shift_labels is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
            )
            log_ppl = loss.detach().exp()
        return RavenCausalLMOutput(
            loss=loss,
            log_ppl=log_ppl,
            logits=logits,
            cache=past_key_values if use_cache else None,
            latent_states=state.detach(),
            hidden_states=tuple(hidden) if hidden is not None else None,
            stats={"num_steps_no_grad": n, "num_steps_with_grad": k},
        )

    def run_layers(
        self,
        input_ids: torch.Tensor,
        ctx: AttentionContext,
        n: int,
        k: int,
        initial_state: torch.Tensor | None = None,
        hidden: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """prelude, n iterations without grad, k with grad, coda: (ln_f output, last state).

        The forward pass without the head; `forward` and the decode steps of `generate` share it.
        Advances the cache (if any) past these tokens.
        """
        e = self.embed(input_ids)
        if hidden is not None:
            hidden.append(e)
        e = self.run_prelude(e, ctx, hidden)
        state = self.initial_state(e) if initial_state is None else initial_state
        parts = self.adapter_parts(e)
        with torch.no_grad():
            for i in range(n):
                state = self.recur(state, e, ctx, i, hidden, parts)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and ctx.cache is None and hidden is None
        for i in range(n, n + k):
            if recompute:
                # Keep only the iteration's inputs; its activations are recomputed in backward.
                state = torch.utils.checkpoint.checkpoint(self.recur, state, e, ctx, i, None, parts, use_reentrant=False)
            else:
                state = self.recur(state, e, ctx, i, hidden, parts)
        x = self.run_coda(state, ctx, hidden)
        if ctx.cache is not None:
            ctx.cache.seen_tokens = ctx.past_length + input_ids.shape[1]
        return x, state


RavenConfig.register_for_auto_class()
RavenForCausalLM.register_for_auto_class("AutoModelForCausalLM")

if __name__.startswith("retrofit."):
    # Imported as part of this repo (not as remote code beside a checkpoint): let the Auto classes
    # resolve model_type RavenConfig.model_type to these classes without trust_remote_code.
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(RavenConfig.model_type, RavenConfig, exist_ok=True)
    AutoModelForCausalLM.register(RavenConfig, RavenForCausalLM, exist_ok=True)
