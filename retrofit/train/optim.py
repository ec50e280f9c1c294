"""Optimizers for retrofitting: AdamW, Muon (+ AdamW for the rest) and ELLIS-Adam ("AdamW*"),
plus the learning-rate schedule.

Every parameter group carries two extra keys the training loop reads:
- `base_lr`: the peak learning rate of the group (the schedule multiplies it),
- `recurrent`: True for the adapter and the recurrent block (`--throttle` divides their lr by the
  batch's mean backprop depth k).

The learning rate is set by hand each optimizer step (`set_learning_rates`) from a pure function of
the step (`wsd_lr_factor`), so resuming needs nothing but the step count and several optimizers
(Muon + AdamW) share one schedule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

RECURRENT_PARAM_MARKERS = ("transformer.adapter", "transformer.core_block")


def is_recurrent_param(name: str) -> bool:
    # DDP / torch.compile wrap names ("module.", "_orig_mod."): match anywhere.
    return any(marker in name for marker in RECURRENT_PARAM_MARKERS)


# --------------------------------------------------------------------------------------------
# ELLIS-Adam ("AdamW*")
# --------------------------------------------------------------------------------------------
class ELLISAdam(torch.optim.Optimizer):
    """Adam with the changes Huginn's pretraining used ("AdamW*" in the paper).

    Options (all per group):
    - running_init: first and second moments start from the first gradient (g and g^2) instead
      of zeros.
    - update_clipping: the step size is divided by max(1, rms(g / sqrt(v))) (v clamped at eps^2).
    - decouple_wd: weight decay is `p *= 1 - (lr / init_lr) * wd`, i.e. scaled by the schedule
      but not by the peak lr; otherwise `p *= 1 - lr * wd`.
    - atan_adam: the update is atan2(m, sqrt(v / bias_corr2)) instead of m / (sqrt(v / bias_corr2) + eps).
    - tensor_wise_gradient_normalization: each gradient is divided by its norm first.
    - tensor_wise_finite_check: a tensor whose gradient has a non-finite entry is skipped.
    The first moment is bias-corrected by dividing the step size by 1 - beta1^t as in Adam.
    """

    def __init__(
        self,
        params,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-6,
        weight_decay: float = 1e-2,
        *,
        running_init: bool = False,
        update_clipping: bool = False,
        decouple_wd: bool = True,
        atan_adam: bool = False,
        tensor_wise_gradient_normalization: bool = False,
        tensor_wise_finite_check: bool = False,
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        defaults = dict(
            lr=lr,
            init_lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            running_init=running_init,
            update_clipping=update_clipping,
            decouple_wd=decouple_wd,
            atan_adam=atan_adam,
            tensor_wise_gradient_normalization=tensor_wise_gradient_normalization,
            tensor_wise_finite_check=tensor_wise_finite_check,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            # a group given its own lr decays relative to that lr
            group["init_lr"] = group["lr"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if grad.dtype in (torch.float16, torch.bfloat16):
                    grad = grad.float()  # moments in fp32 for low-precision weights (--bf16_true)
                if group["tensor_wise_finite_check"] and not torch.isfinite(grad).all():
                    continue
                if group["tensor_wise_gradient_normalization"]:
                    grad = grad / grad.norm()
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    if group["running_init"]:
                        state["exp_avg"] = grad.clone()
                        state["exp_avg_sq"] = grad.square()
                    else:
                        state["exp_avg"] = torch.zeros_like(grad)
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

                step_size = lr
                if group["update_clipping"]:
                    # Floor v at eps^2 (in place, like the original) so rms(g / sqrt(v)) is finite.
                    exp_avg_sq.clamp_(min=eps**2)
                    rms = (grad.square() / exp_avg_sq).mean().sqrt().item()
                    step_size = step_size / max(rms, 1.0)

                state["step"] += 1
                t = state["step"].item()
                step_size = step_size / (1 - beta1**t)
                denom = exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)

                if group["decouple_wd"]:
                    decay = lr / group["init_lr"] * group["weight_decay"] if group["init_lr"] > 0 else 0.0
                else:
                    decay = lr * group["weight_decay"]
                if decay:
                    param.mul_(1 - decay)
                if group["atan_adam"]:
                    update = torch.atan2(exp_avg, denom)
                else:
                    update = exp_avg / (denom + eps)
                param.add_(update.to(param.dtype), alpha=-step_size)
        return loss


# --------------------------------------------------------------------------------------------
# Muon on sharded parameters
# --------------------------------------------------------------------------------------------
class FullMatrixMuon(torch.optim.Muon):
    """`torch.optim.Muon` that orthogonalises whole matrices when parameters are FSDP2 shards.

    torch's Muon accepts DTensor shards, but its Newton-Schulz iteration then runs as sharded bf16
    matmuls whose partial sums round differently: 2e-3 off the single-process update after 3 steps
    on a 32x48 matrix, measured against one process. Here each sharded parameter, its
    gradient and momentum buffer are gathered, the unchanged torch update runs on the full matrix
    (the same numbers as one process), and the local shard of the result is kept. The momentum
    buffer stays sharded between steps; one full matrix at a time is materialised. Plain tensors
    take torch's path untouched.
    """

    def _init_group(self, group, params_with_grad, grads, muon_momentum_bufs):
        has_complex = super()._init_group(group, params_with_grad, grads, muon_momentum_bufs)
        from torch.distributed.tensor import DTensor

        for i, param in enumerate(params_with_grad):
            if isinstance(param, DTensor):
                full = (param.full_tensor(), grads[i].full_tensor(), muon_momentum_bufs[i].full_tensor())
                self._write_back.append((param, muon_momentum_bufs[i], full[0], full[2]))
                params_with_grad[i], grads[i], muon_momentum_bufs[i] = full
        return has_complex

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import distribute_tensor

        self._write_back = []
        loss = super().step(closure)
        for param, buffer, full_param, full_buffer in self._write_back:
            for shard, full in ((param, full_param), (buffer, full_buffer)):
                # every rank holds the same full result: keep the local piece, no communication
                shard.copy_(distribute_tensor(full, shard.device_mesh, shard.placements, src_data_rank=None))
        self._write_back = []
        return loss


# --------------------------------------------------------------------------------------------
# Several optimizers behind one interface (Muon for matrices + AdamW for the rest)
# --------------------------------------------------------------------------------------------
class MultiOptimizer:
    """Steps several torch optimizers as one; `param_groups` is the concatenation of theirs."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict):
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(
                f"checkpoint has {len(state['optimizers'])} optimizers, this run builds {len(self.optimizers)}"
                " (was it saved with a different --muon.use_muon / --ellis_adam.enabled setting?)"
            )
        for opt, opt_state in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)


