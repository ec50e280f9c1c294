"""Tokenize documents and pack them into fixed-length training rows.

Rows are the packed-row format of `retrofit.data.rows`: `input_ids` of exactly `seq_len = max_length + 1`
tokens, an `attention_mask` and, in chat-SFT mode, a `loss_mask`. Writing them as parquet shards is
`retrofit.data.shards`; mixing packed datasets is `retrofit.data.mixing`.

Three ways to turn documents (each ends with EOS; BOS wherever the tokenizer adds it) into rows:

- wrapped:  concatenate every document into one stream and cut it every `seq_len` tokens; only the
            very last row is padded. No token is lost or repeated; documents cross row boundaries.
- best_fit: best-fit-decreasing bin packing of the documents of each block of `batch_size`
            documents into rows; a document that fits in a row is never split. A document longer
            than a row fills whole rows and its remainder is packed like any other document.
- none:     one document per row, padded or truncated.

The core functions are numpy/pyarrow only (no `datasets`), so tests, the quickstart and the CLIs
share them; `iter_packed_rows` runs tokenize + pack over an Arrow table with `num_proc` workers and
gives the same rows for any number of workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from retrofit.data.rows import LOSS_MASK_COLUMN, DataError, check_row_schema, row_matrix
from retrofit.progress import progress_bar

PACKING_MODES = ("wrapped", "best_fit", "none")


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------
@dataclass
class Docs:
    """A batch of tokenized documents, flat: document i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # int32
    offsets: np.ndarray  # int64, len = n_docs + 1
    loss_mask: np.ndarray | None = None  # int8, same length as tokens (chat mode)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @staticmethod
    def from_lists(token_lists: list[list[int]], mask_lists: list[list[int]] | None = None) -> Docs:
        lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
        offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        tokens = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int32, count=total)
        mask = None
        if mask_lists is not None:
            mask = np.fromiter(itertools.chain.from_iterable(mask_lists), dtype=np.int8, count=total)
        return Docs(tokens, offsets, mask)


@dataclass
class Rows:
    """Packed rows, all (n_rows, seq_len)."""

    input_ids: np.ndarray  # int32
    attention_mask: np.ndarray  # int8
    loss_mask: np.ndarray | None = None  # int8

    def __len__(self) -> int:
        return len(self.input_ids)

    @staticmethod
    def empty(seq_len: int, with_loss_mask: bool) -> Rows:
        return Rows(
            np.zeros((0, seq_len), np.int32),
            np.zeros((0, seq_len), np.int8),
            np.zeros((0, seq_len), np.int8) if with_loss_mask else None,
        )

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        loss = None if parts[0].loss_mask is None else np.concatenate([p.loss_mask for p in parts])
        return Rows(
            np.concatenate([p.input_ids for p in parts]), np.concatenate([p.attention_mask for p in parts]), loss
        )

    def real_tokens(self) -> np.ndarray:
        """The non-padding tokens, row by row: what a lossless packing must preserve."""
        return self.input_ids[self.attention_mask.astype(bool)]

    def to_arrow(self) -> pa.RecordBatch:
        n, seq_len = self.input_ids.shape
        offsets = pa.array(np.arange(0, (n + 1) * seq_len, seq_len, dtype=np.int64))

        def as_list(values: np.ndarray) -> pa.Array:
            return pa.LargeListArray.from_arrays(offsets, pa.array(values.reshape(-1))).cast(
                pa.list_(pa.from_numpy_dtype(values.dtype))
            )

        columns = {"input_ids": as_list(self.input_ids), "attention_mask": as_list(self.attention_mask)}
        if self.loss_mask is not None:
            columns[LOSS_MASK_COLUMN] = as_list(self.loss_mask)
        return pa.RecordBatch.from_pydict(columns)

    @staticmethod
    def from_arrow(table: pa.Table | pa.RecordBatch, where: str = "table") -> Rows:
        """Rows of a table of packed rows (parquet shards, packed datasets), checked on the way."""
        columns = check_row_schema(table.schema, where)
        row_len = None
        matrices = {}
        for name in columns:
            matrices[name] = row_matrix(table.column(name), where, name, row_len, np.int32 if name == "input_ids" else np.int8)
            row_len = matrices[name].shape[1]
        return Rows(matrices["input_ids"], matrices["attention_mask"], matrices.get(LOSS_MASK_COLUMN))


