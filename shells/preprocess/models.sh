#!/usr/bin/env bash
# The base models, as CPU jobs: download them, untie Llama-3.2's embeddings for the static
# baseline, and convert them into the paper's recurrent (prelude, recurrent block, coda) models.
# The converter checks every hidden state against the base model with the dropped layers removed
# and exits non-zero on a mismatch.
#
#   bash shells/preprocess/models.sh --list
#   bash shells/preprocess/models.sh download-tinyllama --local    # needs internet: run where you have it
#   bash shells/preprocess/models.sh convert-tinyllama-4-8-4
#
# Everything lives in $MODELS_DIR (default models/, as in the original). Train a converted model
# instead of the authors' released one with, e.g.,
#   bash shells/tinyllama.sh math-rec4 -- --model_name=$MODELS_DIR/Recurrent-TinyLlama-3T-untrained
set -euo pipefail
# shellcheck source=shells/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../_common.sh"

JOB_PREFIX=models
EXPERIMENT_INTRO="Download, untie and convert the paper's base models (layer choices: docs/model.md)."

download() {  # PAPER_MODEL (tinyllama | llama | olmo, see utils/download_to_local.py)
    JOB_CMD=(python utils/download_to_local.py --model_name="$1" --save_dir="${MODELS_DIR:-models}")
}
experiment download-tinyllama 1 0 "TinyLlama-1.1B-intermediate-step-1431k-3T -> \$MODELS_DIR" download tinyllama
experiment download-llama 1 0 "Llama-3.2-1B (gated: accept the licence first) -> \$MODELS_DIR" download llama
experiment download-olmo 1 0 "OLMo-2-0425-1B at stage1-step1907359-tokens4001B -> \$MODELS_DIR" download olmo

untie_llama() {
    local models=${MODELS_DIR:-models}
    JOB_CMD=(python utils/untie_embeds_hf.py --model_name="$models/Llama-3.2-1B" --save_name="$models/Llama-3.2-1B-untied")
}
experiment untie-llama 1 0 "Llama-3.2-1B with its lm_head untied (the static baseline of llama.sh)" untie_llama

convert() {  # SCRIPT BASE_MODEL_DIR SAVE_NAME PRESET (directories inside MODELS_DIR)
    local models=${MODELS_DIR:-models}
    JOB_CMD=(python "convert_pretrained_model/$1" --model_name="$models/$2" --save_name="$models/$3" --preset="$4")
}
experiment convert-tinyllama-4-8-4 1 0 "TinyLlama -> (4,8,4): layers 0-3, 10-17, 18-21" \
    convert convert_llama.py TinyLlama-1.1B-intermediate-step-1431k-3T Recurrent-TinyLlama-3T-untrained tinyllama-4-8-4
experiment convert-llama-2-4-2 1 0 "Llama-3.2-1B -> (2,4,2): layers 0-1, 10-13, 14-15" \
    convert convert_llama.py Llama-3.2-1B Recurrent-Llama-3.2-2-4-2-untrained llama-2-4-2
experiment convert-llama-4-6-4 1 0 "Llama-3.2-1B -> (4,6,4): layers 0-3, 6-11, 12-15" \
    convert convert_llama.py Llama-3.2-1B Recurrent-Llama-3.2-untrained llama-4-6-4
# The stage-1 OLMo snapshot lives in models/OLMo-2-0425-1B-step1907359, as in the original:
# download-olmo saves it there (utils/download_to_local.py), olmo.sh's static baseline reads it there.
experiment convert-olmo-4-6-4 1 0 "OLMo-2-0425-1B step 1907359 -> (4,6,4): layers 0-3, 6-11, 12-15" \
    convert convert_olmo.py OLMo-2-0425-1B-step1907359 Recurrent-OLMo-2-0425-untrained olmo-4-6-4

experiments_main "$@"
