"""Training a learned exit gate on a frozen retrofitted checkpoint (train_exit_gate.py; docs/adaptive_depth.md).

The gate (`ExitGate` in retrofit/model/layers_raven.py) gives each token a probability p_stop_i of
stopping after recurrent iteration i. Everything else in the model stays frozen, so the stage
first runs the model once over the data to R iterations (`collect_depth_records`: every scored
token's latent states s_0..s_R and its loss L_1..L_R at each depth), then fits only the gate's
h + N + 1 weights to those records, which costs no further model forwards.

Objectives (`--objective`), with z_i the gate's stop logit, lambda_i = sigmoid(z_i) and the exit
distribution p_i = lambda_i prod_{j<i} (1 - lambda_j) (the last iteration takes the rest):

- `exit_cost` (default): the expected cost of the exit decision the gate is used for,
  sum_i p_i (L_i + c i), the expected loss of Ouro's objective (Zhu et al. 2025, "Scaling Latent
  Reasoning via Looped Language Models") with a price of c nats per iteration (`depth_cost`) in
  place of its entropy term: with the model frozen, expected loss alone only learns where each
  token's loss is lowest, while the price makes stopping early at (nearly) equal loss worth it.
  Trained from the latent-equivalent gate (`init_latent_equivalent`: w = 0, a = -1, no exit after
  the first iteration), keeping a = -1, so it starts as exactly the `latent` criterion, can only
  move away from it where the records say that lowers the cost, and its threshold keeps latent's
  meaning (at initialisation, gate at T exits where latent at T / (1 - T) does).
- `remaining_gain`: Ouro's second, gate-only stage (adaptive gate training with the language model
  frozen): binary cross entropy of lambda_i against a soft "stop" label 1 - w_i,
  w_i = sigmoid(k (g_i - gamma)). Ouro's g_i is the one-step improvement max(0, L_{i-1} - L_i);
  here it is the gain still to come, g_i = max(0, L_i - min_{j > i} L_j). It labels every
  iteration as if every token kept iterating, not the exit decision, and trained so (from a zero
  gate) its curve lay up to 1e-3 nats above `latent`'s on the quickstart (docs/adaptive_depth.md).
- `expected_loss`: Ouro's entropy-regularised objective, sum_i p_i L_i - beta H(p). With the model
  frozen it only learns where each token's loss is lowest: nothing in it rewards stopping early at
  equal loss.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

OBJECTIVES = ("exit_cost", "remaining_gain", "expected_loss")
INITS = ("auto", "latent", "zero")  # auto: latent for exit_cost, zero (the original gate) otherwise
# The latent-equivalent gate's bias after the first iteration: sigmoid(-30) rounds 1 - p_stop to 1
# in float32, so no threshold below 1 exits there, like every heuristic (the first iteration compares
# s_1 with the random s_0; stopping there also freezes the token's keys and values at their first
# iteration for every later token, which cost the original gate 1e-3 nats in the sweep).
NO_EXIT_BIAS = -30.0
# Files of a checkpoint that saving the gated model rewrites; everything else (tokenizer, generation
# config, chat template, run metadata) is copied from the base checkpoint as it is.
REWRITTEN_SUFFIXES = (".safetensors", ".bin", ".index.json")
REWRITTEN_NAMES = ("config.json",)


class ExitGateError(ValueError):
    """Bad input to the exit-gate stage; the message names the bad value."""


@dataclass
class DepthRecords:
    """What the frozen model does with every scored token: `states` (R + 1, M, h) holds s_0..s_R,
    `losses` (R, M) the next-token loss after 1..R iterations."""

    states: torch.Tensor
    losses: torch.Tensor

    @property
    def iterations(self) -> int:
        return self.losses.shape[0]

    @property
    def tokens(self) -> int:
        return self.losses.shape[1]


@dataclass
class GateObjective:
    name: str = "exit_cost"
    sharpness: float = 50.0  # k: Ouro's value
    min_gain: float = 0.005  # gamma (nats): Ouro's value
    entropy_weight: float = 0.05  # beta, expected_loss only
    depth_cost: float = 0.01  # c (nats per iteration), exit_cost only (last: older positional calls keep their meaning)

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ExitGateError(f"objective {self.name!r} is not one of {', '.join(OBJECTIVES)}")
        for key in ("depth_cost", "sharpness", "min_gain", "entropy_weight"):
            value = getattr(self, key)
            if not value >= 0 or value == float("inf"):
                raise ExitGateError(f"{key} must be a finite number >= 0, got {value}")


def token_losses(model, state: torch.Tensor, ctx, labels: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """Per-token next-token loss (B, T) of the model's output at `state` (-100 targets give 0)."""
    x = model.run_coda(state, ctx).flatten(0, 1)
    targets = labels.flatten()
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk_rows):
        logits = model.lm_head(x[start : start + chunk_rows]).float()
        out[start : start + chunk_rows] = F.cross_entropy(
            logits, targets[start : start + chunk_rows], ignore_index=-100, reduction="none"
        )
    return out.view(labels.shape)


