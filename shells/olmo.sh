#!/usr/bin/env bash
# The paper's OLMo-2-0425-1B runs (stage 1, step 1907359): the recurrent model is (4,6,4),
# layers 0-3, 6-11, 12-15 (`bash shells/preprocess/models.sh convert-olmo-4-6-4` makes it; the authors released
# smcleish/Recurrent-OLMo-2-0425-untrained).
#
#   bash shells/olmo.sh --list
#   bash shells/olmo.sh math-rec32 --dry-run
set -euo pipefail
# shellcheck source=shells/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

JOB_PREFIX=olmo
EXPERIMENT_INTRO="OLMo-2-1B runs of McLeish et al. 2025: figures 6 and 7."

RECURRENT=smcleish/Recurrent-OLMo-2-0425-untrained
# Nemotron-CC-Math 4+ tokenized with the OLMo-2 tokenizer, relative to $PROCESSED_DATA_PATH.
MATH=smcleish/Recurrent-OLMo-2-0425-untrained/olmo_2_0425_1b_packed_nemotron_cc_math_v1_4plus_wrapped_packing_10_splits/dataset

# ------------------------------------------------------------------ Figures 6 and 7: math
for rec in 4 8 16 32; do
    experiment "math-rec$rec" 16 4 "Fig. 6/7: (4,6,4) on math, 1-sqrt curriculum over 75% to mean recurrence $rec" \
        math_recurrent "$RECURRENT" "$MATH" "$rec"
done
# The static baseline is the base model at the same stage-1 checkpoint.
math_static_olmo() { math_static "${MODELS_DIR:-models}/OLMo-2-0425-1B-step1907359" "$MATH"; }
experiment math-static 16 4 "Fig. 6/7: math, non-recurrent OLMo-2-1B baseline" math_static_olmo

experiments_main "$@"
