"""Pre-norm transformer block: causal self-attention and an MLP, each inside a residual. The config picks
GPT-2's parts (LayerNorm, GELU, one key/value head per query head, biases) or Llama's (RMSNorm, SwiGLU,
grouped-query attention with rotary positions, no biases), or any mix.

Tensor parallelism splits the attention heads (whole key/value groups) and the MLP width over the TP ranks
(column-parallel in, row-parallel out, Megatron's layout). Under sequence parallelism the norms, residuals
and hidden dropout work on this rank's share of the sequence. Under autocast (--bf16) the residual stream,
like every activation, is in the autocast dtype (Megatron's default; it has no fp32 residual here).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_eslm import parallel_state
from megatron_eslm.config import ModelConfig
from megatron_eslm.context_parallel.attention import context_parallel_attention
from megatron_eslm.context_parallel.ring import ring_attention
from megatron_eslm.model.keyed_dropout import attention_dropout, build_hidden_dropout
from megatron_eslm.model.attention_backend import attention_backends
from megatron_eslm.model.norms import build_norm
from megatron_eslm.model.rotary import RotaryTables, apply_rotary
from megatron_eslm.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, mark_sequence_parallel
from megatron_eslm.tensor_parallel.random import get_rng_tracker


class CoreAttention(nn.Module):
    """softmax(QK^T / sqrt(d) + causal mask), its dropout, times V: the part whose saved tensors grow with
    the square of the sequence. A module of its own, without parameters, so that selective recompute
    wraps it from outside (`training/recompute.py`) and the state dict does not change."""

    def __init__(self, dropout: float, grouped: bool, keyed: bool, backend: str):
        super().__init__()
        self.dropout, self.keyed = dropout, keyed
        self.sdpa_options = {"enable_gqa": True} if grouped else {}  # torch >= 2.5, only for GQA
        self.backend = backend  # --attention-backend (`attention_backend.py`)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [b, s, heads, d], k and v [b, s, groups, d] -> [b, s, heads, d]. Under context parallelism s is
        this rank's two chunks (`context_parallel/`). Dropout keyed by position (--keyed-dropout) runs the
        ring's math path at any context-parallel size, one process included; the rest runs SDPA under the
        --attention-backend's kernels (`attention_backend.py`)."""
        dropout = self.dropout if self.training else 0.0
        if dropout and self.keyed:
            return ring_attention(q, k, v, attention_dropout(dropout, q, k.shape[2]))
        with attention_backends(self.backend, q.device):
            if parallel_state.context_parallel_size() > 1:
                return context_parallel_attention(q, k, v, **self.sdpa_options)
            # Each TP rank holds different heads: their dropout masks come from the model-parallel stream.
            with get_rng_tracker().fork() if dropout else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True, dropout_p=dropout, **self.sdpa_options)
        return out.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    """Multi-head or grouped-query attention: num_query_groups key/value heads, each shared by
    num_attention_heads / num_query_groups query heads (one each without --group-query-attention). A TP
    rank holds num_query_groups / TP groups with their query heads."""

    def __init__(self, cfg: ModelConfig, output_std: float, generator: torch.Generator, sequence_parallel: bool):
        super().__init__()
        self.local_groups = cfg.num_query_groups // parallel_state.tensor_model_parallel_size()
        self.queries_per_group = cfg.num_attention_heads // cfg.num_query_groups
        self.head_dim = cfg.kv_channels
        bias = not cfg.disable_bias_linear
        # Output features ordered [group, (its queries, key, value), head_dim] (Megatron's layout; without
        # GQA [head, (q, k, v), head_dim]), so that a contiguous shard of the rows holds whole groups.
        qkv_features = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels
        self.query_key_value = ColumnParallelLinear(cfg.hidden_size, qkv_features, cfg.init_method_std, generator,
                                                    sequence_parallel, bias=bias)
        self.core_attention = CoreAttention(cfg.attention_dropout, grouped=self.queries_per_group > 1,
                                            keyed=cfg.keyed_dropout, backend=cfg.attention_backend)
        self.dense = RowParallelLinear(cfg.num_attention_heads * cfg.kv_channels, cfg.hidden_size, output_std,
                                       generator, sequence_parallel, bias=bias)

    def forward(self, x: torch.Tensor, rotary: RotaryTables | None = None) -> torch.Tensor:
        qkv = self.query_key_value(x)
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, self.local_groups, self.queries_per_group + 2, self.head_dim)
        q, k, v = qkv.split([self.queries_per_group, 1, 1], dim=3)
        # Query head i uses group i // queries_per_group (transformers' repeat_kv order).
        q = q.reshape(b, s, self.local_groups * self.queries_per_group, self.head_dim)
        k, v = k.squeeze(3), v.squeeze(3)
        if rotary is not None:
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        out = self.core_attention(q, k, v)
        return self.dense(out.reshape(b, s, -1))


class MLP(nn.Module):
    """GELU: h -> ffn -> h. SwiGLU: h -> (gate, up) -> silu(gate) * up -> h, the input projection's rows
    interleaved [ffn, (gate, up)], so that a contiguous TP shard holds matching gate and up rows."""

    def __init__(self, cfg: ModelConfig, output_std: float, generator: torch.Generator, sequence_parallel: bool):
        super().__init__()
        self.swiglu = cfg.swiglu
        bias = not cfg.disable_bias_linear
        width = 2 * cfg.ffn_hidden_size if cfg.swiglu else cfg.ffn_hidden_size
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, width, cfg.init_method_std, generator,
                                                  sequence_parallel, bias=bias)
        self.dense_4h_to_h = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, output_std, generator,
                                               sequence_parallel, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense_h_to_4h(x)
        if self.swiglu:
            gate, up = y.unflatten(-1, (-1, 2)).unbind(-1)
            return self.dense_4h_to_h(F.silu(gate) * up)
        return self.dense_4h_to_h(F.gelu(y, approximate="tanh"))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, generator: torch.Generator, sequence_parallel: bool = False):
        super().__init__()
        # Megatron/GPT-2 scale the init of the projections that write into the residual stream by
        # 1/sqrt(2 * num_layers) so the residual's variance does not grow with depth.
        output_std = cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
        self.input_layernorm = build_norm(cfg)
        self.self_attention = CausalSelfAttention(cfg, output_std, generator, sequence_parallel)
        self.post_attention_layernorm = build_norm(cfg)
        self.mlp = MLP(cfg, output_std, generator, sequence_parallel)
        self.hidden_dropout = build_hidden_dropout(cfg.hidden_dropout, cfg.keyed_dropout, sequence_parallel)
        if sequence_parallel:
            mark_sequence_parallel([*self.input_layernorm.parameters(), *self.post_attention_layernorm.parameters()])

    def forward(self, x: torch.Tensor, rotary: RotaryTables | None = None) -> torch.Tensor:
        """`rotary`: the stage's cos/sin tables under --position-embedding-type rope."""
        x = x + self.hidden_dropout(self.self_attention(self.input_layernorm(x), rotary))
        return x + self.hidden_dropout(self.mlp(self.post_attention_layernorm(x)))
