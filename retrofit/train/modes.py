"""Training modes that change how the model is held or what it learns: FSDP2 sharding
(`--fsdp`), per-iteration activation checkpointing (`--activation_checkpointing`), LoRA per loop
(`--lora.*`) and distillation from the parent (`--distill.*`). The flag groups, their checks, and
the steps the trainer calls (prepare the model, wrap it, save weights). docs/training.md, "Bigger
bases and cheaper training", describes them for users.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from retrofit.errors import ConfigError
from retrofit.model.configuration_raven import LORA_TARGETS
from retrofit.train.depth import MAX_RECURRENCE


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


def check_flags(cfg) -> str | None:
    """What is wrong with the mode flags of a TrainConfig, as one message (None: fine)."""
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


def lora_num_deltas(cfg, schedule) -> int:
    """One delta shared by every iteration, or (--lora.per_iteration) one per iteration up to the
    largest mean recurrence the run trains (the resolved `RecurrenceSchedule`'s)."""
    if not cfg.lora.per_iteration:
        return 1
    if cfg.lora.num_iterations is not None:
        return cfg.lora.num_iterations
    return schedule.max_mean_rec


def prepare_model(model, cfg, schedule) -> list[str]:
    """LoRA deltas, frozen base, activation checkpointing; before the optimizer is built. Returns log lines.
    `schedule`: the run's resolved RecurrenceSchedule (None for a non-recurrent model, which takes no LoRA)."""
    notes = []
    if cfg.lora.rank:
        if getattr(model.config, "lora", None):
            raise ValueError(
                f"--model_name={cfg.model_name} already has LoRA deltas ({model.config.lora}); drop --lora.rank to train them"
            )
        num_deltas = lora_num_deltas(cfg, schedule)
        model.add_lora(cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, num_deltas)
        notes.append(f"LoRA rank {cfg.lora.rank} on {', '.join(model.config.lora['targets'])}"
                     + (f", {num_deltas} per-iteration deltas" if cfg.lora.per_iteration else ", shared across iterations"))
    if cfg.lora.rank and not cfg.lora.train_base:
        model.freeze_base_weights()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        notes.append(f"base weights frozen: {trainable} trainable parameters (the deltas)")
    if cfg.activation_checkpointing:
        model.activation_checkpointing = True
    return notes


def prepare_modes(model, cfg, env, schedule, log=print):
    """LoRA, frozen base, activation checkpointing and the distillation teacher, before sharding
    and the optimizer; logs what it set up. Returns the teacher or None."""
    from retrofit.train.distill import check_vocabularies, load_teacher

    try:
        notes = prepare_model(model, cfg, schedule)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    teacher = None
    if cfg.distill.teacher is not None:
        teacher = load_teacher(cfg.distill.teacher, env.device, next(model.parameters()).dtype)
        try:
            check_vocabularies(teacher, model, cfg.distill.teacher)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        notes.append(f"distilling from {cfg.distill.teacher} (alpha {cfg.distill.alpha}, T {cfg.distill.temperature})")
    for note in notes:
        log(note)
    return teacher
