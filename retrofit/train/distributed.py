"""Process-group setup for torchrun, SLURM (srun) and flux launches, plus the few collectives
the training loop needs.

One code path for one process, one node or many nodes: the launcher only decides which
environment variables are set.

| launcher | rank | world size | local rank |
|---|---|---|---|
| torchrun | RANK | WORLD_SIZE | LOCAL_RANK |
| srun (SLURM) | SLURM_PROCID | SLURM_NTASKS | SLURM_LOCALID |
| flux run | FLUX_TASK_RANK | FLUX_JOB_SIZE | FLUX_TASK_LOCAL_ID |

MASTER_ADDR / MASTER_PORT must reach rank 0. torchrun sets them; under SLURM we fall back to the
first host of the allocation (`scontrol show hostnames`), elsewhere to 127.0.0.1:29500.
NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

LAUNCH_ENV_VARIABLES = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("FLUX_TASK_RANK", "FLUX_JOB_SIZE", "FLUX_TASK_LOCAL_ID"),
)


class LaunchError(ValueError):
    """A launch setting the user can fix (device, rank variables)."""


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def read_launch_env(environ=None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the first launcher whose variables are all set."""
    environ = os.environ if environ is None else environ
    if "SLURM_STEP_NUM_TASKS" in environ and "RANK" not in environ:
        # Inside an srun step the step's task count is the world (SLURM_NTASKS is the allocation's).
        environ = dict(environ, SLURM_NTASKS=environ["SLURM_STEP_NUM_TASKS"])
    for rank_key, world_key, local_key in LAUNCH_ENV_VARIABLES:
        if rank_key in environ and world_key in environ:
            rank, world = int(environ[rank_key]), int(environ[world_key])
            local = int(environ.get(local_key, rank))
            if not 0 <= rank < world:
                raise LaunchError(f"{rank_key}={rank} is outside [0, {world_key}={world})")
            return rank, world, local
    return 0, 1, 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda (the local rank's GPU) if present, else cpu; or an explicit 'cpu' / 'cuda[:i]'."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):  # meta, xla, ...: nothing this toolkit runs on
        raise LaunchError(f"--device={device} is not a device; use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise LaunchError(f"--device={device} but no CUDA device is visible; use --device=cpu (or auto)")
    if device == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return parsed


def _default_master_addr(environ) -> str:
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if nodelist:
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "127.0.0.1"


def setup(device: str = "auto", timeout_minutes: float = 30.0, single_process_group: bool = False) -> DistEnv:
    """Read the launcher's environment, pick the device and (for world size > 1, or always with
    `single_process_group`, which FSDP needs) join the group."""
    rank, world_size, local_rank = read_launch_env()
    torch_device = resolve_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    env = DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)
    if (world_size > 1 or single_process_group) and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", _default_master_addr(os.environ))
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        kwargs = dict(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        if backend == "nccl":
            kwargs["device_id"] = torch_device  # forms the NCCL communicator eagerly
        dist.init_process_group(**kwargs)
    return env


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over ranks in one collective (float64 so counts stay exact)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on at least one (stop signals, end of data, NaNs)."""
    if not dist.is_initialized():
        return bool(flag)
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def all_gather_object(obj) -> list:
    """Every rank's `obj`, indexed by rank (a one-element list without a process group)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
