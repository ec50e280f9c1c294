"""Conversion at the paper's real shapes: random-weight bases, each converted with its preset.

    python bench/convert_real_shapes.py [--dtype bfloat16] [--only tinyllama,llama,olmo] [--workdir DIR]

For TinyLlama-1.1B-3T, Llama-3.2-1B and OLMo-2-0425-1B this builds a base with the real
config (sizes, GQA, RoPE incl. llama3 scaling, tying) and random weights (normal std 0.02, norms
near 1, and three embedding dims set to 150 so the residual stream carries "massive activations"
as real bases do), saves it, and converts it with the paper's preset in the converter's default
dtype, verification on. Each step runs in its own process, so the conversion's peak RSS is its
own. Prints per shape: verified, wall time, peak RSS (and its ratio to the base's float32 weight
bytes, the baseline a conversion cannot go below by much), and the largest absolute and relative
difference of the verification table. Needs ~16 GB RAM and ~20 GB of disk; minutes per shape on
a few CPU cores. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Real configs of the paper's bases (their config.json values that matter for conversion).
SHAPES = {
    "tinyllama": dict(
        name="TinyLlama-1.1B-3T", preset="tinyllama-4-8-4", family="llama",
        config=dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                    rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    ),
    "llama": dict(
        name="Llama-3.2-1B", preset="llama-4-6-4", family="llama",
        config=dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                    max_position_embeddings=131072, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    ),
    "olmo": dict(
        name="OLMo-2-0425-1B", preset="olmo-4-6-4", family="olmo2",
        config=dict(model_type="olmo2", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=16, num_key_value_heads=16, vocab_size=100352, max_position_embeddings=4096,
                    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                    tie_word_embeddings=False, bos_token_id=None, eos_token_id=100257, pad_token_id=100277),
    ),
}


def build_base(key: str, out: str) -> None:
    """Child process: a random-weight base at the real shape, saved in HF format."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[key]["config"])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.8, 1.2, generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        model.get_input_embeddings().weight[:, :3] = 150.0  # massive-activation dims
    model.tie_weights()
    model.save_pretrained(out)


def run_conversion(key: str, base: str, out: str, dtype: str) -> None:
    """Child process: convert with the preset, verification on; print one JSON line."""
    import resource

    from retrofit.model.conversion import ConversionError, convert, layer_choice

    shape = SHAPES[key]
    start = time.perf_counter()
    try:
        _, rows = convert(base, out, layer_choice(shape["preset"], None, None, None), family=shape["family"], dtype=dtype)
        passed, error = True, None
    except ConversionError as err:
        rows, passed, error = [], False, str(err)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RESULT " + json.dumps(dict(
        passed=passed, error=error, seconds=seconds, peak_rss_gib=peak_kib / 2**20,
        max_abs_diff=max((r.max_abs_diff for r in rows), default=None),
        max_rel_diff=max((r.relative_diff for r in rows), default=None),
        max_abs_reference=max((r.max_abs_reference for r in rows), default=None),
    )), flush=True)


def weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", help="saved dtype (the converter's default: bfloat16)")
    parser.add_argument("--only", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--workdir", default=None, help="where bases are built (default: a temp dir, removed after)")
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        kind, *rest = args._child
        build_base(*rest) if kind == "build" else run_conversion(*rest)
        return 0
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SHAPES]
    if unknown:
        print(f"error: unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="convert_real_shapes_"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = []
    try:
        for key in keys:
            base, out = workdir / f"base-{key}", workdir / f"rec-{key}"
            shutil.rmtree(base, ignore_errors=True), shutil.rmtree(out, ignore_errors=True)
            subprocess.run([sys.executable, __file__, "--_child", "build", key, str(base)], check=True, env=env)
            proc = subprocess.run([sys.executable, __file__, "--_child", "convert", key, str(base), str(out), args.dtype],
                                  env=env, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                results.append((key, None, weight_bytes(base)))
            else:
                print("\n".join(l for l in proc.stdout.splitlines() if not l.startswith("RESULT ")))
                results.append((key, json.loads(line[len("RESULT "):]), weight_bytes(base)))
            shutil.rmtree(base, ignore_errors=True), shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nconversion at real shapes, dtype {args.dtype}, random weights with 3 massive-activation dims (150)")
    print("| base | preset | verified | time (s) | peak RSS (GiB) | peak RSS / base fp32 weights | max abs diff | max rel diff | max abs ref |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, r, base_bytes in results:
        shape = SHAPES[key]
        if r is None:
            print(f"| {shape['name']} | {shape['preset']} | crashed | | | | | | |")
            continue
        fmt = lambda v: "n/a" if v is None else f"{v:.2e}"  # noqa: E731
        print(f"| {shape['name']} | {shape['preset']} | {'yes' if r['passed'] else 'NO: ' + r['error']} | {r['seconds']:.1f} "
              f"| {r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] * 2**30 / base_bytes:.2f}x | {fmt(r['max_abs_diff'])} "
              f"| {fmt(r['max_rel_diff'])} | {fmt(r['max_abs_reference'])} |")
    return 0 if all(r is not None and r["passed"] for _, r, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