@torch.no_grad()
def collect_depth_records(model, input_ids, attention_mask, iterations: int, batch_size: int, seed: int,
                          progress: bool = True) -> DepthRecords:
    """Run the frozen model to `iterations` over rows of max_length + 1 tokens (`load_eval_rows`)
    and keep, for each scored token, its latent state after every iteration and its loss there."""
    from retrofit.progress import progress_bar

    from retrofit.data.rows import inputs_and_labels

    device = model.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    states, losses = [], []
    for start in progress_bar(range(0, input_ids.shape[0], batch_size), desc="depth records", enabled=progress, leave=False):
        inputs, mask, labels = inputs_and_labels(input_ids[start : start + batch_size].to(device),
                                                 attention_mask[start : start + batch_size].to(device))
        ctx = model.attention_context(inputs, mask)
        e = model.run_prelude(model.embed(inputs), ctx)
        state = model.initial_state(e, generator=generator)  # the sweep's rule: s_0 shaped like the prelude output
        parts = model.adapter_parts(e)
        scored = labels != -100
        batch_states, batch_losses = [state[scored]], []
        for i in range(iterations):
            state = model.recur(state, e, ctx, i, adapter_parts=parts)
            batch_states.append(state[scored])
            batch_losses.append(token_losses(model, state, ctx, labels)[scored])
        states.append(torch.stack(batch_states))
        losses.append(torch.stack(batch_losses))
    return DepthRecords(states=torch.cat(states, 1), losses=torch.cat(losses, 1))


def stop_logits(model, states: torch.Tensor) -> torch.Tensor:
    """The gate's stop logits (R, M) after iterations 1..R, from states (R + 1, M, h)."""
    return torch.stack([model.exit_gate(states[i], states[i - 1], i) for i in range(1, states.shape[0])])


def remaining_gain(losses: torch.Tensor) -> torch.Tensor:
    """g_i = max(0, L_i - min_{j > i} L_j) per iteration i (R, M); 0 after the last iteration."""
    later_best = torch.flip(torch.cummin(torch.flip(losses, [0]), 0).values, [0])  # min_{j >= i} L_j
    later_best = torch.cat([later_best[1:], losses[-1:]])  # min over j > i (the last: itself)
    return (losses - later_best).clamp(min=0)


def exit_distribution_log(logits: torch.Tensor) -> torch.Tensor:
    """log p_i (R, M) of stopping exactly after iteration i; the last iteration takes the rest."""
    log_stop, log_go = F.logsigmoid(logits), F.logsigmoid(-logits)
    survived = torch.cat([torch.zeros_like(log_go[:1]), log_go[:-1].cumsum(0)])  # log prod_{j<i} (1 - lambda_j)
    log_p = survived + log_stop
    return torch.cat([log_p[:-1], survived[-1:]])


def gate_objective(logits: torch.Tensor, losses: torch.Tensor, objective: GateObjective) -> torch.Tensor:
    """The objective (a scalar, lower is better) of stop logits (R, M) for per-depth losses (R, M)."""
    if objective.name == "remaining_gain":
        return F.binary_cross_entropy_with_logits(logits, stop_labels(losses, objective))
    log_p = exit_distribution_log(logits)
    p = log_p.exp()
    if objective.name == "exit_cost":
        depth = torch.arange(1, losses.shape[0] + 1, device=losses.device, dtype=losses.dtype)[:, None]
        return (p * (losses + objective.depth_cost * depth)).sum(0).mean()
    entropy = -(p * log_p).sum(0)
    return ((p * losses).sum(0) - objective.entropy_weight * entropy).mean()


def resolve_init(init: str, objective: GateObjective) -> str:
    if init not in INITS:
        raise ExitGateError(f"init {init!r} is not one of {', '.join(INITS)}")
    if init == "auto":
        return "latent" if objective.name == "exit_cost" else "zero"
    return init