# --------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------
def embedding_param_ids(model: nn.Module) -> set[int]:
    """ids of input-embedding and output-head weights (found by module, not by name)."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None and getattr(head, "weight", None) is not None:
        ids.add(id(head.weight))
    return ids


def split_params(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Named trainable parameters in four buckets: {matrix, other} x {recurrent, rest}.

    "matrix" = 2-D hidden weights (attention and MLP projections, the adapter): what Muon
    orthogonalises. "other" = embeddings, lm_head, norms, biases: what AdamW keeps.
    """
    embeddings = embedding_param_ids(model)
    buckets: dict[str, list] = {"matrix_rec": [], "matrix": [], "other_rec": [], "other": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = "matrix" if param.ndim == 2 and id(param) not in embeddings else "other"
        buckets[kind + ("_rec" if is_recurrent_param(name) else "")].append((name, param))
    return buckets


def _groups(named: Iterable[tuple[str, nn.Parameter]], recurrent: bool, **hparams) -> list[dict]:
    params = [p for _, p in named]
    if not params:
        return []
    return [dict(params=params, recurrent=recurrent, base_lr=hparams["lr"], **hparams)]


OPTIMIZER_KINDS = ("adamw", "muon", "ellis_adam")


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    kind: str = "adamw",
    muon_lr: float = 0.005,
    muon_weight_decay: float = 1e-4,
    ellis_options: dict | None = None,
):
    """AdamW (`kind="adamw"`), Muon + AdamW (`"muon"`), or ELLIS-Adam (`"ellis_adam"`)."""
    if kind not in OPTIMIZER_KINDS:
        raise ValueError(f"unknown optimizer kind {kind!r}; expected one of {OPTIMIZER_KINDS}")
    buckets = split_params(model)
    adam_hparams = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    if kind == "ellis_adam":
        options = dict(ellis_options or {})
        groups = []
        for key, rec in (("matrix_rec", True), ("other_rec", True), ("matrix", False), ("other", False)):
            groups += _groups(buckets[key], rec, **adam_hparams)
        return ELLISAdam(groups, **adam_hparams, **options)
    if kind == "muon":
        muon_groups = _groups(buckets["matrix_rec"], True, lr=muon_lr, weight_decay=muon_weight_decay)
        muon_groups += _groups(buckets["matrix"], False, lr=muon_lr, weight_decay=muon_weight_decay)
        adam_groups = _groups(buckets["other_rec"], True, **adam_hparams, eps=eps)
        adam_groups += _groups(buckets["other"], False, **adam_hparams, eps=eps)
        optimizers = []
        if muon_groups:
            optimizers.append(FullMatrixMuon(muon_groups, lr=muon_lr, weight_decay=muon_weight_decay))
        if adam_groups:
            optimizers.append(torch.optim.AdamW(adam_groups, lr=lr, eps=eps))
        return MultiOptimizer(optimizers)
    groups = []
    for key, rec in (("matrix_rec", True), ("other_rec", True), ("matrix", False), ("other", False)):
        groups += _groups(buckets[key], rec, **adam_hparams, eps=eps)
    return torch.optim.AdamW(_merge_by_recurrence(groups), lr=lr, eps=eps)


