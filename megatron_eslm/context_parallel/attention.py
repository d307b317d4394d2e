"""Causal attention of this rank's queries (chunks r and 2C-1-r of each sequence) over the keys and values
of the whole sequence, in the form --cp-comm-type names (`parallel_state.context_parallel_comm_type`):
p2p passes the keys and values around the ring (`ring.py`); all_gather, here, all-gathers them over the
context-parallel group once per layer and reduce-scatters their gradients back in the backward (Transformer
Engine's cp_comm_type="all_gather"; docs/parallelism.md compares the two).

Chunk c of length L attends to the keys of chunks 0..c: a query at local offset i (global position cL + i)
sees keys 0..cL + i, i.e. the causal mask aligned to the lower right of its [L, (c+1)L] score block
(`torch.nn.attention.bias.causal_lower_right`, which flash and memory-efficient SDPA run without
materialising a mask; chunk 0 is the plain causal case). The two local chunks are two SDPA calls.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_eslm import parallel_state
from megatron_eslm.context_parallel.ring import ring_attention
from megatron_eslm.context_parallel.sharding import chunk_ids, shard_sequence
from megatron_eslm.distributed import collectives

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias


def _to_global_order(gathered: Tensor, cp: int) -> Tensor:
    """[C, 2, b, 2L, g, d] in rank order (rank r: chunks r, 2C-1-r) -> [2, b, 2C L, g, d] in sequence order,
    in one copy: chunk j < C is the first half of rank j's, chunk j >= C the second half of rank 2C-1-j's."""
    halves = gathered.unflatten(3, (2, -1))  # [C, 2, b, 2, L, g, d]
    return torch.cat([halves[r, :, :, 0] for r in range(cp)] + [halves[r, :, :, 1] for r in reversed(range(cp))],
                     dim=2)


def _to_rank_order(full: Tensor, cp: int) -> Tensor:
    """The inverse of `_to_global_order`: [2, b, 2C L, g, d] -> [C, 2, b, 2L, g, d], each rank's shard."""
    flat = full.flatten(0, 1)  # [2b, 2C L, g, d]: the sequence on dim 1, as `shard_sequence` takes it
    return torch.stack([shard_sequence(flat, cp, r) for r in range(cp)]).unflatten(1, full.shape[:2])


@functools.lru_cache(maxsize=None)
def _lower_right(queries: int, keys: int) -> CausalBias:
    """The mask object of a [queries, keys] block, made once per shape: it holds only the two lengths, and
    it is a tensor subclass, which cannot be created under a TorchDispatchMode (such as the host-sync
    counter of `host_syncs.py`) while the model runs. Imported here: its module imports torch._dynamo,
    about 2 s of every process's start-up that only context parallelism needs."""
    from torch.nn.attention.bias import causal_lower_right
    return causal_lower_right(queries, keys)


class _GatherKeysValues(torch.autograd.Function):
    """Forward: all-gather [2, b, 2L, g, d] (keys and values stacked: one collective) over the context
    group into the whole sequence. Backward: every rank's gradient of the whole sequence, summed and
    scattered back to the chunks' owners (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, kv: Tensor) -> Tensor:
        group, cp = parallel_state.context_parallel_group(), parallel_state.context_parallel_size()
        return _to_global_order(collectives.all_gather_into_tensor(kv, group, collectives.CP_ALL_GATHER), cp)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        group, cp = parallel_state.context_parallel_group(), parallel_state.context_parallel_size()
        return collectives.reduce_scatter_tensor(_to_rank_order(grad, cp), group, collectives.CP_REDUCE_SCATTER)


def context_parallel_attention(q: Tensor, k: Tensor, v: Tensor, **sdpa_options) -> Tensor:
    """q [b, 2L, heads, d], k and v [b, 2L, groups, d] of this rank's two chunks -> [b, 2L, heads, d]."""
    if parallel_state.context_parallel_comm_type() == "p2p":
        return ring_attention(q, k, v)
    cp = parallel_state.context_parallel_size()
    keys, values = _GatherKeysValues.apply(torch.stack([k, v])).transpose(2, 3).unbind(0)  # [b, g, 2C L, d]
    length = q.shape[1] // 2
    outputs = []
    for half, chunk in enumerate(chunk_ids(cp, parallel_state.context_parallel_rank())):
        query = q[:, half * length:(half + 1) * length].transpose(1, 2)
        seen = (chunk + 1) * length
        outputs.append(F.scaled_dot_product_attention(query, keys[:, :, :seen], values[:, :, :seen],
                                                      attn_mask=_lower_right(length, seen), **sdpa_options))
    return torch.cat([out.transpose(1, 2) for out in outputs], dim=1)  # [b, 2L, heads, d], contiguous
