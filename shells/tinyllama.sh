#!/usr/bin/env bash
# The paper's TinyLlama-1.1B (3T tokens) runs. The recurrent model is (4,8,4): layers 0-3, 10-17
# and 18-21 (`bash shells/preprocess/models.sh convert-tinyllama-4-8-4` makes it; the authors released it as
# smcleish/Recurrent-TinyLlama-3T-untrained).
#
#   bash shells/tinyllama.sh --list
#   bash shells/tinyllama.sh math-rec16 --dry-run
#   bash shells/tinyllama.sh math-rec16 -- --max_steps=100      # extra train.py flags
#
# Global batch = batch_size x GPUs x 1024 tokens = 2^20, so keep nodes x GPUs the same (e.g.
# --nodes 4 --gpus 8 for 8x4) on nodes with another GPU count.
set -euo pipefail
# shellcheck source=shells/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

JOB_PREFIX=tinyllama
EXPERIMENT_INTRO="TinyLlama (4,8,4) runs of McLeish et al. 2025: figures 4, 5, 7, 8 and the curriculum appendix."

RECURRENT=smcleish/Recurrent-TinyLlama-3T-untrained
BASE=TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
# Parquet data sets, relative to $PROCESSED_DATA_PATH.
FINEWEB=smcleish/Recurrent-TinyLlama-3T-untrained/tinyllama_1_1b_packed_350b_sample_wrapped_packing/dataset
MATH=smcleish/Recurrent-TinyLlama-3T-untrained/tinyllama_1_1b_packed_nemotron_cc_math_v1_4plus_wrapped_packing/dataset
MIX=smcleish/Recurrent-TinyLlama-3T-untrained/fineweb_nemotron_sft_general_math_even_mix/dataset

# ------------------------------------------------------------------ Figure 4: optimizers
# FineWeb-Edu, cooldown 90%, curriculum linear over the first 25% up to 32.
optimizer_run() {  # WARMUP MAX_STEPS [optimizer flags...]
    require_config PROCESSED_DATA_PATH
    JOB_CMD=("${TRAIN_FLAGS[@]}" --model_name="$RECURRENT" --preprocessed_data_path="$PROCESSED_DATA_PATH/$FINEWEB"
        --scheduler_args.cooldown=0.9 --scheduler_args.warmup="$1" --batch_size=32 --max_steps="$2"
        --save_n_mins_before_timeout=5
        --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.25 "${@:3}")
}
experiment optimizer-muon 8 4 "Fig. 4: Muon (lr 1e-3) + AdamW (5e-5), 25k steps" \
    optimizer_run 0.005 25000 "${MUON_FLAGS[@]}"
experiment optimizer-adamw 8 4 "Fig. 4: AdamW (5e-5), 30k steps" \
    optimizer_run 0.0042 30000
experiment optimizer-ellisadam 8 4 "Fig. 4: AdamW* (Huginn's ELLIS-Adam), 25k steps" \
    optimizer_run 0.005 25000 --ellis_adam.enabled=true

# ------------------------------------------------------------------ Figures 5 and 7: math
for rec in 4 8 16 32; do
    experiment "math-rec$rec" 16 4 "Fig. 5/7: math, 1-sqrt curriculum over 75% to mean recurrence $rec" \
        math_recurrent "$RECURRENT" "$MATH" "$rec"
done
experiment math-static 16 4 "Fig. 5/7: math, non-recurrent TinyLlama baseline" \
    math_static "$BASE" "$MATH"

# ------------------------------------------------------------------ appendix: curriculum shape
# math-rec4 with a linear curriculum over 75% or 100% of training (math-rec4 itself is the
# 75% 1-sqrt curve of the same figure).
experiment curriculum-linear-75 16 4 "Curriculum appendix: math-rec4 with a linear curriculum over 75%" \
    math_recurrent "$RECURRENT" "$MATH" 4 0.75 linear
experiment curriculum-linear-100 16 4 "Curriculum appendix: math-rec4 with a linear curriculum over 100%" \
    math_recurrent "$RECURRENT" "$MATH" 4 1.0 linear

# ------------------------------------------------------------------ Figure 8: data mix
# 25k steps per phase, cooldown 90%. Single phase: the FineWeb-Edu + Nemotron SFT mix. Two phase:
# FineWeb-Edu, then the mix starting from phase one's last model-only checkpoint (phase one keeps
# the original run names, which phase two reads).
mix_run() {  # DATA MODEL [flags...]
    require_config PROCESSED_DATA_PATH
    JOB_CMD=("${TRAIN_FLAGS[@]}" --model_name="$2" --preprocessed_data_path="$PROCESSED_DATA_PATH/$1"
        --scheduler_args.cooldown=0.9 --scheduler_args.warmup=0.005 --batch_size=32 --max_steps=25000
        --save_n_mins_before_timeout=5 "${@:3}" "${MUON_FLAGS[@]}")
}
STATIC=(--non_recurrent_model=true)
CURRICULUM=(--mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup=0.25)
PHASE1_STATIC=huginn_llama/first_phase_non_rec/model_only_chkpt_25000
PHASE1_RECURRENT=huginn_llama/first_phase_4_8_4/model_only_chkpt_25000

experiment mix-single-static 8 4 "Fig. 8: single phase on the mix, non-recurrent" \
    mix_run "$MIX" "$BASE" "${STATIC[@]}"
experiment mix-single-recurrent 8 4 "Fig. 8: single phase on the mix, (4,8,4) to mean recurrence 4" \
    mix_run "$MIX" "$RECURRENT" "${CURRICULUM[@]}" --mean_recurrence_schedule.max_mean_rec=4
experiment mix-phase1-static 8 4 "Fig. 8: two phase, phase one on FineWeb-Edu, non-recurrent" \
    mix_run "$FINEWEB" "$BASE" "${STATIC[@]}" --run_name=first_phase_non_rec
# As in the original scripts, phase one keeps the default maximum mean recurrence (32).
experiment mix-phase1-recurrent 8 4 "Fig. 8: two phase, phase one on FineWeb-Edu, (4,8,4)" \
    mix_run "$FINEWEB" "$RECURRENT" "${CURRICULUM[@]}" --run_name=first_phase_4_8_4
experiment mix-phase2-static 8 4 "Fig. 8: two phase, phase two on the mix after mix-phase1-static" \
    mix_run "$MIX" "$PHASE1_STATIC" "${STATIC[@]}"
experiment mix-phase2-recurrent 8 4 "Fig. 8: two phase, phase two on the mix after mix-phase1-recurrent" \
    mix_run "$MIX" "$PHASE1_RECURRENT" "${CURRICULUM[@]}" --mean_recurrence_schedule.max_mean_rec=4

experiments_main "$@"
