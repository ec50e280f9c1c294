"""Train a retrofitted recurrent model (or a plain HF baseline) with a curriculum of recurrences.

    python train.py --model_name=DIR --preprocessed_data_path=PARQUET_DIR --is_parquet_dataset=true \
        --max_length=1024 --micro_batch_size=8 --batch_size=32 --max_steps=25000 --save_interval=1000 \
        --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.25 --muon.use_muon=true

Flag names and defaults are the original train.py's, so the paper's shell commands run unchanged;
`--config run.yaml` reads the same flags from YAML, `--device` picks cpu/cuda (auto by default).
Launch one process per GPU with `torchrun --nproc_per_node N train.py ...` or `srun python train.py ...`.

Per optimizer step u (counting from 1): the curriculum gives (mean recurrence, backprop depth) =
RecurrenceSchedule.at(u); every micro-batch draws its own (n, k) from the depth sampler seeded by
its index `data_step` (counting from 1, the same on every rank); gradients are accumulated over
batch_size / micro_batch_size micro-batches, averaged over ranks by DDP, clipped, and applied
with the warmup-stable-decay learning rate. See README "Training" for outputs and resuming.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from retrofit import checkpoint as ckpt
from retrofit import distributed as dist_utils
from retrofit.data import (
    DataError,
    PackedDatasetStream,
    ParquetStream,
    build_sft_dataset,
    check_packed_dataset,
    inputs_and_labels,
    inspect_parquet_files,
    list_parquet_files,
    load_raw_dataset,
)
from retrofit.depth import WARMUP_TYPES, RecurrenceSchedule, sample_num_steps
from retrofit.flops import count_parameters, micro_batch_flops, model_flops_utilization, peak_tflops_of
from retrofit.optim import build_optimizer, set_learning_rates, wsd_lr_factor
from retrofit.training import MetricsLogger, PreemptionWatcher, format_step_line, seed_everything


# ------------------------------------------------------------------------------------------------
# Flags (names and defaults of the original train.py)
# ------------------------------------------------------------------------------------------------
@dataclass
class DatasetArgs:
    q_col: str = "question"
    a_col: str = "answer"


@dataclass
class OptimConfig:
    lr: float = 5e-7
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8


@dataclass
class SchedulerArgs:
    warmup: float = 0.1  # fraction of max_steps
    cooldown: float = 0.1  # fraction of max_steps
    min_lr_ratio: float = 0.001


@dataclass
class MeanRecurrenceSchedule:
    turn_on: bool = False
    warmup: float = 0.1  # fraction of max_steps
    max_mean_rec: int = 32
    warmup_type: str = "linear"  # or "1-sqrt"


@dataclass
class MeanBackpropDepthSchedule:
    turn_on: bool = False
    warmup: float = 0.1
    max_backprop: int = 8
    start: int = 1
    warmup_type: str = "linear"


@dataclass
class MuonArgs:
    use_muon: bool = False
    lr: float = 0.005
    weight_decay: float = 1e-4


@dataclass
class EllisAdamArgs:
    use_ellis_adam: bool = False
    decouple_wd: bool = True
    tensor_wise_gradient_normalization: bool = False
    tensor_wise_finite_check: bool = False
    running_init: bool = True
    atan_adam: bool = True
    update_clipping: bool = True
    eps: float = 1e-6


@dataclass
class TrainConfig:
    run_name: str = "default-run"
    out_path: str = "huginn_llama"
    resume_path: str | None = None  # a checkpoint_{step} dir, or "auto" for the run's newest
    save_n_mins_before_timeout: float | None = None
    # data
    preprocessed_data_path: str | None = None
    dataset_location: str = "openai/gsm8k"
    dataset_args: DatasetArgs = field(default_factory=DatasetArgs)
    dataset_config: str | None = "main"
    max_length: int | None = None
    max_samples: int | None = None
    # implementation
    micro_batch_size: int = 2
    compile: bool = False
    device: str = "auto"
    # Peak TFLOP/s of one device for the `mfu` metric; default: looked up from the GPU's name
    # (retrofit.flops.PEAK_BF16_TFLOPS); on a CPU or an unknown GPU `mfu` is logged as null.
    peak_tflops: float | None = None
    # training
    max_steps: int = 0
    epochs: int = 1
    batch_size: int = 32
    optim_config: OptimConfig = field(default_factory=OptimConfig)
    scheduler_args: SchedulerArgs = field(default_factory=SchedulerArgs)
    save_interval: int = -1
    model_name: str = "smcleish/Recurrent-TinyLlama-3T-untrained"
    wandb_disabled: bool = False
    seed: int = 74
    fix_num_steps: bool = False
    init_from_scratch: bool = False
    take_loss_over_all_tokens: bool = False
    max_grad_norm: float = 1.0
    bf16_true: bool = False
    no_amp: bool = True
    is_parquet_dataset: bool = False
    ignore_past_parquet_dataset: bool = False
    parquet_dataset_max_tokens: int | None = None
    ignore_past_scheduler: bool = False
    mean_recurrence_schedule: MeanRecurrenceSchedule = field(default_factory=MeanRecurrenceSchedule)
    mean_backprop_depth_schedule: MeanBackpropDepthSchedule = field(default_factory=MeanBackpropDepthSchedule)
    throttle: bool = False
    non_recurrent_model: bool = False
    muon: MuonArgs = field(default_factory=MuonArgs)
    use_ellis_adam: EllisAdamArgs = field(default_factory=EllisAdamArgs)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_path) / self.run_name

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size

    def validate(self) -> None:
        """Problems a user can fix in the command line, found before any work."""
        if self.micro_batch_size < 1 or self.batch_size < 1:
            raise ConfigError(f"batch_size ({self.batch_size}) and micro_batch_size ({self.micro_batch_size}) must be >= 1")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}"
            )
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {self.max_length}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"peak_tflops must be > 0 (TFLOP/s of one device), got {self.peak_tflops}")
        if self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0 (0 = derive it from the data), got {self.max_steps}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.save_interval == 0 or self.save_interval < -1:
            raise ConfigError(f"save_interval must be a positive number of steps or -1 (never), got {self.save_interval}")
        if self.muon.use_muon and self.use_ellis_adam.use_ellis_adam:
            raise ConfigError("--muon.use_muon and --use_ellis_adam.use_ellis_adam are exclusive")
        for name, schedule in (
            ("mean_recurrence_schedule", self.mean_recurrence_schedule),
            ("mean_backprop_depth_schedule", self.mean_backprop_depth_schedule),
        ):
            if schedule.warmup_type not in WARMUP_TYPES:
                raise ConfigError(f"{name}.warmup_type={schedule.warmup_type!r}; expected one of {WARMUP_TYPES}")
            if not 0 <= schedule.warmup <= 1:
                raise ConfigError(f"{name}.warmup={schedule.warmup} must be a fraction of max_steps in [0, 1]")
        sched = self.scheduler_args
        if sched.warmup < 0 or sched.cooldown < 0 or sched.warmup + sched.cooldown > 1:
            raise ConfigError(
                f"scheduler_args.warmup ({sched.warmup}) and cooldown ({sched.cooldown}) must be fractions summing to <= 1"
            )
        if self.is_parquet_dataset:
            if self.preprocessed_data_path is None:
                raise ConfigError("--is_parquet_dataset=true needs --preprocessed_data_path (the folder of parquet shards)")
            if self.max_samples is not None:
                raise ConfigError("--max_samples is not supported with parquet data (limit with --max_steps)")
            if not self.max_steps and self.parquet_dataset_max_tokens is None:
                raise ConfigError("parquet data needs --max_steps or --parquet_dataset_max_tokens to size the LR schedule")
        if self.non_recurrent_model:
            if self.throttle:
                raise ConfigError("--throttle needs a recurrent model (not --non_recurrent_model)")
            if self.mean_recurrence_schedule.turn_on or self.mean_backprop_depth_schedule.turn_on:
                raise ConfigError("recurrence curricula need a recurrent model (not --non_recurrent_model)")


class ConfigError(ValueError):
    pass


class TrainingError(RuntimeError):
    pass


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(description=__doc__.split("\n\n")[0], default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the flags below")
    parser.add_class_arguments(TrainConfig)
    namespace = parser.parse_args(argv)
    namespace.pop("config", None)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    fields = instantiate(namespace)  # the nested flag groups become their dataclasses
    return TrainConfig(**{f.name: fields[f.name] for f in dataclasses.fields(TrainConfig)})


# ------------------------------------------------------------------------------------------------
# Setup pieces
# ------------------------------------------------------------------------------------------------
def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name)
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

        if not Path(cfg.preprocessed_data_path).exists():
            raise DataError(f"preprocessed_data_path {cfg.preprocessed_data_path!r} does not exist")
        dataset = datasets.load_from_disk(cfg.preprocessed_data_path)
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


def load_model(cfg: TrainConfig, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.bf16_true else torch.float32
    model_config = AutoConfig.from_pretrained(cfg.model_name, trust_remote_code=True)
    is_raven = getattr(model_config, "model_type", None) == "huginn_raven"
    if cfg.non_recurrent_model:
        if is_raven:
            raise ConfigError(f"{cfg.model_name} is a recurrent model; drop --non_recurrent_model=true to train it")
        if cfg.init_from_scratch:
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.model_name, dtype=dtype)
    else:
        if not is_raven:
            raise ConfigError(
                f"{cfg.model_name} is a plain {getattr(model_config, 'model_type', '?')!r} model: convert it with"
                " convert_pretrained_model/convert_*.py first, or pass --non_recurrent_model=true for the baseline"
            )
        from retrofit.configuration_raven import RavenConfig
        from retrofit.modeling_raven import RavenForCausalLM

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
    rec, bp = cfg.mean_recurrence_schedule, cfg.mean_backprop_depth_schedule
    return RecurrenceSchedule(
        max_mean_rec=rec.max_mean_rec if rec.turn_on else int(model_config.mean_recurrence),
        max_backprop=bp.max_backprop if bp.turn_on else int(model_config.mean_backprop_depth),
        max_steps=max_steps,
        mean_rec_turn_on=rec.turn_on,
        mean_rec_warmup=rec.warmup,
        mean_rec_warmup_type=rec.warmup_type,
        backprop_turn_on=bp.turn_on,
        backprop_warmup=bp.warmup,
        backprop_start=bp.start,
        backprop_warmup_type=bp.warmup_type,
    )


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, env: dist_utils.DistEnv):
        self.cfg, self.env = cfg, env
        cfg.validate()
        seed_everything(cfg.seed)
        if env.is_main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(cfg.run_dir)

        # Data first: bad data fails in seconds, before the model is loaded.
        self.tokenizer = load_tokenizer(cfg)
        self.stream, self.max_length, micro_steps_per_epoch = build_data(cfg, env, self.tokenizer)

        self.model = load_model(cfg, env.device)
        self.vocab_rows = check_vocab(self.model, self.tokenizer, cfg.model_name)
        self.recurrent = not cfg.non_recurrent_model
        self.max_steps = compute_max_steps(cfg, env, self.max_length, micro_steps_per_epoch)
        self.schedule = build_schedule(cfg, self.model.config, self.max_steps) if self.recurrent else None
        # Model FLOPs per micro-batch are counted as param_counter.py counts them (non-embedding
        # parameters, recurrent iterations at the drawn (n, k)); mfu divides by the devices' peak.
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
            use_muon=cfg.muon.use_muon,
            muon_lr=cfg.muon.lr,
            muon_weight_decay=cfg.muon.weight_decay,
            use_ellis_adam=cfg.use_ellis_adam.use_ellis_adam,
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
        if env.is_distributed:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=device_ids, find_unused_parameters=False, gradient_as_bucket_view=True
            )
        self.forward_model = self.ddp_model
        if cfg.compile and self.recurrent:
            # Compile each layer, not the whole model: the unrolled recurrence would be traced
            # (and recompiled) anew for every (n, k) the depth sampler draws.
            from retrofit.modeling_raven import Block

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
        if self.resumed_from is not None:
            self.metrics.truncate_after(self.optimizer_step)

    # ---- checkpoints -----------------------------------------------------------------------
    def _maybe_resume(self) -> Path | None:
        cfg = self.cfg
        if cfg.resume_path is None:
            return None
        if cfg.resume_path == "auto":
            path = ckpt.find_latest_checkpoint(cfg.run_dir)
            if path is None:
                self.print(f"--resume_path=auto: no complete checkpoint in {cfg.run_dir}, starting from scratch")
                return None
        else:
            path = Path(cfg.resume_path)
        state = ckpt.load_training_state(path)
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
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
        return path

    def save_full_checkpoint(self) -> Path:
        """Collective: every rank contributes its data position and RNG state; rank 0 writes."""
        data_states = dist_utils.all_gather_object(self.stream.state_dict())
        rng_states = dist_utils.all_gather_object(ckpt.capture_rng_state())
        out_dir = self.cfg.run_dir / f"checkpoint_{self.optimizer_step}"
        if self.env.is_main:
            state = dict(
                model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                optimizer_step=self.optimizer_step,
                data_step=self.data_step,
                lr_step_offset=self.lr_step_offset,
                total_tokens=self.total_tokens,
                total_tokens_with_loss=self.total_tokens_with_loss,
                elapsed_time=self.elapsed_time,
                max_steps=self.max_steps,
                curriculum=dataclasses.asdict(self.schedule) if self.schedule else None,
                data=data_states,
                rng=rng_states,
                world_size=self.env.world_size,
                config=dataclasses.asdict(self.cfg),
            )
            ckpt.save_training_state(out_dir, state)
            self.print(f"saved full checkpoint {out_dir}")
        dist_utils.barrier()
        return out_dir

    def save_model_only(self, name: str) -> None:
        if self.env.is_main:
            ckpt.save_model_only(self.model, self.tokenizer, self.cfg.run_dir / name)
            self.print(f"saved {self.cfg.run_dir / name}")
        dist_utils.barrier()

    def print(self, *args):
        if self.env.is_main:
            print(*args, flush=True)

    # ---- one optimizer step ----------------------------------------------------------------
    def depth_for(self, data_step: int, mean_rec: int | None, backprop: int | None) -> tuple[int, int] | None:
        if not self.recurrent:
            return None
        if self.cfg.fix_num_steps:
            return (0, 1)
        return sample_num_steps(mean_rec, backprop, data_step)

    def forward_backward(self, batch, num_steps, sync: bool):
        input_ids, labels = inputs_and_labels(batch)
        input_ids = input_ids.to(self.env.device, non_blocking=True)
        labels = labels.to(self.env.device, non_blocking=True)
        # No attention_mask: rows are right-padded at most, so with causal attention real tokens
        # never see padding, and padded targets carry label -100.
        sync_context = nullcontext() if sync or not self.env.is_distributed else self.ddp_model.no_sync()
        with sync_context:
            with self.autocast:
                if self.recurrent:
                    loss = self.forward_model(input_ids, labels=labels, num_steps=num_steps).loss
                else:
                    # HF models shift labels internally; ours are already aligned with input_ids,
                    # so hand them over as `shift_labels` (no second shift) and the loss is the
                    # same mean next-token cross-entropy as the recurrent model's.
                    loss = self.forward_model(input_ids=input_ids, labels=labels, shift_labels=labels).loss
            (loss / self.cfg.accumulation_steps).backward()
        return loss.detach().float(), int(input_ids.numel()), int((labels != -100).sum())

    def train(self) -> str:
        cfg, env = self.cfg, self.env
        self.model.train()
        accumulation = cfg.accumulation_steps
        stop_reason = None
        while self.optimizer_step < self.max_steps:
            step = self.optimizer_step + 1
            step_start = time.monotonic()

            batches = []
            for _ in range(accumulation):
                batch = self.stream.next_batch()
                if batch is None:
                    break
                batches.append(batch)
            if dist_utils.any_rank(len(batches) < accumulation, env.device):
                stop_reason = "end of data"
                break
            max_token = max(int(b["input_ids"].max()) for b in batches)
            if max_token >= self.vocab_rows:
                raise DataError(f"token id {max_token} in the data is >= the model's vocabulary size {self.vocab_rows}")

            mean_rec, backprop = self.schedule.at(step) if self.recurrent else (None, None)
            depths = [self.depth_for(self.data_step + i + 1, mean_rec, backprop) for i in range(accumulation)]
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

            local_loss = torch.zeros((), device=env.device)  # summed on device: one sync per step
            tokens, tokens_with_loss, flops = 0, 0, 0
            for i, batch in enumerate(batches):
                self.data_step += 1
                loss, n_tokens, n_with_loss = self.forward_backward(batch, depths[i], sync=(i == accumulation - 1))
                local_loss += loss
                tokens, tokens_with_loss = tokens + n_tokens, tokens_with_loss + n_with_loss
                flops += micro_batch_flops(self.param_counts, depths[i], n_tokens)
            loss_sum, count, tokens, tokens_with_loss, flops = dist_utils.all_reduce_sum(
                [local_loss.item(), len(batches), tokens, tokens_with_loss, float(flops)], env.device
            )
            # The step's loss is the mean of the micro-batch losses (what the gradient averages) and
            # log_ppl its exp; with packed rows (equal label counts) neither depends on how the
            # global batch is split over ranks and micro-batches.
            mean_loss = loss_sum / count
            mean_log_ppl = math.exp(mean_loss) if mean_loss < 700 else float("inf")

            max_norm = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
            if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                path = self.save_full_checkpoint()
                raise TrainingError(
                    f"non-finite {'loss' if not math.isfinite(mean_loss) else 'grad norm'} at optimizer step {step}"
                    f" (data steps {self.data_step - accumulation + 1}..{self.data_step}): loss={mean_loss},"
                    f" grad_norm={grad_norm}; the weights before this step are in {path}"
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_step = step

            step_time = time.monotonic() - step_start
            self.elapsed_time += step_time
            self.total_tokens += int(tokens)
            self.total_tokens_with_loss += int(tokens_with_loss)
            last_depth = depths[-1] or (None, None)
            record = dict(
                step=step,
                data_step=self.data_step,
                loss=mean_loss,
                log_ppl=mean_log_ppl,
                grad_norm=grad_norm,
                lr=self.optimizer.param_groups[-1]["lr"],
                mean_recurrence=mean_rec,
                mean_backprop_depth=backprop,
                num_steps_no_grad=last_depth[0],
                num_steps_with_grad=last_depth[1],
                tokens_per_second=tokens / step_time,
                mfu=model_flops_utilization(flops, step_time, self.peak_tflops, env.world_size),
                total_tokens=self.total_tokens,
                total_tokens_with_loss=self.total_tokens_with_loss,
                lr_recurrent=next((g["lr"] for g in self.optimizer.param_groups if g.get("recurrent")), None),
            )
            self.metrics.log(record)
            self.print(format_step_line(record, self.max_steps))

            if cfg.save_interval > 0 and step % cfg.save_interval == 0:
                self.save_model_only(f"model_only_chkpt_{step}")
            if cfg.save_interval > 0 and step % (2 * cfg.save_interval) == 0:
                self.save_full_checkpoint()
            reason = self.watcher.reason()
            if dist_utils.any_rank(reason is not None, env.device):
                stop_reason = reason or "another rank is stopping"
                if not (cfg.save_interval > 0 and step % (2 * cfg.save_interval) == 0):
                    self.save_full_checkpoint()
                return f"stopped at step {step}: {stop_reason}; resume with --resume_path=auto"
        self.model.eval()
        self.save_model_only("final_checkpoint")
        done = f"finished at step {self.optimizer_step}"
        return done + (f" ({stop_reason} before max_steps={self.max_steps})" if stop_reason else "")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    env = None
    try:
        cfg.validate()
        env = dist_utils.setup(cfg.device)
        trainer = Trainer(cfg, env)
        trainer.print(
            f"run {cfg.run_name}: {env.world_size} process(es) on {env.device}, {trainer.max_steps} optimizer steps,"
            f" global batch {cfg.batch_size * env.world_size} x {trainer.max_length} tokens"
        )
        try:
            message = trainer.train()
        finally:
            trainer.metrics.close()
            trainer.watcher.close()
        trainer.print(message)
        return 0
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        dist_utils.cleanup()


if __name__ == "__main__":
    sys.exit(main())