def _merge_by_recurrence(groups: list[dict]) -> list[dict]:
    """AdamW needs no matrix/other split: one group for recurrent params, one for the rest."""
    merged: dict[bool, dict] = {}
    for group in groups:
        if group["recurrent"] in merged:
            merged[group["recurrent"]]["params"] += group["params"]
        else:
            merged[group["recurrent"]] = dict(group, params=list(group["params"]))
    return list(merged.values())


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------
def wsd_lr_factor(
    step: int, num_warmup_steps: int, num_decay_steps: int, num_training_steps: int, min_lr_ratio: float
) -> float:
    """Warmup-stable-decay multiplier after `step` scheduler steps (linear warmup from
    min_lr_ratio, cosine decay to min_lr_ratio), the same values as transformers'
    `get_wsd_schedule(..., warmup_type="linear", decay_type="cosine")`.
    """
    num_stable_steps = num_training_steps - num_warmup_steps - num_decay_steps
    if step < num_warmup_steps:
        progress = step / max(1, num_warmup_steps)
        return max(0.0, progress * (1.0 - min_lr_ratio) + min_lr_ratio)
    if step < num_warmup_steps + num_stable_steps:
        return 1.0
    if step < num_warmup_steps + num_stable_steps + num_decay_steps:
        progress = (step - num_warmup_steps - num_stable_steps) / max(1, num_decay_steps)
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


def set_learning_rates(optimizer, factor: float, recurrent_divisor: float = 1.0) -> None:
    """lr = base_lr * factor, and / recurrent_divisor for recurrent groups (--throttle)."""
    for group in optimizer.param_groups:
        lr = group["base_lr"] * factor
        if group.get("recurrent"):
            lr = lr / recurrent_divisor
        group["lr"] = lr
