#!/usr/bin/env bash
# Evaluate checkpoints with lm-eval at several test-time recurrences (docs/evaluation.md).
#
#   bash shells/eval.sh [options] CHECKPOINT_DIR [CHECKPOINT_DIR ...] [-- EXTRA LM_EVAL ARGS]
#
# For every checkpoint, every recurrence R and every task group, one lm_eval run:
#   zeroshot  lambada_openai,hellaswag,arc_easy,arc_challenge,mmlu,openbookqa,piqa,social_iqa,winogrande,asdiv
#             (task defaults = 0-shot; batch size auto)
#   math      gsm8k_cot_sean,minerva_math, 1-shot, max_length=1024 (batch size 32)
# with --model hf --model_args pretrained=CKPT,mean_recurrence=R,trust_remote_code=True,add_bos_token=B,dtype=float32
# writing {CKPT}/eval/rec_{R}/{group}/<model>/results_<time>.json, the layout plot_evals.py reads
# (--non_recurrent: no mean_recurrence, {CKPT}/eval/non_recurrent/{group}/). Runs whose results
# already exist (same tasks, same --limit) are skipped, so an interrupted sweep just reruns.
#
# Options:
#   --recurrences "1 2 4 8 16 32"   test recurrences (spaces or commas)
#   --groups zeroshot,math          which task groups
#   --zeroshot_tasks LIST           replace the zero-shot task list
#   --math_tasks LIST               replace the math task list
#   --batch_size B                  lm-eval batch size for every group (default: auto / 32)
#   --device DEV                    auto (default: cuda if available, else cpu), cpu, cuda, cuda:1, ...
#   --limit N                       only N documents per task (testing only)
#   --include_path DIR              extra lm-eval task folder (repeatable; eval_yamls/ is always in)
#   --non_recurrent                 a non-recurrent baseline: no mean_recurrence, one run per group
#   --dry_run                       print the lm_eval commands that would run, run nothing
#   --add_bos_token auto|true|false start every context with BOS (auto: when the tokenizer adds BOS
#                                   itself, as in training, or its BOS is its EOS, as OLMo-2's)
# Environment: PYTHON, the interpreter with lm-eval installed (default: the repo's .venv, else python3);
# OMP_WAIT_POLICY (default PASSIVE: see retrofit/openmp.py).
# Example, on the quickstart's recurrent model (CPU, 5 documents per task, about a minute):
#   bash shells/eval.sh --recurrences 1,4 --groups math --limit 5 --batch_size 8 \
#       --math_tasks quickstart_gsm8k_cot_sean --include_path runs/quickstart/data/tasks runs/quickstart/runs/recurrent/final_checkpoint
# The two groups are independent: run them at once on two GPUs with
#   CUDA_VISIBLE_DEVICES=0 bash shells/eval.sh --groups zeroshot CKPT & CUDA_VISIBLE_DEVICES=1 bash shells/eval.sh --groups math CKPT
set -euo pipefail

# shellcheck source=shells/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"  # REPO_ROOT, die, use_repo_python, passive_openmp_wait
use_repo_python
passive_openmp_wait

RECURRENCES="1 2 4 8 16 32"
TASK_GROUPS="zeroshot,math"
ZEROSHOT_TASKS="lambada_openai,hellaswag,arc_easy,arc_challenge,mmlu,openbookqa,piqa,social_iqa,winogrande,asdiv"
MATH_TASKS="gsm8k_cot_sean,minerva_math"
BATCH_SIZE=""
DEVICE="auto"
LIMIT=""
INCLUDE_PATHS=()
NON_RECURRENT=0
DRY_RUN=0
ADD_BOS="auto"
CHECKPOINTS=()
EXTRA_ARGS=()

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --recurrences) need_value "$@"; RECURRENCES="$2"; shift 2 ;;
        --groups) need_value "$@"; TASK_GROUPS="$2"; shift 2 ;;
        --zeroshot_tasks) need_value "$@"; ZEROSHOT_TASKS="$2"; shift 2 ;;
        --math_tasks) need_value "$@"; MATH_TASKS="$2"; shift 2 ;;
        --batch_size) need_value "$@"; BATCH_SIZE="$2"; shift 2 ;;
        --device) need_value "$@"; DEVICE="$2"; shift 2 ;;
        --limit) need_value "$@"; LIMIT="$2"; shift 2 ;;
        --include_path) need_value "$@"; INCLUDE_PATHS+=("$2"); shift 2 ;;
        --non_recurrent) NON_RECURRENT=1; shift ;;
        --dry_run) DRY_RUN=1; shift ;;
        --add_bos_token) need_value "$@"; ADD_BOS="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; EXTRA_ARGS=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) CHECKPOINTS+=("$1"); shift ;;
    esac
