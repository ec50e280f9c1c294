#!/usr/bin/env bash
# The paper's Llama-3.2-1B runs: (2,4,2) = layers 0-1, 10-13, 14-15 for the long pretraining
# runs and the curriculum study; (4,6,4) = layers 0-3, 6-11, 12-15 for the math runs
# (`bash shells/preprocess/models.sh convert-llama-2-4-2` / `convert-llama-4-6-4` make them; the authors released
# smcleish/Recurrent-Llama-3.2-2-4-2-untrained and smcleish/Recurrent-Llama-3.2-untrained).
#
#   bash shells/llama.sh --list
#   bash shells/llama.sh math-rec32 --dry-run
set -euo pipefail
# shellcheck source=shells/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

JOB_PREFIX=llama
EXPERIMENT_INTRO="Llama-3.2-1B runs of McLeish et al. 2025: figures 2, 3 and 7."

RECURRENT_242=smcleish/Recurrent-Llama-3.2-2-4-2-untrained
RECURRENT_464=smcleish/Recurrent-Llama-3.2-untrained
# Parquet data sets, relative to $PROCESSED_DATA_PATH (both tokenized with the Llama-3 tokenizer).
FINEWEB=smcleish/Recurrent-Llama-3.2-2-4-2-untrained/llama_1b_packed_350b_sample_wrapped_packing/dataset
MATH=smcleish/Recurrent-Llama-3.2-2-4-2-untrained/llama_1b_packed_nemotron_cc_math_v1_4plus_wrapped_packing/dataset

# ------------------------------------------------------------------ Figure 2: long runs
# (2,4,2) on FineWeb-Edu for 250B tokens without a curriculum, from Llama's layers or from a
# random init. No cooldown, LR warmup 0.008%.
long_run() {  # [flags...]
    require_config PROCESSED_DATA_PATH
    JOB_CMD=("${TRAIN_FLAGS[@]}" --model_name="$RECURRENT_242" --preprocessed_data_path="$PROCESSED_DATA_PATH/$FINEWEB"
        --scheduler_args.cooldown=0.0 --scheduler_args.warmup=0.00008 --batch_size=16
        --save_n_mins_before_timeout=10 --parquet_dataset_max_tokens=250_000_000_000 "$@")
}
experiment long-pretrained 64 4 "Fig. 2: (2,4,2) initialised from Llama-3.2-1B, 250B tokens" long_run
experiment long-scratch 64 4 "Fig. 2: (2,4,2) from a random init, 250B tokens" long_run --init_from_scratch=true

# ------------------------------------------------------------------ Figure 3: curriculum period
# (2,4,2), 25k steps, curriculum linear over the first 12.5% up to 32; vary the period with
#   bash shells/llama.sh curriculum-period -- --mean_recurrence_schedule.warmup=0.25
curriculum_period() {
    require_config PROCESSED_DATA_PATH
    JOB_CMD=("${TRAIN_FLAGS[@]}" --model_name="$RECURRENT_242" --preprocessed_data_path="$PROCESSED_DATA_PATH/$FINEWEB"
        --scheduler_args.cooldown=0.0 --scheduler_args.warmup=0.005 --batch_size=128 --max_steps=25000
        --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.125
        --save_n_mins_before_timeout=5)
}
experiment curriculum-period 1 4 "Fig. 3: (2,4,2), recurrence curriculum over the first 12.5%" curriculum_period

# ------------------------------------------------------------------ Figure 7: math
for rec in 4 8 16 32; do
    experiment "math-rec$rec" 16 4 "Fig. 7: (4,6,4) on math, 1-sqrt curriculum over 75% to mean recurrence $rec" \
        math_recurrent "$RECURRENT_464" "$MATH" "$rec"
done
# The static baseline is Llama-3.2-1B with its tied embeddings untied (utils/untie_embeds_hf.py).
math_static_llama() { math_static "${MODELS_DIR:-models}/Llama-3.2-1B-untied" "$MATH"; }
experiment math-static 16 4 "Fig. 7: math, non-recurrent Llama-3.2-1B (untied) baseline" math_static_llama

experiments_main "$@"
