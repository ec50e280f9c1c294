#!/usr/bin/env bash
# Stream a completion from a checkpoint (generate.py; docs/evaluation.md, Generating text):
#
#   bash shells/generate.sh MODEL_DIR PROMPT [generate.py flags...]
#
# e.g. on the quickstart's recurrent model, in the Q:/A: format of its synthetic corpus (no chat format):
#   bash shells/generate.sh runs/quickstart/runs/recurrent/final_checkpoint \
#       $'Q: Ava has 23 books. Ava buys 30 more and then gives away 9. How many books does Ava have now?\nA:' \
#       --no_chat --num_steps 8 --max_new_tokens 40
# Environment: PYTHON (default: the repo's .venv, else python3); OMP_WAIT_POLICY (default PASSIVE).
set -euo pipefail
# shellcheck source=shells/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"  # REPO_ROOT, die, use_repo_python, passive_openmp_wait
if [[ $# -lt 2 ]]; then
    die "usage: bash shells/generate.sh MODEL_DIR PROMPT [--num_steps R] [--max_new_tokens N] [--adaptive T | --compile] (python generate.py --help lists every flag)"
fi
use_repo_python
passive_openmp_wait
model_dir=$1 prompt=$2
shift 2
exec "$PYTHON" "$REPO_ROOT/generate.py" "$model_dir" --prompt "$prompt" "$@"
