"""Counted collectives: every parallel code path (tensor-parallel mappings, pipeline p2p, gradient and
metric reductions, the ESLM threshold) calls torch.distributed through these wrappers, which add the
payload this rank hands over to a per-kind byte counter, so the communication volume is measured from
the code's own calls (tools/bench_comm.py) instead of being re-derived by hand.

Payload = the tensor this rank passes in: for an all-gather its own shard, for a reduce-scatter the whole
unreduced tensor, for a send or receive the message.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
from torch import Tensor

TP_ALL_REDUCE = "tp all-reduce"
TP_ALL_GATHER = "tp all-gather"
TP_REDUCE_SCATTER = "tp reduce-scatter"
PP_SEND = "pp send"
PP_RECV = "pp recv"
DP_ALL_REDUCE = "dp all-reduce"
EMBEDDING_ALL_REDUCE = "embedding all-reduce"
ESLM_THRESHOLD = "eslm threshold"
DENSE_NORMALIZER = "dense normalizer"
GRAD_NORM = "grad norm"
METRICS = "metrics"
KINDS = (TP_ALL_REDUCE, TP_ALL_GATHER, TP_REDUCE_SCATTER, PP_SEND, PP_RECV, DP_ALL_REDUCE,
         EMBEDDING_ALL_REDUCE, ESLM_THRESHOLD, DENSE_NORMALIZER, GRAD_NORM, METRICS)

bytes_by_kind: Counter[str] = Counter()
calls_by_kind: Counter[str] = Counter()


def nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def record(kind: str, size: int) -> None:
    bytes_by_kind[kind] += size
    calls_by_kind[kind] += 1


def reset() -> None:
    bytes_by_kind.clear()
    calls_by_kind.clear()


def all_reduce(tensor: Tensor, group: dist.ProcessGroup | None, kind: str,
               op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """In place over `group`; returns `tensor`."""
    record(kind, nbytes(tensor))
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather(tensor: Tensor, group: dist.ProcessGroup | None, kind: str) -> list[Tensor]:
    """Every rank's `tensor` (equal shapes), in group rank order."""
    tensor = tensor.contiguous()
    record(kind, nbytes(tensor))
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor, group=group)
    return out


def reduce_scatter(chunks: list[Tensor], group: dist.ProcessGroup | None, kind: str) -> Tensor:
    """Sum over the group of chunk i, delivered to group rank i."""
    chunks = [chunk.contiguous() for chunk in chunks]
    record(kind, sum(nbytes(chunk) for chunk in chunks))
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


def broadcast(tensor: Tensor, src: int, group: dist.ProcessGroup | None, kind: str) -> Tensor:
    """In place from global rank `src`; returns `tensor`."""
    record(kind, nbytes(tensor))
    dist.broadcast(tensor, src=src, group=group)
    return tensor
