"""AdamW with Megatron's weight-decay groups: biases and norm parameters (all 1-D tensors) are not decayed."""
from __future__ import annotations

import torch
from torch import nn

from megatron_eslm.config import OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # ZeRO-3 partitions parameters into flat 1-D shards at construction: its `ds_shape` is the shape
            (no_decay if len(getattr(param, "ds_shape", param.shape)) < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
