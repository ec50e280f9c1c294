"""Training data for train.py: a stateful, rank-sharded parquet reader, a resumable reader for
`load_from_disk` packed datasets, and q/a chat SFT tokenisation.

Rows are the packed-row format of `retrofit.data.rows` (checked there; `retrofit.data.rows.inputs_and_labels`
turns a batch into model inputs and labels).

Both readers hand out micro-batches with `next_batch()` (None at the end of the data) and save
their exact position with `state_dict()`, so a resumed run reads exactly what the uninterrupted
run would have read.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch

from retrofit.data.rows import DataError, check_rows, row_columns, row_matrix
from retrofit.data.shards import inspect_parquet_files, list_parquet_files, open_parquet, parquet_fingerprint, read_row_group

PARQUET_SHUFFLE_SEED = 42  # the original's reader always used 42, independent of --seed
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant that can assist users with mathematical reasoning."


class ParquetStream:
    """Streams micro-batches from parquet shards, sharded across ranks by file.

    File order: natural sort, then a seeded shuffle (per epoch); rank r reads files[r::world].
    Within a row group, rows are read in a seeded random order derived from (seed, epoch,
    file, row group), so the position (epoch, file, row group, row) is the whole state.
    """

    def __init__(
        self,
        folder: str | Path,
        micro_batch_size: int,
        max_length: int | None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = PARQUET_SHUFFLE_SEED,
        shuffle: bool = True,
        epochs: int = 1,
    ):
        """Lists the shards and checks them (`inspect_parquet_files`) before anything is read:
        `max_length` None takes the rows' length from the data (`self.max_length`)."""
        self.all_files = list_parquet_files(folder)
        if len(self.all_files) < world_size:
            raise DataError(
                f"{len(self.all_files)} parquet file(s) in {str(folder)!r} cannot be split across {world_size}"
                " ranks (sharding is by file): write at least one shard per rank"
            )
        self.max_length = inspect_parquet_files(self.all_files, max_length)
        self.micro_batch_size = micro_batch_size
        self.row_len = self.max_length + 1
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        # The shards' names (older checkpoints carry only these) and, per shard, its size and footer
        # digest: shards replaced with other rows under the same names are noticed on resume.
        self.fingerprint = hashlib.sha1("\n".join(p.name for p in self.all_files).encode()).hexdigest()[:12]
        self.file_fingerprints = {p.name: parquet_fingerprint(p) for p in self.all_files}
        self.position = dict(epoch=0, file_idx=0, row_group_idx=0, row_idx=0)
        self._cache_key = None
        self._cache = None

    def files_for_epoch(self, epoch: int) -> list[Path]:
        files = list(self.all_files)
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(files)
        return files[self.rank :: self.world_size]

    def _row_group(self, epoch: int, file_idx: int, row_group_idx: int) -> dict[str, np.ndarray]:
        """{column: (rows, max_length + 1) array} of one row group, rows in their shuffled order.

        Reads `input_ids`, `attention_mask` and, where the shards carry one (chat SFT data from
        preprocess_data_packing.py), `loss_mask`.
        """
        key = (epoch, file_idx, row_group_idx)
        if self._cache_key == key:
            return self._cache
        path = self.files_for_epoch(epoch)[file_idx]
        parquet = open_parquet(path)
        columns = row_columns(parquet.schema_arrow.names)
        table = read_row_group(parquet, path, row_group_idx, columns)
        where = f"{path} row group {row_group_idx}"
        arrays = {c: row_matrix(table.column(c), where, c, self.row_len) for c in columns}
        if self.shuffle:
            order = list(range(table.num_rows))
            random.Random(f"{self.seed}/{epoch}/{path.name}/{row_group_idx}").shuffle(order)
            arrays = {c: a[order] for c, a in arrays.items()}
        self._cache_key, self._cache = key, arrays
        return arrays

    def _num_row_groups(self, epoch: int, file_idx: int) -> int:
        return open_parquet(self.files_for_epoch(epoch)[file_idx]).num_row_groups

    def next_batch(self) -> dict[str, torch.Tensor] | None:
        """The next micro-batch of this rank, or None when this rank's data is exhausted."""
        chunks: dict[str, list[np.ndarray]] = {}  # per column, chunks of rows (a micro-batch may span row groups)
        have = 0
        pos = self.position
        while have < self.micro_batch_size:
            if pos["epoch"] >= self.epochs:
                return None
            files = self.files_for_epoch(pos["epoch"])
            if pos["file_idx"] >= len(files):
                pos.update(epoch=pos["epoch"] + 1, file_idx=0, row_group_idx=0, row_idx=0)
                continue
            if pos["row_group_idx"] >= self._num_row_groups(pos["epoch"], pos["file_idx"]):
                pos.update(file_idx=pos["file_idx"] + 1, row_group_idx=0, row_idx=0)
                continue
            arrays = self._row_group(pos["epoch"], pos["file_idx"], pos["row_group_idx"])
            take = min(self.micro_batch_size - have, len(arrays["input_ids"]) - pos["row_idx"])
            if take <= 0:
                pos.update(row_group_idx=pos["row_group_idx"] + 1, row_idx=0)
                continue
            for column, array in arrays.items():
                chunks.setdefault(column, []).append(array[pos["row_idx"] : pos["row_idx"] + take])
            pos["row_idx"] += take
            have += take
        if len({len(parts) for parts in chunks.values()}) > 1:
            raise DataError("some parquet shards carry a loss_mask column and others do not; repack them alike")
        return {column: torch.from_numpy(np.concatenate(parts)) for column, parts in chunks.items()}

    def state_dict(self) -> dict:
        return dict(kind="parquet", fingerprint=self.fingerprint, file_fingerprints=self.file_fingerprints,
                    world_size=self.world_size, **self.position)

    def load_state_dict(self, state: dict):
        if state.get("kind") != "parquet":
            raise DataError(f"checkpoint data state is for a {state.get('kind')!r} dataset, not parquet")
        if state["fingerprint"] != self.fingerprint:
            raise DataError(
                f"the parquet files differ from the checkpoint's (fingerprint {self.fingerprint} vs"
                f" {state['fingerprint']}); pass --ignore_past_parquet_dataset=true to start the data from the beginning"
            )
        recorded = state.get("file_fingerprints") or {}
        changed = next((name for name, print_ in recorded.items() if self.file_fingerprints.get(name) != print_), None)
        if changed is not None:
            raise DataError(
                f"{self.all_files[0].parent / changed} holds other data than when the checkpoint was written (its size or"
                " parquet footer changed); restore the original shard, or pass --ignore_past_parquet_dataset=true to"
                " start the data from the beginning"
            )
        if state["world_size"] != self.world_size:
            raise DataError(
                f"checkpoint was written with {state['world_size']} ranks, this run has {self.world_size}; the"
                " per-rank file positions cannot be mapped (pass --ignore_past_parquet_dataset=true to restart the data)"
            )
        self.position = {k: int(state[k]) for k in ("epoch", "file_idx", "row_group_idx", "row_idx")}


