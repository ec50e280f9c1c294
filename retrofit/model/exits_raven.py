"""Per-token adaptive exit for the depth-recurrent model: the registry of exit criteria, the
tracker that applies one over the iterations of the recurrent block, and the compacted decode
iteration in which tokens that have exited stop running the recurrent block.

Convention (every criterion): after each iteration a criterion computes a nonnegative "change"
per token, and a token exits when change < threshold. Threshold 0 therefore never exits (fixed
depth). Criteria that compare two iterations give no change after the first one, so they never
exit before the second iteration.

Criteria (Huginn: seal-rg/recurrent-pretraining, recpre/raven_modeling_minimal.py, the
`*ExitEvaluator` classes; p_i = softmax of the next-token logits after iteration i, s_i = the
latent state after iteration i, V = the vocabulary size):

    kl                  KL(p_{i-1} || p_i) = sum p_{i-1} (log p_{i-1} - log p_i)      (KLExitEvaluator, default 1e-3;
                                                                                       this repo's docs: 5e-4)
    latent              ||s_i - s_{i-1}|| / ||s_i||                                   (LatentDiffExitEvaluator, 0.03)
    entropy-diff        |H(p_i) - H(p_{i-1})|, H(p) = -sum p log p                     (EntropyDiffExitEvaluator, 1e-3)
    minp-kl             KL(q_{i-1} || q_i), q = p with every probability below 0.1 max(p) set to 1/V,
                        renormalised                                                   (MinKLExitEvaluator, 1e-5)
    cosine              1 - cos(s_i, s_{i-1})                                          (CosineExitEvaluator, 1e-3)
    argmax-stability    1 / (1 + n), n = for how many iterations in a row argmax p has not changed;
                        threshold 1/m exits once n >= m (Huginn's m, default 5: threshold 0.2)
    argmax-stability-M  0 once n >= M, else 1: any threshold in (0, 1] exits once the argmax has
                        held for the last M iterations (ArgmaxStabilityExitEvaluator, M = 5)
    gate                1 - model.exit_probability(s_i): a learned exit gate on the latent state;
                        may exit after the first iteration (it compares nothing)

Differences from Huginn, on purpose: Huginn compares the first iteration with a uniform
distribution (kl, minp-kl), an entropy of 100 or the initial state; here the first iteration is
never compared (same rule as `kl`/`latent` had), and entropy uses exact log-probabilities
instead of log(p + 1e-10).

What exited tokens cost and what later tokens see (`decode_with_exits`): in a batched decode step,
rows whose token has exited are dropped from the recurrent block's later iterations (their state,
prelude output and adapter input are index-selected away; attention runs only for active rows,
which read and write their own cache rows). For an exited position, every later iteration's cache
slot holds its last iteration's keys and values (Huginn's "latest" lookup), so later tokens attend
to those.

Part of the model's self-contained code (torch only): copied beside saved weights with
modeling_raven.py.
"""

from __future__ import annotations

import math

import torch

from .layers_raven import AttentionContext, relative_change

# ----------------------------------------------------------------------------------------------
# The criteria
# ----------------------------------------------------------------------------------------------


