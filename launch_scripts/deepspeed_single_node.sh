#!/usr/bin/env bash
# One node, the DeepSpeed launcher: ZeRO from DeepSpeed (the recipe's ds_config.json), TP/PP from ours.
#   DATA_PATH=... TOKENIZER_MODEL=... launch_scripts/deepspeed_single_node.sh [RECIPE_DIR] [PRETRAIN FLAGS...]
# Env: NUM_GPUS (8), SAVE_DIR (runs/<recipe>), MASTER_PORT (29500), DS_CONFIG, MEGATRON_ESLM_IFNAME and
# MEGATRON_ESLM_IB_HCA (network), DRY_RUN=1 (print, don't run).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

launch_setup "$@"
NUM_GPUS="${NUM_GPUS:-8}"
positive_int NUM_GPUS
check_config "$NUM_GPUS"
MASTER_ADDR=127.0.0.1  # what DeepSpeed's runner uses on one node
launch deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" \
    --module megatron_eslm.pretrain "${PRETRAIN_ARGS[@]}"
