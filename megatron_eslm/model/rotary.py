"""Rotary position embeddings (--position-embedding-type rope), Llama's rotate-half convention, as in
transformers' LlamaForCausalLM: head dimension i is paired with i + d/2 and rotated by position x
base^(-2i/d).

The positions are the tokens' global positions: 0..s-1 when attention sees whole sequences (under
sequence parallelism the column-parallel QKV projection has gathered them, and every pipeline stage
receives whole sequences), and those of its two chunks on a context-parallel rank
(`context_parallel/sharding.py: positions`), never positions within a shard.
"""
from __future__ import annotations

import torch
from torch import Tensor

RotaryTables = tuple[Tensor, Tensor]  # (cos, sin), each [seq, head_dim], fp32


def rotary_tables(positions: Tensor, head_dim: int, base: int) -> RotaryTables:
    """cos and sin of every (position, dimension) angle, in fp32 (computed once per forward of a stage)."""
    device = positions.device
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(positions.to(torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, tables: RotaryTables) -> Tensor:
    """Rotate x [batch, seq, heads, head_dim] in at least fp32; returns x's dtype."""
    cos, sin = (t.unsqueeze(1) for t in tables)  # [seq, 1, head_dim]
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    first, second = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-second, first], dim=-1) * sin).to(x.dtype)
