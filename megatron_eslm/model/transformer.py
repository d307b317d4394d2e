"""Pre-LayerNorm transformer block: causal self-attention and a GELU MLP, each inside a residual.

Tensor parallelism splits the attention heads and the MLP width over the TP ranks (column-parallel in,
row-parallel out, Megatron's layout). Under sequence parallelism the norms, residuals and hidden dropout
work on this rank's share of the sequence. Under autocast (--bf16) the residual stream, like every
activation, is in the autocast dtype (Megatron's default; it has no fp32 residual here).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_eslm import parallel_state
from megatron_eslm.config import ModelConfig
from megatron_eslm.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, ShardedDropout,
                                                  mark_sequence_parallel)
from megatron_eslm.tensor_parallel.random import get_rng_tracker


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that takes and returns the activation dtype under autocast. CUDA's autocast runs
    layer_norm in fp32 and returns fp32, which would turn the residual stream, the saved activations and
    the pipeline messages fp32. Here input and weights go to the kernel in the autocast dtype with autocast
    off: it still accumulates the statistics in fp32, and saves its bf16 input and weights and one mean
    and rstd per row (fp32 on CUDA; the CPU kernel stores them in bf16). Without autocast: nn.LayerNorm."""

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype),
                                self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, output_std: float, generator: torch.Generator, sequence_parallel: bool):
        super().__init__()
        self.local_heads = cfg.num_attention_heads // parallel_state.tensor_model_parallel_size()
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.attention_dropout = cfg.attention_dropout
        # Output features ordered [head, (q, k, v), head_dim] (Megatron's layout), so that a contiguous
        # shard of the rows holds whole heads.
        self.query_key_value = ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, cfg.init_method_std,
                                                    generator, sequence_parallel)
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, output_std, generator, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.query_key_value(x)
        b, s, _ = qkv.shape
        q, k, v = qkv.view(b, s, self.local_heads, 3, self.head_dim).unbind(3)
        dropout = self.attention_dropout if self.training else 0.0
        # Each TP rank holds different heads: their dropout masks come from the model-parallel stream.
        with get_rng_tracker().fork() if dropout else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, dropout_p=dropout)
        return self.dense(out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, output_std: float, generator: torch.Generator, sequence_parallel: bool):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, cfg.init_method_std,
                                                  generator, sequence_parallel)
        self.dense_4h_to_h = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, output_std, generator,
                                               sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, generator: torch.Generator, sequence_parallel: bool = False):
        super().__init__()
        # Megatron/GPT-2 scale the init of the projections that write into the residual stream by
        # 1/sqrt(2 * num_layers) so the residual's variance does not grow with depth.
        output_std = cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.self_attention = CausalSelfAttention(cfg, output_std, generator, sequence_parallel)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(cfg, output_std, generator, sequence_parallel)
        self.hidden_dropout = (ShardedDropout if sequence_parallel else nn.Dropout)(cfg.hidden_dropout)
        if sequence_parallel:
            mark_sequence_parallel([*self.input_layernorm.parameters(), *self.post_attention_layernorm.parameters()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.hidden_dropout(self.self_attention(self.input_layernorm(x)))
        return x + self.hidden_dropout(self.mlp(self.post_attention_layernorm(x)))
