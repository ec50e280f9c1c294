"""FSDP2 training support: shard the model, gather full weights to save, and save / load the
resumable training state sharded with `torch.distributed.checkpoint` (DCP).

Sharding (`torch.distributed.fsdp.fully_shard`): each layer of the prelude, the recurrent block and
the coda is one unit, the root (embedding, adapter, final norm, lm_head) another. A recurrent-block
layer runs n + k times per forward; FSDP2 gathers its weights for every call and, in backward,
accumulates its gradient over the k grad iterations before the one reduce-scatter. With bf16
(`--bf16_true` or autocast) the policy computes in bf16 and reduces gradients in fp32.

Checkpoints keep the DDP path's rules (retrofit/train/checkpoint.py): written under a temporary name and
renamed into place, `COMPLETE` lists size and SHA-256 of every file, loading verifies it first.
A sharded `checkpoint_{step}/` holds:
- `training_state.pt`: counters, data positions and RNG states of every rank, config (no tensors of
  the model or optimizer), with `sharded: True`;
- `sharded/`: DCP files (`.metadata`, one `__{rank}_0.distcp` per rank) with the model and optimizer
  state by parameter name (DCP maps them onto the shards of the loading run).
`model_only_chkpt_*` / `final_checkpoint` are ordinary `save_pretrained` folders: the full state dict
is gathered to rank 0 (on CPU), put into an unsharded copy of the model and saved from there.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from retrofit.train import checkpoint as ckpt
from retrofit.train import distributed as dist_utils
from retrofit.train.faults import fault_point

SHARDED_DIR = "sharded"


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one: every layer of a recurrent model (prelude, recurrent block,
    coda), or a plain HF model's decoder layers (its `_no_split_modules` classes)."""
    transformer = getattr(model, "transformer", None)
    if transformer is not None and "core_block" in transformer:
        return [layer for part in ("prelude", "core_block", "coda") for layer in transformer[part]]
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: nn.Module, bf16: bool = False) -> nn.Module:
    """Shard `model` in place over all ranks (FSDP2); returns it. Call after loading weights."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for unit in sharding_units(model):
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _optimizers(optimizer) -> list[torch.optim.Optimizer]:
    return list(getattr(optimizer, "optimizers", [optimizer]))  # retrofit.train.optim.MultiOptimizer or one


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the full (unsharded) weights as CPU tensors on rank 0, {} on the other ranks."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded_training_state(out_dir: str | Path, model: nn.Module, optimizer, state: dict, add_files=None) -> Path:
    """Collective. `state` (counters, data positions, RNG states, config: rank 0's is written) goes
    to training_state.pt, model and optimizer to DCP shards, `add_files(folder)` writes more files
    (run.json); then COMPLETE, then the rename."""
    out_dir = Path(out_dir)
    tensors = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, _optimizers(optimizer)),
    }
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    with ckpt.atomic_directory(out_dir) if is_main else nullcontext() as tmp:
        tmp = Path(dist_utils.broadcast_object(str(tmp) if is_main else None))
        dcp.save(tensors, checkpoint_id=tmp / SHARDED_DIR)
        dist_utils.barrier()  # every rank's shard file is on disk before the checksums are taken
        if is_main:
            torch.save(dict(state, sharded=True), tmp / ckpt.STATE_FILE)
            fault_point("full:temp_written")
            if add_files is not None:
                add_files(tmp)
            ckpt.write_complete_marker(tmp, optimizer_step=state.get("optimizer_step"), sharded=True)
            fault_point("full:before_rename")
    if is_main:
        fault_point("full:after_rename")
    dist_utils.barrier()  # rank 0 has renamed the folder into place
    return out_dir


def load_sharded_tensors(checkpoint_dir: str | Path, model: nn.Module, optimizer) -> None:
    """Collective: read the DCP shards of a verified checkpoint into the sharded model and optimizer."""
    optimizers = _optimizers(optimizer)
    # get_optimizer_state_dict creates the optimizer state (zero step at lr 0) when there is none
    # yet, so DCP finds every entry to fill.
    tensors = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizers)}
    dcp.load(tensors, checkpoint_id=Path(checkpoint_dir) / SHARDED_DIR)
    set_model_state_dict(model, tensors["model"])
    set_optimizer_state_dict(model, optimizers, tensors["optimizer"])


def local_non_finite(tree, limit: int = 3) -> list[str]:
    """`checkpoint.non_finite_entries` on this rank's shards (DTensors read locally, no collective)."""
    from torch.distributed.tensor import DTensor

    def local(value):
        if isinstance(value, DTensor):
            return value.to_local()
        if isinstance(value, dict):
            return {k: local(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [local(v) for v in value]
        return value

    return ckpt.non_finite_entries(local(tree), limit=limit)


class ShardedCheckpoints:
    """The checkpoint manager's backend under FSDP: every rank writes and reads its DCP shards
    (collective), and checks for non-finite values on its shards, sharing what it finds."""

    sharded = True

    def writes_on(self, env) -> bool:
        return True

    def save(self, out_dir: str | Path, model: nn.Module, optimizer, state: dict, add_files=None) -> Path:
        return save_sharded_training_state(out_dir, model, optimizer, state, add_files)

    def load(self, checkpoint_dir: Path, state: dict, model: nn.Module, optimizer) -> list[str]:
        """Read the shards into model and optimizer; returns the names of non-finite entries."""
        load_sharded_tensors(checkpoint_dir, model, optimizer)
        return self.non_finite({"model": model.state_dict(), "optimizer": optimizer.state_dict()})

    def non_finite(self, tree) -> list[str]:
        """Every rank's findings on its shards, the same list on every rank."""
        found = dist_utils.all_gather_object(local_non_finite(tree))
        return sorted({name for names in found for name in names})[:3]

    def full_state_dict(self, model: nn.Module) -> dict:
        return full_state_dict(model)
