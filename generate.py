"""Stream a completion from a recurrent (or plain HF) checkpoint at a chosen test-time depth.

    python generate.py MODEL_DIR --prompt "Q: Ava has 3 apples ..." [--num_steps 8] [--max_new_tokens 128]
                       [--adaptive 1e-3 [--criterion kl|latent|entropy-diff|...] | --compile] [--no_chat] [--sample --temperature 0.7]
                       [--cache_policy full|latest-M|compress-S] [--continuous] [--speculative_k K --speculative_draft_steps D] [--state_seed S]

e.g. on the quickstart's recurrent model (docs/evaluation.md, Generating text):

    python generate.py runs/quickstart/runs/recurrent/final_checkpoint --no_chat --num_steps 8 --max_new_tokens 40 \
        --prompt $'Q: Ava has 23 books. Ava buys 30 more and then gives away 9. How many books does Ava have now?\nA:'

The prompt goes through the tokenizer's chat template when it has one (disable with --no_chat).
For recurrent models the mean number of recurrent iterations per generated token is reported
(with --adaptive, tokens exit early once successive iterations agree).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from retrofit.train.depth import MAX_RECURRENCE

from retrofit.openmp import passive_openmp_wait

passive_openmp_wait()  # before torch starts OpenMP: --compile's kernels would slow later eager ops


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="checkpoint directory (config.json + weights + tokenizer)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--num_steps", type=int, default=None, help="recurrence (default: the config's mean_recurrence)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--adaptive", type=float, default=None, metavar="THRESHOLD", help="per-token early exit threshold")
    parser.add_argument("--criterion", default="kl",
                        help="exit criterion with --adaptive (docs/adaptive_depth.md): kl, latent, entropy-diff, minp-kl, "
                             "cosine, argmax-stability, argmax-stability-M, gate")
    parser.add_argument("--compile", action="store_true",
                        help="decode through a torch.compile'd step (recurrent models; not with --adaptive): "
                             "compiles once per batch size, depth and cache size (about a minute on CPU), then each "
                             "token is faster; pays off for long generations only (docs/evaluation.md, Generating text)")
    parser.add_argument("--cache_policy", default=None,
                        help="KV cache across iterations: full (default), latest-M or compress-S (docs/generation.md)")
    parser.add_argument("--continuous", action="store_true",
                        help="continuous thought: each token's recurrence starts from the previous token's final state")
    parser.add_argument("--speculative_k", type=int, default=0, metavar="K",
                        help="self-speculative greedy decoding: draft K tokens at --speculative_draft_steps, verify at --num_steps")
    parser.add_argument("--speculative_draft_steps", type=int, default=None, metavar="D", help="draft depth for --speculative_k")
    parser.add_argument("--state_seed", type=int, default=None,
                        help="draw each position's random initial state from a generator seeded by (this, position): "
                             "--speculative_k then writes the same tokens as plain greedy decoding with the same --state_seed")
    parser.add_argument("--no_chat", action="store_true", help="do not apply the chat template")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run the modeling code saved in the checkpoint instead of this repo's (only for checkpoints you trust)")
    args = parser.parse_args(argv)
    if not (Path(args.model_dir) / "config.json").is_file():
        parser.error(f"{args.model_dir} has no config.json: not a model directory")
    if args.num_steps is not None and not 1 <= args.num_steps <= MAX_RECURRENCE:
        parser.error(f"--num_steps must be in [1, {MAX_RECURRENCE}] (recurrent iterations per token), got {args.num_steps}")
    if args.adaptive is not None and not (math.isfinite(args.adaptive) and args.adaptive >= 0):
        parser.error(f"--adaptive must be a threshold >= 0, got {args.adaptive}")
    from retrofit.model.exits_raven import exit_criterion

    try:
        exit_criterion(args.criterion)
    except ValueError as err:
        parser.error(f"--criterion: {err}")
    if args.sample and not (math.isfinite(args.temperature) and args.temperature > 0):
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if args.sample and not 0 < args.top_p <= 1:
        parser.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.compile and args.adaptive is not None:
        parser.error("--compile cannot be combined with --adaptive (the compiled step runs a fixed depth)")
    inference_options_error = check_generate_options(args)
    if inference_options_error:
        parser.error(inference_options_error)
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    return args


def check_generate_options(args) -> str | None:
    """The error message for a bad --cache_policy / --continuous / --speculative_* value or combination."""
    from retrofit.model.speculative_raven import InferenceOptions

    if args.state_seed is not None and (args.state_seed < 0 or args.adaptive is not None):
        return f"--state_seed must be >= 0 and not with --adaptive, got {args.state_seed}"
    if args.speculative_draft_steps is not None and not 1 <= args.speculative_draft_steps <= MAX_RECURRENCE:
        return f"--speculative_draft_steps must be in [1, {MAX_RECURRENCE}], got {args.speculative_draft_steps}"
    try:
        InferenceOptions(args.cache_policy, args.continuous, args.speculative_k, args.speculative_draft_steps,
                         args.state_seed).check(True, args.adaptive, args.compile, args.sample)
    except ValueError as err:
        return str(err)
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import TextStreamer

    from retrofit.model.loading import load_saved_model, load_saved_tokenizer
    from retrofit.errors import first_line
    from retrofit.model.configuration_raven import RavenConfig
    from retrofit.train.distributed import LaunchError, resolve_device

    try:
        device = resolve_device(args.device)
    except LaunchError as err:  # e.g. --device cuda on a machine without one
        print(f"error: {err}", file=sys.stderr)
        return 2
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    try:
        tokenizer = load_saved_tokenizer(args.model_dir)
        model = load_saved_model(args.model_dir, dtype, checkpoint_code=args.trust_remote_code).to(device).eval()
    except (OSError, ValueError, KeyError, TypeError) as exc:  # no tokenizer files, no weights, bad config values
        print(f"error: {args.model_dir} does not load: {first_line(exc)[:300]}", file=sys.stderr)
        return 2
    recurrent = getattr(model.config, "model_type", "") == RavenConfig.model_type
    # Only the options given (each off by default), so plain checkpoints and default runs pass none.
    inference_options = {name: value for name, value in dict(
        cache_policy=args.cache_policy, continuous=args.continuous or None, speculative_k=args.speculative_k or None,
        speculative_draft_steps=args.speculative_draft_steps, state_seed=args.state_seed).items() if value is not None}
    if not recurrent and (args.num_steps is not None or args.adaptive is not None or args.compile
                          or inference_options):
        print("error: --num_steps/--adaptive/--compile/--cache_policy/--continuous/--speculative_k need a recurrent checkpoint",
              file=sys.stderr)
        return 2

    if tokenizer.chat_template and not args.no_chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    ids = ids.to(device)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    if args.sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    if recurrent:
        kwargs.update(num_steps=args.num_steps, adaptive_threshold=args.adaptive, adaptive_criterion=args.criterion)
        if args.compile:
            kwargs["compile"] = True
        kwargs.update(inference_options)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    elapsed = time.perf_counter() - start
    new_tokens = out.shape[1] - ids.shape[1]
    summary = f"[{new_tokens} tokens in {elapsed:.1f}s, {new_tokens / max(elapsed, 1e-9):.1f} tok/s"
    if recurrent:
        summary += f", mean depth {model.last_generation_stats['mean_depth']:.2f} iterations/token"
        if args.speculative_k:
            summary += f", {model.last_generation_stats['tokens_per_round']:.2f} tokens per draft-and-verify round"
    print(summary + "]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
