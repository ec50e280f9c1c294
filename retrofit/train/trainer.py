"""The training loop behind train.py: set-up pieces, the `Trainer` and `run(cfg)`.

Per optimizer step u (counting from 1): the curriculum gives (mean recurrence, backprop depth) =
RecurrenceSchedule.applied_at(u) (the original's scheduler values); every micro-batch draws its own
(n, k) from the depth sampler seeded by its index `data_step` (counting from 1, the same on every
rank; plus 1 with parquet data, the original's numbering); gradients are accumulated over
batch_size / micro_batch_size micro-batches, averaged over ranks by DDP (or reduce-scattered by
FSDP2 with --fsdp), clipped, and applied with the warmup-stable-decay learning rate. LoRA,
activation checkpointing, FSDP and distillation: retrofit/train/modes.py. See docs/training.md for
outputs and resuming.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from retrofit.train import checkpoint as ckpt
from retrofit.train import distributed as dist_utils
from retrofit.train import fsdp
from retrofit.train import modes as train_modes
from retrofit.model.configuration_raven import RavenConfig
from retrofit.data.stream import (
    PackedDatasetStream,
    ParquetStream,
    build_sft_dataset,
    check_packed_dataset,
    inspect_parquet_files,
    load_raw_dataset,
)
from retrofit.train.depth import RecurrenceSchedule, sample_num_steps
from retrofit.train.distill import check_vocabularies, distillation_kl, load_teacher, teacher_logits
from retrofit.analysis.flops import count_parameters, micro_batch_flops, model_flops_utilization, peak_tflops_of
from retrofit.train.optim import build_optimizer, set_learning_rates, wsd_lr_factor
from retrofit.data.rows import DataError, inputs_and_labels
from retrofit.train.run_record import build_run_record, write_run_record
from retrofit.data.shards import list_parquet_files
from retrofit.train.config import ConfigError, TrainConfig
from retrofit.train.monitor import MetricsLogger, PreemptionWatcher, format_step_line, seed_everything


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or weights); train.py exits 1 with one `error:` line."""


# ------------------------------------------------------------------------------------------------
# Setup pieces
# ------------------------------------------------------------------------------------------------
RUN_OUTPUT_RE = re.compile(r"^(checkpoint_\d+|model_only_chkpt_\d+|final_checkpoint|metrics\.jsonl|run\.json)$")


