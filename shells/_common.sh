# shellcheck shell=bash
# Shared by the launchers in shells/: errors, the machine config, and the registry of named
# experiments/jobs behind tinyllama.sh, llama.sh, olmo.sh and preprocess/*.sh.
# Sourced, never run.

# shellcheck disable=SC2034  # REPO_ROOT and SUBMIT are used by the scripts that source this file
SHELLS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SHELLS_DIR")"
SUBMIT="$SHELLS_DIR/_submit.sh"

die() {
    echo "error: $*" >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------
# Machine config: shells/_machine_config.sh (copied from the .example), or the file named by
# $MACHINE_CONFIG. Every key may also come from the environment, and the environment wins.
# ---------------------------------------------------------------------------------------------
MACHINE_CONFIG_KEYS=(
    SCHEDULER GPUS_PER_NODE CPUS_PER_TASK CPU_JOB_CPUS DEFAULT_TIME ENV_SETUP LOG_DIR
    SIGNAL_LEAD_SECONDS MAX_REQUEUES
    SLURM_ACCOUNT SLURM_PARTITION SLURM_QOS SLURM_GPU_TYPE SLURM_CPU_PARTITION SLURM_EXTRA
    FLUX_QUEUE FLUX_BANK FLUX_CPU_QUEUE FLUX_EXTRA
    PROCESSED_DATA_PATH MODELS_DIR DATASETS_DIR TOKENIZED_DATA_PATH CACHE_DIR
    HF_HOME HF_DATASETS_CACHE
)

load_machine_config() {
    local config="${MACHINE_CONFIG:-$SHELLS_DIR/_machine_config.sh}"
    if [[ -n "${MACHINE_CONFIG:-}" && ! -f "$config" ]]; then
        die "MACHINE_CONFIG=$config does not exist"
    fi
    MACHINE_CONFIG_FILE="$config"
    [[ -f "$config" ]] || return 0
    # Remember what the environment set, source the file, then put the environment back on top.
    local key
    local -A from_env=()
    for key in "${MACHINE_CONFIG_KEYS[@]}"; do
        if [[ -n "${!key+set}" ]]; then from_env[$key]="${!key}"; fi
    done
    # shellcheck source=/dev/null
    source "$config"
    for key in "${!from_env[@]}"; do
        printf -v "$key" '%s' "${from_env[$key]}"
    done
    for key in "${MACHINE_CONFIG_KEYS[@]}"; do
        if [[ -n "${!key+set}" ]]; then export "${key?}"; fi
    done
}

# require_config VAR...: fail with one line naming the first missing machine-config value.
require_config() {
    local key
    for key in "$@"; do
        if [[ -z "${!key:-}" ]]; then
            die "$key is not set: set it in ${MACHINE_CONFIG_FILE:-shells/_machine_config.sh} (copy shells/_machine_config.sh.example) or export $key"
        fi
    done
}

# ---------------------------------------------------------------------------------------------
# Experiment registry. A launcher script registers each job with
#     experiment NAME NODES GPUS_PER_NODE "description" BUILDER [ARGS...]
# (GPUS_PER_NODE 0 = a CPU job), where BUILDER is a function that fills the array JOB_CMD, and
# ends with: experiments_main "$@". Train commands without --run_name get
# --run_name=$JOB_PREFIX-NAME, so every experiment checkpoints (and resumes) in its own folder.
# ---------------------------------------------------------------------------------------------
EXPERIMENT_NAMES=()
declare -A EXPERIMENT_NODES=() EXPERIMENT_GPUS=() EXPERIMENT_HELP=() EXPERIMENT_BUILDER=()

experiment() {
    local name=$1 nodes=$2 gpus=$3 help=$4
    shift 4
    EXPERIMENT_NAMES+=("$name")
    EXPERIMENT_NODES[$name]=$nodes
    EXPERIMENT_GPUS[$name]=$gpus
    EXPERIMENT_HELP[$name]=$help
    EXPERIMENT_BUILDER[$name]=$(printf '%q ' "$@")
}

list_experiments() {
    local name shape
    for name in "${EXPERIMENT_NAMES[@]}"; do
        if [[ "${EXPERIMENT_GPUS[$name]}" == 0 ]]; then
            shape="cpu"
        else
            shape="${EXPERIMENT_NODES[$name]}x${EXPERIMENT_GPUS[$name]} GPUs"
        fi
        printf '  %-30s %-12s %s\n' "$name" "$shape" "${EXPERIMENT_HELP[$name]}"
    done
}

experiments_usage() {
    local script="shells/${0#*shells/}"
    cat <<EOF
usage: bash $script EXPERIMENT [submit options] [-- extra flags for the command]
       bash $script --list

${EXPERIMENT_INTRO:-}
Submits one named job through shells/_submit.sh on the nodes x GPUs the paper used.
Submit options (bash shells/_submit.sh --help): --dry-run, --local, --nodes N, --gpus G,
--time HH:MM:SS, --scheduler slurm|flux, --name NAME, --no-requeue, --fsdp (shard with FSDP2:
bases too big to replicate per GPU); they override the job's defaults. Flags after -- are appended to the command (a repeated flag overrides the earlier one).

EOF
    echo "experiments:"
    list_experiments
}

# Options of _submit.sh that take a value (so "--nodes 4" is not mistaken for an experiment).
SUBMIT_VALUE_OPTIONS=" --nodes --gpus --time --scheduler --name "

experiments_main() {
    local name="" arg
    local submit_args=() extra=()
    while (($#)); do
        arg=$1
        case "$arg" in
            -h | --help) experiments_usage; exit 0 ;;
            --list) list_experiments; exit 0 ;;
            --) shift; extra=("$@"); break ;;
            -*)
                submit_args+=("$arg")
                if [[ "$SUBMIT_VALUE_OPTIONS" == *" $arg "* ]]; then
                    (($# >= 2)) || die "$arg needs a value"
                    submit_args+=("$2")
                    shift
                fi
                ;;
            *)
                [[ -z "$name" ]] || die "one experiment at a time (got '$name' and '$arg')"
                name=$arg
                ;;
        esac
        shift
    done
    if [[ -z "$name" ]]; then
        experiments_usage >&2
        exit 2
    fi
    if [[ -z "${EXPERIMENT_HELP[$name]+set}" ]]; then
        die "unknown experiment '$name' (bash shells/${0#*shells/} --list shows them)"
    fi

    load_machine_config
    JOB_CMD=()
    eval "${EXPERIMENT_BUILDER[$name]}"
    if [[ " ${JOB_CMD[*]} " == *" train.py "* && " ${JOB_CMD[*]} " != *" --run_name="* ]]; then
        JOB_CMD+=(--run_name="$JOB_PREFIX-$name")
    fi
    local job_args=(--name "$JOB_PREFIX-$name")
    if [[ "${EXPERIMENT_GPUS[$name]}" == 0 ]]; then
        job_args+=(--cpu)
    else
        job_args+=(--nodes "${EXPERIMENT_NODES[$name]}" --gpus "${EXPERIMENT_GPUS[$name]}")
    fi
    exec bash "$SUBMIT" "${job_args[@]}" "${submit_args[@]}" -- "${JOB_CMD[@]}" "${extra[@]}"
}

