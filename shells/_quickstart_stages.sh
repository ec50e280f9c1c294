# Setup and stage helpers shared by shells/quickstart.sh and shells/quickstart_smollm2.sh (sourced, not
# run). The caller sets OUT (output folder), THREADS, REPO_ROOT and QUICKSTART_TAG (the log prefix)
# first; this makes OUT absolute, creates OUT/logs (LOGS, one log per stage) and OUT/stage_times.tsv
# (TIMES), and sets the environment every stage runs in.
# shellcheck shell=bash disable=SC2034  # ran_any and PAR_THREADS are read by the sourcing script

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# shellcheck source=shells/_common.sh
source "$REPO_ROOT/shells/_common.sh"  # use_repo_python, passive_openmp_wait
use_repo_python
# Offline for the Hugging Face libraries (the real-base quickstart's one download goes through pip);
# passive OpenMP waiting keeps a busy machine from thrashing (spinning threads of two processes
# fight for the same cores otherwise).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
passive_openmp_wait
export OMP_NUM_THREADS="$THREADS" PYTHONUNBUFFERED=1
export WANDB_MODE=disabled MPLBACKEND=Agg
PAR_THREADS=$(( THREADS / 2 > 0 ? THREADS / 2 : 1 ))  # per process when two stages share the machine
LOGS="$OUT/logs"
TIMES="$OUT/stage_times.tsv"
mkdir -p "$LOGS" && touch "$TIMES"

ran_any=0  # set to 1 by any stage that did work: the caller then rewrites its summary
log() { echo "[$QUICKSTART_TAG $(date +%H:%M:%S)] $*"; }
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

# side_by_side NAME A B: shell functions A and B, each in a subshell; the pair's wall time is recorded as NAME.
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
