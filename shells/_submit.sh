#!/usr/bin/env bash
# Run one command as a multi-node job: N nodes x G GPUs, one task per GPU, on SLURM or flux,
# or right here with torchrun. Training commands (anything running train.py) get
# --resume_path=auto appended and are requeued after preemption or near the time limit, so a
# long run is a chain of jobs that each resume from the newest checkpoint that verifies.
set -euo pipefail

# shellcheck source=shells/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
    cat <<'EOF'
usage: bash shells/_submit.sh [options] -- COMMAND [ARGS...]

Submits COMMAND as one batch job (sbatch + srun, or flux batch + flux run) with one task per
GPU, or runs it here (--local). The command runs from the repository root.

options:
  --nodes N              nodes (default 1)
  --gpus G               GPUs = tasks per node (default: GPUS_PER_NODE; 1 with --local)
  --cpu                  CPU job: one task on one node, CPU partition/queue (preprocessing)
  --time T               time limit, HH:MM:SS or D-HH:MM:SS (default: DEFAULT_TIME or 24:00:00)
  --name NAME            job name (default: the command's --run_name or script name)
  --scheduler S          slurm or flux (default: SCHEDULER from the machine config)
  --requeue              requeue and resume (the default for train.py commands)
  --no-requeue           neither requeue nor append --resume_path=auto
  --fsdp                 train.py commands: shard model, gradients and optimizer state (FSDP2)
                         instead of replicating them (appends --fsdp=true)
  --local                run here with torchrun --standalone --nproc_per_node G (a SIGTERM that
                         every rank saves on ends with status 0, no traceback)
  --dry-run              print the command lines and the generated batch script, submit nothing
  -h, --help             this message

Machine config: shells/_machine_config.sh (copy shells/_machine_config.sh.example), or the file
in $MACHINE_CONFIG; environment variables override its values.

examples:
  bash shells/_submit.sh --nodes 16 --gpus 4 --time 24:00:00 -- python train.py --model_name=...
  bash shells/_submit.sh --local --gpus 2 -- python train.py --device=cpu ...
  bash shells/_submit.sh --cpu --dry-run -- python utils/to_parquet.py --dataset_path=...
EOF
}

# ---------------------------------------------------------------- arguments
nodes=1 gpus="" cpu_job=false time_limit="" job_name="" scheduler="" requeue=auto
local_run=false dry_run=false fsdp=false
CMD=()
while (($#)); do
    case "$1" in
        --nodes | --gpus | --time | --name | --scheduler)
            (($# >= 2)) || die "$1 needs a value"
            case "$1" in
                --nodes) nodes=$2 ;;
                --gpus) gpus=$2 ;;
                --time) time_limit=$2 ;;
                --name) job_name=$2 ;;
                --scheduler) scheduler=$2 ;;
            esac
            shift 2
            ;;
        --nodes=* | --gpus=* | --time=* | --name=* | --scheduler=*)
            set -- "${1%%=*}" "${1#*=}" "${@:2}"
            ;;
        --cpu) cpu_job=true; shift ;;
        --requeue) requeue=true; shift ;;
        --no-requeue) requeue=false; shift ;;
        --local) local_run=true; shift ;;
        --fsdp) fsdp=true; shift ;;
        --dry-run) dry_run=true; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; CMD=("$@"); break ;;
        *) die "unknown option '$1' (the command goes after --; see --help)" ;;
    esac