def previous_run_outputs(run_dir: Path) -> list[Path]:
    """What an earlier run left in `run_dir` (checkpoints, model-only saves, metrics)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if RUN_OUTPUT_RE.match(p.name))


def _is_within(path: str | Path, folder: Path) -> bool:
    path, folder = Path(path).resolve(), folder.resolve()
    return path == folder or folder in path.parents


def prepare_run_dir(cfg: TrainConfig) -> str | None:
    """Main rank: refuse to train over a previous run unless asked, clear it for --overwrite=true,
    and check that the folder is writable. Returns a message for the log, or raises ConfigError."""
    run_dir = cfg.run_dir
    outputs = previous_run_outputs(run_dir)
    message = None
    if outputs and cfg.resume_path is None:
        names = ", ".join(p.name for p in outputs[:4]) + (", ..." if len(outputs) > 4 else "")
        if not cfg.overwrite:
            raise ConfigError(
                f"{run_dir} already holds a run ({names}); continue it with --resume_path=auto, or pass"
                " --overwrite=true to delete it and start again (or choose another --run_name)"
            )
        for value, flag in ((cfg.model_name, "--model_name"), (cfg.preprocessed_data_path, "--preprocessed_data_path")):
            if value is not None and any(_is_within(value, p) for p in outputs):
                raise ConfigError(f"--overwrite=true would delete {flag}={value}; copy it out of {run_dir} first")
        for path in outputs:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        message = f"--overwrite=true: deleted the previous run in {run_dir} ({names})"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to --out_path={cfg.out_path} ({exc.strerror or exc}): choose a writable folder"
        ) from None
    ckpt.remove_stale_temporaries(run_dir)
    return message


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
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot load the tokenizer of --model_name={cfg.model_name}: {first_line}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_data(cfg: TrainConfig, env: dist_utils.DistEnv, tokenizer):
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
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot read the config.json of --model_name={model_name}: {first_line[:300]}") from None
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


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
class Trainer:
    """Builds everything a run needs from a validated TrainConfig (`__init__`), then `train()`s.

    Every rank builds one; the main rank alone writes files (run.json, metrics, checkpoints)."""

    def __init__(self, cfg: TrainConfig, env: dist_utils.DistEnv):
        self.cfg, self.env = cfg, env
        seed_everything(cfg.seed)
        check_model_name(cfg.model_name)
        # The main rank inspects (and for --overwrite clears) the run folder; every rank gets its
        # verdict, so all of them stop with the same error.
        verdict = None
        if env.is_main:
            try:
                verdict = ("ok", prepare_run_dir(cfg))
            except ConfigError as exc:
                verdict = ("error", str(exc))
        kind, text = dist_utils.broadcast_object(verdict)
        if kind == "error":
            raise ConfigError(text)
        if text:
            self.print(text)
        if cfg.resume_path not in (None, "auto"):
            ckpt.check_training_state_dir(cfg.resume_path)  # a wrong path fails before any work

        # Data first: bad data fails in seconds, before the model is loaded.
        self.tokenizer = load_tokenizer(cfg)
        self.stream, self.max_length, micro_steps_per_epoch = build_data(cfg, env, self.tokenizer)

        self.model = load_model(cfg, env.device)
        self.vocab_rows = check_vocab(self.model, self.tokenizer, cfg.model_name)
        self.recurrent = not cfg.non_recurrent_model
        self.max_steps = compute_max_steps(cfg, env, self.max_length, micro_steps_per_epoch)
        self.schedule = build_schedule(cfg, self.model.config, self.max_steps) if self.recurrent else None
        self.teacher = self._prepare_modes()
        # Model FLOPs per micro-batch are counted as param_counter.py counts them (non-embedding
        # parameters and LoRA deltas, recurrent iterations at the drawn (n, k)); mfu divides by the
        # devices' peak. (FSDP shards report their global sizes.)
        self.param_counts = count_parameters(self.model)
        self.peak_tflops = cfg.peak_tflops
        if self.peak_tflops is None and env.device.type == "cuda":
            self.peak_tflops = peak_tflops_of(torch.cuda.get_device_name(env.device))

        self.optimizer = build_optimizer(
            self.model,
            lr=cfg.optim_config.lr,
            weight_decay=cfg.optim_config.weight_decay,
            betas=cfg.optim_config.betas,
            eps=cfg.optim_config.eps,
            kind=cfg.optimizer_kind,
            muon_lr=cfg.muon.lr,
            muon_weight_decay=cfg.muon.weight_decay,
            ellis_options={k: v for k, v in dataclasses.asdict(cfg.use_ellis_adam).items() if k != "use_ellis_adam"},
        )
        self.num_warmup_steps = math.ceil(cfg.scheduler_args.warmup * self.max_steps)
        self.num_decay_steps = math.ceil(cfg.scheduler_args.cooldown * self.max_steps)

        # Counters (all part of the checkpoint)
        self.optimizer_step = 0
        self.data_step = 0
        self.lr_step_offset = 0  # --ignore_past_scheduler restarts the LR schedule at the resumed step
        self.total_tokens = 0
        self.total_tokens_with_loss = 0
        self.elapsed_time = 0.0

        self.resumed_from = self._maybe_resume()

        # Wrap for DDP after loading weights. Every parameter gets a gradient on every backward:
        # truncated backprop runs n iterations under no_grad and then k >= 1 with grad, and all
        # parameters (prelude, adapter, recurrent block, coda, head) sit on that k-iteration path.
        # So find_unused_parameters=False is correct, and it avoids a full graph traversal per
        # backward. Every rank draws the same (n, k), so ranks run the same graph.
        self.ddp_model = self.model
        if env.is_distributed and not self.sharded:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=device_ids, find_unused_parameters=False, gradient_as_bucket_view=True
            )
        self.forward_model = self.ddp_model
        if cfg.compile and self.recurrent:
            # Compile each layer, not the whole model: the unrolled recurrence would be traced
            # (and recompiled) anew for every (n, k) the depth sampler draws.
            from retrofit.model.modeling_raven import Block

            for module in self.model.modules():
                if isinstance(module, Block):
                    module.compile()
        elif cfg.compile:
            self.forward_model = torch.compile(self.ddp_model)
        self.autocast = (
            torch.autocast(device_type="cuda", dtype=torch.bfloat16)
            if env.device.type == "cuda" and not cfg.no_amp
            else nullcontext()
        )

        self.watcher = PreemptionWatcher(cfg.save_n_mins_before_timeout)
        self.metrics = MetricsLogger(
            cfg.run_dir / "metrics.jsonl",
            enabled=env.is_main,
            wandb_kwargs=None
            if cfg.wandb_disabled
            else dict(project=Path(cfg.out_path).name, name=cfg.run_name, dir=cfg.out_path, config=dataclasses.asdict(cfg)),
        )
        # A fresh start empties metrics.jsonl (records of a run killed before its first checkpoint);
        # a resume drops the records past the resumed step.
        try:
            dropped = self.metrics.truncate_after(self.optimizer_step)
        except ValueError as exc:  # a damaged line in the middle of metrics.jsonl
            raise ConfigError(str(exc)) from None
        if dropped:
            self.print(f"metrics.jsonl: dropped {dropped} record(s) after step {self.optimizer_step}")

        # Written after every check (a refused start or resume leaves the previous run.json alone).
        self.run_record = build_run_record(
            settings=dataclasses.asdict(cfg),
            schedule=self.schedule,
            model_type=self.model.config.model_type,
            max_steps=self.max_steps,
            max_length=self.max_length,
            world_size=env.world_size,
            micro_batches_per_step=cfg.accumulation_steps,
            batch_size=cfg.batch_size,
            lr_schedule=dict(warmup_steps=self.num_warmup_steps, decay_steps=self.num_decay_steps,
                             min_lr_ratio=cfg.scheduler_args.min_lr_ratio, lr_step_offset=self.lr_step_offset),
        )
        if env.is_main:
            write_run_record(cfg.run_dir, self.run_record)

    def _prepare_modes(self):
        """LoRA, frozen base, activation checkpointing, the teacher, FSDP sharding (before the
        optimizer is built: it holds the shards, and before resuming). Returns the teacher or None."""
        cfg, env = self.cfg, self.env
        try:
            notes = train_modes.prepare_model(self.model, cfg)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        teacher = None
        if cfg.distill.teacher is not None:
            teacher = load_teacher(cfg.distill.teacher, env.device, next(self.model.parameters()).dtype)
            try:
                check_vocabularies(teacher, self.model, cfg.distill.teacher)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            notes.append(f"distilling from {cfg.distill.teacher} (alpha {cfg.distill.alpha}, T {cfg.distill.temperature})")
        self.sharded = cfg.fsdp
        if cfg.fsdp:
            bf16 = train_modes.uses_bf16(cfg, env.device)
            fsdp.shard_model(self.model, bf16=bf16)
            if teacher is not None:
                fsdp.shard_model(teacher, bf16=bf16)
            notes.append(f"FSDP2: sharded over {env.world_size} rank(s)" + (", bf16 compute / fp32 reduce" if bf16 else ""))
        for note in notes:
            self.print(note)
        return teacher

    def describe(self) -> str:
        cfg, env = self.cfg, self.env
        return (
            f"run {cfg.run_name}: {env.world_size} process(es) on {env.device}, {self.max_steps} optimizer steps,"
            f" global batch {cfg.batch_size * env.world_size} x {self.max_length} tokens"
        )

    # ---- checkpoints -----------------------------------------------------------------------
    def _maybe_resume(self) -> Path | None:
        """Load the checkpoint named by --resume_path; for "auto", the newest one of the run that
        verifies and loads, saying which newer ones were skipped and why."""
        cfg = self.cfg
        if cfg.resume_path is None:
            return None
        if cfg.resume_path != "auto":
            path = Path(cfg.resume_path)
            self._load_checkpoint(path, ckpt.load_training_state(path))
            return path
        candidates = ckpt.list_checkpoints(cfg.run_dir)
        if not candidates:
            if (cfg.run_dir / "final_checkpoint").exists():
                raise ConfigError(
                    f"{cfg.run_dir} holds a finished run (final_checkpoint) without a full checkpoint to resume"
                    " from; pass --overwrite=true (without --resume_path) to train it again, or choose another --run_name"
                )
            self.print(f"--resume_path=auto: no checkpoint in {cfg.run_dir} yet, starting from scratch")
            return None
        skipped = []
        for path in candidates:
            try:
                state = ckpt.load_training_state(path)
                self._load_checkpoint(path, state)
            except ckpt.CheckpointError as exc:
                skipped.append(f"{path.name} ({exc.reason})")
                self.print(f"--resume_path=auto: skipping {path.name}: {exc.reason}")
                continue
            return path
        raise ConfigError(
            f"--resume_path=auto: no checkpoint in {cfg.run_dir} verifies and loads: {'; '.join(skipped)}; pass a"
            " checkpoint you trust as --resume_path, or --overwrite=true (without --resume_path) to start again"
        )

    def _changed_settings(self, state: dict) -> list[str]:
        """Settings that define the run and differ from the checkpoint's, as 'name old -> new'."""
        cfg, old = self.cfg, state.get("config") or {}
        checks = []
        if not cfg.ignore_past_parquet_dataset:  # restarting the data allows a new batch layout and seed
            checks += [(name, old.get(name), getattr(cfg, name)) for name in ("batch_size", "micro_batch_size", "seed")]
        if not cfg.ignore_past_scheduler:  # restarting the schedules allows a new length and curriculum
            checks.append(("max_steps", state.get("max_steps"), self.max_steps))
            old_curriculum = _flatten(state.get("curriculum") or {})
            new_curriculum = _flatten(self.schedule.as_dict() if self.schedule else {})
            for key in sorted(set(old_curriculum) & set(new_curriculum) - {"max_steps"}):
                checks.append((f"--{key}", old_curriculum[key], new_curriculum[key]))
        return [f"{name} {a} -> {b}" for name, a, b in checks if a is not None and a != b]

    def _load_checkpoint(self, path: Path, state: dict) -> None:
        """Put a loaded training state into the model, optimizer, counters, data and RNGs.

        CheckpointError: this checkpoint cannot be used (auto-resume tries the next one);
        ConfigError / DataError: it does not fit this run's flags or data (no fallback helps)."""
        cfg = self.cfg
        changed = self._changed_settings(state)
        if changed:
            raise ConfigError(
                f"{path} was written with other settings: {', '.join(changed)}; resume with the original flags"
                " (--ignore_past_scheduler=true allows a new max_steps/curriculum, --ignore_past_parquet_dataset=true"
                " a new batch_size/micro_batch_size/seed) or start a new run"
            )
        if bool(state.get("sharded")) != self.sharded:
            written = "with --fsdp=true (sharded)" if state.get("sharded") else "without --fsdp"
            raise ConfigError(f"{path} was written {written}; resume it with the same --fsdp setting")
        if not self.sharded:
            bad = ckpt.non_finite_entries({"model": state["model"], "optimizer": state["optimizer"]})
            if bad:
                raise ckpt.CheckpointError(path, f"holds non-finite values ({', '.join(bad)})")
        try:
            if self.sharded:  # collective: every rank reads its shards
                fsdp.load_sharded_tensors(path, self.model, self.optimizer)
            else:
                self.model.load_state_dict(state["model"], strict=True)
                self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ckpt.CheckpointError(path, f"does not fit this model/optimizer: {first_line[:300]}") from None
        if self.sharded:
            bad = self._non_finite({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})
            if bad:
                raise ckpt.CheckpointError(path, f"holds non-finite values ({', '.join(bad)})")
        self.optimizer_step = state["optimizer_step"]
        self.data_step = state["data_step"]
        self.total_tokens = state["total_tokens"]
        self.total_tokens_with_loss = state["total_tokens_with_loss"]
        self.elapsed_time = state["elapsed_time"]
        self.lr_step_offset = self.optimizer_step if cfg.ignore_past_scheduler else state.get("lr_step_offset", 0)
        if not cfg.ignore_past_parquet_dataset:
            data_states = state["data"]
            if len(data_states) != self.env.world_size:
                raise DataError(
                    f"{path} was written by {len(data_states)} rank(s), this run has {self.env.world_size}; pass"
                    " --ignore_past_parquet_dataset=true to start the data from the beginning"
                )
            self.stream.load_state_dict(data_states[self.env.rank])
        rng_states = state["rng"]
        ckpt.restore_rng_state(rng_states[self.env.rank % len(rng_states)])
        self.print(f"resumed from {path} at optimizer step {self.optimizer_step} (data step {self.data_step})")

    def _non_finite(self, tree) -> list[str]:
        """Names of non-finite entries, the same list on every rank (FSDP: each rank checks its shards)."""
        if not self.sharded:
            return ckpt.non_finite_entries(tree)
        found = dist_utils.all_gather_object(fsdp.local_non_finite(tree))
        return sorted({name for names in found for name in names})[:3]

    def _refuse_non_finite(self, what: str, include_optimizer: bool) -> None:
        """Every rank holds the same weights and optimizer state (or, with FSDP, learns every
        rank's findings), so every rank raises alike."""
        tree = {"model": self.model.state_dict()}
        if include_optimizer:
            tree["optimizer"] = self.optimizer.state_dict()
        bad = self._non_finite(tree)
        if bad:
            raise TrainingError(
                f"not saving {what} at optimizer step {self.optimizer_step}: non-finite values in {', '.join(bad)};"
                " resume from the last checkpoint with a lower learning rate"
            )

    def save_full_checkpoint(self) -> Path:
        """Collective: every rank contributes its data position and RNG state; rank 0 writes."""
        out_dir = self.cfg.run_dir / f"checkpoint_{self.optimizer_step}"
        self._refuse_non_finite(out_dir.name, include_optimizer=True)
        data_states = dist_utils.all_gather_object(self.stream.state_dict())
        rng_states = dist_utils.all_gather_object(ckpt.capture_rng_state())
        if self.env.is_main or self.sharded:
            state = dict(
                optimizer_step=self.optimizer_step,
                data_step=self.data_step,
                lr_step_offset=self.lr_step_offset,
                total_tokens=self.total_tokens,
                total_tokens_with_loss=self.total_tokens_with_loss,
                elapsed_time=self.elapsed_time,
                max_steps=self.max_steps,
                curriculum=self.schedule.as_dict() if self.schedule else None,
                data=data_states,
                rng=rng_states,
                world_size=self.env.world_size,
                config=dataclasses.asdict(self.cfg),
            )
            if self.sharded:  # collective: every rank writes its shards
                fsdp.save_sharded_training_state(out_dir, self.model, self.optimizer, state, self._record_writer("full"))
            else:
                state.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
                ckpt.save_training_state(out_dir, state, add_files=self._record_writer("full"))
            self.print(f"saved full checkpoint {out_dir}")
        dist_utils.barrier()
        return out_dir

    def save_model_only(self, name: str) -> None:
        self._refuse_non_finite(name, include_optimizer=False)
        # FSDP: gathered to rank 0 (collective); --lora.merge_on_save: shared deltas folded in
        model = train_modes.exportable_model(self.model, self.cfg, self.sharded, self.env.is_main)
        if self.env.is_main:
            kind = "final" if name == "final_checkpoint" else "model_only"
            ckpt.save_model_only(model, self.tokenizer, self.cfg.run_dir / name, add_files=self._record_writer(kind))
            self.print(f"saved {self.cfg.run_dir / name}")
        dist_utils.barrier()

    def _record_writer(self, kind: str):
        """Writes the checkpoint's copy of run.json into the folder being saved (before it is renamed into place)."""
        return lambda folder: write_run_record(folder, self.run_record, checkpoint={"kind": kind, "step": self.optimizer_step})

    def print(self, *args):
        if self.env.is_main:
            print(*args, flush=True)

    # ---- one optimizer step ----------------------------------------------------------------
    def depth_for(self, data_step: int, mean_rec: int | None, backprop: int | None) -> tuple[int, int] | None:
        if not self.recurrent:
            return None
        if self.cfg.fix_num_steps:
            return (0, 1)
        # The original numbers parquet micro-batches from 2 (its loop enumerates from
        # data_start_step + 1 with data_start_step = 1), other data from 1; seeding the same way
        # gives the same (n, k) sequence as the original for the same flags.
        return sample_num_steps(mean_rec, backprop, data_step + self.cfg.depth_seed_offset)

    def forward_backward(self, batch, num_steps, sync: bool):
        input_ids, _, labels = inputs_and_labels(**batch)
        input_ids = input_ids.to(self.env.device, non_blocking=True)
        labels = labels.to(self.env.device, non_blocking=True)
        # No attention_mask: rows are right-padded at most, so with causal attention real tokens
        # never see padding, and padded targets carry label -100.
        # FSDP reduce-scatters every micro-batch's gradient into the sharded one (no unsharded
        # gradients kept for accumulation); DDP syncs on the last micro-batch only.
        skip_sync = not sync and self.env.is_distributed and not self.sharded
        kl = None
        with self.ddp_model.no_sync() if skip_sync else nullcontext():
            with self.autocast:
                if self.recurrent:
                    out = self.forward_model(input_ids, labels=labels, num_steps=num_steps)
                else:
                    # HF models shift labels internally; ours are already aligned with input_ids,
                    # so hand them over as `shift_labels` (no second shift) and the loss is the
                    # same mean next-token cross-entropy as the recurrent model's.
                    out = self.forward_model(input_ids=input_ids, labels=labels, shift_labels=labels)
                loss = objective = out.loss
                if self.teacher is not None:  # the parent on the same micro-batch, no grad
                    distill = self.cfg.distill
                    kl = distillation_kl(out.logits, teacher_logits(self.teacher, input_ids), labels, distill.temperature)
                    objective = loss + distill.alpha * kl
            (objective / self.cfg.accumulation_steps).backward()
        self.micro_kl = kl.detach().float() if kl is not None else None
        return loss.detach().float(), int(input_ids.numel()), int((labels != -100).sum())

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> str:
        """Optimizer steps until max_steps, the end of the data or a stop request; returns what happened."""
        self.model.train()
        while self.optimizer_step < self.max_steps:
            record = self.train_step()
            if record is None:
                return self.finish(stop_reason="end of data")
            self.log_step(record)
            step = record["step"]
            self.save_on_cadence(step)
            reason = self.stop_requested()
            if reason is not None:
                if not self.full_checkpoint_due(step):
                    self.save_full_checkpoint()
                return f"stopped at step {step}: {reason}; resume with --resume_path=auto"
        return self.finish()

    def finish(self, stop_reason: str | None = None) -> str:
        self.model.eval()
        self.save_model_only("final_checkpoint")
        done = f"finished at step {self.optimizer_step}"
        return done + (f" ({stop_reason} before max_steps={self.max_steps})" if stop_reason else "")

    def train_step(self) -> dict | None:
        """One optimizer step: its micro-batches' forward/backward, clipping, the update. Returns the
        step's metrics record, or None when some rank's data ended (nothing is updated then)."""
        step = self.optimizer_step + 1
        step_start = time.monotonic()
        batches = self.gather_micro_batches()
        if batches is None:
            return None
        mean_rec, backprop = self.schedule.applied_at(step) if self.recurrent else (None, None)
        depths = [self.depth_for(self.data_step + i + 1, mean_rec, backprop) for i in range(len(batches))]
        self.set_step_lr(depths)
        mean_loss, tokens, tokens_with_loss, flops, mean_kl = self.accumulate_gradients(batches, depths)
        grad_norm = self.clip_gradients()
        if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
            self.stop_on_non_finite(step, mean_loss, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_step = step

        step_time = time.monotonic() - step_start
        self.elapsed_time += step_time
        self.total_tokens += int(tokens)
        self.total_tokens_with_loss += int(tokens_with_loss)
        last_depth = depths[-1] or (None, None)
        return dict(
            step=step,
            data_step=self.data_step,
            loss=mean_loss,
            log_ppl=math.exp(mean_loss) if mean_loss < 700 else float("inf"),
            grad_norm=grad_norm,
            lr=self.optimizer.param_groups[-1]["lr"],
            mean_recurrence=mean_rec,
            mean_backprop_depth=backprop,
            num_steps_no_grad=last_depth[0],
            num_steps_with_grad=last_depth[1],
            tokens_per_second=tokens / step_time,
            mfu=model_flops_utilization(flops, step_time, self.peak_tflops, self.env.world_size),
            total_tokens=self.total_tokens,
            total_tokens_with_loss=self.total_tokens_with_loss,
            lr_recurrent=next((g["lr"] for g in self.optimizer.param_groups if g.get("recurrent")), None),
            # --distill: `loss` stays the cross-entropy; the objective adds distill.alpha * distill_kl
            **({"distill_kl": mean_kl} if self.teacher is not None else {}),
        )

    def gather_micro_batches(self) -> list | None:
        """The step's batch_size / micro_batch_size micro-batches, or None if any rank ran out of data."""
        accumulation = self.cfg.accumulation_steps
        batches = []
        for _ in range(accumulation):
            batch = self.stream.next_batch()
            if batch is None:
                break
            batches.append(batch)
        if dist_utils.any_rank(len(batches) < accumulation, self.env.device):
            return None
        max_token = max(int(b["input_ids"].max()) for b in batches)
        if max_token >= self.vocab_rows:
            raise DataError(f"token id {max_token} in the data is >= the model's vocabulary size {self.vocab_rows}")
        return batches

    def set_step_lr(self, depths: list) -> None:
        """Warmup-stable-decay factor for this step; --throttle divides the recurrent groups' lr by the mean k."""
        cfg = self.cfg
        lr_factor = wsd_lr_factor(
            self.optimizer_step - self.lr_step_offset,
            self.num_warmup_steps,
            self.num_decay_steps,
            self.max_steps - self.lr_step_offset,
            cfg.scheduler_args.min_lr_ratio,
        )
        divisor = 1.0
        if cfg.throttle:
            # The same k on every rank (seeded by data_step), so every rank sets the same lr.
            divisor = max(1, int(sum(k for _, k in depths) / len(depths)))
        set_learning_rates(self.optimizer, lr_factor, recurrent_divisor=divisor)

    def accumulate_gradients(self, batches: list, depths: list) -> tuple[float, int, int, float, float]:
        """Forward/backward of every micro-batch (gradients synchronised on the last); returns the
        step's mean loss over all ranks and micro-batches, its token counts and model FLOPs over all
        ranks, and the mean distillation KL (0 without a teacher)."""
        local_loss = torch.zeros((), device=self.env.device)  # summed on device: one sync per step
        local_kl = torch.zeros((), device=self.env.device)
        tokens, tokens_with_loss, flops = 0, 0, 0
        last = len(batches) - 1
        for i, batch in enumerate(batches):
            self.data_step += 1
            loss, n_tokens, n_with_loss = self.forward_backward(batch, depths[i], sync=(i == last))
            local_loss += loss
            if self.micro_kl is not None:
                local_kl += self.micro_kl
            tokens, tokens_with_loss = tokens + n_tokens, tokens_with_loss + n_with_loss
            flops += micro_batch_flops(self.param_counts, depths[i], n_tokens)
        loss_sum, count, tokens, tokens_with_loss, flops, kl_sum = dist_utils.all_reduce_sum(
            [local_loss.item(), len(batches), tokens, tokens_with_loss, float(flops), local_kl.item()], self.env.device
        )
        # The step's loss is the mean of the micro-batch losses (what the gradient averages) and
        # log_ppl its exp; with packed rows (equal label counts) neither depends on how the
        # global batch is split over ranks and micro-batches.
        return loss_sum / count, tokens, tokens_with_loss, flops, kl_sum / count

    def clip_gradients(self) -> float:
        max_grad_norm = self.cfg.max_grad_norm
        max_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor

    def stop_on_non_finite(self, step: int, mean_loss: float, grad_norm: float) -> None:
        """Drop the step's gradients, keep the weights before it in a full checkpoint, raise TrainingError."""
        self.optimizer.zero_grad(set_to_none=True)
        first_data_step = self.data_step - self.cfg.accumulation_steps + 1
        problem = (
            f"non-finite {'loss' if not math.isfinite(mean_loss) else 'grad norm'} at optimizer step {step}"
            f" (data steps {first_data_step}..{self.data_step}): loss={mean_loss}, grad_norm={grad_norm}"
        )
        try:
            path = self.save_full_checkpoint()
        except TrainingError as exc:  # the weights themselves are already non-finite
            raise TrainingError(f"{problem}; {exc}") from None
        raise TrainingError(f"{problem}; the weights before this step are in {path}")

    def log_step(self, record: dict) -> None:
        self.metrics.log(record)
        self.print(format_step_line(record, self.max_steps))

    # ---- checkpoint cadence and stopping -------------------------------------------------------
    def full_checkpoint_due(self, step: int) -> bool:
        """A resumable checkpoint every 2 x save_interval steps (the original's cadence)."""
        return self.cfg.save_interval > 0 and step % (2 * self.cfg.save_interval) == 0

    def save_on_cadence(self, step: int) -> None:
        """Weights every save_interval steps, a full checkpoint every other time."""
        if self.cfg.save_interval > 0 and step % self.cfg.save_interval == 0:
            self.save_model_only(f"model_only_chkpt_{step}")
        if self.full_checkpoint_due(step):
            self.save_full_checkpoint()

    def stop_requested(self) -> str | None:
        """Why to stop now (a signal or the job's time limit, on any rank), or None."""
        reason = self.watcher.reason()
        if dist_utils.any_rank(reason is not None, self.env.device):
            return reason or "another rank is stopping"
        return None


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the curriculum's settings one by one, for 'changed settings' messages."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# ------------------------------------------------------------------------------------------------
# One run, as train.py starts it
# ------------------------------------------------------------------------------------------------
USER_ERRORS = (ConfigError, DataError, ckpt.CheckpointError, dist_utils.LaunchError)


def run(cfg: TrainConfig) -> int:
    """Validate, build the Trainer, train. A setting the user can fix: one `error:` line, exit status 2;
    a run that cannot go on (TrainingError): one `error:` line, exit status 1."""
    try:
        cfg.validate()
        env = dist_utils.setup(cfg.device, single_process_group=cfg.fsdp)  # FSDP needs a group, even of one
        trainer = Trainer(cfg, env)
        trainer.print(trainer.describe())
        try:
            message = trainer.train()
        finally:
            trainer.metrics.close()
            trainer.watcher.close()
        trainer.print(message)
        return 0
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        dist_utils.cleanup()
