#!/usr/bin/env bash
# One node, torchrun: the same recipe, still through the DeepSpeed engine (--deepspeed), so ZeRO applies.
#   DATA_PATH=... TOKENIZER_MODEL=... launch_scripts/torchrun_single_node.sh [RECIPE_DIR] [PRETRAIN FLAGS...]
# Env: NUM_GPUS (8), SAVE_DIR (runs/<recipe>), MASTER_PORT (29500), DS_CONFIG, MEGATRON_ESLM_IFNAME and
# MEGATRON_ESLM_IB_HCA (network), DRY_RUN=1 (print, don't run).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

launch_setup "$@"
NUM_GPUS="${NUM_GPUS:-8}"
positive_int NUM_GPUS
check_config "$NUM_GPUS"
MASTER_ADDR=127.0.0.1
launch torchrun --nnodes 1 --nproc-per-node "$NUM_GPUS" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megatron_eslm.pretrain "${PRETRAIN_ARGS[@]}"