@dataclass
class PackStats:
    docs: int = 0
    tokens: int = 0  # tokens after tokenization (with BOS/EOS), before packing
    rows: int = 0
    real_tokens: int = 0  # non-padding tokens in the rows
    truncated_tokens: int = 0  # tokens dropped by mode "none"
    split_docs: int = 0  # documents longer than a row (best_fit)
    seq_len: int = 0

    def add(self, other: PackStats):
        for name in ("docs", "tokens", "rows", "real_tokens", "truncated_tokens", "split_docs"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> str:
        slots = max(self.rows * self.seq_len, 1)
        text = (
            f"{self.docs:,} documents, {self.tokens:,} tokens -> {self.rows:,} rows of {self.seq_len} tokens"
            f" ({100 * self.real_tokens / slots:.2f}% real tokens, {100 * (1 - self.real_tokens / slots):.2f}% padding)"
        )
        if self.truncated_tokens:
            text += f", {self.truncated_tokens:,} tokens truncated"
        if self.split_docs:
            text += f", {self.split_docs:,} documents longer than a row were split"
        return text


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------
def special_token_ids(tokenizer, tokenizer_name: str = "the tokenizer") -> tuple[int, int]:
    """(eos_id, pad_id); pad falls back to EOS like the original. No EOS is an error: documents
    must end with it so the model learns where they stop."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(f"tokenizer {tokenizer_name!r} has no eos_token; documents must end with EOS")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    return int(eos_id), int(pad_id)


def tokenize_texts(tokenizer, texts: list[str], eos_id: int) -> Docs:
    """Each text stripped, tokenized with the tokenizer's special tokens (BOS where it adds one)
    and followed by EOS. Uses the Rust tokenizer directly when there is one (no per-call Python
    wrapping), which gives the same ids as `tokenizer(text)`."""
    texts = [t.strip() for t in texts]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        token_lists = [enc.ids for enc in encode(texts, add_special_tokens=True)]
    else:
        token_lists = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    body = Docs.from_lists(token_lists)
    n = len(texts)
    # Insert one EOS after every document, vectorised.
    offsets = body.offsets + np.arange(n + 1, dtype=np.int64)
    tokens = np.empty(len(body.tokens) + n, dtype=np.int32)
    is_eos = np.zeros(len(tokens), dtype=bool)
    is_eos[offsets[1:] - 1] = True
    tokens[is_eos] = eos_id
    tokens[~is_eos] = body.tokens
    return Docs(tokens, offsets)


def tokenize_chats(
    tokenizer,
    questions: list[str],
    answers: list[str],
    system_prompt: str | None,
    take_loss_over_all_tokens: bool = False,
) -> Docs:
    """Chat-templated (system, user, assistant) conversations with a loss mask that is 1 exactly
    on the tokens after the generation prompt (the answer and the template's end of turn).

    Uses retrofit.data.stream.tokenize_chat_example so preprocessed rows and train.py's on-the-fly SFT
    rows are token-for-token the same."""
    from retrofit.data.stream import tokenize_chat_example

    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template; chat mode (q_col != 'text') needs one")
    ids_lists, mask_lists = [], []
    for question, answer in zip(questions, answers):
        ids, mask = tokenize_chat_example(tokenizer, question, answer, system_prompt or None)
        ids_lists.append(ids)
        mask_lists.append([1] * len(ids) if take_loss_over_all_tokens else mask)
    return Docs.from_lists(ids_lists, mask_lists)


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------
def _scatter_pieces(docs: Docs, src_starts, lengths, dest_starts, n_rows: int, seq_len: int, pad_id: int) -> Rows:
    """Copy token pieces (src_start, length) of docs to flat positions dest_start of an
    (n_rows, seq_len) block, vectorised: one fancy-indexing pass for all pieces."""
    src_starts, lengths, dest_starts = (np.asarray(a, dtype=np.int64) for a in (src_starts, lengths, dest_starts))
    total = int(lengths.sum())
    before = np.cumsum(lengths) - lengths  # tokens of earlier pieces
    step = np.arange(total, dtype=np.int64)
    src = np.repeat(src_starts - before, lengths) + step
    dst = np.repeat(dest_starts - before, lengths) + step
    ids = np.full(n_rows * seq_len, pad_id, dtype=np.int32)
    att = np.zeros(n_rows * seq_len, dtype=np.int8)
    ids[dst] = docs.tokens[src]
    att[dst] = 1
    loss = None
    if docs.loss_mask is not None:
        loss = np.zeros(n_rows * seq_len, dtype=np.int8)
        loss[dst] = docs.loss_mask[src]
    shape = (n_rows, seq_len)
    return Rows(ids.reshape(shape), att.reshape(shape), None if loss is None else loss.reshape(shape))


class WrappedPacker:
    """Streaming wrapped packing: feed batches of documents in order, get full rows back; the
    tokens that do not fill a row yet are carried to the next batch. `finish()` pads the last."""

    def __init__(self, seq_len: int, pad_id: int, with_loss_mask: bool = False):
        self.seq_len, self.pad_id, self.with_loss_mask = seq_len, pad_id, with_loss_mask
        self.carry = np.zeros(0, np.int32)
        self.carry_loss = np.zeros(0, np.int8)

    def add(self, docs: Docs) -> Rows:
        stream = np.concatenate([self.carry, docs.tokens])
        loss = np.concatenate([self.carry_loss, docs.loss_mask]) if self.with_loss_mask else None
        n = len(stream) // self.seq_len
        cut = n * self.seq_len
        self.carry = stream[cut:].copy()
        ids = stream[:cut].reshape(n, self.seq_len)
        rows = Rows(ids, np.ones_like(ids, dtype=np.int8), None)
        if loss is not None:
            self.carry_loss = loss[cut:].copy()
            rows.loss_mask = loss[:cut].reshape(n, self.seq_len)
        return rows

    def finish(self) -> Rows:
        n = len(self.carry)
        if n == 0:
            return Rows.empty(self.seq_len, self.with_loss_mask)
        tail = Docs(self.carry, np.array([0, n]), self.carry_loss if self.with_loss_mask else None)
        self.carry, self.carry_loss = np.zeros(0, np.int32), np.zeros(0, np.int8)
        return _scatter_pieces(tail, [0], [n], [0], 1, self.seq_len, self.pad_id)


def pack_wrapped(docs: Docs, seq_len: int, pad_id: int) -> Rows:
    """Wrapped packing of one batch of documents (the last row padded)."""
    packer = WrappedPacker(seq_len, pad_id, docs.loss_mask is not None)
    return Rows.concat([packer.add(docs), packer.finish()])


def best_fit_bins(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Best-fit decreasing: items (1 <= length <= capacity) longest first, each into the open bin
    with the least free room that still fits it, else a new bin.

    Returns (bin of each item, offset of each item inside its bin, number of bins). The free
    capacities of open bins are kept as bits of one Python int, so "smallest free >= s" is a
    shift and a lowest-set-bit: O(1) big-int ops per item instead of a scan or a tree."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"item lengths must be in [1, {capacity}]")
    order = np.argsort(-lengths, kind="stable")
    bin_of = np.empty(len(lengths), dtype=np.int64)
    offset = np.empty(len(lengths), dtype=np.int64)
    bins_with_free: dict[int, list[int]] = {}  # free capacity -> open bins with exactly that room
    free_bits = 0  # bit c set <=> some open bin has exactly c free slots
    n_bins = 0
    size_of = lengths.tolist()
    for item in order.tolist():
        size = size_of[item]
        fits = free_bits >> size
        if fits:
            free = size + ((fits & -fits).bit_length() - 1)
            stack = bins_with_free[free]
            b = stack.pop()
            if not stack:
                free_bits ^= 1 << free
        else:
            b, free = n_bins, capacity
            n_bins += 1
        bin_of[item] = b
        offset[item] = capacity - free
        left = free - size
        if left:
            stack = bins_with_free.setdefault(left, [])
            if not stack:
                free_bits |= 1 << left
            stack.append(b)
    return bin_of, offset, n_bins


def pack_best_fit(docs: Docs, seq_len: int, pad_id: int) -> tuple[Rows, int]:
    """Best-fit packing of one batch of documents; returns (rows, documents split).

    A document longer than seq_len first fills whole rows of its own; only its remainder is
    bin-packed. Rows: the whole-row pieces first, then the bins in the order they were opened."""
    lengths = docs.lengths
    n_whole = lengths // seq_len
    remainder = lengths - n_whole * seq_len
    # Whole-row pieces of long documents.
    doc_idx = np.repeat(np.arange(len(docs)), n_whole)
    k = np.arange(int(n_whole.sum())) - np.repeat(np.cumsum(n_whole) - n_whole, n_whole)
    whole_src = docs.offsets[:-1][doc_idx] + k * seq_len
    n_whole_rows = len(whole_src)
    # Remainders (whole documents when they fit) are bin-packed.
    has_rest = remainder > 0
    rest_src = (docs.offsets[:-1] + n_whole * seq_len)[has_rest]
    rest_len = remainder[has_rest]
    bin_of, offset, n_bins = best_fit_bins(rest_len, seq_len)
    rows = _scatter_pieces(
        docs,
        np.concatenate([whole_src, rest_src]),
        np.concatenate([np.full(n_whole_rows, seq_len, dtype=np.int64), rest_len]),
        np.concatenate([np.arange(n_whole_rows) * seq_len, (n_whole_rows + bin_of) * seq_len + offset]),
        n_whole_rows + n_bins,
        seq_len,
        pad_id,
    )
    return rows, int((lengths > seq_len).sum())


def pad_or_truncate(docs: Docs, seq_len: int, pad_id: int) -> tuple[Rows, int]:
    """One row per document; returns (rows, tokens truncated away)."""
    lengths = docs.lengths
    kept = np.minimum(lengths, seq_len)
    rows = _scatter_pieces(docs, docs.offsets[:-1], kept, np.arange(len(docs)) * seq_len, len(docs), seq_len, pad_id)
    return rows, int((lengths - kept).sum())


# --------------------------------------------------------------------------------------------
# Tokenize + pack over a table, with worker processes
# --------------------------------------------------------------------------------------------
@dataclass
class PackConfig:
    seq_len: int  # max_length + 1
    mode: str = "wrapped"  # one of PACKING_MODES
    q_col: str = "text"
    a_col: str = "answer"
    system_prompt: str | None = None
    take_loss_over_all_tokens: bool = False
    batch_size: int = 1024  # documents per work unit (and per best-fit block)
    eos_id: int = 1
    pad_id: int = 2

    @property
    def chat(self) -> bool:
        return self.q_col != "text"  # the original's switch

    @property
    def columns(self) -> list[str]:
        return [self.q_col, self.a_col] if self.chat else [self.q_col]


def check_pack_config(cfg: PackConfig, table_schema: pa.Schema, where: str):
    if cfg.seq_len < 3:
        raise DataError(f"max_length={cfg.seq_len - 1} is too small; rows need max_length >= 2")
    if cfg.mode not in PACKING_MODES:
        raise DataError(f"packing mode {cfg.mode!r} is not one of {PACKING_MODES}")
    if cfg.batch_size < 1:
        raise DataError(f"batch_size={cfg.batch_size} must be >= 1")
    for col in cfg.columns:
        if col not in table_schema.names:
            raise DataError(f"{where} has no column {col!r} (columns: {', '.join(table_schema.names)})")
        col_type = table_schema.field(col).type
        if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
            raise DataError(f"{where}: column {col!r} has type {col_type}, expected strings")


_WORKER: dict = {}


def _init_worker(table: pa.Table, tokenizer, cfg: PackConfig):
    _WORKER.update(table=table, tokenizer=tokenizer, cfg=cfg)


def _column_strings(table: pa.Table, name: str, start: int) -> list[str]:
    values = table.column(name).to_pylist()
    if None in values:
        raise DataError(f"row {start + values.index(None)} of column {name!r} is null")
    return values


def _work(start_stop: tuple[int, int]) -> tuple[Docs | Rows, PackStats]:
    """One unit: tokenize documents [start, stop) and, unless wrapped, pack them."""
    table, tokenizer, cfg = _WORKER["table"], _WORKER["tokenizer"], _WORKER["cfg"]
    start, stop = start_stop
    part = table.slice(start, stop - start)
    if cfg.chat:
        docs = tokenize_chats(
            tokenizer,
            _column_strings(part, cfg.q_col, start),
            _column_strings(part, cfg.a_col, start),
            cfg.system_prompt,
            cfg.take_loss_over_all_tokens,
        )
    else:
        docs = tokenize_texts(tokenizer, _column_strings(part, cfg.q_col, start), cfg.eos_id)
    stats = PackStats(docs=len(docs), tokens=len(docs.tokens), seq_len=cfg.seq_len)
    if cfg.mode == "wrapped":
        return docs, stats  # the main process stitches the stream in order
    if cfg.mode == "best_fit":
        rows, stats.split_docs = pack_best_fit(docs, cfg.seq_len, cfg.pad_id)
    else:
        rows, stats.truncated_tokens = pad_or_truncate(docs, cfg.seq_len, cfg.pad_id)
    return rows, stats


def iter_packed_rows(
    table: pa.Table, tokenizer, cfg: PackConfig, num_proc: int = 1, progress: bool = True
) -> Iterator[tuple[Rows, PackStats]]:
    """Tokenize and pack every row of `table` (an Arrow table with the text / q-a columns).

    Work units are fixed blocks of `cfg.batch_size` documents, processed by `num_proc` forked
    workers and consumed in order, so the rows are identical for any `num_proc`. Yields
    (rows, stats of the documents that went into them)."""
    check_pack_config(cfg, table.schema, "the dataset")
    table = table.select(cfg.columns)
    n = table.num_rows
    if n == 0:
        raise DataError("the dataset has no rows")
    units = [(a, min(a + cfg.batch_size, n)) for a in range(0, n, cfg.batch_size)]
    num_proc = max(1, min(num_proc, len(units)))
    packer = WrappedPacker(cfg.seq_len, cfg.pad_id, cfg.chat) if cfg.mode == "wrapped" else None
    bar = progress_bar(total=n, unit="doc", desc=f"tokenize+pack ({num_proc} proc)", enabled=progress)

    def handle(result: tuple[Docs | Rows, PackStats]) -> tuple[Rows, PackStats]:
        out, stats = result
        rows = packer.add(out) if packer is not None else out
        stats.rows, stats.real_tokens = len(rows), int(rows.attention_mask.sum(dtype=np.int64))
        bar.update(stats.docs)
        return rows, stats

    try:
        if num_proc == 1:
            _init_worker(table, tokenizer, cfg)
            for unit in units:
                yield handle(_work(unit))
        else:
            import multiprocessing as mp

            # fork: workers inherit the (memory-mapped) table and tokenizer without pickling.
            ctx = mp.get_context("fork")
            with ctx.Pool(num_proc, initializer=_init_worker, initargs=(table, tokenizer, cfg)) as pool:
                for result in pool.imap(_work, units, chunksize=1):
                    yield handle(result)
        if packer is not None:
            tail = packer.finish()
            yield tail, PackStats(rows=len(tail), real_tokens=int(tail.attention_mask.sum()), seq_len=cfg.seq_len)
    finally:
        bar.close()
        _WORKER.clear()
