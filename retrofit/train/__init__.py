"""Training: settings, the loop, the depth sampler and curricula, optimizers, checkpoints, the
process group and sharding, distillation and LoRA modes, FLOPs and parameter counts, and the run
record each run writes."""