done

[[ ${#CHECKPOINTS[@]} -gt 0 ]] || die "no checkpoint directory given (usage: bash shells/eval.sh [options] CHECKPOINT_DIR ...)"
for i in "${!CHECKPOINTS[@]}"; do
    ckpt="${CHECKPOINTS[$i]}"
    [[ -d "$ckpt" ]] || die "checkpoint directory $ckpt does not exist"
    [[ -f "$ckpt/config.json" ]] || die "checkpoint directory $ckpt has no config.json (not a saved model)"
    CHECKPOINTS[i]="$(cd "$ckpt" && pwd)"  # absolute: lm-eval records it in config.model_args
done

read -r -a REC_LIST <<< "${RECURRENCES//,/ }"
[[ ${#REC_LIST[@]} -gt 0 ]] || die "--recurrences is empty"
for r in "${REC_LIST[@]}"; do
    [[ "$r" =~ ^[0-9]+$ ]] || die "recurrence '$r' is not an integer"
    (( r >= 1 )) || die "recurrence $r is < 1: every test recurrence needs at least one iteration"
done
if (( NON_RECURRENT )); then REC_LIST=("none"); fi

read -r -a GROUP_LIST <<< "${TASK_GROUPS//,/ }"
[[ ${#GROUP_LIST[@]} -gt 0 ]] || die "--groups is empty"
for g in "${GROUP_LIST[@]}"; do
    [[ "$g" == zeroshot || "$g" == math ]] || die "unknown task group '$g' (choose zeroshot and/or math)"
done
[[ -z "$LIMIT" || "$LIMIT" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--limit '$LIMIT' is not a number"
[[ -z "$LIMIT" || ! "$LIMIT" =~ ^0*(\.0*)?$ ]] || die "--limit $LIMIT evaluates no document; pass N >= 1 (or a fraction > 0)"
[[ -z "$BATCH_SIZE" || "$BATCH_SIZE" == auto || "$BATCH_SIZE" =~ ^auto:[1-9][0-9]*$ || "$BATCH_SIZE" =~ ^[1-9][0-9]*$ ]] \
    || die "--batch_size '$BATCH_SIZE' must be a positive integer, auto or auto:N"
[[ "$ADD_BOS" =~ ^(auto|true|false)$ ]] || die "--add_bos_token must be auto, true or false, got '$ADD_BOS'"

if (( ! DRY_RUN )); then
    "$PYTHON" -c "import lm_eval" 2>/dev/null || die "lm-eval is not installed for $PYTHON (pip install -r requirements.txt, or set PYTHON=/path/to/python)"
fi
# auto -> cuda if available, else cpu; a CUDA device on a machine without one is a one-line error.
# The rule train.py, generate.py and multi_recurrence_eval.py use (retrofit/train/distributed.py).
RESOLVE_DEVICE_PY='
import sys
from retrofit.train.distributed import LaunchError, resolve_device
try:
    print(resolve_device(sys.argv[1]))
except LaunchError as err:
    sys.exit(f"error: {err}")
'
DEVICE="$(cd "$REPO_ROOT" && "$PYTHON" -c "$RESOLVE_DEVICE_PY" "$DEVICE")" || exit 2

# lm-eval takes one --include_path: several folders are mirrored (symlinks) under one temp folder.
INCLUDE="$REPO_ROOT/eval_yamls"
if [[ ${#INCLUDE_PATHS[@]} -gt 0 ]]; then
    INCLUDE="$(mktemp -d "${TMPDIR:-/tmp}/eval_tasks.XXXXXX")"
    trap 'rm -rf "$INCLUDE"' EXIT
    cp -rs "$REPO_ROOT/eval_yamls" "$INCLUDE/eval_yamls"
    for i in "${!INCLUDE_PATHS[@]}"; do
        path="${INCLUDE_PATHS[$i]}"
        [[ -d "$path" ]] || die "--include_path $path is not a directory"
        cp -rs "$(cd "$path" && pwd)" "$INCLUDE/extra_$i"
    done
fi

# run_done FOLDER TASKS: exit 0 when FOLDER holds an lm-eval results JSON that covers every task in
# TASKS (as a task or group) and was run with the same --limit.
RUN_DONE_PY='
import json, sys
from pathlib import Path
folder, tasks, limit = Path(sys.argv[1]), set(sys.argv[2].split(",")), sys.argv[3]
want_limit = float(limit) if limit else None
for file in sorted(folder.rglob("results*.json")) if folder.is_dir() else []:
    try:
        data = json.loads(file.read_text())
        got = set(data["results"]) | set(data.get("groups") or {}) | set(data.get("group_subtasks") or {})
        got_limit = (data.get("config") or {}).get("limit")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        continue
    if tasks <= got and (None if got_limit is None else float(got_limit)) == want_limit:
        sys.exit(0)
sys.exit(1)
'
run_done() { "$PYTHON" -c "$RUN_DONE_PY" "$1" "$2" "$LIMIT"; }

# add_bos CKPT: True or False for lm-eval's add_bos_token (retrofit.evaluate.loss_over_depth.eval_prepends_bos);
# the paper's True when the tokenizer cannot be read (lm-eval then names the problem).
ADD_BOS_PY='
import sys
sys.path.insert(0, sys.argv[1])
from retrofit.model.loading import load_saved_tokenizer
from retrofit.evaluate.loss_over_depth import eval_prepends_bos
try:
    tokenizer = load_saved_tokenizer(sys.argv[2])
except (OSError, ValueError):
    print(True)
else:
    print(eval_prepends_bos(tokenizer))
'
add_bos() {
    case "$ADD_BOS" in
        true) echo True ;;
        false) echo False ;;
        *) "$PYTHON" -c "$ADD_BOS_PY" "$REPO_ROOT" "$1" ;;
    esac
}

ran=0
skipped=0
for ckpt in "${CHECKPOINTS[@]}"; do
    bos="$(add_bos "$ckpt")" || die "cannot read the tokenizer of $ckpt"
    for rec in "${REC_LIST[@]}"; do
        for group in "${GROUP_LIST[@]}"; do
            model_args="pretrained=$ckpt"
            if [[ "$rec" == none ]]; then
                out="$ckpt/eval/non_recurrent/$group"
            else
                out="$ckpt/eval/rec_$rec/$group"
                model_args+=",mean_recurrence=$rec"
            fi
            model_args+=",trust_remote_code=True,add_bos_token=$bos,dtype=float32"
            if [[ "$group" == zeroshot ]]; then
                tasks="$ZEROSHOT_TASKS"; batch="${BATCH_SIZE:-auto}"; group_args=()
            else
                tasks="$MATH_TASKS"; batch="${BATCH_SIZE:-32}"; group_args=(--num_fewshot 1)
                model_args+=",max_length=1024"
            fi
            if run_done "$out" "$tasks"; then
                echo "skip: $out already has results for $tasks"
                skipped=$((skipped + 1))
                continue
            fi
            cmd=("$PYTHON" -m lm_eval --model hf --model_args "$model_args" --tasks "$tasks"
                 --include_path "$INCLUDE" --device "$DEVICE" --batch_size "$batch" --output_path "$out"
                 "${group_args[@]}")
            if [[ -n "$LIMIT" ]]; then cmd+=(--limit "$LIMIT"); fi
            cmd+=("${EXTRA_ARGS[@]}")
            echo "+ ${cmd[*]}"
            if (( ! DRY_RUN )); then
                "${cmd[@]}" || die "lm_eval failed for $ckpt (recurrence $rec, group $group); rerun to resume"
                ran=$((ran + 1))
            fi
        done
    done
done
(( DRY_RUN )) || echo "done: $ran lm_eval runs, $skipped skipped"
