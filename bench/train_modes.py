"""Training-step cost of FSDP2, activation checkpointing, LoRA per loop and distillation, each
against plain DDP on the same shape, measured in one run.

Two ranks (gloo on CPU, NCCL on GPU; the script relaunches itself under torchrun when started
plainly). Per mode, on a scaled-down TinyLlama shape (hidden 256, GQA 8/2, (2, 2, 2) layers,
vocab 4096, 2 x micro-batch 4 x 128 tokens, depth (n, k) = (4, 8), AdamW), it prints:

- tokens/s of whole optimizer steps (forward, backward, optimizer step; median of --steps, the
  modes' steps interleaved round by round so machine noise hits them alike),
- persistent training memory per rank: this rank's parameters + gradients + optimizer state bytes
  (what sharding divides), counted exactly from the tensors (local shards under FSDP),
- activation memory saved for backward during one micro-batch forward (saved-tensor hooks, as
  bench/train_step.py measures it, here without the weights autograd references), which is what
  activation checkpointing, LoRA and distillation change,
- each as a ratio to DDP.

    python bench/train_modes.py [--steps 6] [--device cpu|cuda] [--modes ddp fsdp ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from _common import llama_config, raven_config, saved_activation_bytes

SHAPE = dict(hidden=256, intermediate=704, heads=8, kv_heads=2, vocab=4096, prelude=2, core=2, coda=2)
DEPTH = (4, 8)
MODES = ["ddp", "fsdp", "ddp+activation_checkpointing", "fsdp+activation_checkpointing", "ddp+lora_shared",
         "ddp+lora_per_iteration", "ddp+distill", "fsdp+distill"]
LORA = dict(rank=16, alpha=32, targets=["core_block"])


def raven(device):
    from retrofit.model.modeling_raven import RavenForCausalLM

    torch.manual_seed(0)
    return RavenForCausalLM(raven_config(SHAPE, init_values={"std": 0.0})).to(device).train()


def teacher(device):
    """A Llama with as many layers as prelude + recurrent block + coda (the parent of a conversion)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    config = llama_config(SHAPE, SHAPE["prelude"] + SHAPE["core"] + SHAPE["coda"])
    return LlamaForCausalLM(config).to(device).eval().requires_grad_(False)


def state_bytes(model, optimizer) -> int:
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    total = 0
    for p in model.parameters():
        total += local(p).numel() * local(p).element_size()
        if p.grad is not None:
            total += local(p.grad).numel() * local(p.grad).element_size()
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += local(value).numel() * local(value).element_size()
    return total


def build_mode(mode: str, args, device, rank: int) -> dict:
    """The model, optimizer and step of one mode (all modes live side by side, so their steps can
    be interleaved and machine noise hits every mode alike)."""
    from retrofit.train import fsdp
    from retrofit.train.distill import distillation_kl

    model = raven(device)
    if "lora" in mode:
        model.add_lora(**LORA, num_deltas=sum(DEPTH) if mode.endswith("per_iteration") else 1)
        model.freeze_base_weights()
    model.activation_checkpointing = "activation_checkpointing" in mode
    parent = teacher(device) if "distill" in mode else None
    if mode.startswith("fsdp"):
        fsdp.shard_model(model)
        if parent is not None:
            fsdp.shard_model(parent)
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, SHAPE["vocab"], (args.micro_batch, args.seq), generator=generator).to(device)

    def loss_of():
        out = wrapped(ids, labels=ids, num_steps=DEPTH)
        loss = out.loss
        if parent is not None:
            with torch.no_grad():
                reference = parent(input_ids=ids).logits
            loss = loss + 0.5 * distillation_kl(out.logits, reference, ids, 2.0)
        return loss

    def step():
        loss_of().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (creates the optimizer state)
    return dict(model=model, optimizer=optimizer, loss_of=loss_of, step=step, times=[])


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank does
    return elapsed.item()


def measure(modes: dict, args, device) -> dict:
    for _ in range(args.steps):  # interleaved rounds
        for built in modes.values():
            built["times"].append(timed(built["step"], device))
    tokens = args.micro_batch * args.seq * dist.get_world_size()
    results = {}
    for mode, built in modes.items():
        model, optimizer = built["model"], built["optimizer"]
        built["loss_of"]().backward()  # gradients present: count them with the state
        persistent = state_bytes(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        activations = saved_activation_bytes(built["loss_of"], model)
        results[mode] = dict(tokens_per_s=tokens / statistics.median(built["times"]), persistent=persistent,
                             activations=activations)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:  # relaunch as two ranks
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
               os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])]
        return subprocess.call(cmd)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    modes = {mode: build_mode(mode, args, device, rank) for mode in ["ddp"] + [m for m in args.modes if m != "ddp"]}
    results = measure(modes, args, device)
    if rank == 0:
        base = results["ddp"]
        print(f"device {device.type}, 2 ranks, shape {SHAPE}, micro-batch {args.micro_batch} x {args.seq} per rank,"
              f" (n, k) = {DEPTH}, LoRA {LORA} with frozen base, median of {args.steps} interleaved steps")
        print(f"{'mode':<30} {'tokens/s':>9} {'x DDP':>6} {'state MiB/rank':>15} {'x DDP':>6} {'saved act. MiB':>15} {'x DDP':>6}")
        for mode, r in results.items():
            print(f"{mode:<30} {r['tokens_per_s']:9.0f} {r['tokens_per_s'] / base['tokens_per_s']:6.2f}"
                  f" {r['persistent'] / 2**20:15.2f} {r['persistent'] / base['persistent']:6.2f}"
                  f" {r['activations'] / 2**20:15.2f} {r['activations'] / base['activations']:6.2f}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