done
((${#CMD[@]})) || { usage >&2; exit 2; }

load_machine_config

is_positive_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
is_positive_int "$nodes" || die "--nodes must be a positive integer, got '$nodes'"
if [[ -n "$gpus" ]] && ! is_positive_int "$gpus"; then
    die "--gpus must be a positive integer, got '$gpus'"
fi
if $cpu_job && ((nodes != 1)); then die "--cpu jobs run on one node, got --nodes $nodes"; fi

# ---------------------------------------------------------------- train commands resume
is_train_command() {
    local arg
    for arg in "${CMD[@]}"; do
        [[ "$(basename -- "$arg")" == train.py ]] && return 0
    done
    return 1
}
if $fsdp; then
    is_train_command || die "--fsdp shards train.py's model; '${CMD[*]}' is not a train.py command"
    CMD+=(--fsdp=true)
fi
if [[ "$requeue" == auto ]]; then
    if is_train_command; then requeue=true; else requeue=false; fi
fi
if $requeue && is_train_command; then
    has_resume=false
    for arg in "${CMD[@]}"; do
        [[ "$arg" == --resume_path || "$arg" == --resume_path=* ]] && has_resume=true
    done
    $has_resume || CMD+=(--resume_path=auto)
fi

quote() { printf '%q ' "$@" | sed 's/ $//'; }

# ---------------------------------------------------------------- --local
if $local_run; then
    if ((nodes > 1)); then echo "note: --local runs on this machine only; ignoring --nodes $nodes" >&2; fi
    if $cpu_job; then
        LAUNCH=()
    else
        # torchrun, but a SIGTERM / SIGUSR1 that every rank saves on ends with status 0 and one line
        # instead of the agent's traceback and status 1 (retrofit/train/stoppable_torchrun.py)
        LAUNCH=(python -m retrofit.train.stoppable_torchrun)
        LAUNCH+=(--standalone --nproc_per_node "${gpus:-1}" --no-python)
    fi
    if $dry_run; then
        echo "cd $(quote "$REPO_ROOT") && $(quote "${LAUNCH[@]}" "${CMD[@]}")"
        exit 0
    fi
    cd "$REPO_ROOT"
    echo "+ $(quote "${LAUNCH[@]}" "${CMD[@]}")" >&2
    exec "${LAUNCH[@]}" "${CMD[@]}"
fi

# ---------------------------------------------------------------- cluster settings
scheduler=${scheduler:-${SCHEDULER:-}}
[[ -n "$scheduler" ]] || require_config SCHEDULER
[[ "$scheduler" == slurm || "$scheduler" == flux ]] || die "scheduler must be slurm or flux, got '$scheduler'"
if ! $cpu_job && [[ -z "$gpus" ]]; then
    require_config GPUS_PER_NODE
    gpus=$GPUS_PER_NODE
    is_positive_int "$gpus" || die "GPUS_PER_NODE must be a positive integer, got '$gpus'"
fi
if $cpu_job; then gpus=0; fi

time_limit=${time_limit:-${DEFAULT_TIME:-24:00:00}}
if [[ "$time_limit" =~ ^(([0-9]+)-)?([0-9]{1,2}):([0-9]{2}):([0-9]{2})$ ]]; then
    time_seconds=$(((10#${BASH_REMATCH[2]:-0} * 24 + 10#${BASH_REMATCH[3]}) * 3600 + 10#${BASH_REMATCH[4]} * 60 + 10#${BASH_REMATCH[5]}))
else
    die "--time must look like HH:MM:SS or D-HH:MM:SS, got '$time_limit'"
fi
lead=${SIGNAL_LEAD_SECONDS:-120}
is_positive_int "$lead" || die "SIGNAL_LEAD_SECONDS must be a positive integer, got '$lead'"
if $requeue && ((lead >= time_seconds)); then
    die "--time $time_limit leaves no room for the checkpoint signal sent $lead s before the end"
fi
max_requeues=${MAX_REQUEUES:-50}
# Both go into the job script verbatim: a typo there would only fail at the time limit (no requeue).
[[ "$max_requeues" =~ ^[0-9]+$ ]] || die "MAX_REQUEUES must be a whole number >= 0, got '$max_requeues'"
for cpus in "${CPUS_PER_TASK:-}" "${CPU_JOB_CPUS:-}"; do
    [[ -z "$cpus" ]] || is_positive_int "$cpus" || die "CPUS_PER_TASK and CPU_JOB_CPUS must be positive integers, got '$cpus'"
done

if [[ -z "$job_name" ]]; then
    for arg in "${CMD[@]}"; do
        [[ "$arg" == --run_name=* ]] && job_name=${arg#--run_name=}
    done
fi
if [[ -z "$job_name" ]]; then
    for arg in "${CMD[@]}"; do
        if [[ "$arg" == *.py ]]; then job_name=$(basename -- "$arg" .py); break; fi
    done
fi
job_name=${job_name:-$(basename -- "${CMD[0]}")}
job_name=${job_name//[^A-Za-z0-9._-]/_}

log_dir=${LOG_DIR:-$REPO_ROOT/logs}
[[ "$log_dir" == /* ]] || log_dir="$REPO_ROOT/$log_dir"
# The log path goes into #SBATCH / #flux: lines inside double quotes (both parsers strip them, so
# spaces are fine); a double quote, backslash or newline in it could not be written there.
case "$log_dir" in
    *'"'* | *\\* | *$'\n'*) die "LOG_DIR '$log_dir' contains a double quote, backslash or newline; choose another folder" ;;
esac
ext=$([[ "$scheduler" == slurm ]] && echo sbatch || echo flux)
script_path="$log_dir/$job_name-$(date +%Y%m%d-%H%M%S)-$$.$ext"

if [[ -n "${ENV_SETUP:-}" ]]; then
    env_setup=$ENV_SETUP
elif [[ -f "$REPO_ROOT/.venv/bin/activate" ]]; then
    env_setup="source $(quote "$REPO_ROOT/.venv/bin/activate")"
else
    env_setup="# (no ENV_SETUP in the machine config: using the submitting shell's environment)"
fi

# ---------------------------------------------------------------- the batch script
slurm_header() {
    echo "#SBATCH --job-name=$job_name"
    echo "#SBATCH --nodes=$nodes"
    if $cpu_job; then
        echo "#SBATCH --ntasks=1"
        echo "#SBATCH --cpus-per-task=${CPU_JOB_CPUS:-${CPUS_PER_TASK:-8}}"
        [[ -z "${SLURM_CPU_PARTITION:-${SLURM_PARTITION:-}}" ]] || echo "#SBATCH --partition=${SLURM_CPU_PARTITION:-$SLURM_PARTITION}"
    else
        echo "#SBATCH --ntasks-per-node=$gpus"
        echo "#SBATCH --gpus-per-node=${SLURM_GPU_TYPE:+$SLURM_GPU_TYPE:}$gpus"
        [[ -z "${CPUS_PER_TASK:-}" ]] || echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"
        [[ -z "${SLURM_PARTITION:-}" ]] || echo "#SBATCH --partition=$SLURM_PARTITION"
    fi
    echo "#SBATCH --time=$time_limit"
    [[ -z "${SLURM_ACCOUNT:-}" ]] || echo "#SBATCH --account=$SLURM_ACCOUNT"
    [[ -z "${SLURM_QOS:-}" ]] || echo "#SBATCH --qos=$SLURM_QOS"
    echo "#SBATCH --output=\"$log_dir/%x-%j.out\""
    echo "#SBATCH --open-mode=append"
    if $requeue; then
        echo "#SBATCH --requeue"
        echo "#SBATCH --signal=B:USR1@$lead"
    else
        echo "#SBATCH --no-requeue"
    fi
    local extra
    # shellcheck disable=SC2086  # one directive per whitespace-separated word
    for extra in ${SLURM_EXTRA:-}; do echo "#SBATCH $extra"; done
}

flux_header() {
    echo "#flux: --job-name=$job_name"
    echo "#flux: --nodes=$nodes"
    echo "#flux: --exclusive"
    echo "#flux: --time-limit=${time_seconds}s"
    if $cpu_job; then
        [[ -z "${FLUX_CPU_QUEUE:-${FLUX_QUEUE:-}}" ]] || echo "#flux: --queue=${FLUX_CPU_QUEUE:-$FLUX_QUEUE}"
    else
        [[ -z "${FLUX_QUEUE:-}" ]] || echo "#flux: --queue=$FLUX_QUEUE"
    fi
    [[ -z "${FLUX_BANK:-}" ]] || echo "#flux: --bank=$FLUX_BANK"
    echo "#flux: --output=\"$log_dir/$job_name-{{id}}.out\""
    local extra
    # shellcheck disable=SC2086
    for extra in ${FLUX_EXTRA:-}; do echo "#flux: $extra"; done
}

# How the batch script starts the tasks and where rank 0 listens.
launch_lines() {
    if [[ "$scheduler" == slurm ]]; then
        local launch=(srun --nodes="$nodes" --kill-on-bad-exit=1)
        if $cpu_job; then
            launch+=(--ntasks=1)
        else
            launch+=(--ntasks-per-node="$gpus")
            [[ -z "${CPUS_PER_TASK:-}" ]] || launch+=(--cpus-per-task="$CPUS_PER_TASK")
        fi
        echo "LAUNCH=($(quote "${launch[@]}"))"
        cat <<'EOF'
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"  # sed reads all: no SIGPIPE
export MASTER_ADDR
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
EOF
    else
        local launch=(flux run --nodes="$nodes")
        if $cpu_job; then
            launch+=(--ntasks=1)
        else
            # flux sets FLUX_TASK_RANK / FLUX_JOB_SIZE / FLUX_TASK_LOCAL_ID, which train.py reads.
            launch+=(--ntasks="$((nodes * gpus))" --gpus-per-task=1)
            [[ -z "${CPUS_PER_TASK:-}" ]] || launch+=(--cores-per-task="$CPUS_PER_TASK")
        fi
        echo "LAUNCH=($(quote "${launch[@]}"))"
        # The batch script runs on the allocation's first node, where task 0 starts.
        cat <<'EOF'
MASTER_ADDR="$(hostname)"
export MASTER_ADDR
export MASTER_PORT=$((20000 + $$ % 20000))
EOF
    fi
}

# What to do after the tasks stopped on the checkpoint signal.
requeue_lines() {
    if [[ "$scheduler" == slurm ]]; then
        cat <<'EOF'
requeue() {
    local restarts=${SLURM_RESTART_COUNT:-0}
    if ((restarts >= MAX_REQUEUES)); then
        echo "[_submit] not requeueing: already restarted $restarts times (MAX_REQUEUES)" >&2
        return
    fi
    echo "[_submit] requeueing job $SLURM_JOB_ID; it resumes from its newest checkpoint" >&2
    scontrol requeue "$SLURM_JOB_ID"
}
EOF
    else
        cat <<'EOF'
requeue() {
    local restarts=${SUBMIT_RESTART_COUNT:-0}
    if ((restarts >= MAX_REQUEUES)); then
        echo "[_submit] not resubmitting: already restarted $restarts times (MAX_REQUEUES)" >&2
        return
    fi
    echo "[_submit] resubmitting $BATCH_SCRIPT; it resumes from its newest checkpoint" >&2
    flux --parent batch --env=SUBMIT_RESTART_COUNT=$((restarts + 1)) "$BATCH_SCRIPT"
}
# flux has no signal-before-time-limit for a batch script: a timer sends USR1 to this script.
start_timer() {
    local timeleft
    timeleft=$(flux job timeleft 2>/dev/null || echo unknown)
    [[ "$timeleft" =~ ^[0-9]+$ ]] || return 0  # no time limit, or not inside a flux job
    if ((timeleft > SIGNAL_LEAD)); then
        (
            sleep "$((timeleft - SIGNAL_LEAD))" &
            sleeper=$!
            trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
            wait "$sleeper" && kill -USR1 "$SCRIPT_PID"
        ) &
        timer=$!
    fi
}
EOF
    fi
}

batch_script() {
    echo "#!/bin/bash"
    if [[ "$scheduler" == slurm ]]; then slurm_header; else flux_header; fi
    cat <<EOF
# Generated by shells/_submit.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ). Submit again with:
#   $(quote "${submit_cmd[@]}")
set -eo pipefail
cd $(quote "$REPO_ROOT")
# shellcheck disable=SC1091  # ENV_SETUP from the machine config
$env_setup
set -u

CMD=($(quote "${CMD[@]}"))
REQUEUE=$($requeue && echo 1 || echo 0)
MAX_REQUEUES=$max_requeues
EOF
    if [[ "$scheduler" == flux ]]; then
        echo "SIGNAL_LEAD=$lead"
        echo "BATCH_SCRIPT=$(quote "$script_path")"
        echo "SCRIPT_PID=\$\$"
    fi
    launch_lines
    requeue_lines
    cat <<'EOF'

# Run the tasks in the background so this shell can catch the checkpoint signal (USR1, sent
# before the time limit) or SIGTERM (preemption, scancel) and hand it to them: train.py saves
# a full checkpoint and exits, then the job is requeued and resumes (--resume_path=auto).
echo "[_submit] $(date): ${LAUNCH[*]} ${CMD[*]}" >&2
"${LAUNCH[@]}" "${CMD[@]}" &
tasks=$!
timer=""
stop_signal=""
interrupted=0
# shellcheck disable=SC2317  # called from the traps below
on_signal() {
    stop_signal=$1
    interrupted=1
    echo "[_submit] caught SIG$1: forwarding it so the tasks checkpoint and stop" >&2
    kill -s "$1" "$tasks" 2>/dev/null || true
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
EOF
    if [[ "$scheduler" == flux ]] && $requeue; then echo "start_timer"; fi
    cat <<'EOF'
while :; do
    interrupted=0
    status=0
    wait "$tasks" || status=$?
    if ((interrupted)) && kill -0 "$tasks" 2>/dev/null; then continue; fi
    break
done
trap - USR1 TERM
[[ -z "$timer" ]] || kill "$timer" 2>/dev/null || true
if [[ "$stop_signal" == USR1 ]] && ((REQUEUE)); then requeue; fi
exit "$status"
EOF
}

if [[ "$scheduler" == slurm ]]; then submit_cmd=(sbatch "$script_path"); else submit_cmd=(flux batch "$script_path"); fi
script_text=$(batch_script)

if $dry_run; then
    printf '%s\n' "$(quote "${submit_cmd[@]}")"
    echo "# ----- $script_path -----"
    echo "$script_text"
    exit 0
fi

mkdir -p "$log_dir"
# Write then rename, so a half-written script is never submitted or left behind.
printf '%s\n' "$script_text" >"$script_path.tmp"
mv "$script_path.tmp" "$script_path"
echo "+ $(quote "${submit_cmd[@]}")" >&2
"${submit_cmd[@]}"
