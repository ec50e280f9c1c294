"""How the model runs over devices, decided in one place: `parallelize(model, cfg, env)`.

One process, DDP (`torchrun` with world size > 1) or FSDP2 (`--fsdp=true`), plus `--compile`. The
loop sees one `Parallelized`: what to call forward on, when gradients synchronise, the autocast
context, and the checkpoint backend (plain state dicts, or DCP shards under FSDP). So the loop and
the checkpoint manager never ask which of them is in use.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from retrofit.train.checkpoint import LocalCheckpoints
from retrofit.train.distributed import DistEnv


def autocast_on(cfg, device: torch.device) -> bool:
    """bf16 autocast runs on GPU with --bf16_autocast=true (the original's --no_amp=false)."""
    return device.type == "cuda" and cfg.bf16_autocast


def computes_in_bf16(cfg, device: torch.device) -> bool:
    """bf16 weights (--bf16_true) or bf16 autocast: FSDP then computes in bf16 and reduces in fp32."""
    return cfg.bf16_true or autocast_on(cfg, device)


@dataclass
class Parallelized:
    """The trained model as the loop runs it.

    `module` is the model itself (sharded in place under FSDP): the optimizer, state dicts and
    saving use it. `forward` is what the loop calls (DDP's wrapper, `torch.compile`'s, or `module`).
    """

    module: nn.Module
    forward: nn.Module
    checkpoints: object  # LocalCheckpoints or fsdp.ShardedCheckpoints
    autocast: object = field(default_factory=nullcontext)
    ddp: torch.nn.parallel.DistributedDataParallel | None = None
    notes: list[str] = field(default_factory=list)

    def gradient_sync(self, sync: bool):
        """Context for one micro-batch's backward: DDP all-reduces on the step's last micro-batch
        only; FSDP reduce-scatters every micro-batch's gradient into the shard (no unsharded
        gradients kept for accumulation); one process has nothing to sync."""
        return self.ddp.no_sync() if self.ddp is not None and not sync else nullcontext()


def parallelize(model: nn.Module, cfg, env: DistEnv, teacher: nn.Module | None = None) -> Parallelized:
    """Shard (FSDP) or wrap (DDP) `model`, compile it if asked; call after LoRA / freezing and
    before the optimizer is built (under FSDP it holds the shards). A distillation teacher is
    sharded alike, so it fits where the student does."""
    notes = []
    ddp = None
    forward = model
    if cfg.fsdp:
        from retrofit.train import fsdp

        bf16 = computes_in_bf16(cfg, env.device)
        fsdp.shard_model(model, bf16=bf16)
        if teacher is not None:
            fsdp.shard_model(teacher, bf16=bf16)
        checkpoints = fsdp.ShardedCheckpoints()
        notes.append(f"FSDP2: sharded over {env.world_size} rank(s)" + (", bf16 compute / fp32 reduce" if bf16 else ""))
    else:
        checkpoints = LocalCheckpoints()
        if env.is_distributed:
            # Every parameter gets a gradient on every backward: truncated backprop runs n
            # iterations under no_grad and then k >= 1 with grad, and all parameters (prelude,
            # adapter, recurrent block, coda, head) sit on that k-iteration path. So
            # find_unused_parameters=False is correct, and it avoids a full graph traversal per
            # backward. Every rank draws the same (n, k), so ranks run the same graph.
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids, find_unused_parameters=False, gradient_as_bucket_view=True
            )
            forward = ddp
    if cfg.compile and not cfg.non_recurrent_model:
        # Compile each layer, not the whole model: the unrolled recurrence would be traced (and
        # recompiled) anew for every (n, k) the depth sampler draws.
        from retrofit.model.modeling_raven import Block

        for module in model.modules():
            if isinstance(module, Block):
                module.compile()
    elif cfg.compile:
        forward = torch.compile(forward)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if autocast_on(cfg, env.device) else nullcontext()
    return Parallelized(module=model, forward=forward, checkpoints=checkpoints, autocast=autocast, ddp=ddp, notes=notes)
