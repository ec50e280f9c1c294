#!/usr/bin/env bash
# One prepared GPU check, at most 10 minutes on one GPU (no installs): bf16 training tokens/s, MFU
# and peak memory of a TinyLlama-shaped (4,8,4) recurrent model at mean recurrence 32, backprop
# depth 8, eager and per-layer compiled; cached generation tokens/s at recurrence 32 for batch 1
# and 32 against HF Llama with as many layers. Run on a lent device machine from the repo root:
#   bash bench/gpu_check.sh            (uses python3, which holds torch + transformers there)
# Extra arguments go to bench/gpu_check.py (e.g. --peak_tflops 989).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The device image has torch + transformers but not this package installed: import it from the checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 570 "$PYTHON" bench/gpu_check.py "$@"
