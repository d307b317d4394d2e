"""Pre-LayerNorm transformer block: causal self-attention and a GELU MLP, each inside a residual."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_eslm.config import ModelConfig


def init_linear(layer: nn.Linear, std: float) -> None:
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    nn.init.zeros_(layer.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, output_std: float):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.attention_dropout = cfg.attention_dropout
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        init_linear(self.query_key_value, cfg.init_method_std)
        init_linear(self.dense, output_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.query_key_value(x).view(b, s, 3, self.num_heads, h // self.num_heads).unbind(2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            dropout_p=self.attention_dropout if self.training else 0.0)
        return self.dense(out.transpose(1, 2).reshape(b, s, h))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, output_std: float):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)
        init_linear(self.dense_h_to_4h, cfg.init_method_std)
        init_linear(self.dense_4h_to_h, output_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Megatron/GPT-2 scale the init of the projections that write into the residual stream by
        # 1/sqrt(2 * num_layers) so the residual's variance does not grow with depth.
        output_std = cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.self_attention = CausalSelfAttention(cfg, output_std)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(cfg, output_std)
        self.hidden_dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.hidden_dropout(self.self_attention(self.input_layernorm(x)))
        return x + self.hidden_dropout(self.mlp(self.post_attention_layernorm(x)))
