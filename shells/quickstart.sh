#!/usr/bin/env bash
# shellcheck disable=SC2317  # the stage functions below are called through side_by_side
# The bundled tiny default: the whole pipeline, end to end, on CPU, offline, in minutes.
#
#   bash shells/quickstart.sh [OUT_DIR]          # default OUT_DIR: runs/quickstart
#
# Stages (each is the script and flags a cluster user runs; each is skipped when its output exists,
# so a rerun resumes where an interrupted one stopped and a finished folder reruns in seconds):
#   data        utils/make_synthetic_data.py   GSM8K-style arithmetic corpus, tokenizer, base Llama config, eval sets
#   pack        preprocess_data_packing.py     tokenize + wrapped packing into rows of max_length + 1
#   parquet     utils/to_parquet.py            training shards + one held-out validation shard (val/)
#   pretrain    train.py --non_recurrent_model=true --init_from_scratch=true: the "pretrained" Llama
#   convert     convert_pretrained_model/convert_llama.py   prelude 0-1 | recurrent block 4-5 | coda 6-7
#   train       train.py, two runs side by side (half the threads each), same steps and tokens:
#                 recurrent  --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup_type=1-sqrt
#                 baseline   --non_recurrent_model=true on the pretrained model
#   val_loss    multi_recurrence_eval.py (recurrent, depths 1..16) and the same loss for the static models
#   lm_eval     shells/eval.sh: a local gsm8k_cot_sean-format task and a multiple-choice task,
#               recurrent model at recurrences 1 4 8, baseline once
#   report      plot_evals.py (accuracy vs recurrence / step / FLOPs), loss vs recurrence, and
#               OUT_DIR/summary.md: steps, FLOPs (param_counter.py), losses, accuracies, stage times;
#               how each run trained comes from the run.json train.py writes, never from flags here
#
# Knobs (environment; the defaults take about 11 minutes on 2 busy cores, 3 on quiet ones; the README's table):
#   QUICKSTART_NUM_PROBLEMS=20000  training problems       QUICKSTART_HIDDEN=64      base Llama width (8 layers)
#   QUICKSTART_PRETRAIN_STEPS=300  pretraining steps       QUICKSTART_STEPS=200      recurrent / baseline steps
#   QUICKSTART_BATCH=16            rows per step           QUICKSTART_MAX_LENGTH=128 tokens per row
#   QUICKSTART_MAX_REC=8           curriculum's final mean recurrence (1-sqrt over half the steps)
#   QUICKSTART_BACKPROP=4          mean backprop depth     QUICKSTART_LOSS_RECS=1,...,16  val-loss depths
#   QUICKSTART_EVAL_RECS="1 4 8"   lm-eval recurrences     QUICKSTART_LIMIT=50       lm-eval documents per task
#   QUICKSTART_VAL_SEQUENCES=256   validation rows         QUICKSTART_THREADS=nproc  torch threads per stage
#   QUICKSTART_NUM_TEST=200        held-out test problems (the lm-eval tasks' documents)
#   QUICKSTART_MODE=               how the recurrent run trains (docs/training.md, "Bigger bases and cheaper
#                                  training"): empty = as the paper (default); lora = per-iteration LoRA
#                                  deltas, rank 8; fsdp = 2 processes sharded with FSDP2 (same tokens per
#                                  step: QUICKSTART_BATCH / 2 rows per rank); distill = KL to the pretrained
#                                  parent added to the loss (alpha 0.5, temperature 2)
#   PYTHON=.venv/bin/python (if present, else python3)   OMP_WAIT_POLICY=PASSIVE
set -euo pipefail
{  # the whole script is read before it runs, so editing this file never disturbs a running quickstart

# shellcheck source=shells/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"  # REPO_ROOT, die, use_repo_python, passive_openmp_wait
cd "$REPO_ROOT"

[[ $# -le 1 ]] || die "usage: bash shells/quickstart.sh [OUT_DIR] (got $# arguments)"
OUT="${1:-runs/quickstart}"

use_repo_python

NUM_PROBLEMS="${QUICKSTART_NUM_PROBLEMS:-20000}"
NUM_TEST="${QUICKSTART_NUM_TEST:-200}"
HIDDEN="${QUICKSTART_HIDDEN:-64}"
PRETRAIN_STEPS="${QUICKSTART_PRETRAIN_STEPS:-300}"
STEPS="${QUICKSTART_STEPS:-200}"
BATCH="${QUICKSTART_BATCH:-16}"
MAX_LENGTH="${QUICKSTART_MAX_LENGTH:-128}"
MAX_REC="${QUICKSTART_MAX_REC:-8}"
BACKPROP="${QUICKSTART_BACKPROP:-4}"
CURRICULUM_WARMUP=0.5
LOSS_RECS="${QUICKSTART_LOSS_RECS:-1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16}"
EVAL_RECS="${QUICKSTART_EVAL_RECS:-1 4 8}"
LIMIT="${QUICKSTART_LIMIT:-50}"
VAL_SEQUENCES="${QUICKSTART_VAL_SEQUENCES:-256}"
THREADS="${QUICKSTART_THREADS:-$(nproc 2>/dev/null || echo 2)}"
MODE="${QUICKSTART_MODE:-}"
for name in NUM_PROBLEMS NUM_TEST HIDDEN PRETRAIN_STEPS STEPS BATCH MAX_LENGTH MAX_REC BACKPROP LIMIT VAL_SEQUENCES THREADS; do
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || die "QUICKSTART_$name='${!name}' is not a positive integer"
done
case "$MODE" in
    "" | lora | distill) ;;
    fsdp) (( BATCH % 2 == 0 )) || die "QUICKSTART_MODE=fsdp splits QUICKSTART_BATCH=$BATCH rows over 2 processes: use an even number" ;;
    *) die "QUICKSTART_MODE='$MODE' is not one of: lora, fsdp, distill (or empty for the default)" ;;