def kl_change(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """KL(p_before || p_after) per token from log-probabilities (clamped at 0: rounding)."""
    return (before.exp() * (before - after)).sum(-1).clamp(min=0)


def minp_log_probs(log_probs: torch.Tensor, ratio: float = 0.1) -> torch.Tensor:
    """Huginn's min-p filtering: probabilities below ratio * max set to 1/V, then renormalised."""
    probs = log_probs.exp()
    keep = probs >= ratio * probs.amax(-1, keepdim=True)
    probs = torch.where(keep, probs, torch.full_like(probs, 1.0 / probs.shape[-1]))
    return (probs / probs.sum(-1, keepdim=True)).log()


class ExitCriterion:
    """One criterion: `step(model, state, log_probs, memory) -> (change or None, memory)`.

    `memory` is what the criterion keeps between iterations, a tensor whose leading dims are the
    tokens' (B, T) (or None); the tracker stores it per row, so rows can be dropped. `reads_logits`:
    the criterion needs the next-token log-probabilities (a coda + head pass per iteration)."""

    name = ""
    reads_logits = False

    def start(self, initial_state):
        """The memory before the first iteration, from the initial state s_0 (None: nothing)."""
        return None

    def step(self, model, state, log_probs, memory):
        raise NotImplementedError


class KLCriterion(ExitCriterion):
    name, reads_logits = "kl", True

    def step(self, model, state, log_probs, memory):
        return (None if memory is None else kl_change(memory, log_probs)), log_probs


class MinPKLCriterion(ExitCriterion):
    name, reads_logits = "minp-kl", True

    def step(self, model, state, log_probs, memory):
        filtered = minp_log_probs(log_probs)
        return (None if memory is None else kl_change(memory, filtered)), filtered


class EntropyDiffCriterion(ExitCriterion):
    name, reads_logits = "entropy-diff", True

    def step(self, model, state, log_probs, memory):
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return (None if memory is None else (entropy - memory).abs()), entropy


class LatentCriterion(ExitCriterion):
    name = "latent"

    def step(self, model, state, log_probs, memory):
        state = state.float()
        return (None if memory is None else relative_change(state, memory)), state


class CosineCriterion(ExitCriterion):
    name = "cosine"

    def step(self, model, state, log_probs, memory):
        state = state.float()
        if memory is None:
            return None, state
        norms = state.norm(dim=-1).clamp(min=1e-12) * memory.norm(dim=-1).clamp(min=1e-12)
        return (1 - (state * memory).sum(-1) / norms).clamp(min=0), state


class ArgmaxStabilityCriterion(ExitCriterion):
    """memory[..., 0] = the argmax, memory[..., 1] = n, the iterations in a row it has held."""

    reads_logits = True

    def __init__(self, m: int | None = None):
        self.m = m
        self.name = "argmax-stability" if m is None else f"argmax-stability-{m}"

    def step(self, model, state, log_probs, memory):
        argmax = log_probs.argmax(-1)
        if memory is None:
            return None, torch.stack([argmax, torch.zeros_like(argmax)], -1)
        held = torch.where(argmax == memory[..., 0], memory[..., 1] + 1, torch.zeros_like(argmax))
        if self.m is None:
            change = 1.0 / (1.0 + held.float())
        else:
            change = (held < self.m).float()
        return change, torch.stack([argmax, held], -1)


def has_exit_gate(model) -> bool:
    """Whether `model` carries a learned exit gate (`config.exit_gate`, trained by train_exit_gate.py);
    `exit_criterion("gate", model)` refuses a model without one."""
    return getattr(model, "exit_gate", None) is not None and callable(getattr(model, "exit_probability", None))


class GateCriterion(ExitCriterion):
    """change = 1 - p_stop, the learned exit gate's stop probability after iteration i (1-based),
    which reads s_i and s_{i-1} (`RavenForCausalLM.exit_probability`, as train_exit_gate.py fits
    it): a token exits when p_stop > 1 - threshold, possibly right after its first iteration.
    memory[..., :h] = s_{i-1} (s_0 from `start`), memory[..., h] = i - 1, the iterations run."""

    name = "gate"

    def start(self, initial_state):
        state = initial_state.float()
        return torch.cat([state, torch.zeros_like(state[..., :1])], dim=-1)

    def step(self, model, state, log_probs, memory):
        state = state.float()
        if memory is None:  # a caller that did not `begin` with s_0: compare s_1 with itself
            previous, iteration = state, torch.ones_like(state[..., 0], dtype=torch.long)
        else:  # each token's own count (no host sync)
            previous, iteration = memory[..., :-1], memory[..., -1].long() + 1
        change = 1.0 - model.exit_probability(state, previous, iteration).float()
        return change, torch.cat([state, iteration.to(state.dtype)[..., None]], dim=-1)


EXIT_CRITERIA = {
    "kl": KLCriterion,
    "latent": LatentCriterion,
    "entropy-diff": EntropyDiffCriterion,
    "minp-kl": MinPKLCriterion,
    "cosine": CosineCriterion,
    "argmax-stability": ArgmaxStabilityCriterion,
    "gate": GateCriterion,  # the learned exit gate: needs a model with `exit_probability`
}
ARGMAX_PREFIX = "argmax-stability-"


def criterion_names() -> str:
    return ", ".join([*EXIT_CRITERIA, ARGMAX_PREFIX + "M (M >= 1)"])


def exit_criterion(name, model=None) -> ExitCriterion:
    """The criterion called `name` (an ExitCriterion passes through). ValueError, one line, for
    an unknown name; for "gate" when `model` is given and has no exit gate."""
    if isinstance(name, ExitCriterion):
        return name
    text = str(name)
    if text.startswith(ARGMAX_PREFIX):
        m = text[len(ARGMAX_PREFIX):]
        if not (m.isdigit() and int(m) >= 1):
            raise ValueError(f"adaptive_criterion {text!r}: M in {ARGMAX_PREFIX}M must be an integer >= 1")
        return ArgmaxStabilityCriterion(int(m))
    if text not in EXIT_CRITERIA:
        raise ValueError(f"unknown adaptive_criterion {text!r}; valid: {criterion_names()}")
    if text == "gate" and model is not None and not has_exit_gate(model):
        raise ValueError("adaptive_criterion 'gate' needs a checkpoint with a learned exit gate (this model has none)")
    return EXIT_CRITERIA[text]()


def check_exit_threshold(threshold) -> None:
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"adaptive_threshold must be a finite number >= 0, got {threshold!r}")