# ---------------------------------------------------------------------------------------------
# train.py flags shared by the paper's runs (the original shells/*.sh, flag for flag).
# ---------------------------------------------------------------------------------------------
# Every run: one epoch of 1024-token rows from parquet, AdamW lr 5e-5, micro-batch 8, bf16
# autocast, grad clip 1.0, a model-only checkpoint every 1000 steps.
TRAIN_FLAGS=(python train.py --epochs=1 --max_length=1024 --out_path=huginn_llama --optim_config.lr=5e-5
    --is_parquet_dataset=true --max_grad_norm=1.0 --micro_batch_size=8 --bf16_autocast=true --compile=false
    --save_interval=1000)
# Muon (lr 1e-3) for the hidden matrices, AdamW for the rest.
MUON_FLAGS=(--muon.use_muon=true --muon.lr=0.001)
# The math runs (Figures 5-7): 50k steps of 16 rows per GPU on 64 GPUs, LR warmup 0.25%,
# cooldown 60%, and for recurrent models a curriculum (1-sqrt over the first 75% of training)
# up to the maximum mean recurrence.
MATH_FLAGS=(--scheduler_args.cooldown=0.6 --scheduler_args.warmup=0.0025 --batch_size=16 --max_steps=50000
    --save_n_mins_before_timeout=5)

# The two kinds of math run; DATA is relative to $PROCESSED_DATA_PATH.
math_recurrent() {  # MODEL DATA MAX_MEAN_REC [CURRICULUM_FRACTION [CURRICULUM_SHAPE]]
    require_config PROCESSED_DATA_PATH
    JOB_CMD=("${TRAIN_FLAGS[@]}" --model_name="$1" --preprocessed_data_path="$PROCESSED_DATA_PATH/$2"
        "${MATH_FLAGS[@]}" --mean_recurrence_schedule.turn_on=true
        --mean_recurrence_schedule.warmup="${4:-0.75}" --mean_recurrence_schedule.warmup_type="${5:-1-sqrt}"
        --mean_recurrence_schedule.max_mean_rec="$3" "${MUON_FLAGS[@]}")
}
math_static() {  # MODEL DATA
    require_config PROCESSED_DATA_PATH
    JOB_CMD=("${TRAIN_FLAGS[@]}" --model_name="$1" --preprocessed_data_path="$PROCESSED_DATA_PATH/$2"
        "${MATH_FLAGS[@]}" --non_recurrent_model=true "${MUON_FLAGS[@]}")
}

# ---------------------------------------------------------------------------------------------
# The interpreter and OpenMP settings of every launcher that runs Python here (eval.sh,
# generate.sh, quickstart.sh; the cluster jobs above run `python` after ENV_SETUP instead).
# ---------------------------------------------------------------------------------------------
# use_repo_python: PYTHON from the environment if set, else the repo's .venv (README: Fresh
# machine), else python3 on PATH. Exported, so the scripts a launcher calls use the same one.
use_repo_python() {
    if [[ -z "${PYTHON:-}" ]]; then
        if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
            PYTHON="$REPO_ROOT/.venv/bin/python"
        else
            PYTHON="$(command -v python3 || command -v python || echo python3)"
        fi
    fi
    export PYTHON
}

# passive_openmp_wait: idle OpenMP threads sleep instead of spinning (unless the environment
# chose a policy). torch.compile'd CPU kernels (generate.py --compile, lm-eval with compile=True)
# otherwise leave threads spinning that slow every later eager op 3-8x (retrofit/openmp.py).
passive_openmp_wait() {
    export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
}
