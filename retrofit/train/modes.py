"""Training modes that change how the model is held or what it learns: FSDP2 sharding
(`--fsdp`), per-iteration activation checkpointing (`--activation_checkpointing`), LoRA per loop
(`--lora.*`) and distillation from the parent (`--distill.*`): the steps the trainer calls
(prepare the model, wrap it, save weights). Their flag groups and checks are with every other flag
in retrofit/train/config.py. docs/training.md, "Bigger bases and cheaper training", describes them
for users.
"""

from __future__ import annotations

from retrofit.errors import ConfigError


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
    from retrofit.train.distill import load_teacher

    try:
        notes = prepare_model(model, cfg, schedule)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    teacher = None
    if cfg.distill.teacher is not None:
        teacher = load_teacher(cfg.distill.teacher, model, env.device)
        notes.append(f"distilling from {cfg.distill.teacher} (alpha {cfg.distill.alpha}, T {cfg.distill.temperature})")
    for note in notes:
        log(note)
    return teacher
