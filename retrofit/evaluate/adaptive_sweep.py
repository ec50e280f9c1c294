"""The depth sweep with per-token adaptive exit (`loss_over_depth.depth_sweep(adaptive=...)`), in
which tokens that have exited stop running the recurrent block.

While every token still iterates, an iteration is the plain whole-sequence call. Once some have
exited, each iteration packs the tokens still iterating, per row, into a (rows, A) batch (A: the
most any row has; shorter rows repeat their last active position, whose duplicate computes the
same values and is counted as executed), runs the recurrent block on those queries only, and lets
them attend to the keys and values of every token of their row: their own new ones, and for an
exited token those of its last iteration (Huginn's rule, as in decoding). `TokenKeyValues` keeps
every token's latest keys and values per layer and takes the new ones of the packed tokens. For
criteria that read the next-token distribution, the coda runs on the packed tokens the same way
(the exited tokens' coda keys and values are those of their final state).

`executed` counts the recurrent-block token-iterations actually run (packed slots included), so
`executed / (depth * B * T)` is the fraction of fixed depth's compute that was spent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retrofit.model.exits_raven import ExitTracker
from retrofit.model.layers_raven import AttentionContext


@dataclass
class TokenPacking:
    """The tokens still iterating, packed per row: `rows` (R,) batch rows with any; `positions`
    (R, A) their positions, padded with each row's last one; `valid` (R, A) the real entries."""

    rows: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def of(cls, active: torch.Tensor) -> TokenPacking | None:
        rows = active.any(-1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return None
        sub = active.index_select(0, rows)
        counts = sub.sum(-1)
        width = int(counts.max())
        # A stable sort of "not active" puts each row's active positions first, in order.
        order = torch.sort((~sub).to(torch.int8), dim=-1, stable=True).indices[:, :width]
        valid = torch.arange(width, device=active.device)[None] < counts[:, None]
        positions = torch.where(valid, order, order.gather(1, (counts - 1)[:, None]))
        return cls(rows, positions, valid)

    def index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Advanced index of the packed tokens into (B, T, ...) tensors."""
        return self.rows[:, None].expand_as(self.positions), self.positions


class TokenKeyValues:
    """Every token's latest keys and values per layer (B, H, T, D), as the cache of the sweep's
    attention calls. Unpacked (`packing` None) a call stores and returns its keys unchanged; packed,
    the packed tokens' new keys replace theirs in their rows, and the call attends to those rows'
    keys. Duck-types `KVCache` for `Attention`."""

    bounded = True

    def __init__(self):
        self.keys, self.values = {}, {}
        self.packing: TokenPacking | None = None

    def slot(self, kind: str, layer: int, iteration: int = 0):
        return (kind, layer)

    def update(self, slot, k: torch.Tensor, v: torch.Tensor, start: int):
        packing = self.packing
        if packing is None:
            self.keys[slot], self.values[slot] = k, v
            return k, v
        out = []
        for store, new in ((self.keys, k), (self.values, v)):
            index = packing.positions[:, None, :, None].expand(-1, new.shape[1], -1, new.shape[3])
            rows = store[slot].index_select(0, packing.rows).scatter(2, index, new)
            store[slot] = store[slot].index_copy(0, packing.rows, rows)
            out.append(rows)
        return out[0], out[1]


def packed_context(ctx: AttentionContext, packing: TokenPacking, cache: TokenKeyValues, length: int) -> AttentionContext:
    """RoPE at the packed tokens' positions; each may see its row's keys up to its position (and,
    with padding, only real ones: the whole-sequence mask's rows)."""
    where = packing.index()
    if ctx.cos.dim() == 4:  # per-row positions (left padding): (B, T, 1, D)
        cos, sin = ctx.cos[where], ctx.sin[where]
    else:  # (T, 1, D), shared by the rows
        cos, sin = ctx.cos[packing.positions], ctx.sin[packing.positions]
    if ctx.mask is not None:
        mask = ctx.mask[:, 0][where]
    else:
        mask = torch.arange(length, device=packing.positions.device)[None, None] <= packing.positions[..., None]
    return AttentionContext(cos=cos, sin=sin, mask=mask[:, None], cache=cache, past_length=0)


def observe_packed(tracker: ExitTracker, packing: TokenPacking, state, log_probs) -> None:
    """`ExitTracker.observe` for packed tokens (padding duplicates write the same values)."""
    where = packing.index()
    previous = None if tracker.memory is None else tracker.memory[where]
    change, memory = tracker.criterion.step(tracker.model, state, log_probs, previous)
    if memory is not None:
        tracker.memory[where] = memory
    if change is not None:
        tracker.active[where] = tracker.active[where] & (change >= tracker.threshold)


def adaptive_sweep(model, ctx, e, state, labels, depths, adaptive, result, readout):
    """Per-sequence losses at `depths` with per-token exit (`readout(model, state, ctx, labels)`
    gives the loss); fills `result` (losses, depth_sum, executed) and returns it."""
    batch, length = labels.shape
    scored = labels != -100
    tracker = ExitTracker(adaptive.criterion, adaptive.threshold, labels.shape, labels.device, model=model)
    tracker.begin(state)
    w_state, embed_proj = model.adapter_parts(e)
    store = TokenKeyValues()
    whole = AttentionContext(cos=ctx.cos, sin=ctx.sin, mask=ctx.mask, cache=store, past_length=0)
    executed, result.positions = 0, batch * length
    for i in range(1, max(depths) + 1):
        if bool(tracker.active.all()):  # every token iterates: the plain whole-sequence call
            store.packing = None
            tracker.count_iteration()
            state = model.recur(state, e, whole, i - 1, adapter_parts=(w_state, embed_proj))
            executed += batch * length
            log_probs = None
            if tracker.reads_logits:
                log_probs = F.log_softmax(model.lm_head(model.run_coda(state, whole)).float(), dim=-1)
            tracker.observe(state, log_probs)
        elif (packing := TokenPacking.of(tracker.active)) is not None:
            store.packing = packing
            packed = packed_context(ctx, packing, store, length)
            where = packing.index()
            tracker.used.index_put_(where, packing.valid.long(), accumulate=True)
            new_state = model.recur(state[where], e[where], packed, i - 1, adapter_parts=(w_state, embed_proj[where]))
            executed += packing.positions.numel()
            log_probs = None
            if tracker.reads_logits:
                log_probs = F.log_softmax(model.lm_head(model.run_coda(new_state, packed)).float(), dim=-1)
            observe_packed(tracker, packing, new_state, log_probs)
            state = state.index_put(where, new_state)
        if i in depths:
            result.losses[i] = readout(model, state, ctx, labels).cpu()
            result.depth_sum[i] = float(tracker.used[scored].sum())
            result.executed[i] = float(executed)
    return result
