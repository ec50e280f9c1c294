"""Validation loss over test-time depth, shared by multi_recurrence_eval.py, its tests and bench/bench_eval.py.

Validation loss over test-time depth. The recurrent model computes

    e = prelude(embed(x)); s_0 = initial state; s_i = recur(s_{i-1}, e); logits_r = head(coda(s_r))

so the losses at depths 1, 2, 4, ..., 64 can all be read off one run of 64 iterations: run the
prelude once, keep iterating, and apply the coda + head whenever i is a requested depth
(`depth_sweep`). Evaluating each depth from scratch (`independent_losses`, the original script's
way) costs 1 + 2 + ... + 64 = 127 iterations and 7 preludes/codas; the two agree exactly when they
start from the same initial state, which is why both draw it from the same seeded generator.

Adaptive depth (Huginn-style per-token early exit, the criteria of the model code's
`exits_raven.EXIT_CRITERIA`): a token stops iterating once its criterion's change between
iterations falls below a threshold. An exited token keeps its state, and later iterations of the
other tokens attend to its last iteration's keys and values (Huginn's rule, as in decoding). Once
some tokens have exited, only the others run the recurrent block (`retrofit.evaluate.adaptive_sweep`:
packed per row); the compute actually spent is counted (`executed`: recurrent-block
token-iterations run), beside the mean iterations per scored token.

Also here: reading the held-out parquet shard, per-sequence losses and the result JSON.

`inputs_and_labels` (re-exported here for the evaluation scripts) is `retrofit.data.rows`'s, the same
rule training uses; the adaptive exit is the model code's `ExitTracker`, the same iteration its
adaptive decoding runs.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from retrofit.evaluate.adaptive_sweep import adaptive_sweep
from retrofit.evaluate.scoring import (  # noqa: F401 (re-exported)
    EvalError, SweepResult, draw_initial_state, mean_over_scored, per_sequence_loss,
)
from retrofit.model.exits_raven import criterion_names, exit_criterion  # noqa: F401 (criterion_names re-exported)
from retrofit.data.rows import inputs_and_labels, row_matrix
from retrofit.train.depth import MAX_RECURRENCE
from retrofit.data.shards import first_row_groups
from retrofit.train.run_folder import MODEL_ONLY_PREFIX

DEFAULT_RECURRENCES = (1, 2, 4, 8, 16, 32, 64)  # the paper's validation loss depths (docs/evaluation.md, Tasks and metrics)


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def parse_list(value, name: str) -> list[str]:
    """'1,2,4' / '[1, 2, 4]' / '1 2 4' / a list (of any of those) -> ['1', '2', '4']."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[str] = []
    for item in items:
        text = str(item)
        for char in "[],'\"":
            text = text.replace(char, " ")
        out += text.split()
    if not out:
        raise EvalError(f"{name} is empty")
    return out


def parse_recurrences(value) -> list[int]:
    """Sorted, de-duplicated test recurrences; each must be an integer >= 1."""
    recurrences = []
    for part in parse_list(value, "recurrences"):
        try:
            r = int(part)
        except ValueError:
            raise EvalError(f"recurrence {part!r} is not an integer") from None
        if r < 1:
            raise EvalError(f"recurrence {r} is < 1: every test recurrence needs at least one iteration")
        if r > MAX_RECURRENCE:
            raise EvalError(
                f"recurrence {r} is more than {MAX_RECURRENCE}: every token would pass the recurrent block {r} times"
            )
        recurrences.append(r)
    return sorted(set(recurrences))


