#!/usr/bin/env bash
# Several nodes, the DeepSpeed launcher over ssh (pdsh): run it on the first node of the hostfile.
#   HOSTFILE=hostfile DATA_PATH=... TOKENIZER_MODEL=... launch_scripts/deepspeed_multi_node.sh [RECIPE_DIR] [FLAGS...]
# The hostfile has one line per node, "HOST slots=GPUS" (e.g. "node01 slots=8"); '#' starts a comment.
# Every node needs passwordless ssh from this one, pdsh, and the same paths (repository, data, SAVE_DIR).
# Env: HOSTFILE (hostfile), NUM_NODES (every host in the hostfile), GPUS_PER_NODE (8), MASTER_ADDR (DeepSpeed
# asks the first host), MASTER_PORT (29500), SAVE_DIR (runs/<recipe>), DS_CONFIG, MEGATRON_ESLM_IFNAME and
# MEGATRON_ESLM_IB_HCA (network, written to ./.deepspeed_env too), DRY_RUN=1 (print, don't run).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

launch_setup "$@"
HOSTFILE="${HOSTFILE:-hostfile}"
[[ -f "$HOSTFILE" ]] || die "HOSTFILE $HOSTFILE: file not found (one line per node: 'host slots=8')"
mapfile -t hosts < <(grep -Ev '^[[:space:]]*(#|$)' "$HOSTFILE" || true)
(( ${#hosts[@]} )) || die "HOSTFILE $HOSTFILE lists no host (one line per node: 'host slots=8')"
for line in "${hosts[@]}"; do
    [[ "$line" =~ ^[[:space:]]*[^[:space:]]+[[:space:]]+slots=[0-9]+[[:space:]]*$ ]] \
        || die "HOSTFILE $HOSTFILE: bad line '$line' (expected 'host slots=8')"
done
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
positive_int GPUS_PER_NODE
nodes="${NUM_NODES:-${#hosts[@]}}"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] && (( nodes <= ${#hosts[@]} )) \
    || die "NUM_NODES must be between 1 and the ${#hosts[@]} hosts of $HOSTFILE, got '$nodes'"
check_config "$(( nodes * GPUS_PER_NODE ))"

# pdsh starts the other nodes' ranks without this environment: DeepSpeed's runner passes on NCCL_* variables
# and the lines of ./.deepspeed_env (and ~/.deepspeed_env), so the network choice goes there too (other
# lines of an existing ./.deepspeed_env are kept).
if (( ${#NET_ENV[@]} )); then
    if is_dry_run; then
        echo "dry run: not writing .deepspeed_env (${NET_ENV[*]})" >&2
    else
        kept="$(grep -Ev '^(NCCL_SOCKET_IFNAME|GLOO_SOCKET_IFNAME|NCCL_IB_HCA)=' .deepspeed_env 2> /dev/null || true)"
        printf '%s\n' ${kept:+"$kept"} "${NET_ENV[@]}" > .deepspeed_env
    fi
fi
MASTER_NOTE="${hosts[0]%% *} (the first host; DeepSpeed's runner asks it for its address)"

launcher=(deepspeed --hostfile "$HOSTFILE")
[[ -n "${NUM_NODES:-}" ]] && launcher+=(--num_nodes "$NUM_NODES")
launcher+=(--num_gpus "$GPUS_PER_NODE")
[[ -n "${MASTER_ADDR:-}" ]] && launcher+=(--master_addr "$MASTER_ADDR")
launcher+=(--master_port "$MASTER_PORT")
launch "${launcher[@]}" --module megatron_eslm.pretrain "${PRETRAIN_ARGS[@]}"
