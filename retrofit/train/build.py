"""The pieces a training run is built from, each checked before the next costs time: the model
name, tokenizer, data stream, model, vocabulary, step count and the recurrence schedule."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from retrofit.data.rows import DataError
from retrofit.data.shards import list_parquet_files
from retrofit.data.stream import (
    PackedDatasetStream,
    ParquetStream,
    build_sft_dataset,
    check_packed_dataset,
    inspect_parquet_files,
    load_raw_dataset,
)
from retrofit.errors import first_line
from retrofit.model.configuration_raven import RavenConfig
from retrofit.train.config import ConfigError, TrainConfig
from retrofit.train.depth import RecurrenceSchedule
from retrofit.train.distributed import DistEnv


def check_model_name(name: str) -> None:
    """A local folder with config.json, or something that can be a Hub repo id."""
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"--model_name={name} has no config.json: pass a model folder (save_pretrained output)")
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
        is_repo_id = not name.startswith((".", "/", "~"))
    except HFValidationError:
        is_repo_id = False
    if not is_repo_id:
        raise ConfigError(f"--model_name={name} does not exist (neither a local folder nor a Hub repo id)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"--model_name={name} is not a local folder and HF_HUB_OFFLINE=1 forbids downloading it")


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_name)
    except OSError as exc:
        raise ConfigError(f"cannot load the tokenizer of --model_name={cfg.model_name}: {first_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_data(cfg: TrainConfig, env: DistEnv, tokenizer):
    """(stream, max_length, micro-steps per epoch per rank or None for streams of unknown length)."""
    if cfg.preprocessed_data_path is not None and cfg.is_parquet_dataset:
        files = list_parquet_files(cfg.preprocessed_data_path)
        max_length = inspect_parquet_files(files, cfg.max_length)
        stream = ParquetStream(
            cfg.preprocessed_data_path,
            cfg.micro_batch_size,
            max_length,
            rank=env.rank,
            world_size=env.world_size,
            epochs=cfg.epochs,
        )
        return stream, max_length, None
    if cfg.preprocessed_data_path is not None:
        import datasets

        folder = Path(cfg.preprocessed_data_path)
        if not folder.exists():
            raise DataError(f"preprocessed_data_path {cfg.preprocessed_data_path!r} does not exist")
        saved_by_datasets = any((folder / name).is_file() for name in ("dataset_info.json", "dataset_dict.json"))
        if not saved_by_datasets and folder.is_dir() and any(folder.glob("*.parquet")):
            raise DataError(
                f"{cfg.preprocessed_data_path} holds parquet shards: pass --is_parquet_dataset=true to read them"
            )
        try:
            dataset = datasets.load_from_disk(cfg.preprocessed_data_path)
        except FileNotFoundError as exc:
            raise DataError(
                f"{cfg.preprocessed_data_path} is not a save_to_disk dataset ({exc}); for parquet shards pass"
                " --is_parquet_dataset=true"
            ) from None
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"]
        if cfg.max_samples is not None:
            dataset = dataset.select(range(min(cfg.max_samples, len(dataset))))
        max_length = check_packed_dataset(dataset, cfg.max_length, cfg.preprocessed_data_path)
    else:
        raw = load_raw_dataset(cfg.dataset_location, cfg.dataset_config)
        dataset, max_length = build_sft_dataset(
            raw,
            tokenizer,
            cfg.dataset_args.q_col,
            cfg.dataset_args.a_col,
            cfg.max_length,
            take_loss_over_all_tokens=cfg.take_loss_over_all_tokens,
            max_samples=cfg.max_samples,
        )
    stream = PackedDatasetStream(
        dataset, cfg.micro_batch_size, rank=env.rank, world_size=env.world_size, seed=cfg.seed, epochs=cfg.epochs
    )
    return stream, max_length, stream.steps_per_epoch()


def read_model_type(model_name: str) -> str | None:
    """model_type of --model_name's config.json, read as JSON: a checkpoint's own configuration code
    (configuration_raven.py copied beside its weights) never runs here."""
    from transformers.utils import cached_file

    try:
        config_path = cached_file(model_name, "config.json")
        config = json.loads(Path(config_path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the config.json of --model_name={model_name}: {first_line(exc)[:300]}") from None
    return config.get("model_type") if isinstance(config, dict) else None


def load_model(cfg: TrainConfig, device: torch.device):
    """The model to train: this repository's RavenForCausalLM for a recurrent checkpoint, a plain
    transformers class (no remote code) for --non_recurrent_model."""
    dtype = torch.bfloat16 if cfg.bf16_true else torch.float32
    model_type = read_model_type(cfg.model_name)
    is_raven = model_type == RavenConfig.model_type
    if cfg.non_recurrent_model:
        if is_raven:
            raise ConfigError(f"{cfg.model_name} is a recurrent model; drop --non_recurrent_model=true to train it")
        from transformers import AutoConfig, AutoModelForCausalLM

        if cfg.init_from_scratch:
            model_config = AutoConfig.from_pretrained(cfg.model_name, trust_remote_code=False)
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.model_name, dtype=dtype, trust_remote_code=False)
    else:
        if not is_raven:
            raise ConfigError(
                f"{cfg.model_name} is a plain {model_type or '?'!r} model: convert it with"
                " convert_pretrained_model/convert_*.py first, or pass --non_recurrent_model=true for the baseline"
            )
        from retrofit.model.modeling_raven import RavenForCausalLM

        if cfg.init_from_scratch:
            config = RavenConfig.from_pretrained(cfg.model_name)
            model = RavenForCausalLM(config).to(dtype)
        else:
            model = RavenForCausalLM.from_pretrained(cfg.model_name, dtype=dtype)
    return model.to(device)


def check_vocab(model, tokenizer, model_name: str) -> int:
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(
            f"tokenizer of {model_name} has {len(tokenizer)} tokens but the model's embedding has {rows} rows"
        )
    return rows


def compute_max_steps(cfg: TrainConfig, env, max_length: int, micro_steps_per_epoch: int | None) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    if micro_steps_per_epoch is None:  # parquet: sized by tokens
        tokens_per_step = cfg.batch_size * env.world_size * max_length
        return max(1, math.ceil(cfg.parquet_dataset_max_tokens / tokens_per_step))
    steps = cfg.epochs * (micro_steps_per_epoch // cfg.accumulation_steps)
    if steps < 1:
        raise DataError(
            f"the data gives {micro_steps_per_epoch} micro-batches per rank per epoch, fewer than one optimizer step"
            f" ({cfg.accumulation_steps} micro-batches): lower --batch_size or add data"
        )
    return steps


def build_schedule(cfg: TrainConfig, model_config, max_steps: int) -> RecurrenceSchedule:
    """The run's resolved schedule: the curriculum flags, the model config's values where a curriculum is off."""
    return RecurrenceSchedule.resolve(
        max_steps,
        cfg.mean_recurrence_schedule,
        cfg.mean_backprop_depth_schedule,
        model_mean_recurrence=model_config.mean_recurrence,
        model_backprop_depth=model_config.mean_backprop_depth,
    )