class PackedDatasetStream:
    """Micro-batches from an in-memory / `load_from_disk` dataset of fixed-length rows.

    A seeded permutation per epoch defines one global row order; each global micro-step takes
    world_size * micro_batch_size rows and rank r gets the r-th slice, so a run on W ranks with
    micro-batch m sees exactly the rows one process with micro-batch W*m would see. The last
    incomplete global micro-batch of an epoch is dropped so every rank does the same number of steps.
    """

    def __init__(
        self,
        dataset,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 74,
        shuffle: bool = True,
        epochs: int = 1,
        max_length: int | None = None,
        source: str = "the dataset",
    ):
        """Checks the rows before anything is read (`retrofit.data.rows.check_rows`): each
        `max_length` + 1 tokens, or as long as the first row when None (`self.max_length`).
        `source` names the data in errors."""
        if len(dataset) == 0:
            raise DataError(f"{source}: the dataset is empty")
        self.dataset = dataset.with_format("numpy")
        self.content_digest = packed_content_digest(self.dataset)  # ragged rows too: the check comes next
        table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
        self.max_length = check_rows(table, source, None if max_length is None else max_length + 1) - 1
        self.columns = row_columns(dataset.column_names)
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.global_micro_batch = micro_batch_size * world_size
        if len(dataset) < self.global_micro_batch:
            raise DataError(
                f"the dataset has {len(dataset)} rows, fewer than one global micro-batch"
                f" ({micro_batch_size} x {world_size} ranks)"
            )
        self.position = dict(epoch=0, row=0)
        self._order_epoch, self._order = None, None

    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(len(self.dataset), generator=generator).numpy()
            else:
                self._order = np.arange(len(self.dataset))
            self._order_epoch = epoch
        return self._order

    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_micro_batch

    def next_batch(self) -> dict[str, torch.Tensor] | None:
        pos = self.position
        if pos["row"] + self.global_micro_batch > len(self.dataset):
            pos.update(epoch=pos["epoch"] + 1, row=0)
        if pos["epoch"] >= self.epochs:
            return None
        order = self._order_for(pos["epoch"])
        start = pos["row"] + self.rank * self.micro_batch_size
        indices = np.sort(order[start : start + self.micro_batch_size]).tolist()
        rows = self.dataset[indices]
        # restore the permutation's order (datasets reads faster with sorted indices)
        back = np.argsort(np.argsort(order[start : start + self.micro_batch_size]))
        pos["row"] += self.global_micro_batch
        return {c: torch.as_tensor(np.asarray(rows[c])[back], dtype=torch.long) for c in self.columns}

    def state_dict(self) -> dict:
        return dict(kind="packed", num_rows=len(self.dataset), content_digest=self.content_digest,
                    world_size=self.world_size, **self.position)

    def load_state_dict(self, state: dict):
        if state.get("kind") != "packed":
            raise DataError(f"checkpoint data state is for a {state.get('kind')!r} dataset, not a packed dataset")
        if state["num_rows"] != len(self.dataset):
            raise DataError(
                f"the dataset has {len(self.dataset)} rows, the checkpoint's had {state['num_rows']};"
                " pass --ignore_past_parquet_dataset=true to start the data from the beginning"
            )
        recorded = state.get("content_digest")  # None: a checkpoint from before it was recorded
        if recorded is not None and recorded != self.content_digest:
            raise DataError(
                "the --preprocessed_data_path dataset holds other rows than when the checkpoint was written (the same"
                f" {len(self.dataset)} rows but other contents: digest {self.content_digest} vs {recorded}); restore the"
                " original data, or pass --ignore_past_parquet_dataset=true to start the data from the beginning"
            )
        self.position = {"epoch": int(state["epoch"]), "row": int(state["row"])}