# ----------------------------------------------------------------------------------------------
# Applying a criterion over the iterations
# ----------------------------------------------------------------------------------------------


class ExitTracker:
    """Per-token exit state over the iterations of the recurrent block, for a (B, T) batch: which
    tokens still run (`active`), how many iterations each ran (`used`) and the criterion's memory.
    `rows` arguments name the batch rows a call covers (None: all), so callers that drop exited
    rows pass only the rows still running."""

    def __init__(self, criterion, threshold: float, shape, device, model=None):
        self.criterion = exit_criterion(criterion, model)
        self.threshold, self.model = threshold, model
        self.active = torch.ones(shape, dtype=torch.bool, device=device)
        self.used = torch.zeros(shape, dtype=torch.long, device=device)  # iterations each token ran
        self.memory = None

    def begin(self, initial_state) -> None:
        """Seed the criterion's memory with the initial state s_0 (the gate reads s_{i-1})."""
        self.memory = self.criterion.start(initial_state)

    @property
    def reads_logits(self) -> bool:
        return self.criterion.reads_logits

    def count_iteration(self, rows=None) -> None:
        if rows is None:
            self.used += self.active
        else:
            self.used.index_add_(0, rows, self.active.index_select(0, rows).long())

    def observe(self, state, log_probs=None, rows=None) -> None:
        """This iteration's state (and log-probabilities) of `rows`; stops the tokens whose
        change fell below the threshold."""
        previous = self.memory if (rows is None or self.memory is None) else self.memory.index_select(0, rows)
        change, memory = self.criterion.step(self.model, state, log_probs, previous)
        if memory is not None:
            if rows is None:
                self.memory = memory
            else:
                if self.memory is None:
                    self.memory = memory.new_zeros((self.active.shape[0], *memory.shape[1:]))
                self.memory.index_copy_(0, rows, memory)
        if change is not None:
            stays = change >= self.threshold
            if rows is None:
                self.active &= stays
            else:
                self.active.index_copy_(0, rows, self.active.index_select(0, rows) & stays)

    def all_exited(self) -> bool:
        return not bool(self.active.any())


# ----------------------------------------------------------------------------------------------
# Decoding with exits: compacted rows
# ----------------------------------------------------------------------------------------------


