# shellcheck shell=bash
# Shared logic of the launch scripts; sourced, never run. Each script calls
#   launch_setup "$@"          recipe folder and environment -> RECIPE, PRETRAIN_ARGS, ...
#   check_config WORLD         the pretrain flags and the ds_config are valid at this world size
#   launch CMD...              print the master address, the interface (and the clock); DRY_RUN=1: print CMD
#                              on one line, shell-quoted; otherwise exec it
# Every error is one line, "error: ...", and exit status 2.
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$LAUNCH_DIR")"
DEFAULT_RECIPE="examples/gpt2_124m"

die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

require_env() {  # NAME WHAT-IT-IS
    [[ -n "${!1:-}" ]] || die "$1 is not set ($2)"
}

positive_int() {  # NAME: the variable must hold a positive integer
    [[ "${!1}" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '${!1}'"
}

is_dry_run() {
    [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 ]]
}

# launch_setup [RECIPE_DIR] [PRETRAIN FLAGS...]
# RECIPE_DIR is relative to the working directory or to the repository root; when the first argument is
# a flag, the default recipe is used and every argument goes to pretrain. Sets RECIPE (absolute),
# RECIPE_NAME, PRETRAIN_JSON, DS_CONFIG, SAVE_DIR, MASTER_PORT, PASS_ARGS, PRETRAIN_ARGS and NET_ENV.
launch_setup() {
    local recipe="$DEFAULT_RECIPE"
    if (( $# )) && [[ "$1" != -* ]]; then
        recipe="$1"
        shift
    fi
    PASS_ARGS=("$@")
    if [[ -d "$recipe" ]]; then
        RECIPE="$(cd "$recipe" && pwd)"
    elif [[ "$recipe" != /* && -d "$REPO_ROOT/$recipe" ]]; then
        RECIPE="$(cd "$REPO_ROOT/$recipe" && pwd)"
    else
        die "recipe folder $recipe not found (expected a folder like $DEFAULT_RECIPE)"
    fi
    RECIPE_NAME="$(basename "$RECIPE")"
    PRETRAIN_JSON="$RECIPE/pretrain.json"
    [[ -f "$PRETRAIN_JSON" ]] || die "recipe folder $recipe has no pretrain.json"
    if [[ -n "${DS_CONFIG:-}" ]]; then
        [[ -f "$DS_CONFIG" ]] || die "DS_CONFIG $DS_CONFIG: file not found"
    else
        DS_CONFIG="$RECIPE/ds_config.json"
        [[ -f "$DS_CONFIG" ]] || die "recipe folder $recipe has no ds_config.json"
    fi

    require_env DATA_PATH "the dataset prefix P of P.bin/P.idx, or a blend 'W1 P1 W2 P2 ...'"
    require_env TOKENIZER_MODEL "the SentencePiece .model file of the dataset's tokenizer"
    [[ -e "$TOKENIZER_MODEL" ]] || die "TOKENIZER_MODEL $TOKENIZER_MODEL: file not found"
    SAVE_DIR="${SAVE_DIR:-runs/$RECIPE_NAME}"
    MASTER_PORT="${MASTER_PORT:-29500}"
    positive_int MASTER_PORT

    network_env
    local data_path
    read -r -a data_path <<< "$DATA_PATH"  # a blend is several words: weights and prefixes
    (( ${#data_path[@]} )) || die "DATA_PATH is empty (the dataset prefix P of P.bin/P.idx)"
    PRETRAIN_ARGS=(--config "$PRETRAIN_JSON" --deepspeed --deepspeed_config "$DS_CONFIG"
                   --data-path "${data_path[@]}" --tokenizer-model "$TOKENIZER_MODEL"
                   --save "$SAVE_DIR" --load "$SAVE_DIR"
                   --tensorboard-dir "$SAVE_DIR/tensorboard" --metrics-file "$SAVE_DIR/metrics.jsonl"
                   "${PASS_ARGS[@]}")
}

# network_env: the one network knob of a cluster. MEGATRON_ESLM_IFNAME names the interface(s) both NCCL's
# and gloo's sockets use (every NCCL run also opens a gloo group, whose full-mesh connect breaks when a
# hostname resolves to 127.0.1.1 or docker0); MEGATRON_ESLM_IB_HCA the InfiniBand adapters NCCL uses.
# Exports NCCL_SOCKET_IFNAME (NCCL's exact-match form, "=ib0"), GLOO_SOCKET_IFNAME and NCCL_IB_HCA for the
# ones given, and lists them as NAME=value words in NET_ENV (written to .deepspeed_env for pdsh).
network_env() {
    NET_ENV=()
    local names='^[A-Za-z0-9_.:-]+(,[A-Za-z0-9_.:-]+)*$'
    if [[ -n "${MEGATRON_ESLM_IFNAME:-}" ]]; then
        [[ "$MEGATRON_ESLM_IFNAME" =~ $names ]] \
            || die "MEGATRON_ESLM_IFNAME must be interface names separated by commas (e.g. ib0 or eth0), got '$MEGATRON_ESLM_IFNAME'"
        NET_ENV+=("NCCL_SOCKET_IFNAME==$MEGATRON_ESLM_IFNAME" "GLOO_SOCKET_IFNAME=$MEGATRON_ESLM_IFNAME")
    fi
    if [[ -n "${MEGATRON_ESLM_IB_HCA:-}" ]]; then
        [[ "$MEGATRON_ESLM_IB_HCA" =~ ^[=^]?[A-Za-z0-9_.:,-]+$ ]] \
            || die "MEGATRON_ESLM_IB_HCA must be NCCL_IB_HCA's adapter list (e.g. mlx5_0,mlx5_1), got '$MEGATRON_ESLM_IB_HCA'"
        NET_ENV+=("NCCL_IB_HCA=$MEGATRON_ESLM_IB_HCA")
    fi
    local pair
    for pair in "${NET_ENV[@]}"; do
        export "${pair?}"
    done
}

# resolved HOST: HOST and the IPv4 address it resolves to here, flagging a loopback address (127.0.1.1 from
# /etc/hosts), which the other nodes cannot reach.
resolved() {
    local addr
    addr="$(getent ahostsv4 "$1" 2> /dev/null | awk 'NR == 1 { print $1 }')" || true
    if [[ -z "$addr" ]]; then
        printf '%s (does not resolve here)' "$1"
    elif [[ "$addr" == 127.* && "$1" != 127.* ]]; then
        printf '%s (%s: loopback, unreachable from other nodes; set MASTER_ADDR)' "$1" "$addr"
    elif [[ "$addr" == "$1" ]]; then
        printf '%s' "$1"
    else
        printf '%s (%s)' "$1" "$addr"
    fi
}

# check_config WORLD_SIZE: run, once and before anything starts, the checks every rank runs first:
# megatron_eslm's parse_args and validate_layout on the exact pretrain arguments at this world size. They
# include the ds_config's agreement with our flags (batch sizes and accumulation, clipping, bf16, ZeRO
# stage against pipelining), which depends on the world size: a mismatch would otherwise stop every rank
# after start-up. Skipped, with a note, when PYTHON cannot import megatron_eslm.
check_config() {
    local python="${PYTHON:-python3}"
    if ! command -v "$python" > /dev/null; then
        echo "note: $python not found; skipping the pre-launch check of the flags" >&2
        return 0
    fi
    "$python" - "$1" "${PRETRAIN_ARGS[@]}" <<'PY' || exit 2
import sys

try:
    from megatron_eslm.config import parse_args, validate_layout
    from megatron_eslm.errors import UserError
except ImportError:
    print(f"note: {sys.executable} cannot import megatron_eslm; skipping the pre-launch check of the flags",
          file=sys.stderr)
    sys.exit(0)
try:
    validate_layout(parse_args(sys.argv[2:]), int(sys.argv[1]))
except UserError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
PY
}

# slurm_setup: inside an allocation; sets NODES (the job's host names: SLURM_HOSTS, space-separated, when
# set, e.g. for a dry run off Slurm; else scontrol's expansion of SLURM_JOB_NODELIST), NUM_NODES,
# MASTER_ADDR (the first host unless set), GPUS_PER_NODE (Slurm's count on this node, else 8, unless set),
# CPUS_PER_NODE (SLURM_CPUS_ON_NODE unless set) and SRUN_ARGS; adds --exit-signal-handler and (exit_by_clock)
# --exit-duration-in-mins to PRETRAIN_ARGS.
slurm_setup() {
    require_env SLURM_JOB_NODELIST "submit with sbatch, or run inside a Slurm allocation"
    require_env SLURM_NNODES "submit with sbatch, or run inside a Slurm allocation"
    require_env SLURM_JOB_ID "submit with sbatch, or run inside a Slurm allocation"
    if [[ -n "${SLURM_HOSTS:-}" ]]; then
        read -r -a NODES <<< "$SLURM_HOSTS"
    else
        command -v scontrol > /dev/null \
            || die "scontrol not found on PATH (off Slurm, name the hosts: SLURM_HOSTS='host1 host2')"
        mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
        (( ${#NODES[@]} )) || die "scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host"
    fi
    NUM_NODES="$SLURM_NNODES"
    positive_int NUM_NODES
    MASTER_ADDR="${MASTER_ADDR:-${NODES[0]}}"  # scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
    GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
    positive_int GPUS_PER_NODE
    # srun starts one launcher task per node, whose ranks inherit its CPU mask: give it every CPU of the
    # node, bound to them, not the one CPU some Slurm configurations give a task by default.
    CPUS_PER_NODE="${CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-}}"
    require_env CPUS_PER_NODE "CPUs per node for srun's --cpus-per-task; Slurm sets SLURM_CPUS_ON_NODE"
    positive_int CPUS_PER_NODE
    SRUN_ARGS=(--nodes "$NUM_NODES" --ntasks-per-node 1 --cpus-per-task "$CPUS_PER_NODE" --cpu-bind=cores
               --kill-on-bad-exit=1)
    # The sbatch scripts ask for SIGTERM 180 s before the time limit (#SBATCH --signal=TERM@180): every
    # rank finishes its iteration, saves and exits 0 (docs/fault_tolerance.md). torchrun's agent forwards
    # the signal and kills the ranks TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later (its default, 30 s, is
    # short for a large checkpoint); DeepSpeed's launcher waits 30 s (hard-coded).
    PRETRAIN_ARGS+=(--exit-signal-handler)
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-170}"
    exit_by_clock
}

# slurm_seconds TIME WHERE: sets SECONDS_LEFT to the seconds in TIME (from WHERE, for the error), a time in
# Slurm's format as squeue's %L prints it: MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS,
# DAYS-HOURS:MINUTES or DAYS-HOURS:MINUTES:SECONDS.
slurm_seconds() {
    [[ "$1" =~ ^(([0-9]+)-)?([0-9]+)(:([0-9]+))?(:([0-9]+))?$ ]] \
        || die "$2 must be the job's time left in Slurm's format ([DAYS-]HOURS:MINUTES:SECONDS), got '$1'"
    local days="${BASH_REMATCH[2]:-0}" a="${BASH_REMATCH[3]}" b="${BASH_REMATCH[5]:-0}" c="${BASH_REMATCH[7]:-0}"
    if [[ -n "${BASH_REMATCH[1]}" || -n "${BASH_REMATCH[6]}" ]]; then  # DAYS-HOURS[...] or HOURS:MINUTES:SECONDS
        SECONDS_LEFT=$(( 10#$days * 86400 + 10#$a * 3600 + 10#$b * 60 + 10#$c ))
    else  # MINUTES[:SECONDS]
        SECONDS_LEFT=$(( 10#$a * 60 + 10#$b ))
    fi
}

# exit_by_clock: unless the flags or the recipe set --exit-duration-in-mins, pass the job's time left minus
# SAVE_MINUTES (default 10), in whole minutes, so that the last save starts while there is time for it: a
# signal gives the ranks only what the launcher's kill allows (30 s under DeepSpeed's launcher). The run's
# clock starts when training starts, so SAVE_MINUTES must cover the start-up (building, --load), a log
# interval and the save (the log line `saved checkpoint ...`, or time_checkpoint_ms at --timing-log-level 1). The time
# left comes from SLURM_TIME_LEFT (Slurm's time format; a dry run off Slurm), else SLURM_JOB_END_TIME (set
# by recent Slurm releases), else `squeue -o %L`; a job without a limit, or one squeue cannot tell, stops on
# the signal only. CLOCK_NOTE says what was done, for `launch` to print.
exit_by_clock() {
    local arg
    for arg in "${PASS_ARGS[@]}"; do
        if [[ "$arg" == --exit-duration-in-mins || "$arg" == --exit-duration-in-mins=* ]]; then
            CLOCK_NOTE="launch: --exit-duration-in-mins given; not derived from the job's time limit"
            return 0
        fi
    done
    if grep -q '"exit-duration-in-mins"' "$PRETRAIN_JSON"; then
        CLOCK_NOTE="launch: --exit-duration-in-mins set by $PRETRAIN_JSON; not derived from the job's time limit"
        return 0
    fi
    SAVE_MINUTES="${SAVE_MINUTES:-10}"
    positive_int SAVE_MINUTES
    local left origin
    if [[ -n "${SLURM_TIME_LEFT:-}" ]]; then
        origin="SLURM_TIME_LEFT"
        slurm_seconds "$SLURM_TIME_LEFT" SLURM_TIME_LEFT
    elif [[ -n "${SLURM_JOB_END_TIME:-}" ]]; then
        [[ "$SLURM_JOB_END_TIME" =~ ^[0-9]+$ ]] \
            || die "SLURM_JOB_END_TIME must be the job's end in seconds since the epoch, got '$SLURM_JOB_END_TIME'"
        origin="SLURM_JOB_END_TIME"
        SECONDS_LEFT=$(( SLURM_JOB_END_TIME - $(date +%s) ))
    elif command -v squeue > /dev/null; then
        origin="squeue"
        left="$(squeue -h -j "$SLURM_JOB_ID" -o %L 2> /dev/null)" || left=""
        if [[ -z "$left" || "$left" == UNLIMITED || "$left" == NOT_SET || "$left" == INVALID ]]; then
            CLOCK_NOTE="launch: squeue gives the job's time left as '$left'; stopping on the signal only,"
            CLOCK_NOTE+=" not by the clock"
            return 0
        fi
        slurm_seconds "$left" "squeue -j $SLURM_JOB_ID -o %L"
    else
        CLOCK_NOTE="launch: the job's time left is unknown (no squeue on PATH); stopping on the signal only, not"
        CLOCK_NOTE+=" by the clock (set SLURM_TIME_LEFT, or pass --exit-duration-in-mins)"
        return 0
    fi
    local minutes=$(( SECONDS_LEFT / 60 ))
    (( minutes > SAVE_MINUTES )) \
        || die "the job has $minutes minutes left ($origin), not more than SAVE_MINUTES=$SAVE_MINUTES for the last save"
    local exit_minutes=$(( minutes - SAVE_MINUTES ))
    PRETRAIN_ARGS+=(--exit-duration-in-mins "$exit_minutes")
    CLOCK_NOTE="launch: --exit-duration-in-mins $exit_minutes: the job's $minutes minutes left ($origin) minus"
    CLOCK_NOTE+=" SAVE_MINUTES=$SAVE_MINUTES for the last save"
}

# launch CMD ARGS...: print (stderr) the master address (MASTER_ADDR, resolved; else MASTER_NOTE), the
# network interface and CLOCK_NOTE (exit_by_clock); with DRY_RUN set (and not 0) print the command as one
# shell-quoted line and exit 0; otherwise create SAVE_DIR and replace this shell with the command.
launch() {
    local master="${MASTER_NOTE:-}"
    local net="not chosen (NCCL and gloo pick one each; on a cluster set MEGATRON_ESLM_IFNAME)"
    [[ -n "${MASTER_ADDR:-}" ]] && master="$(resolved "$MASTER_ADDR")"
    local chosen=()
    local name
    for name in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_HCA; do
        [[ -n "${!name:-}" ]] && chosen+=("$name=${!name}")
    done
    (( ${#chosen[@]} )) && net="${chosen[*]}"
    printf 'launch: master %s port %s; interface %s\n' "$master" "$MASTER_PORT" "$net" >&2
    [[ -z "${CLOCK_NOTE:-}" ]] || printf '%s\n' "$CLOCK_NOTE" >&2
    if is_dry_run; then
        local line
        printf -v line '%q ' "$@"
        printf '%s\n' "${line% }"
        exit 0
    fi
    command -v "$1" > /dev/null || die "$1 not found on PATH (activate the environment megatron_eslm is installed in)"
    mkdir -p "$SAVE_DIR"
    exec "$@"
}
