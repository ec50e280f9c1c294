#!/usr/bin/env bash
# Stream a completion from a checkpoint: bash shells/generate.sh MODEL_DIR "prompt" [generate.py flags...]
# e.g. bash shells/generate.sh runs/quickstart/recurrent/final_checkpoint "Q: ..." --num_steps 8 --adaptive 1e-3
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: bash shells/generate.sh MODEL_DIR PROMPT [--num_steps R] [--max_new_tokens N] [--adaptive T]" >&2
  exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
model_dir=$1 prompt=$2
shift 2
exec "${PYTHON:-python}" "$here/generate.py" "$model_dir" --prompt "$prompt" "$@"