def checkpoint_dirs(model_dir: str | os.PathLike, ckpts) -> list[tuple[str, Path]]:
    """(output name, checkpoint dir) per requested checkpoint of a run directory.

    As in the original, an integer N means `{model_dir}/model_only_chkpt_N` (output `chkpt_N`);
    any other name is a folder in the run directory (e.g. `final_checkpoint`).
    """
    run = Path(model_dir)
    if not run.is_dir():
        raise EvalError(f"model directory {str(run)!r} does not exist")
    out = []
    for name in parse_list(ckpts, "ckpts"):
        if name.isdigit():
            path, label = run / f"{MODEL_ONLY_PREFIX}{name}", f"chkpt_{name}"
        else:
            path = run / name
            label = f"chkpt_{name[len(MODEL_ONLY_PREFIX):]}" if name.startswith(MODEL_ONLY_PREFIX) else name
        if not path.is_dir():
            raise EvalError(f"checkpoint {name!r}: {str(path)!r} does not exist")
        if not (path / "config.json").is_file():
            raise EvalError(f"checkpoint {name!r}: {str(path)!r} has no config.json (not a saved model)")
        out.append((label, path))
    return out


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_eval_rows(path: str | os.PathLike, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `num_sequences` rows of a parquet shard (or a folder of shards, in natural
    name order: shard-2 before shard-10).

    Returns `input_ids` (N, max_length + 1) and `attention_mask` (1 = real token; all ones when
    the shard has no such column), both int64. Rows are checked as `retrofit.data.rows` says.
    """
    if num_sequences < 1:
        raise EvalError(f"num_sequences must be >= 1, got {num_sequences}")
    path = Path(path)
    if not path.exists():
        raise EvalError(f"eval file {str(path)!r} does not exist")
    ids, masks = [], []
    have, row_len = 0, None
    for where, table in first_row_groups(path, num_sequences):
        ids.append(row_matrix(table.column("input_ids"), where, "input_ids", row_len))
        row_len = ids[-1].shape[1]
        if "attention_mask" in table.column_names:
            masks.append(row_matrix(table.column("attention_mask"), where, "attention_mask", row_len))
        else:
            masks.append(np.ones_like(ids[-1]))
        have += table.num_rows
    if not have:
        raise EvalError(f"{path} holds no rows")
    if row_len < 2:
        raise EvalError(f"{path}: rows need at least 2 tokens (max_length + 1)")
    if have < num_sequences:
        print(f"warning: {path} has only {have} rows; evaluating those instead of {num_sequences}", file=sys.stderr)
    return torch.from_numpy(np.concatenate(ids)), torch.from_numpy(np.concatenate(masks))


def only_right_padded(mask: torch.Tensor) -> bool:
    """True when no row has a real token after a padding token."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


# The depth sweep's readout computes logits for at most this many (token, vocabulary) entries at a
# time. Unchunked, a batch of 64 x 1024 tokens over Llama-3.2's 128,256-token vocabulary makes
# 8.4e9 logits (34 GB in float32, twice that with the cross entropy's temporaries) per depth;
# chunked, about 0.5 GB, while each chunk still has over a thousand rows, so re-reading the head's
# weights per chunk costs little. Small vocabularies (the tests, the bench) fit in one chunk.
READOUT_LOGITS_PER_CHUNK = 1 << 27


def readout_loss(model, state: torch.Tensor, ctx, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence loss of the model's output at `state`: coda, head and cross entropy, the head
    and loss taken over chunks of tokens (`READOUT_LOGITS_PER_CHUNK`). Each token's loss is the
    same computation as `per_sequence_loss` on the whole logits tensor (bit for bit on CPU)."""
    x = model.run_coda(state, ctx).flatten(0, 1)
    targets = labels.flatten()
    rows = max(1, READOUT_LOGITS_PER_CHUNK // model.lm_head.out_features)
    token_loss = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], rows):
        logits = model.lm_head(x[start : start + rows]).float()
        token_loss[start : start + rows] = F.cross_entropy(
            logits, targets[start : start + rows], ignore_index=-100, reduction="none"
        )
    return mean_over_scored(token_loss.view(labels.shape), labels)


# ----------------------------------------------------------------------------------------------
# Depth sweeps
# ----------------------------------------------------------------------------------------------


def check_adaptive_criterion(name) -> None:
    """EvalError naming `name` and the valid criteria when it is not one."""
    try:
        exit_criterion(name)
    except ValueError as err:
        raise EvalError(str(err)) from None


@dataclass
class AdaptiveExit:
    """Stop iterating a token once `criterion` falls below `threshold` (never before iteration 2);
    the rule and its iteration are the model code's (`exits_raven.ExitTracker`).

    kl:     KL(p_{i-1} || p_i) of the next-token distributions of successive iterations
            (Huginn's default threshold: 5e-4).
    latent: ||s_i - s_{i-1}|| / ||s_i|| of the latent state (Huginn's default: 0.03).
    entropy-diff, minp-kl, cosine, argmax-stability[-M], gate: see `exits_raven` (formulas and
    sources). A threshold of 0 never exits (every change is >= 0), so it reproduces fixed depth.
    """

    threshold: float
    criterion: str = "kl"

    def __post_init__(self):
        check_adaptive_criterion(self.criterion)
        if not self.threshold >= 0 or math.isinf(self.threshold):
            raise EvalError(f"adaptive threshold must be a finite number >= 0, got {self.threshold}")


@torch.no_grad()
def depth_sweep(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    recurrences: list[int],
    initial_state: torch.Tensor | None = None,
    adaptive: AdaptiveExit | None = None,
) -> SweepResult:
    """Per-sequence losses at every depth in `recurrences`, from one run of max(recurrences) iterations."""
    depths = set(recurrences)
    last = max(depths)
    ctx = model.attention_context(input_ids, attention_mask)
    e = model.run_prelude(model.embed(input_ids), ctx)
    state = model.initial_state(e) if initial_state is None else initial_state.to(e.dtype)
    # The prelude's half of the adapter is the same at every iteration: project it once (models
    # saved before `adapter_parts` existed carry a modeling file without it).
    extra = {"adapter_parts": model.adapter_parts(e)} if hasattr(model, "adapter_parts") else {}
    scored = labels != -100
    result = SweepResult(token_count=int(scored.sum()))

    if adaptive is None:
        # Fixed depth: the only work per depth is the coda + head readout; nothing else is repeated.
        for i in range(1, last + 1):
            state = model.recur(state, e, ctx, i - 1, **extra)
            if i in depths:
                result.losses[i] = readout_loss(model, state, ctx, labels).cpu()
                result.depth_sum[i] = float(i * result.token_count)
                result.executed[i] = float(i * input_ids.numel())
        result.positions = input_ids.numel()
        return result

    return adaptive_sweep(model, ctx, e, state, labels, depths, adaptive, result, readout_loss)


@torch.no_grad()
def independent_losses(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    recurrences: list[int],
    initial_state: torch.Tensor | None = None,
    adaptive: AdaptiveExit | None = None,
) -> SweepResult:
    """The original script's way: every depth from scratch (the model's own forward per depth)."""
    result = SweepResult(token_count=int((labels != -100).sum()))
    for r in recurrences:
        if adaptive is not None:
            one = depth_sweep(model, input_ids, attention_mask, labels, [r], initial_state, adaptive)
            result.losses[r], result.depth_sum[r], result.executed[r] = one.losses[r], one.depth_sum[r], one.executed[r]
            result.positions = one.positions
            continue
        logits = model(input_ids, attention_mask=attention_mask, num_steps=r, initial_state=initial_state).logits
        result.losses[r] = per_sequence_loss(logits, labels).cpu()
        result.depth_sum[r] = float(r * result.token_count)
        result.executed[r], result.positions = float(r * input_ids.numel()), input_ids.numel()
    return result


@dataclass
class LossOverDepth:
    """Everything one checkpoint's evaluation produced."""

    recurrences: list[int]
    losses: dict[int, list[list[float]]]  # depth -> per batch -> per sequence (the original's layout)
    mean_depth: dict[int, float]
    num_sequences: int
    # depth -> recurrent-block token-iterations executed / those of fixed depth (1.0 without exits)
    executed_fraction: dict[int, float] = field(default_factory=dict)


def loss_over_depth(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    recurrences: list[int],
    batch_size: int = 64,
    seed: int = 0,
    independent_runs: bool = False,
    adaptive: AdaptiveExit | None = None,
    progress: bool = True,
    cache_policy: str | None = None,
    continuous: bool = False,
) -> LossOverDepth:
    """Per-sequence validation loss at each depth for rows of max_length + 1 tokens.

    The initial state of every batch is drawn from one generator seeded with `seed`, so one-pass
    and independent runs (and reruns) see the same s_0. `cache_policy` / `continuous` score by
    teacher-forced decoding through the KV cache instead (`retrofit.evaluate.cached_sweep`).
    """
    from retrofit.progress import progress_bar

    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    recurrences = parse_recurrences(recurrences)
    if adaptive is not None:
        try:
            exit_criterion(adaptive.criterion, model)  # "gate" needs a model with an exit gate
        except ValueError as err:
            raise EvalError(str(err)) from None
    device = model.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    losses: dict[int, list[list[float]]] = {r: [] for r in recurrences}
    depth_sum = {r: 0.0 for r in recurrences}
    executed = {r: 0.0 for r in recurrences}
    tokens = positions = 0
    run = independent_losses if independent_runs else depth_sweep
    if cache_policy is not None or continuous:
        from functools import partial

        from retrofit.evaluate.cached_sweep import cached_losses, check_cached_options

        check_cached_options(cache_policy, continuous, adaptive, independent_runs)
        run = partial(cached_losses, cache_policy=cache_policy, continuous=continuous)
    starts = range(0, input_ids.shape[0], batch_size)
    bar_desc = f"batches ({len(recurrences)} depths)"
    for start in progress_bar(starts, desc=bar_desc, unit="batch", enabled=progress, leave=False):
        rows = input_ids[start : start + batch_size].to(device)
        mask = attention_mask[start : start + batch_size].to(device)
        inputs, inputs_mask, labels = inputs_and_labels(rows, mask)
        if only_right_padded(inputs_mask):
            # Padding only after the real tokens (packed shards): causal attention already keeps it
            # out of every scored position, and positions agree, so skip the mask and keep the
            # fast causal attention kernels (as the original script did).
            inputs_mask = None
        s0 = draw_initial_state(model, inputs.shape[0], inputs.shape[1], generator)
        out = run(model, inputs, inputs_mask, labels, recurrences, initial_state=s0, adaptive=adaptive)
        for r in recurrences:
            losses[r].append(out.losses[r].tolist())
            depth_sum[r] += out.depth_sum[r]
            executed[r] += out.executed[r]
        tokens += out.token_count
        positions += out.positions
    mean_depth = {r: depth_sum[r] / max(tokens, 1) for r in recurrences}
    executed_fraction = {r: executed[r] / max(r * positions, 1) for r in recurrences}
    return LossOverDepth(recurrences, losses, mean_depth, int(input_ids.shape[0]), executed_fraction)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def result_json(result: LossOverDepth, adaptive: AdaptiveExit | None) -> dict:
    """The original's format, {"1": [[losses of batch 1], [batch 2], ...], "2": ...}; with
    adaptive exit, {"criterion", "threshold", "loss": that, "mean_depth": {"1": d, ...},
    "executed_fraction": {"1": f, ...}} (f: recurrent-block token-iterations run / fixed depth's)."""
    losses = {str(r): result.losses[r] for r in result.recurrences}
    if adaptive is None:
        return losses
    return {
        "criterion": adaptive.criterion,
        "threshold": adaptive.threshold,
        "loss": losses,
        "mean_depth": {str(r): result.mean_depth[r] for r in result.recurrences},
        "executed_fraction": {str(r): result.executed_fraction[r] for r in result.recurrences},
    }


def output_name(label: str, adaptive: AdaptiveExit | None, variant: str = "") -> str:
    """`variant`: the cached sweep's suffix (`cached_sweep.cached_variant_suffix`), '' by default."""
    if adaptive is None:
        return f"{label}{variant}.json"
    return f"{label}_adaptive_{adaptive.criterion}_{adaptive.threshold:g}.json"


def summary_lines(result: LossOverDepth, adaptive: AdaptiveExit | None) -> list[str]:
    """A small table: depth, mean per-sequence loss, perplexity (and mean depth used)."""
    lines = [f"{'depth':>6} {'loss':>9} {'ppl':>10}" + (f" {'mean depth':>11} {'executed':>9}" if adaptive else "")]
    for r in result.recurrences:
        values = [v for batch in result.losses[r] for v in batch]
        mean = sum(values) / len(values)
        line = f"{r:>6} {mean:>9.4f} {math.exp(min(mean, 50)):>10.3f}"
        if adaptive:
            line += f" {result.mean_depth[r]:>11.2f} {result.executed_fraction.get(r, 1.0):>9.3f}"
        lines.append(line)
    return lines


def eval_prepends_bos(tokenizer) -> bool:
    """Whether lm-eval should start every context with BOS (`add_bos_token`, shells/eval.sh's `auto`).

    Contexts should begin as training rows do: the packer writes BOS wherever the tokenizer adds
    it (Llama's, TinyLlama's: True, the paper's setting). A tokenizer that adds none gets BOS only
    when its BOS is its EOS, the document separator (OLMo-2's <|endoftext|>: again the paper's
    True). Otherwise BOS is something plain text never starts with (SmolLM2-Instruct's BOS is the
    chat-turn marker <|im_start|>), and prepending it would score every context off-distribution.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    if tokenizer("x").input_ids[:1] == [bos]:
        return True
    return bos == tokenizer.eos_token_id