class ActiveRowsCache:
    """The model's KV cache seen by the rows still iterating (`rows`, indices into the batch).

    A write puts the active rows' keys at their own cache rows; for the recurrent block it first
    carries every row's keys of the previous iteration into this iteration's slot, so a row that
    has exited holds its last iteration's keys in every later slot (Huginn's "latest" lookup). A
    read returns the active rows' keys only. Duck-types `KVCache` for `Attention` and `recur`."""

    def __init__(self, cache, rows: torch.Tensor):
        self.cache, self.rows = cache, rows
        self.bounded = cache.bounded

    def slot(self, kind: str, layer: int, iteration: int = 0):
        here = self.cache.slot(kind, layer, iteration)
        before = self.cache.slot(kind, layer, iteration - 1) if kind == "core" and iteration > 0 else here
        return here, before

    def update(self, slot, k: torch.Tensor, v: torch.Tensor, start: int):
        here, before = slot
        end = start + k.shape[2]
        column_k = self.cache.keys[before][:, :, start:end]
        column_v = self.cache.values[before][:, :, start:end]
        self.cache.update(here, column_k.index_copy(0, self.rows, k), column_v.index_copy(0, self.rows, v), start)
        return self._active_rows(self.cache.keys[here], end, "keys"), self._active_rows(self.cache.values[here], end, "values")

    def _active_rows(self, buffer: torch.Tensor, end: int, kind: str) -> torch.Tensor:
        # Rows of the whole contiguous buffer seen as 2-D, then the columns so far: index_select
        # on the strided [:end] view, or on the 4-D buffer, took slower paths on CPU (4x, 1.5x).
        # Gathered into one buffer per kind that every layer and iteration reuses (attention reads
        # it before the next gather): a fresh tensor per call, megabytes after a long context, cost
        # the allocator's page faults on every call.
        shape = buffer.shape
        flat = buffer.reshape(shape[0], -1)
        scratch = self.cache.scratch.get(kind)
        if scratch is None or scratch.shape != flat.shape or scratch.dtype != flat.dtype:
            scratch = self.cache.scratch[kind] = torch.empty_like(flat)
        rows = torch.index_select(flat, 0, self.rows, out=scratch[: self.rows.numel()])
        return rows.view(-1, *shape[1:])[:, :, :end]


def select_rows(ctx: AttentionContext, rows: torch.Tensor, batch: int, cache=None) -> AttentionContext:
    """`ctx` for the batch rows `rows`: per-row RoPE tables and mask selected, `cache` in place."""

    def pick(t):
        return t.index_select(0, rows) if t is not None and t.dim() == 4 and t.shape[0] == batch else t

    return AttentionContext(cos=pick(ctx.cos), sin=pick(ctx.sin), mask=pick(ctx.mask), cache=cache,
                            past_length=ctx.past_length)


def fill_skipped_iterations(model, cache, last: int, max_steps: int, start: int, length: int) -> None:
    """Every row stopped after iteration `last`: later iterations' slots of these positions get
    its keys (every row's latest, `ActiveRowsCache`), which later tokens attend to."""
    if cache is None or cache.bounded:
        return
    for i in range(last + 1, max_steps):
        for j in range(len(model.transformer.core_block)):
            src = cache.slot("core", j, last)
            k = cache.keys[src][:, :, start : start + length]
            v = cache.values[src][:, :, start : start + length]
            cache.update(cache.slot("core", j, i), k, v, start)


def decode_with_exits(model, ctx: AttentionContext, prelude_out, state, max_steps: int, tracker: ExitTracker):
    """Up to `max_steps` iterations of one decode step (one new token per row) with per-row
    exit; rows that exited are dropped from later iterations. Returns the last position's logits
    per row (each row's at the iteration it stopped)."""
    batch = state.shape[0]
    tracker.begin(state)
    w_state, embed_proj = model.adapter_parts(prelude_out)
    rows, logits, last = None, None, max_steps - 1
    sub_ctx, sub_e, sub_proj, sub_state = ctx, prelude_out, embed_proj, state
    for i in range(max_steps):
        tracker.count_iteration(rows)
        sub_state = model.recur(sub_state, sub_e, sub_ctx, i, adapter_parts=(w_state, sub_proj))
        log_probs = None
        if tracker.reads_logits:
            step_logits = model.lm_head(model.run_coda(sub_state, sub_ctx)[:, -1])
            logits = step_logits if rows is None else logits.index_copy(0, rows, step_logits)
            log_probs = step_logits.float().log_softmax(-1)[:, None]
        state = sub_state if rows is None else state.index_copy(0, rows, sub_state)
        tracker.observe(sub_state, log_probs, rows)
        running = tracker.active[:, -1] if rows is None else tracker.active[rows, -1]
        if not bool(running.any()):
            last = i
            break
        if not bool(running.all()):
            keep = running.nonzero().squeeze(1)
            rows = keep if rows is None else rows.index_select(0, keep)
            sub_ctx = select_rows(ctx, rows, batch, ActiveRowsCache(ctx.cache, rows))
            sub_e, sub_proj, sub_state = (t.index_select(0, keep) for t in (sub_e, sub_proj, sub_state))
    fill_skipped_iterations(model, ctx.cache, last, max_steps, ctx.past_length, state.shape[1])
    if not tracker.reads_logits:
        logits = model.lm_head(model.run_coda(state, ctx)[:, -1])
    return logits
