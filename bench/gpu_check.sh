#!/usr/bin/env bash
# One prepared GPU check (no installs; < 5 minutes on an H200): bf16 training tokens/s and MFU of a
# TinyLlama-shaped (4,8,4) recurrent model at mean recurrence 4 and 32, eager vs torch.compile,
# and the SDPA kernel used. Run on a lent device machine from the repo root:
#   bash bench/gpu_check.sh            (uses python3, which holds torch + transformers there)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The device image has torch + transformers but not this package installed: import it from the checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 290 "$PYTHON" bench/gpu_check.py
