"""The pieces a training run is built from, seeded, each checked before the next costs time:
tokenizer, data stream, step count, model (and its vocabulary) and the recurrence schedule
(`build_run`, in that order). The flags, --model_name and the run folder are checked and claimed
before, by train.py's main()."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retrofit.data.rows import DataError
from retrofit.data.stream import open_training_stream
from retrofit.errors import first_line
from retrofit.model.configuration_raven import RavenConfig
from retrofit.model.loading import load_saved_tokenizer
from retrofit.errors import ConfigError
from retrofit.train.config import TrainConfig
from retrofit.train.depth import RecurrenceSchedule
from retrofit.train.distributed import DistEnv


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def load_tokenizer(cfg: TrainConfig):
    try:
        tokenizer = load_saved_tokenizer(cfg.model_name)
    except (OSError, ValueError) as exc:  # ValueError: no tokenizer files (transformers then asks for sentencepiece)
        raise ConfigError(f"cannot load the tokenizer of --model_name={cfg.model_name}: {first_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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


def load_model(cfg: TrainConfig, device: torch.device, tokenizer) -> tuple[torch.nn.Module, int]:
    """The model to train, and its embedding rows (at least the tokenizer's length): this
    repository's RavenForCausalLM for a recurrent checkpoint, a plain transformers class (no
    remote code) for --non_recurrent_model."""
    try:
        model = build_model(cfg)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # no weights, config values out of range, ...
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"--model_name={cfg.model_name} does not load: {first_line(exc)[:300]}") from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(
            f"tokenizer of {cfg.model_name} has {len(tokenizer)} tokens but the model's embedding has {rows} rows"
        )
    return model.to(device), rows


def build_model(cfg: TrainConfig):
    dtype = torch.bfloat16 if cfg.bf16_true else torch.float32
    model_type = read_model_type(cfg.model_name)
    is_raven = model_type == RavenConfig.model_type
    if cfg.non_recurrent_model:
        if is_raven:
            raise ConfigError(f"{cfg.model_name} is a recurrent model; drop --non_recurrent_model=true to train it")
        from transformers import AutoConfig, AutoModelForCausalLM

        if not cfg.init_from_scratch:
            model = AutoModelForCausalLM.from_pretrained(cfg.model_name, dtype=dtype, trust_remote_code=False)
        else:  # --init_from_scratch: the architecture alone, fresh weights
            model_config = AutoConfig.from_pretrained(cfg.model_name, trust_remote_code=False)
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    else:
        if not is_raven:
            raise ConfigError(
                f"{cfg.model_name} is a plain {model_type or '?'!r} model: convert it with"
                " convert_pretrained_model/convert_*.py first, or pass --non_recurrent_model=true for the baseline"
            )
        from retrofit.model.modeling_raven import RavenForCausalLM

        if not cfg.init_from_scratch:
            model = RavenForCausalLM.from_pretrained(cfg.model_name, dtype=dtype)
        else:  # --init_from_scratch
            config = RavenConfig.from_pretrained(cfg.model_name)
            model = RavenForCausalLM(config).to(dtype)
    return model


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


@dataclass
class RunParts:
    tokenizer: object
    stream: object  # ParquetStream or PackedDatasetStream
    max_length: int
    model: torch.nn.Module
    vocab_rows: int
    max_steps: int
    schedule: RecurrenceSchedule | None  # None for --non_recurrent_model


def build_run(cfg: TrainConfig, env: DistEnv) -> RunParts:
    """Everything a run trains with, checked cheapest first, in a run folder that train.py's main()
    has claimed (after its checks of the flags and --model_name). Data comes before the model: bad
    data fails in seconds, before the model is loaded. Seeded first: a model built from scratch
    starts alike on every rank and in every run with the same --seed."""
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    stream, max_length, micro_steps_per_epoch = open_training_stream(cfg, env.rank, env.world_size, tokenizer)
    max_steps = compute_max_steps(cfg, env, max_length, micro_steps_per_epoch)
    model, vocab_rows = load_model(cfg, env.device, tokenizer)
    schedule = None
    if not cfg.non_recurrent_model:  # a curriculum that is off holds the model config's value
        schedule = RecurrenceSchedule.resolve(
            max_steps, cfg.mean_recurrence_schedule, cfg.mean_backprop_depth_schedule,
            model_mean_recurrence=model.config.mean_recurrence, model_backprop_depth=model.config.mean_backprop_depth,
        )
    return RunParts(tokenizer, stream, max_length, model, vocab_rows, max_steps, schedule)
