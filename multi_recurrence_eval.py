"""Validation loss of recurrent checkpoints at many test-time depths (docs/evaluation.md, Validation loss over depth).

For each checkpoint of a run, the first --num_sequences rows of a held-out parquet shard are
scored at every depth in --recurrences (default 1,2,4,8,16,32,64): the model reads row[:-1],
predicts row[1:], padding is not scored, and the mean loss of each sequence is saved as

    {output_dir}/{run name}/chkpt_{N}.json    {"1": [[loss of each sequence in batch 1], [batch 2], ...], "2": ...}

(the original's format and path; output_dir defaults to ./loss_over_rec_eval). All depths come
from one pass: the prelude runs once and the recurrent block keeps iterating, with the coda read
out at each requested depth (64 iterations instead of 1+2+...+64). --independent_runs evaluates
each depth from scratch instead, as the original did; both start from the same seeded state.

--cache_policy P (full, latest-M, compress-S) and --continuous (each position's recurrence starts
from the previous position's final state) score by teacher-forced decoding through the KV cache,
one token at a time (T forward calls per depth: use a few short sequences); results go to
chkpt_{N}_cache-{P}[_continuous].json or chkpt_{N}_continuous.json.

--adaptive_threshold T stops iterating each token once its exit criterion (--adaptive_criterion:
kl, the KL between successive iterations' next-token distributions, latent, entropy-diff, minp-kl,
cosine, argmax-stability[-M] or gate; docs/adaptive_depth.md) drops below T, and also reports the
mean depth used and the fraction of recurrent-block compute actually run; results go to
chkpt_{N}_adaptive_{criterion}_{T}.json = {"criterion", "threshold", "loss": {...}, "mean_depth": {...},
"executed_fraction": {...}}.

    python multi_recurrence_eval.py runs/my_run 1000,2000 --eval_file_path=$DATA/val/shard-00512.parquet
    python multi_recurrence_eval.py runs/my_run final_checkpoint --eval_file_path=... --adaptive_threshold 5e-4

CKPTS: step numbers N (meaning {MODEL_DIR}/model_only_chkpt_N, as in the original; '[1000,2000]',
'1000,2000' and '1000 2000' all work) or folder names such as final_checkpoint. Checkpoints whose
output already exists are skipped (--overwrite to redo).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from retrofit.atomic import write_json_atomic
from retrofit.train.distributed import LaunchError, resolve_device
from retrofit.evaluate.loss_over_depth import (
    DEFAULT_RECURRENCES,
    AdaptiveExit,
    check_adaptive_criterion,
    criterion_names,
    EvalError,
    checkpoint_dirs,
    load_eval_rows,
    loss_over_depth,
    output_name,
    parse_recurrences,
    result_json,
    summary_lines,
)
from retrofit.data.rows import DataError, check_token_ids
from retrofit.evaluate.cached_sweep import cached_variant_suffix, check_cached_options


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_name", metavar="MODEL_DIR", help="run directory holding the checkpoints")
    parser.add_argument("ckpts", metavar="CKPTS", nargs="+", help="checkpoint steps (model_only_chkpt_N) or folder names")
    parser.add_argument("--eval_file_path", required=True, help="held-out parquet shard (or a folder of shards)")
    parser.add_argument("--recurrences", default=",".join(map(str, DEFAULT_RECURRENCES)), help="test depths, e.g. 1,2,4,8")
    parser.add_argument("--num_sequences", type=int, default=1024, help="first N rows of the shard (default 1024)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initial states")
    parser.add_argument("--independent_runs", action="store_true", help="run every depth from scratch (the original's way)")
    parser.add_argument("--adaptive_threshold", type=float, default=None, help="per-token early exit below this value")
    parser.add_argument("--adaptive_criterion", default="kl",
                        help=f"exit criterion (docs/adaptive_depth.md): {criterion_names()}")
    parser.add_argument("--cache_policy", default=None,
                        help="score by teacher-forced decoding through the KV cache under this policy: full, latest-M "
                             "or compress-S (docs/generation.md, KV-cache policies); T forward calls per depth")
    parser.add_argument("--continuous", action="store_true",
                        help="continuous thought: position t starts from position t-1's final latent state of the "
                             "same depth run (teacher-forced through the cache, as --cache_policy)")
    parser.add_argument("--output_dir", default="loss_over_rec_eval", help="results go to OUTPUT_DIR/{run name}/")
    parser.add_argument("--overwrite", action="store_true", help="recompute checkpoints whose output exists")
    parser.add_argument("--no_progress", action="store_true",
                        help="no progress bar (drawn on stderr only when it is a terminal)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run the modeling code saved in each checkpoint instead of this repo's (only for checkpoints you trust)")
    return parser.parse_args(argv)


def load_model(path: Path, device: str, dtype: str, checkpoint_code: bool = False):
    import torch

    from retrofit.model.loading import load_saved_model

    model = load_saved_model(path, getattr(torch, dtype), checkpoint_code=checkpoint_code)
    if not hasattr(model, "recur"):
        raise EvalError(f"{path} is not a recurrent model (model_type {model.config.model_type!r}); nothing to sweep")
    return model.to(device).eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        recurrences = parse_recurrences(args.recurrences)
        adaptive = None
        if args.adaptive_threshold is not None:
            adaptive = AdaptiveExit(args.adaptive_threshold, args.adaptive_criterion)
        else:
            check_adaptive_criterion(args.adaptive_criterion)
        check_cached_options(args.cache_policy, args.continuous, adaptive, args.independent_runs)
        variant = cached_variant_suffix(args.cache_policy, args.continuous)
        checkpoints = checkpoint_dirs(args.model_name, args.ckpts)
        device = resolve_device(args.device)
        out_dir = Path(args.output_dir) / Path(args.model_name).resolve().name
        todo = []
        for label, path in checkpoints:
            target = out_dir / output_name(label, adaptive, variant)
            if target.exists() and not args.overwrite:
                print(f"skip {label}: {target} exists (--overwrite to redo)")
            else:
                todo.append((label, path))
        if not todo:
            return 0
        input_ids, attention_mask = load_eval_rows(args.eval_file_path, args.num_sequences)
        for label, path in todo:
            vocab_size = json.loads((Path(path) / "config.json").read_text()).get("vocab_size")
            if isinstance(vocab_size, int):  # before the weights load
                check_token_ids(input_ids, vocab_size, args.eval_file_path)
            model = load_model(path, device, args.dtype, checkpoint_code=args.trust_remote_code)
            check_token_ids(input_ids, model.get_input_embeddings().num_embeddings, args.eval_file_path)
            start = time.perf_counter()
            result = loss_over_depth(
                model, input_ids, attention_mask, recurrences, batch_size=args.batch_size, seed=args.seed,
                independent_runs=args.independent_runs, adaptive=adaptive, progress=not args.no_progress,
                cache_policy=args.cache_policy, continuous=args.continuous,
            )
            elapsed = time.perf_counter() - start
            target = write_json_atomic(out_dir / output_name(label, adaptive, variant), result_json(result, adaptive))
            mode = "independent runs" if args.independent_runs else ("through the cache" if variant else "one pass")
            print(f"{label}: {result.num_sequences} sequences, {mode}, {elapsed:.1f}s -> {target}")
            print("\n".join(summary_lines(result, adaptive)))
            del model
    except (EvalError, DataError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
