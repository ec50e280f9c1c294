"""The logit lens over the recurrent block's iterations, behind inspect_recurrence.py (docs/evaluation.md, Inside the loop).

The recurrent model computes

    e = prelude(embed(x)); s_0 = initial state; s_i = recur(s_{i-1}, e); logits = head(coda(s_R))

and only the last state s_R is normally read out. The lens reads out every s_i the same way,
`lm_head(run_coda(s_i))`, so each token gets a next-token distribution p_i per iteration. Per
token and iteration it reports

    top-1 token      argmax of p_i
    entropy          H(p_i) in nats
    KL to final      KL(p_R || p_i) = sum_v p_R(v) (log p_R(v) - log p_i(v)) in nats (0 at i = R)
    target rank      1 + the number of vocabulary entries scored strictly above the next token
                     (1 = top-1); none for a sequence's last token

and keeps the states s_1..s_R themselves for the trajectory plot. The last iteration's readout is
`forward`'s logits bit for bit (same initial state): it runs the same modules in the same order.

Initial state: each sequence draws its own s_0 from a generator seeded with `seed`, shaped like that
sequence alone (its real tokens only), the model's own rule (`initial_state`, config init_values
std). So a sequence's s_0, and with it its table, depends on the seed and its tokens, not on which
other sequences share its padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from retrofit.evaluate.scoring import draw_initial_state

# Sequences read out together. Each iteration materialises (batch, tokens, vocabulary) logits, so
# a small batch keeps Llama-size vocabularies within a few GB per iteration.
LENS_BATCH_SIZE = 8


class InspectError(ValueError):
    """Bad input to the inspector; the message is one line that names the bad value."""


@dataclass
class Trace:
    """One batch's pass through the loop, iteration i (0-based) holding s_{i+1}."""

    states: torch.Tensor  # (R, B, T, h): latent state after each iteration
    head_inputs: torch.Tensor  # (R, B, T, h): ln_f(coda(state)), what lm_head reads


@dataclass
class SequenceLens:
    """One sequence's table: real tokens only, iteration index 0 = after the first iteration."""

    token_ids: list[int]
    top1: np.ndarray  # (R, L) int64
    entropy: np.ndarray  # (R, L) float32, nats
    kl_to_final: np.ndarray  # (R, L) float32, nats
    target_rank: np.ndarray  # (R, L) int64, -1 where there is no next token
    states: np.ndarray  # (R, L, h) float32


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of shape (B, longest), real tokens first, then `pad_id`."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def sequence_initial_state(model, length: int, seed: int) -> torch.Tensor:
    """s_0 of one sequence of `length` tokens, (1, length, h): the model's rule, seeded."""
    generator = torch.Generator(device=model.device)
    generator.manual_seed(seed)
    return draw_initial_state(model, 1, length, generator)


def batch_initial_state(model, attention_mask: torch.Tensor, seed: int) -> torch.Tensor:
    """(B, T, h): each row's own `sequence_initial_state` at its real tokens, zeros at padding."""
    B, T = attention_mask.shape
    state = torch.zeros(B, T, model.config.n_embd, dtype=model.dtype, device=model.device)
    for row in range(B):
        real = attention_mask[row].bool().to(model.device)
        state[row, real] = sequence_initial_state(model, int(real.sum()), seed)[0]
    return state


@torch.no_grad()
def trace_recurrence(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    num_steps: int,
    initial_state: torch.Tensor,
) -> Trace:
    """Run the loop `num_steps` times and keep every state and its coda output.

    The same calls in the same order as `forward` (`run_layers`), so the last head input is the
    tensor `forward(..., num_steps, initial_state=...)` feeds to lm_head.
    """
    if num_steps < 1:
        raise InspectError(f"num_steps must be >= 1, got {num_steps}")
    ctx = model.attention_context(input_ids, attention_mask)
    e = model.run_prelude(model.embed(input_ids), ctx)
    state = initial_state.to(e.dtype)
    parts = model.adapter_parts(e)
    states, head_inputs = [], []
    for i in range(num_steps):
        state = model.recur(state, e, ctx, i, None, parts)
        states.append(state)
        head_inputs.append(model.run_coda(state, ctx))
    return Trace(torch.stack(states), torch.stack(head_inputs))


