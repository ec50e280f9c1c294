"""The packed-row format: what every training and evaluation row looks like, its one check, and
how a row becomes model inputs and labels.

A row is `input_ids` of exactly `max_length + 1` tokens with an `attention_mask` of the same
length (1 = real token, 0 = padding) and, in chat-SFT data, a `loss_mask` (1 = a token the model
is trained to produce: the assistant's answer). Stored as list-of-integer columns (parquet shards,
`save_to_disk` datasets, Arrow tables); the packers write padding only after the real tokens.
The model reads `row[:-1]` and is scored on `row[1:]` (see `inputs_and_labels`).

`DataError` is the one error for bad data or data settings anywhere in the package (packing,
shards, mixing, the training readers, the evaluation reader): one line naming the bad value.

numpy + pyarrow only (no torch import: `inputs_and_labels` works on the tensors it is given).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

ROW_COLUMNS = ("input_ids", "attention_mask")
LOSS_MASK_COLUMN = "loss_mask"
IGNORE_INDEX = -100  # label of a target that is not scored (PyTorch's cross-entropy default)


class DataError(ValueError):
    """Bad input data or data settings; the message is one line that names the bad value."""


def row_columns(names, required=ROW_COLUMNS) -> list[str]:
    """The row columns among `names`: the required ones, then `attention_mask` / `loss_mask`
    where present (in this order)."""
    optional = [c for c in (*ROW_COLUMNS, LOSS_MASK_COLUMN) if c not in required and c in names]
    return [*required, *optional]


def check_row_schema(schema: pa.Schema, where: str, required=ROW_COLUMNS) -> list[str]:
    """Every required row column is present and every row column is a list of integers; returns
    the row columns (`row_columns`)."""
    columns = row_columns(schema.names, required)
    for name in columns:
        if name not in schema.names:
            raise DataError(
                f"{where} is not packed training rows: no column {name!r} (columns: {', '.join(schema.names) or 'none'})"
            )
        col_type = schema.field(name).type
        is_list = pa.types.is_list(col_type) or pa.types.is_large_list(col_type) or pa.types.is_fixed_size_list(col_type)
        if not is_list or not pa.types.is_integer(col_type.value_type):
            raise DataError(f"{where}: column {name!r} has type {col_type}, expected a list of integers")
    return columns


def _row_length(column, where: str, name: str, row_len: int | None) -> int:
    """`row_len`, or the first row's length; a DataError names the first row of another length."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    expected = int(lengths[0]) if row_len is None else row_len
    bad = np.nonzero(lengths != expected)[0]
    if len(bad):
        hint = "was the data packed for a different --max_length?" if row_len is not None else "is this packed data?"
        raise DataError(
            f"{where}: row {int(bad[0])} of {name!r} has {int(lengths[bad[0]])} tokens, expected {expected}"
            f" (max_length + 1); {hint}"
        )
    return expected


def check_rows(table: pa.Table | pa.RecordBatch, where: str, row_len: int | None = None, required=ROW_COLUMNS) -> int:
    """The one check of packed rows: the columns and their types (`check_row_schema`), and every
    row of every row column `row_len` tokens long (default: as long as the first row). Returns
    the row length, max_length + 1 (`row_len` or 0 for an empty table)."""
    for name in check_row_schema(table.schema, where, required):
        if table.num_rows:
            row_len = _row_length(table.column(name), where, name, row_len)
    return row_len or 0


def check_token_ids(ids, vocab_size: int, where: str) -> None:
    """DataError unless every id of `ids` (a tensor or array) indexes the model's embedding: an id
    outside [0, vocab_size) would fail deep in the model, or on a GPU as a device assert."""
    if ids.numel() if hasattr(ids, "numel") else ids.size:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise DataError(
                f"token id {bad} in {where} is outside the model's vocabulary [0, {vocab_size}): re-tokenize the data"
                " with the model's tokenizer"
            )


def row_matrix(column, where: str, name: str, row_len: int | None = None, dtype=np.int64) -> np.ndarray:
    """A list column of rows -> a (rows, row_len) array, checked like `check_rows`."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, row_len or 0), dtype=dtype)
    row_len = _row_length(column, where, name, row_len)
    values = column.flatten()
    if column.null_count or values.null_count:  # to_numpy would turn them into floats, then into garbage ids
        raise DataError(f"{where}: column {name!r} holds null values; re-create the data without them")
    values = values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return values.reshape(len(column), row_len)


def inputs_and_labels(input_ids, attention_mask=None, loss_mask=None):
    """Rows of max_length + 1 tokens -> (input_ids, attention_mask, labels), each max_length long.

    The model reads row[:-1] and is scored on row[1:]. The labels are aligned with the inputs:
    pass them as `shift_labels`, which HF's causal LMs and ours take unshifted. A target is scored
    (label = its token id, else -100) when it is a real token, the token predicting it is a real
    token, and, with a `loss_mask`, the target is part of the answer.

    Why "both real": the output at a padding position comes from a pad token that attends to
    nothing real (left padding) or follows the document (right padding), so the token after it is
    not predicted from its document and scoring it only adds noise. For rows whose padding comes
    after the real tokens (everything the packers write) this is the same as "the target is not
    padding", the original's rule: training on packed data is unchanged by it.
    Takes and returns torch tensors (`inputs_and_labels(**batch)` for a reader's batch).
    """
    if attention_mask is None:
        attention_mask = input_ids.new_ones(input_ids.shape)
    scored = (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)
    if loss_mask is not None:
        scored &= loss_mask[:, 1:] != 0
    labels = input_ids[:, 1:].masked_fill(~scored, IGNORE_INDEX)
    return input_ids[:, :-1], attention_mask[:, :-1], labels
