"""The training loop behind train.py: the `Trainer`.

Per optimizer step u (counting from 1): the curriculum gives (mean recurrence, backprop depth) =
RecurrenceSchedule.applied_at(u) (the original's scheduler values); every micro-batch draws its own
(n, k) from the depth sampler seeded by its index `data_step` (counting from 1, the same on every
rank; plus 1 with parquet data, the original's numbering); gradients are accumulated over
batch_size / micro_batch_size micro-batches, averaged over ranks by DDP (or reduce-scattered by
FSDP2 with --fsdp), clipped, and applied with the warmup-stable-decay learning rate. The pieces
come from retrofit/train/build.py, the device layout from parallel.py, saving and resuming from
checkpoint.py; LoRA, activation checkpointing and distillation: modes.py. See
docs/training.md for outputs and resuming.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from retrofit.train.flops import count_parameters, micro_batch_flops, model_flops_utilization, peak_tflops_of
from retrofit.data.rows import DataError, check_token_ids, inputs_and_labels
from retrofit.train import distributed as dist_utils
from retrofit.train import modes as train_modes
from retrofit.train.build import build_run
from retrofit.train.checkpoint import CheckpointManager, TrainingCounters, TrainingError
from retrofit.errors import ConfigError
from retrofit.train.config import TrainConfig
from retrofit.train.depth import micro_batch_depth
from retrofit.train.distill import distillation_kl, teacher_logits
from retrofit.train.monitor import format_step_line, open_monitors
from retrofit.train.optim import build_optimizer, set_learning_rates, wsd_lr_factor
from retrofit.train.parallel import parallelize
from retrofit.train.run_record import build_run_record, write_run_record

__all__ = ["Trainer", "TrainingError"]


class Trainer:
    """Builds everything a run needs from a validated TrainConfig (`__init__`), then `train()`s.

    Every rank builds one, in a run folder that train.py's main() has claimed; the main rank alone
    writes files (run.json, metrics, checkpoints)."""

    def __init__(self, cfg: TrainConfig, env: dist_utils.DistEnv):
        self.cfg, self.env = cfg, env
        parts = build_run(cfg, env)
        self.tokenizer, self.stream, self.max_length = parts.tokenizer, parts.stream, parts.max_length
        self.model, self.vocab_rows = parts.model, parts.vocab_rows
        self.max_steps, self.schedule = parts.max_steps, parts.schedule
        self.recurrent = not cfg.non_recurrent_model
        self.teacher = train_modes.prepare_modes(self.model, cfg, env, self.schedule, log=self.print)
        if self.teacher is not None:  # the teacher reads the same token ids
            teacher_rows = self.teacher.get_input_embeddings().num_embeddings
            if teacher_rows < len(self.tokenizer):
                raise ConfigError(
                    f"--distill.teacher={cfg.distill.teacher} embeds {teacher_rows} tokens but the tokenizer of"
                    f" --model_name has {len(self.tokenizer)}: distil from the model it was converted from"
                )
            self.vocab_rows = min(self.vocab_rows, teacher_rows)
        self.parallel = parallelize(self.model, cfg, env, teacher=self.teacher)
        for note in self.parallel.notes:
            self.print(note)
        # Model FLOPs per micro-batch are counted as param_counter.py counts them (non-embedding
        # parameters and LoRA deltas, recurrent iterations at the drawn (n, k)); mfu divides by the
        # devices' peak. (FSDP shards report their global sizes.)
        self.param_counts = count_parameters(self.model)
        self.peak_tflops = cfg.peak_tflops
        if self.peak_tflops is None and env.device.type == "cuda":
            self.peak_tflops = peak_tflops_of(torch.cuda.get_device_name(env.device))
        self.optimizer = self._build_optimizer()
        self.counters = TrainingCounters()
        self.run_record = None  # written below, once resuming has settled lr_step_offset
        self.checkpoints = CheckpointManager(
            cfg, env, self.parallel, self.optimizer, self.stream, self.tokenizer, run_state=self, log=self.print
        )
        self.resumed_from = self.checkpoints.resume()
        self.watcher, self.metrics, self.progress = open_monitors(
            cfg, env.is_main, self.counters.optimizer_step, self.max_steps, log=self.print
        )
        # run.json, written after every check (a refused start or resume leaves the previous one alone)
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
                             min_lr_ratio=cfg.scheduler_args.min_lr_ratio, lr_step_offset=self.counters.lr_step_offset),
        )
        if env.is_main:
            write_run_record(cfg.run_dir, self.run_record)

    def _build_optimizer(self):
        cfg = self.cfg
        optimizer = build_optimizer(
            self.model,
            lr=cfg.optim_config.lr,
            weight_decay=cfg.optim_config.weight_decay,
            betas=cfg.optim_config.betas,
            eps=cfg.optim_config.eps,
            kind=cfg.optimizer_kind,
            muon_lr=cfg.muon.lr,
            muon_weight_decay=cfg.muon.weight_decay,
            ellis_options={k: v for k, v in dataclasses.asdict(cfg.ellis_adam).items() if k != "enabled"},
        )
        self.num_warmup_steps = math.ceil(cfg.scheduler_args.warmup * self.max_steps)
        self.num_decay_steps = math.ceil(cfg.scheduler_args.cooldown * self.max_steps)
        return optimizer

    def describe(self) -> str:
        cfg, env = self.cfg, self.env
        # --max_steps=0 (the default) means "as many as the data or --parquet_dataset_max_tokens gives": say so
        derived = "" if cfg.max_steps else " (derived from the data: --max_steps=0)"
        return (
            f"run {cfg.run_name}: {env.world_size} process(es) on {env.device}, {self.max_steps} optimizer steps{derived},"
            f" global batch {cfg.batch_size * env.world_size} x {self.max_length} tokens"
        )

    def save_full_checkpoint(self) -> Path:
        return self.checkpoints.save_full_checkpoint()

    def print(self, *args):
        if self.env.is_main:
            print(*args, flush=True)

    # ---- one optimizer step ----------------------------------------------------------------
    def depth_for(self, data_step: int, mean_rec: int | None, backprop: int | None) -> tuple[int, int] | None:
        if not self.recurrent:
            return None
        return micro_batch_depth(mean_rec, backprop, data_step, seed_offset=self.cfg.depth_seed_offset,
                                 single_iteration=self.cfg.single_iteration)

    def forward_backward(self, batch, num_steps, sync: bool):
        input_ids, _, labels = inputs_and_labels(**batch)
        input_ids = input_ids.to(self.env.device, non_blocking=True)
        labels = labels.to(self.env.device, non_blocking=True)
        # No attention_mask: rows are right-padded at most, so with causal attention real tokens
        # never see padding, and padded targets carry label -100.
        kl = None
        with self.parallel.gradient_sync(sync):
            with self.parallel.autocast:
                # Our labels are already aligned with input_ids (inputs_and_labels), so both the
                # recurrent model and HF models take them as `shift_labels` (no second shift).
                depth = {"num_steps": num_steps} if self.recurrent else {}
                out = self.parallel.forward(input_ids=input_ids, labels=labels, shift_labels=labels, **depth)
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
        end_of_data = False  # the one exit below writes final_checkpoint either way
        while self.counters.optimizer_step < self.max_steps:
            record = self.train_step()
            if record is None:
                if self.counters.optimizer_step == 0:  # no final_checkpoint of an untrained model
                    raise DataError(
                        f"the data ends before the first optimizer step ({self.cfg.accumulation_steps} micro-batches of"
                        f" {self.cfg.micro_batch_size} rows per rank): lower --batch_size or add data"
                    )
                end_of_data = True
                break
            self.log_step(record)
            step = record["step"]
            self.checkpoints.save_on_cadence(step)
            reason = self.stop_requested()
            if reason is not None:
                self.checkpoints.save_before_stopping(step)
                return f"stopped at step {step}: {reason}; resume with --resume_path=auto"
        self.model.eval()
        self.checkpoints.save_final()
        done = f"finished at step {self.counters.optimizer_step}"
        return done + (f" (end of data before max_steps={self.max_steps})" if end_of_data else "")

    def train_step(self) -> dict | None:
        """One optimizer step: its micro-batches' forward/backward, clipping, the update. Returns the
        step's metrics record, or None when some rank's data ended (nothing is updated then)."""
        counters = self.counters
        step = counters.optimizer_step + 1
        step_start = time.monotonic()
        batches = self.gather_micro_batches()
        if batches is None:
            return None
        mean_rec, backprop = self.schedule.applied_at(step) if self.recurrent else (None, None)
        depths = [self.depth_for(counters.data_step + i + 1, mean_rec, backprop) for i in range(len(batches))]
        self.set_step_lr(depths)
        mean_loss, tokens, tokens_with_loss, flops, mean_kl = self.accumulate_gradients(batches, depths)
        grad_norm = self.clip_gradients()
        if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
            self.stop_on_non_finite(step, mean_loss, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        counters.optimizer_step = step

        step_time = time.monotonic() - step_start
        counters.elapsed_time += step_time
        counters.total_tokens += int(tokens)
        counters.total_tokens_with_loss += int(tokens_with_loss)
        last_depth = depths[-1] or (None, None)
        return dict(
            step=step,
            data_step=counters.data_step,
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
            total_tokens=counters.total_tokens,
            total_tokens_with_loss=counters.total_tokens_with_loss,
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
        for i, batch in enumerate(batches):
            check_token_ids(batch["input_ids"], self.vocab_rows, f"the data (data step {self.counters.data_step + i + 1})")
        return batches

    def set_step_lr(self, depths: list) -> None:
        """Warmup-stable-decay factor for this step; --throttle divides the recurrent groups' lr by the mean k."""
        cfg, counters = self.cfg, self.counters
        lr_factor = wsd_lr_factor(
            counters.optimizer_step - counters.lr_step_offset,
            self.num_warmup_steps,
            self.num_decay_steps,
            self.max_steps - counters.lr_step_offset,
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
            self.counters.data_step += 1
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
        data_step = self.counters.data_step
        first_data_step = data_step - self.cfg.accumulation_steps + 1
        problem = (
            f"non-finite {'loss' if not math.isfinite(mean_loss) else 'grad norm'} at optimizer step {step}"
            f" (data steps {first_data_step}..{data_step}): loss={mean_loss}, grad_norm={grad_norm}"
        )
        try:
            path = self.save_full_checkpoint()
        except TrainingError as exc:  # the weights themselves are already non-finite
            raise TrainingError(f"{problem}; {exc}") from None
        raise TrainingError(f"{problem}; the weights before this step are in {path}")

    def log_step(self, record: dict) -> None:
        self.metrics.log(record)
        self.progress.show(record, format_step_line(record, self.max_steps), log=self.print)  # a bar on a terminal

    def stop_requested(self) -> str | None:
        """Why to stop now (a signal or the job's time limit, on any rank), or None."""
        reason = self.watcher.reason()
        if dist_utils.any_rank(reason is not None, self.env.device):
            return reason or "another rank is stopping"
        return None