def packed_content_digest(dataset, sample_rows: int = 1024) -> str:
    """What identifies a packed dataset's contents, cheaply: a SHA-1 of its column names and of up to
    `sample_rows` rows spread evenly over it, first and last included (milliseconds even for
    billions of tokens; a rewrite that keeps every sampled row goes unnoticed). `dataset` must be in
    numpy format."""
    num_rows = len(dataset)
    indices = np.unique(np.linspace(0, num_rows - 1, min(num_rows, sample_rows)).round().astype(np.int64)).tolist()
    rows = dataset[indices]
    digest = hashlib.sha1(f"{num_rows}:{sorted(rows)}".encode())
    for column in sorted(rows):
        for value in rows[column]:  # fixed-length rows come as one 2-D array, ragged ones as objects
            array = np.asarray(value)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Chat SFT (GSM8K-style q/a columns)
# --------------------------------------------------------------------------------------------
def load_raw_dataset(location: str, config: str | None, split: str = "train"):
    """A local `save_to_disk` folder, or a Hub / builder dataset name."""
    import datasets

    if Path(location).exists():
        loaded = datasets.load_from_disk(location)
    else:
        loaded = datasets.load_dataset(location, config)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{location!r} has no {split!r} split; found {list(loaded)}")
        loaded = loaded[split]
    return loaded


def tokenize_chat_example(
    tokenizer, question: str, answer: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated (system, user, assistant) conversation and a mask that is
    1 on the assistant's answer tokens (everything after the generation prompt)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question.strip()})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": answer.strip()}], tokenize=False
    )
    if not full.startswith(prompt):
        raise DataError("the tokenizer's chat template does not render the prompt as a prefix of the conversation")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    # Start with BOS like plain text does, unless the template already writes it.
    template_has_bos = bool(tokenizer.bos_token) and prompt.startswith(tokenizer.bos_token)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not template_has_bos else []
    ids = bos + prompt_ids + answer_ids
    mask = [0] * (len(bos) + len(prompt_ids)) + [1] * len(answer_ids)
    return ids, mask


