# shellcheck shell=bash
# Shared logic of the launch scripts; sourced, never run. Each script calls
#   launch_setup "$@"          recipe folder and environment -> RECIPE, PRETRAIN_ARGS, ...
#   check_config WORLD         the pretrain flags and the ds_config are valid at this world size
#   launch CMD...              DRY_RUN=1: print CMD on one line, shell-quoted; otherwise exec it
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
# RECIPE_NAME, PRETRAIN_JSON, DS_CONFIG, SAVE_DIR, MASTER_PORT, PASS_ARGS and PRETRAIN_ARGS.
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

    local data_path
    read -r -a data_path <<< "$DATA_PATH"  # a blend is several words: weights and prefixes
    (( ${#data_path[@]} )) || die "DATA_PATH is empty (the dataset prefix P of P.bin/P.idx)"
    PRETRAIN_ARGS=(--config "$PRETRAIN_JSON" --deepspeed --deepspeed_config "$DS_CONFIG"
                   --data-path "${data_path[@]}" --tokenizer-model "$TOKENIZER_MODEL"
                   --save "$SAVE_DIR" --load "$SAVE_DIR"
                   --tensorboard-dir "$SAVE_DIR/tensorboard" --metrics-file "$SAVE_DIR/metrics.jsonl"
                   "${PASS_ARGS[@]}")
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
# MASTER_ADDR (the first host unless set) and GPUS_PER_NODE (Slurm's count on this node, else 8, unless set).
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
    # The sbatch scripts ask for SIGTERM 180 s before the time limit (#SBATCH --signal=TERM@180): every
    # rank finishes its iteration, saves and exits 0 (docs/fault_tolerance.md). torchrun's agent forwards
    # the signal and kills the ranks TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later (its default, 30 s, is
    # short for a large checkpoint); DeepSpeed's launcher waits 30 s (hard-coded).
    PRETRAIN_ARGS+=(--exit-signal-handler)
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-170}"
}

# launch CMD ARGS...: with DRY_RUN set (and not 0) print the command as one shell-quoted line and exit 0;
# otherwise create SAVE_DIR and replace this shell with the command.
launch() {
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