@torch.no_grad()
def init_latent_equivalent(model, exit_after_first: bool = False) -> None:
    """Set the gate to z_i = -log(||s_i - s_{i-1}|| / ||s_i||) (+ NO_EXIT_BIAS after iteration 1):
    w = 0, a = -1, b = 0. Threshold T then exits exactly where `latent` at T / (1 - T) does.
    `exit_after_first`: b_1 = 0 like the others, so training may learn to stop tokens after their
    first iteration (there the gate compares s_1 with the random s_0)."""
    gate = model.exit_gate
    gate.reset_parameters()
    gate.change_weight.fill_(-1.0)
    if not exit_after_first:
        gate.iteration_bias[0] = NO_EXIT_BIAS


def trainable_parameters(model, init: str) -> list[torch.nn.Parameter]:
    """The gate's weights that training moves: all of them from a zero gate; from the
    latent-equivalent gate only w and the biases (a stays -1, the norm's scale is w's)."""
    gate = model.exit_gate
    if init == "latent":
        return [gate.proj.weight, gate.iteration_bias]
    return list(gate.parameters())


def stop_labels(losses: torch.Tensor, objective: GateObjective) -> torch.Tensor:
    """The remaining_gain objective's soft stop labels 1 - w_i (R, M)."""
    return 1 - torch.sigmoid(objective.sharpness * (remaining_gain(losses) - objective.min_gain))


def objective_floor(records: DepthRecords, objective: GateObjective) -> float | None:
    """The lowest value the remaining_gain objective can reach (the labels' own entropy, when the
    gate predicts every label exactly); None for expected_loss."""
    if objective.name != "remaining_gain":
        return None
    labels = stop_labels(records.losses, objective)
    return float(F.binary_cross_entropy(labels, labels))


@torch.no_grad()
def evaluate_objective(model, records: DepthRecords, objective: GateObjective, chunk: int = 8192) -> float:
    """The objective over every recorded token (weighted by tokens over chunks)."""
    total = 0.0
    for start in range(0, records.tokens, chunk):
        part = slice(start, start + chunk)
        value = gate_objective(stop_logits(model, records.states[:, part]), records.losses[:, part], objective)
        total += float(value) * records.losses[:, part].shape[1]
    return total / max(records.tokens, 1)


def train_gate(model, records: DepthRecords, objective: GateObjective, steps: int, lr: float,
               tokens_per_step: int, seed: int, progress: bool = True, parameters=None) -> list[float]:
    """Fit the gate's weights (only those; `parameters`, default all of the gate's) to the records
    with AdamW, on `tokens_per_step` tokens drawn at random each step, or on every token when that
    covers them (the per-token losses are noisy: exit_cost gates from resampled batches lay up to
    2e-4 nats above the full-batch one); returns each step's objective."""
    from retrofit.progress import progress_bar

    if model.exit_gate is None:
        raise ExitGateError("the model has no exit gate to train (add_exit_gate first)")
    for param in model.parameters():
        param.requires_grad_(False)
    params = list(model.exit_gate.parameters()) if parameters is None else list(parameters)
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    history = []
    bar = progress_bar(range(steps), desc="exit gate", enabled=progress)
    whole = tokens_per_step >= records.tokens  # every token each step: exact, no sampling noise
    for _ in bar:
        if whole:
            states, losses = records.states, records.losses
        else:
            pick = torch.randint(records.tokens, (tokens_per_step,), generator=generator).to(records.states.device)
            states, losses = records.states[:, pick], records.losses[:, pick]
        loss = gate_objective(stop_logits(model, states), losses, objective)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
        bar.set_postfix(objective=f"{history[-1]:.4f}")
    for param in params:
        param.requires_grad_(False)
    return history


def save_gated_checkpoint(model, base_dir: str | Path, out_dir: str | Path) -> Path:
    """The base checkpoint's files with the model's weights and config (gate included) rewritten,
    written to a temporary folder beside `out_dir` and renamed into place; never overwrites."""
    from retrofit.atomic import atomic_directory

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists():
        raise ExitGateError(f"--save_name {out_dir} already exists: choose a new folder (nothing is overwritten)")
    rewritten = lambda name: name.endswith(REWRITTEN_SUFFIXES) or name in REWRITTEN_NAMES or name.endswith("_raven.py")
    with atomic_directory(out_dir) as tmp:
        shutil.copytree(base_dir, tmp, ignore=lambda _, names: [n for n in names if rewritten(n)], dirs_exist_ok=True)
        model.save_pretrained(tmp)
    return out_dir