def iteration_logits(model, trace: Trace, iteration: int) -> torch.Tensor:
    """Next-token logits (B, T, V) read out after iteration `iteration` (0-based)."""
    return model.lm_head(trace.head_inputs[iteration])


@torch.no_grad()
def readout_statistics(model, trace: Trace, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """top1, entropy, kl_to_final, target_rank, each (R, B, T); `targets` (B, T) is each
    position's next token, -1 where there is none (its rank is -1)."""
    R = trace.head_inputs.shape[0]
    final = F.log_softmax(iteration_logits(model, trace, R - 1).float(), dim=-1)
    has_target = targets >= 0
    safe_targets = targets.clamp(min=0).unsqueeze(-1)
    stats = {name: [] for name in ("top1", "entropy", "kl_to_final", "target_rank")}
    for i in range(R):
        logits = iteration_logits(model, trace, i).float()
        logp = F.log_softmax(logits, dim=-1)
        stats["top1"].append(logits.argmax(-1))
        stats["entropy"].append(-(logp.exp() * logp).sum(-1))
        # kl_div(input=log p_i, target=log p_R) sums p_R (log p_R - log p_i), and 0 where p_R = 0.
        kl = F.kl_div(logp, final, log_target=True, reduction="none").sum(-1)
        stats["kl_to_final"].append(kl.clamp(min=0) if i < R - 1 else torch.zeros_like(kl))
        rank = (logits > logits.gather(-1, safe_targets)).sum(-1) + 1
        stats["target_rank"].append(torch.where(has_target, rank, torch.full_like(rank, -1)))
    return {name: torch.stack(values) for name, values in stats.items()}


def next_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each position's next real token in its row, -1 for the last real token and for padding."""
    out = torch.full_like(input_ids, -1)
    for row in range(input_ids.shape[0]):
        real = attention_mask[row].bool()
        ids = input_ids[row, real]
        shifted = torch.full_like(ids, -1)
        shifted[:-1] = ids[1:]
        out[row, real] = shifted
    return out


def inspect_batch(model, sequences: list[list[int]], num_steps: int, seed: int, pad_id: int) -> list[SequenceLens]:
    """The lens tables of sequences read out together in one padded batch."""
    ids, mask = pad_right(sequences, pad_id)
    s0 = batch_initial_state(model, mask, seed)
    ids, mask = ids.to(model.device), mask.to(model.device)
    # Without padding, no mask: `forward` on the same tokens takes the same (maskless) path.
    trace = trace_recurrence(model, ids, mask if not bool(mask.all()) else None, num_steps, s0)
    stats = readout_statistics(model, trace, next_tokens(ids, mask))
    tables = []
    for row, seq in enumerate(sequences):
        real = mask[row].bool()

        def take(t: torch.Tensor) -> np.ndarray:
            return t[:, row, real].cpu().numpy()

        tables.append(
            SequenceLens(
                token_ids=list(seq),
                top1=take(stats["top1"]),
                entropy=take(stats["entropy"]),
                kl_to_final=take(stats["kl_to_final"]),
                target_rank=take(stats["target_rank"]),
                states=take(trace.states.float()),
            )
        )
    return tables


def inspect_sequences(
    model, sequences: list[list[int]], num_steps: int, seed: int = 0, batch_size: int = LENS_BATCH_SIZE
) -> list[SequenceLens]:
    """One `SequenceLens` per sequence of token ids, batches of `batch_size` padded on the right."""
    if not sequences:
        raise InspectError("no sequences to inspect")
    for index, seq in enumerate(sequences):
        if not seq:
            raise InspectError(f"sequence {index} has no tokens")
    vocab = model.get_input_embeddings().num_embeddings
    for index, seq in enumerate(sequences):
        bad = [t for t in seq if not 0 <= t < vocab]
        if bad:
            raise InspectError(f"sequence {index} holds token id {bad[0]}, outside the model's vocabulary of {vocab}")
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    tables = []
    for start in range(0, len(sequences), batch_size):
        tables += inspect_batch(model, sequences[start : start + batch_size], num_steps, seed, pad_id)
    return tables


def read_parquet_sequences(path, num_sequences: int) -> list[list[int]]:
    """The real tokens of the first `num_sequences` rows of a parquet file (or a folder of them, in
    natural name order): `input_ids`, kept where `attention_mask` is 1 when there is one. Rows may
    differ in length (unpacked data) as well as in padding (packed rows)."""
    from pathlib import Path

    from retrofit.data.shards import first_row_groups

    if num_sequences < 1:
        raise InspectError(f"num_sequences must be >= 1, got {num_sequences}")
    path = Path(path)
    if not path.exists():
        raise InspectError(f"data {str(path)!r} does not exist")
    sequences: list[list[int]] = []
    for group, table in first_row_groups(path, num_sequences):
        ids = table.column("input_ids").to_pylist()
        has_mask = "attention_mask" in table.column_names
        masks = table.column("attention_mask").to_pylist() if has_mask else [None] * len(ids)
        for row, (seq, mask) in enumerate(zip(ids, masks)):
            where = f"{group} row {row}"
            if mask is not None and len(mask) != len(seq):
                raise InspectError(f"{where}: attention_mask has {len(mask)} entries for {len(seq)} tokens")
            real = seq if mask is None else [t for t, m in zip(seq, mask) if m]
            if not real:
                raise InspectError(f"{where} has no real tokens")
            sequences.append(real)
    if not sequences:
        raise InspectError(f"{path} holds no rows")
    return sequences


def token_texts(tokenizer, ids) -> list[str]:
    """Each id decoded on its own (special tokens shown as themselves)."""
    return [tokenizer.decode([int(i)]) for i in ids]


def sequence_record(index: int, source: str, lens: SequenceLens, tokenizer) -> dict:
    """The JSON table of one sequence: per token, per iteration (1-based) of the lens."""
    R, L = lens.top1.shape
    texts = token_texts(tokenizer, lens.token_ids)
    top1_texts = {int(i): t for i, t in zip(np.unique(lens.top1), token_texts(tokenizer, np.unique(lens.top1)))}
    tokens = []
    for t in range(L):
        iterations = [
            {
                "iteration": i + 1,
                "top1_id": int(lens.top1[i, t]),
                "top1": top1_texts[int(lens.top1[i, t])],
                "entropy": float(lens.entropy[i, t]),
                "kl_to_final": float(lens.kl_to_final[i, t]),
                "target_rank": int(lens.target_rank[i, t]) if lens.target_rank[i, t] > 0 else None,
            }
            for i in range(R)
        ]
        has_target = t + 1 < L
        tokens.append(
            {
                "position": t,
                "token_id": int(lens.token_ids[t]),
                "token": texts[t],
                "target_id": int(lens.token_ids[t + 1]) if has_target else None,
                "target": texts[t + 1] if has_target else None,
                "iterations": iterations,
            }
        )
    return {"index": index, "source": source, "num_tokens": L, "tokens": tokens}


READOUT_DEFINITIONS = {
    "iteration": "i = 1..R: the readout lm_head(coda(s_i)) of the state after the i-th pass of the recurrent block",
    "top1_id": "argmax of p_i, the next-token distribution read out after iteration i (top1: that token decoded)",
    "entropy": "H(p_i) in nats",
    "kl_to_final": "KL(p_R || p_i) in nats, R = num_steps (0 at i = R)",
    "target_rank": "1 + the number of vocabulary entries scored strictly above the actual next token (1 = top-1); "
    "null for a sequence's last token",
}


def summary_lines(tables: list[SequenceLens]) -> list[str]:
    """Per iteration over every token: mean entropy, mean KL to final, and the fraction of tokens
    whose next token is top-1 (over tokens that have one)."""
    entropy = np.concatenate([t.entropy for t in tables], axis=1)
    kl = np.concatenate([t.kl_to_final for t in tables], axis=1)
    rank = np.concatenate([t.target_rank for t in tables], axis=1)
    scored = rank[0] > 0
    lines = [f"{'iteration':>9} {'entropy':>9} {'KL to final':>12} {'next token top-1':>17}"]
    for i in range(entropy.shape[0]):
        top1 = f"{(rank[i][scored] == 1).mean():>17.3f}" if scored.any() else f"{'-':>17}"
        lines.append(f"{i + 1:>9} {entropy[i].mean():>9.4f} {kl[i].mean():>12.2e} {top1}")
    return lines