def build_sft_dataset(
    dataset,
    tokenizer,
    q_col: str,
    a_col: str,
    max_length: int | None,
    take_loss_over_all_tokens: bool = False,
    max_samples: int | None = None,
    num_proc: int | None = None,
):
    """Rows of `input_ids`, `attention_mask`, `loss_mask`, each max_length + 1 long (right-padded,
    truncated). `q_col == "text"` trains on plain text (bos + text, loss on every token)."""
    if tokenizer.chat_template is None and q_col != "text":
        raise DataError("the tokenizer has no chat template; chat SFT needs one (or use q_col=text)")
    needed = [q_col] if q_col == "text" else [q_col, a_col]
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise DataError(f"dataset has no column(s) {missing}; found {dataset.column_names} (set --dataset_args.q_col/a_col)")
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise DataError("the SFT dataset is empty")

    def encode(example):
        if q_col == "text":
            ids = tokenizer(example[q_col].strip())["input_ids"]
            mask = [1] * len(ids)
        else:
            ids, mask = tokenize_chat_example(tokenizer, example[q_col], example[a_col])
        return {"ids": ids, "answer_mask": mask}

    encoded = dataset.map(encode, remove_columns=dataset.column_names, num_proc=num_proc, desc="tokenizing")
    if max_length is None:
        max_length = max(len(ids) for ids in encoded["ids"]) - 1
    row_len = max_length + 1
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def pad(example):
        ids, answer_mask = example["ids"][:row_len], example["answer_mask"][:row_len]
        n_pad = row_len - len(ids)
        attention = [1] * len(ids) + [0] * n_pad
        loss_mask = attention if take_loss_over_all_tokens else answer_mask + [0] * n_pad
        return {"input_ids": ids + [pad_id] * n_pad, "attention_mask": attention, "loss_mask": loss_mask}

    return encoded.map(pad, remove_columns=["ids", "answer_mask"], num_proc=num_proc, desc="padding"), max_length


def load_packed_dataset(path: str, max_samples: int | None = None):
    """The `save_to_disk` dataset of packed rows at --preprocessed_data_path (its "train" split),
    the first `max_samples` rows when given."""
    import datasets

    folder = Path(path)
    if not folder.exists():
        raise DataError(f"preprocessed_data_path {path!r} does not exist")
    saved_by_datasets = any((folder / name).is_file() for name in ("dataset_info.json", "dataset_dict.json"))
    if not saved_by_datasets and folder.is_dir() and any(folder.glob("*.parquet")):
        raise DataError(f"{path} holds parquet shards: pass --is_parquet_dataset=true to read them")
    try:
        dataset = datasets.load_from_disk(path)
    except FileNotFoundError as exc:
        raise DataError(
            f"{path} is not a save_to_disk dataset ({exc}); for parquet shards pass --is_parquet_dataset=true"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"]
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset


def open_training_stream(cfg, rank: int, world_size: int, tokenizer):
    """The stream train.py reads, from its data flags (`cfg`: a TrainConfig): parquet shards, a
    save_to_disk dataset of packed rows, or a raw dataset tokenized here; each stream checks its
    rows itself. Returns (stream, max_length, micro-steps per epoch per rank, or None for streams
    of unknown length)."""
    if cfg.preprocessed_data_path is not None and cfg.is_parquet_dataset:
        stream = ParquetStream(
            cfg.preprocessed_data_path, cfg.micro_batch_size, cfg.max_length, rank=rank, world_size=world_size,
            epochs=cfg.epochs,
        )
        return stream, stream.max_length, None
    if cfg.preprocessed_data_path is not None:
        dataset = load_packed_dataset(cfg.preprocessed_data_path, cfg.max_samples)
        source = cfg.preprocessed_data_path
    else:
        raw = load_raw_dataset(cfg.dataset_location, cfg.dataset_config)
        dataset, _ = build_sft_dataset(
            raw,
            tokenizer,
            cfg.dataset_args.q_col,
            cfg.dataset_args.a_col,
            cfg.max_length,
            take_loss_over_all_tokens=cfg.take_loss_over_all_tokens,
            max_samples=cfg.max_samples,
        )
        source = cfg.dataset_location
    stream = PackedDatasetStream(
        dataset, cfg.micro_batch_size, rank=rank, world_size=world_size, seed=cfg.seed, epochs=cfg.epochs,
        max_length=cfg.max_length, source=source,
    )
    return stream, stream.max_length, stream.steps_per_epoch()
