"""train.py's settings: the flags (names and defaults of the original train.py), checked and parsed.

`TrainConfig` is the whole set; its nested groups are the `--group.flag` flags (the training modes'
`--lora.*` and `--distill.*` included; what they do: retrofit/train/modes.py). The recurrence
curricula (`MeanRecurrenceSchedule`, `MeanBackpropDepthSchedule`) live in retrofit.train.depth, the one
definition that counting and plotting share. `parse_config` reads flags (and `--config run.yaml`)
with jsonargparse, after rewriting the original's three misleading names (flag_renames.py);
`TrainConfig.validate` finds what a user can fix in the command line, `check_model_name` whether
--model_name names a model folder or a Hub id.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from retrofit.errors import ConfigError
from retrofit.model.configuration_raven import LORA_TARGETS
from retrofit.train.depth import MAX_RECURRENCE, MeanBackpropDepthSchedule, MeanRecurrenceSchedule
from retrofit.train.flag_renames import BadRenamedFlag, rewrite_renamed_flags


def in_range(value: float, valid: str) -> bool:
    """Whether a finite `value` satisfies `valid`: ">= 0", "> 0", "in [a, b]" or "in [a, b)"."""
    if not math.isfinite(value):
        return False
    if valid.startswith(">= "):
        return value >= float(valid.split()[1])
    if valid.startswith("> "):
        return value > float(valid.split()[1])
    low, high = (float(x) for x in valid[4:-1].split(", "))
    return low <= value and (value <= high if valid.endswith("]") else value < high)


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
class MuonArgs:
    use_muon: bool = False
    lr: float = 0.005
    weight_decay: float = 1e-4


@dataclass
class EllisAdamArgs:
    enabled: bool = False  # AdamW* instead of AdamW (the original's --use_ellis_adam.use_ellis_adam)
    decouple_wd: bool = True
    tensor_wise_gradient_normalization: bool = False
    tensor_wise_finite_check: bool = False
    running_init: bool = True
    atan_adam: bool = True
    update_clipping: bool = True
    eps: float = 1e-6


# ---- training modes (retrofit/train/modes.py): LoRA per loop, distillation from the parent
@dataclass
class LoraArgs:
    rank: int = 0  # 0: no LoRA
    alpha: float | None = None  # scale alpha / rank; default: rank (scale 1)
    targets: list[str] = field(default_factory=lambda: ["core_block"])  # any of prelude, core_block, coda
    per_iteration: bool = False  # each recurrent iteration index gets its own delta
    num_iterations: int | None = None  # deltas with per_iteration (default: the largest mean recurrence trained)
    train_base: bool = True  # false: only the deltas train
    merge_on_save: bool = False  # saved weights carry shared deltas folded in


@dataclass
class DistillArgs:
    teacher: str | None = None  # the base model the recurrent model was converted from
    alpha: float = 0.5  # weight of the KL term
    temperature: float = 1.0


def mode_flag_problem(cfg) -> str | None:
    """What is wrong with the mode flags (--lora.*, --distill.*, --activation_checkpointing) of a
    TrainConfig, as one message (None: fine)."""
    lora, distill = cfg.lora, cfg.distill
    if lora.rank < 0:
        return f"--lora.rank={lora.rank} must be >= 0 (0 = no LoRA)"
    if lora.rank:
        if cfg.non_recurrent_model:
            return "--lora.rank adds deltas to a recurrent model's layers; drop it for --non_recurrent_model=true"
        bad = [t for t in lora.targets if t not in LORA_TARGETS]
        if bad or not lora.targets:
            return f"--lora.targets={lora.targets} must be a non-empty subset of {list(LORA_TARGETS)}"
        if lora.alpha is not None and lora.alpha <= 0:
            return f"--lora.alpha={lora.alpha} must be > 0"
        if lora.num_iterations is not None and not 1 <= lora.num_iterations <= MAX_RECURRENCE:
            return (
                f"--lora.num_iterations={lora.num_iterations} must be in [1, {MAX_RECURRENCE}] (one set of deltas per"
                " recurrent iteration; each set is as large as the targeted layers' LoRA deltas)"
            )
    else:
        set_without_rank = [name for name, on in (("--lora.train_base=false", not lora.train_base),
                                                   ("--lora.merge_on_save=true", lora.merge_on_save),
                                                   ("--lora.per_iteration=true", lora.per_iteration)) if on]
        if set_without_rank:
            return f"{set_without_rank[0]} needs LoRA deltas: pass --lora.rank R (R >= 1)"
    if cfg.activation_checkpointing and cfg.non_recurrent_model:
        return "--activation_checkpointing=true recomputes recurrent iterations; it needs a recurrent model"
    if distill.teacher is not None:
        if not (Path(distill.teacher) / "config.json").is_file():
            return f"--distill.teacher={distill.teacher} is not a model folder with config.json (pass the base model directory)"
        if distill.alpha < 0:
            return f"--distill.alpha={distill.alpha} must be >= 0"
        if not distill.temperature > 0:
            return f"--distill.temperature={distill.temperature} must be > 0"
    return None


@dataclass
class TrainConfig:
    run_name: str = "default-run"
    out_path: str = "huginn_llama"
    resume_path: str | None = None  # a checkpoint_{step} dir, or "auto" for the run's newest
    overwrite: bool = False  # train into a run folder that holds a previous run: delete that run first
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
    # (retrofit.train.flops.PEAK_BF16_TFLOPS); on a CPU or an unknown GPU `mfu` is logged as null.
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
    # every micro-batch runs the recurrent block once, with grad: (n, k) = (0, 1), no depth sampling
    single_iteration: bool = False  # the original's --fix_num_steps
    init_from_scratch: bool = False
    take_loss_over_all_tokens: bool = False
    max_grad_norm: float = 1.0
    bf16_true: bool = False
    bf16_autocast: bool = False  # bf16 autocast on GPU (the original's --no_amp, inverted)
    is_parquet_dataset: bool = False
    ignore_past_parquet_dataset: bool = False
    parquet_dataset_max_tokens: int | None = None
    ignore_past_scheduler: bool = False
    mean_recurrence_schedule: MeanRecurrenceSchedule = field(default_factory=MeanRecurrenceSchedule)
    mean_backprop_depth_schedule: MeanBackpropDepthSchedule = field(default_factory=MeanBackpropDepthSchedule)
    throttle: bool = False
    non_recurrent_model: bool = False
    muon: MuonArgs = field(default_factory=MuonArgs)
    ellis_adam: EllisAdamArgs = field(default_factory=EllisAdamArgs)
    # bigger bases and cheaper training (LoraArgs, DistillArgs above; the steps: retrofit/train/modes.py)
    fsdp: bool = False
    activation_checkpointing: bool = False
    lora: LoraArgs = field(default_factory=LoraArgs)
    distill: DistillArgs = field(default_factory=DistillArgs)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_path) / self.run_name

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size

    @property
    def optimizer_kind(self) -> str:
        """"adamw", "muon" or "ellis_adam" (validate() refuses both flags at once)."""
        if self.ellis_adam.enabled:
            return "ellis_adam"
        return "muon" if self.muon.use_muon else "adamw"

    @property
    def depth_seed_offset(self) -> int:
        """data_step + this seeds a micro-batch's depth draw: 1 with parquet data, as in the original
        (its parquet loop numbers micro-batches from 2, other data from 1)."""
        return 1 if self.is_parquet_dataset else 0

    def numeric_ranges(self) -> list[tuple[str, float, str]]:
        """(flag, value, the range it must lie in) for every numeric setting with a bound."""
        optim, muon, sched = self.optim_config, self.muon, self.scheduler_args
        ranges = [
            ("--optim_config.lr", optim.lr, ">= 0"),
            ("--optim_config.weight_decay", optim.weight_decay, ">= 0"),
            ("--optim_config.eps", optim.eps, "> 0"),
            ("--muon.lr", muon.lr, ">= 0"),
            ("--muon.weight_decay", muon.weight_decay, ">= 0"),
            ("--ellis_adam.eps", self.ellis_adam.eps, "> 0"),
            ("--scheduler_args.min_lr_ratio", sched.min_lr_ratio, "in [0, 1]"),
            ("--seed", self.seed, f"in [0, {2**32 - 1}]"),
        ]
        if self.save_n_mins_before_timeout is not None:
            ranges.append(("--save_n_mins_before_timeout", self.save_n_mins_before_timeout, ">= 0"))
        if self.parquet_dataset_max_tokens is not None:
            ranges.append(("--parquet_dataset_max_tokens", self.parquet_dataset_max_tokens, "> 0"))
        if self.max_samples is not None:
            ranges.append(("--max_samples", self.max_samples, "> 0"))
        ranges += [(f"--optim_config.betas[{i}]", beta, "in [0, 1)") for i, beta in enumerate(optim.betas)]
        return ranges

    def validate(self) -> None:
        """Problems a user can fix in the command line, found before any work."""
        for flag, value, valid in self.numeric_ranges():
            if not in_range(value, valid):
                raise ConfigError(f"{flag}={value} must be {valid}")
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
        if self.overwrite and self.resume_path is not None:
            raise ConfigError(
                f"--overwrite=true deletes the run that --resume_path={self.resume_path} would continue; pass only one"
            )
        for group in (self.mean_recurrence_schedule, self.mean_backprop_depth_schedule):
            try:
                group.check()
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.muon.use_muon and self.ellis_adam.enabled:
            raise ConfigError("--muon.use_muon and --ellis_adam.enabled are exclusive: choose one optimizer")
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
        mode_problem = mode_flag_problem(self)
        if mode_problem:
            raise ConfigError(mode_problem)
        if self.non_recurrent_model:
            if self.throttle:
                raise ConfigError("--throttle needs a recurrent model (not --non_recurrent_model)")
            if self.mean_recurrence_schedule.turn_on or self.mean_backprop_depth_schedule.turn_on:
                raise ConfigError("recurrence curricula need a recurrent model (not --non_recurrent_model)")


def check_model_name(name: str) -> None:
    """--model_name is a local folder with config.json, or something that can be a Hub repo id.

    Apart from `TrainConfig.validate` (which reads the flags alone) because it looks at the file
    system and the offline setting; train.py's main() calls both before it claims the run folder."""
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


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags (and `--config run.yaml`) -> TrainConfig; jsonargparse exits 2 with a usage line on a bad flag.

    The original's misleading flag names are rewritten to their new ones first (flag_renames.py),
    with one warning line each (printed by the first process only)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    try:
        argv, warnings = rewrite_renamed_flags(sys.argv[1:] if argv is None else list(argv))
    except BadRenamedFlag as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        for warning in warnings:
            print(warning, file=sys.stderr)

    parser = ArgumentParser(description="Train a retrofitted recurrent model (or a plain HF baseline) with a curriculum of recurrences.", default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the flags below")
    parser.add_class_arguments(TrainConfig)
    namespace = parser.parse_args(argv)
    namespace.pop("config", None)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    fields = instantiate(namespace)  # the nested flag groups become their dataclasses
    return TrainConfig(**{f.name: fields[f.name] for f in dataclasses.fields(TrainConfig)})
