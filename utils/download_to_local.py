"""Download a model snapshot from the Hugging Face Hub into a local directory.

    python utils/download_to_local.py --model_name TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T \
        --save_dir models [--revision main]

The snapshot lands in {save_dir}/{repo name}, e.g. models/TinyLlama-1.1B-intermediate-step-1431k-3T,
the path the converters and shell scripts expect. Interrupted downloads resume.
The paper's base models:
  TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
  meta-llama/Llama-3.2-1B                      (gated: accept the licence, `hf auth login`)
  allenai/OLMo-2-0425-1B --revision stage1-step1907359-tokens4001B  (saved as OLMo-2-0425-1B-step1907359)
"""

import argparse
import sys
from pathlib import Path

# name -> (Hub id, revision, local folder name the shell scripts expect)
PAPER_MODELS = {
    "tinyllama": ("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", None, None),
    "llama": ("meta-llama/Llama-3.2-1B", None, None),
    "olmo": ("allenai/OLMo-2-0425-1B", "stage1-step1907359-tokens4001B", "OLMo-2-0425-1B-step1907359"),
}


def target_dir(model_name: str, save_dir: str, folder: str | None = None) -> Path:
    return Path(save_dir) / (folder or model_name.rstrip("/").split("/")[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Download a HF model snapshot to a local directory.")
    parser.add_argument("--model_name", required=True, help=f"Hub id, or one of {', '.join(PAPER_MODELS)}")
    parser.add_argument("--save_dir", default="models", help="parent directory (default: models)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit")
    parser.add_argument("--folder", default=None, help="local folder name (default: the repo name)")
    parser.add_argument("--dry_run", action="store_true", help="print what would be downloaded and exit")
    args = parser.parse_args(argv)
    if args.model_name in PAPER_MODELS:
        name, revision, folder = PAPER_MODELS[args.model_name]
        args.model_name, args.revision, args.folder = name, args.revision or revision, args.folder or folder
    if "/" not in args.model_name:
        parser.error(f"--model_name {args.model_name!r} is not a Hub id (owner/name) or one of {', '.join(PAPER_MODELS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = target_dir(args.model_name, args.save_dir, args.folder)
    print(f"{args.model_name} (revision {args.revision or 'main'}) -> {out}")
    if args.dry_run:
        return 0
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=args.model_name, revision=args.revision, local_dir=out)
    print(f"downloaded to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