esac
read -r -a EVAL_REC_LIST <<< "${EVAL_RECS//,/ }"
[[ ${#EVAL_REC_LIST[@]} -gt 0 ]] || die "QUICKSTART_EVAL_RECS is empty"
for r in "${EVAL_REC_LIST[@]}"; do
    [[ "$r" =~ ^[1-9][0-9]*$ ]] || die "QUICKSTART_EVAL_RECS: '$r' is not a positive integer"
done
# Weights every fifth of a run, a resumable full checkpoint every two fifths: an interrupted run resumes.
save_interval() { echo $(( $1 / 5 > 0 ? $1 / 5 : 1 )); }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# Offline by construction; passive OpenMP waiting keeps a busy machine from thrashing (spinning
# threads of two processes fight for the same cores otherwise).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
passive_openmp_wait
export OMP_NUM_THREADS="$THREADS" PYTHONUNBUFFERED=1
export WANDB_MODE=disabled MPLBACKEND=Agg
PAR_THREADS=$(( THREADS / 2 > 0 ? THREADS / 2 : 1 ))  # per process when two stages share the machine

DATA="$OUT/data"
PACKED="$OUT/packed/llama_huginn_preprocessed_data_packed_wrapped/tokenizer/quickstart/dataset"
PARQUET="$OUT/parquet"
RUNS="$OUT/runs"
PRETRAINED="$RUNS/pretrain/final_checkpoint"
CONVERTED="$OUT/models/recurrent-2-2-2"
RECURRENT="$RUNS/recurrent/final_checkpoint"
BASELINE="$RUNS/baseline/final_checkpoint"
LOSS_DIR="$OUT/loss_over_rec_eval"
LOGS="$OUT/logs"
TIMES="$OUT/stage_times.tsv"
mkdir -p "$LOGS" && touch "$TIMES"

ran_any=0
log() { echo "[quickstart $(date +%H:%M:%S)] $*"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
record() { printf '%s\t%s\n' "$1" "$2" >> "$TIMES"; }

# exists PATTERN: some path matches the glob PATTERN (a plain path matches itself).
exists() { compgen -G "$1" > /dev/null; }

# stage NAME MARKER CMD...: run CMD (output to logs/NAME.log) unless MARKER (a path or glob) exists;
# CMD must create it.
stage() {
    local name="$1" marker="$2"; shift 2
    if exists "$marker"; then
        log "skip $name: ${marker#"$OUT"/} exists"
        return 0
    fi
    log "$name ... (log: ${LOGS#"$REPO_ROOT"/}/$name.log)"
    local start; start=$(now)
    if ! "$@" > "$LOGS/$name.log" 2>&1; then
        tail -n 30 "$LOGS/$name.log" >&2
        echo "error: stage $name failed (full log: $LOGS/$name.log); rerun the same command to resume" >&2
        exit 1
    fi
    exists "$marker" || { tail -n 30 "$LOGS/$name.log" >&2; echo "error: stage $name finished without writing $marker" >&2; exit 1; }
    local seconds; seconds=$(elapsed "$start" "$(now)")
    record "$name" "$seconds"
    ran_any=1
    log "$name done in ${seconds}s"
}

train_common=(--is_parquet_dataset=true --preprocessed_data_path="$PARQUET" --max_length="$MAX_LENGTH"
    --micro_batch_size="$BATCH" --batch_size="$BATCH" --epochs=100
    --scheduler_args.warmup=0.05 --scheduler_args.cooldown=0.3 --device=cpu --wandb_disabled=true
    --out_path="$RUNS" --resume_path=auto)

total_start=$(now)
log "output folder: $OUT (python: $PYTHON, $THREADS threads)"

# ---------------------------------------------------------------------------------------------- data
stage data "$DATA/synthetic_data.json" \
    "$PYTHON" utils/make_synthetic_data.py --out_dir "$DATA" --num_train "$NUM_PROBLEMS" --num_test "$NUM_TEST" \
    --hidden "$HIDDEN" --layers 8 --max_length "$MAX_LENGTH"

stage pack "$PACKED" \
    "$PYTHON" preprocess_data_packing.py --tokenizer_name="$DATA/tokenizer" --dataset_location="$DATA/text_dataset" \
    --out_path=quickstart --save_path="$OUT/packed" --cache_path="$OUT/packed/cache" --max_length="$MAX_LENGTH" \
    --num_proc="$THREADS"

stage parquet "$PARQUET/val" \
    "$PYTHON" utils/to_parquet.py --dataset_path "$PACKED" --dataset_save_dir "$PARQUET" \
    --num_shards 9 --val_shards 1 --row_group_size 256

# ------------------------------------------------------------------------------ pretrain and convert
stage pretrain "$PRETRAINED/config.json" \
    "$PYTHON" train.py --model_name="$DATA/base_config" --non_recurrent_model=true --init_from_scratch=true \
    --run_name=pretrain --max_steps="$PRETRAIN_STEPS" --save_interval="$(save_interval "$PRETRAIN_STEPS")" --optim_config.lr=3e-3 --optim_config.weight_decay=0.01 \
    "${train_common[@]}"

stage convert "$CONVERTED/config.json" \
    "$PYTHON" convert_pretrained_model/convert_llama.py --model_name "$PRETRAINED" --save_name "$CONVERTED" \
    --prelude_idx 0-1 --core_idx 4-5 --coda_idx 6-7 --dtype float32 \
    --mean_recurrence "$MAX_REC" --mean_backprop_depth "$BACKPROP"

# ------------------------------------------------------- recurrent and baseline training, side by side
# QUICKSTART_MODE: flags appended to the recurrent run (a later flag overrides an earlier one).
recurrent_launch=("$PYTHON") recurrent_threads=$PAR_THREADS mode_flags=()
case "$MODE" in
    lora) mode_flags=(--lora.rank=8 --lora.per_iteration=true) ;;
    distill) mode_flags=(--distill.teacher="$PRETRAINED" --distill.alpha=0.5 --distill.temperature=2.0) ;;
    fsdp)
        recurrent_launch=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2)
        recurrent_threads=$(( PAR_THREADS / 2 > 0 ? PAR_THREADS / 2 : 1 ))
        mode_flags=(--fsdp=true --micro_batch_size=$((BATCH / 2)) --batch_size=$((BATCH / 2)))
        ;;
