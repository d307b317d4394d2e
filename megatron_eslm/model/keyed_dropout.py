"""Dropout whose masks are keyed by position (--keyed-dropout): each dropout site draws one number from
the default generator (alike on every tensor- and context-parallel rank, and in one process, which draw
the same sites in the same order), and an element is dropped when a hash of (that number, its row in the
micro-batch, its global token position, its hidden unit; for attention its global head and query and key
positions) falls below the probability (`keyed_random.py`). So a sequence split over context-parallel
ranks (or over tensor-parallel ranks under sequence parallelism) drops exactly what one process drops, a
checkpoint does not depend on the split, and selective and full recompute replay the masks (they replay
the generator, so the site draws the same number).

Stream dropout (torch's, the default) draws the mask of the tensor a rank holds from the stream: its
shard of the sequence would get a mask that depends on the split.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from megatron_eslm import parallel_state
from megatron_eslm.context_parallel.ring import AttentionDropout
from megatron_eslm.context_parallel.sharding import positions as sequence_positions
from megatron_eslm.keyed_random import below, mix
from megatron_eslm.compiled_regions import outside_compiled_regions
from megatron_eslm.tensor_parallel import layers


def site_key(device: torch.device) -> Tensor:
    """One draw of the device's default generator (a 0-dim int64 on the device: no host copy)."""
    return torch.randint(0, 1 << 62, (), dtype=torch.int64, device=device)


def keep_mask(key: Tensor, p: float, *indices: Tensor) -> Tensor:
    """Keep (True) with probability 1 - p for each element of the broadcast of `indices` (int64), hashed in
    order after `key`: the same element of the same site gets the same answer wherever it is computed."""
    hashed = key
    for index in indices:
        hashed = mix(hashed ^ index)
    return ~below(hashed, p)


class KeyedDropout(nn.Module):
    """Hidden (and embedding) dropout on [b, s, h] activations holding this rank's tokens: its context-
    parallel chunks, and under sequence parallelism its tensor-parallel share of them."""

    def __init__(self, p: float, sequence_parallel: bool):
        super().__init__()
        self.p, self.sequence_parallel = p, sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        return self.drop(x)

    @outside_compiled_regions  # the site's draw from the generator, in eager's order (`compiled_regions.py`)
    def drop(self, x: Tensor) -> Tensor:
        b, s, h = x.shape
        if self.sequence_parallel:
            tp_rank = parallel_state.tensor_model_parallel_rank()
            positions = sequence_positions(s * parallel_state.tensor_model_parallel_size(), x.device)
            positions = positions[tp_rank * s:(tp_rank + 1) * s]
        else:
            positions = sequence_positions(s, x.device)
        rows, units = (torch.arange(n, device=x.device) for n in (b, h))
        keep = keep_mask(site_key(x.device), self.p, rows.view(b, 1, 1), positions.view(1, s, 1), units.view(1, 1, h))
        return x * keep.to(x.dtype) / (1.0 - self.p)


def build_hidden_dropout(p: float, keyed: bool, sequence_parallel: bool) -> nn.Module:
    """Embedding and hidden dropout: keyed by position (--keyed-dropout), or torch's from the stream (the
    model-parallel one for sequence-parallel shards)."""
    if keyed:
        return KeyedDropout(p, sequence_parallel)
    return (layers.ShardedDropout if sequence_parallel else layers.Dropout)(p)


def attention_dropout(p: float, q: Tensor, groups: int) -> AttentionDropout:
    """The ring's attention dropout for q [b, s, heads, d] over `groups` key/value groups of this rank:
    masks keyed by (site, row, global head: this tensor-parallel rank's heads are an offset into all,
    query position, key position)."""
    b, _, heads, _ = q.shape
    key = site_key(q.device)
    first_head = parallel_state.tensor_model_parallel_rank() * heads
    rows = torch.arange(b, device=q.device).view(b, 1, 1, 1, 1)
    head = (first_head + torch.arange(heads, device=q.device)).view(1, groups, heads // groups, 1, 1)
    return AttentionDropout(p, lambda q_pos, k_pos: keep_mask(key, p, rows, head, q_pos.view(-1, 1), k_pos.view(1, -1)))