esac
train_recurrent() {
    OMP_NUM_THREADS=$recurrent_threads stage train_recurrent "$RECURRENT/config.json" \
        "${recurrent_launch[@]}" train.py --model_name="$CONVERTED" --run_name=recurrent --max_steps="$STEPS" --save_interval="$(save_interval "$STEPS")" \
        --optim_config.lr=1e-3 --optim_config.weight_decay=0.01 \
        --mean_recurrence_schedule.turn_on=true --mean_recurrence_schedule.warmup_type=1-sqrt \
        --mean_recurrence_schedule.warmup="$CURRICULUM_WARMUP" --mean_recurrence_schedule.max_mean_rec="$MAX_REC" \
        "${train_common[@]}" "${mode_flags[@]}"
}
train_baseline() {
    OMP_NUM_THREADS=$PAR_THREADS stage train_baseline "$BASELINE/config.json" \
        "$PYTHON" train.py --model_name="$PRETRAINED" --non_recurrent_model=true --run_name=baseline \
        --max_steps="$STEPS" --save_interval="$(save_interval "$STEPS")" --optim_config.lr=1e-3 --optim_config.weight_decay=0.01 "${train_common[@]}"
}

# both A and B are shell functions; each runs in a subshell, the pair's wall time is recorded as NAME.
side_by_side() {
    local name="$1" a="$2" b="$3" start; start=$(now)
    local ran_before; ran_before=$(wc -l < "$TIMES" 2>/dev/null || echo 0)
    "$a" & local pid_a=$!
    "$b" & local pid_b=$!
    local status=0
    wait "$pid_a" || status=1
    wait "$pid_b" || status=1
    (( status == 0 )) || exit 1
    if [[ "$(wc -l < "$TIMES" 2>/dev/null || echo 0)" != "$ran_before" ]]; then
        local seconds; seconds=$(elapsed "$start" "$(now)")
        record "$name" "$seconds"
        ran_any=1
        log "$name (both) done in ${seconds}s wall"
    fi
}
side_by_side train train_recurrent train_baseline

# -------------------------------------------------------------------------------------- evaluation
# Validation loss on the held-out shard: the recurrent model at every depth (one pass), the static
# models once (multi_recurrence_eval.py sweeps recurrent models only).
val_loss_recurrent() {
    OMP_NUM_THREADS=$PAR_THREADS stage val_loss_recurrent "$LOSS_DIR/recurrent/final_checkpoint.json" \
        "$PYTHON" multi_recurrence_eval.py "$RUNS/recurrent" final_checkpoint --eval_file_path "$PARQUET/val" \
        --recurrences "$LOSS_RECS" --num_sequences "$VAL_SEQUENCES" --batch_size 64 --device cpu --output_dir "$LOSS_DIR"
}
val_loss_static() {
    OMP_NUM_THREADS=$PAR_THREADS stage val_loss_static "$LOSS_DIR/baseline/final_checkpoint.json" \
        "$PYTHON" utils/quickstart_summary.py static-loss --eval_file_path "$PARQUET/val" --num_sequences "$VAL_SEQUENCES" \
        --model "$PRETRAINED" "$LOSS_DIR/pretrain/final_checkpoint.json" \
        --model "$BASELINE" "$LOSS_DIR/baseline/final_checkpoint.json"
}
side_by_side val_loss val_loss_recurrent val_loss_static

# lm-eval through shells/eval.sh: both tasks in its 1-shot "math" group (one lm_eval process per
# recurrence), the task files from the data stage, --limit documents per task.
EVAL_ARGS=(--device cpu --batch_size 16 --limit "$LIMIT" --groups math
    --math_tasks "quickstart_gsm8k_cot_sean,quickstart_arith_mc" --include_path "$DATA/tasks")
lm_eval_marker() { echo "$1/eval/$2/math/*/results_*.json"; }  # what one eval.sh run writes
# Two lm_eval processes at a time: the deepest recurrence alone, the rest with the baseline.
last_rec="${EVAL_REC_LIST[${#EVAL_REC_LIST[@]}-1]}"
other_recs=("${EVAL_REC_LIST[@]:0:${#EVAL_REC_LIST[@]}-1}")
lm_eval_deep() {
    OMP_NUM_THREADS=$PAR_THREADS stage "lm_eval_rec_$last_rec" "$(lm_eval_marker "$RECURRENT" "rec_$last_rec")" \
        bash shells/eval.sh "${EVAL_ARGS[@]}" --recurrences "$last_rec" "$RECURRENT"
}
lm_eval_rest() {
    local r
    for r in "${other_recs[@]}"; do
        OMP_NUM_THREADS=$PAR_THREADS stage "lm_eval_rec_$r" "$(lm_eval_marker "$RECURRENT" "rec_$r")" \
            bash shells/eval.sh "${EVAL_ARGS[@]}" --recurrences "$r" "$RECURRENT"
    done
    OMP_NUM_THREADS=$PAR_THREADS stage lm_eval_baseline "$(lm_eval_marker "$BASELINE" non_recurrent)" \
        bash shells/eval.sh "${EVAL_ARGS[@]}" --non_recurrent "$BASELINE"
}
side_by_side lm_eval lm_eval_deep lm_eval_rest

# --------------------------------------------------------------------------------- plots and summary
# How each run trained (steps, tokens per step, curriculum) is read from its run.json, written by train.py.
summary_marker="$OUT/summary.md"
if (( ran_any )); then rm -f "$summary_marker"; fi  # something new: redraw and rewrite
stage report "$summary_marker" \
    "$PYTHON" utils/quickstart_summary.py report --out_dir "$OUT" --limit "$LIMIT" --eval_recs "${EVAL_REC_LIST[*]}"

cat "$summary_marker"
if (( ran_any )); then
    log "finished in $(elapsed "$total_start" "$(now)")s; summary: $summary_marker"
else
    log "every stage was already done; summary: $summary_marker"
fi
exit 0
}
