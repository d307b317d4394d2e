"""Counted collectives: every parallel code path (tensor-parallel mappings, pipeline p2p, gradient and
metric reductions, the ESLM threshold) calls torch.distributed through these wrappers, which add the
payload this rank hands over to a per-kind byte counter, so the communication volume is measured from
the code's own calls (tools/bench_comm.py) instead of being re-derived by hand.

Payload = the tensor this rank passes in: for an all-gather its own shard, for a reduce-scatter the whole
unreduced tensor, for a send or receive the message.
"""
from __future__ import annotations

from collections import Counter

import torch.distributed as dist
from torch import Tensor

TP_ALL_REDUCE = "tp all-reduce"
TP_ALL_GATHER = "tp all-gather"
TP_REDUCE_SCATTER = "tp reduce-scatter"
CP_ALL_GATHER = "cp all-gather"
CP_REDUCE_SCATTER = "cp reduce-scatter"
CP_SEND = "cp send"  # the ring (--cp-comm-type p2p): keys and values, and their gradients, to the next rank
CP_RECV = "cp recv"
PP_SEND = "pp send"
PP_RECV = "pp recv"
DP_ALL_REDUCE = "dp all-reduce"
EMBEDDING_ALL_REDUCE = "embedding all-reduce"
ESLM_THRESHOLD = "eslm threshold"
DENSE_NORMALIZER = "dense normalizer"
GRAD_NORM = "grad norm"
METRICS = "metrics"
SEQUENCE_SELECTION = "sequence selection"  # --eslm-granularity sequence: scores, kept ids, kept sequences' tokens
KINDS = (TP_ALL_REDUCE, TP_ALL_GATHER, TP_REDUCE_SCATTER, CP_ALL_GATHER, CP_REDUCE_SCATTER, CP_SEND, CP_RECV,
         PP_SEND, PP_RECV,
         DP_ALL_REDUCE, EMBEDDING_ALL_REDUCE, ESLM_THRESHOLD, DENSE_NORMALIZER, GRAD_NORM, METRICS, SEQUENCE_SELECTION)

# torch 2.13 renamed the single-tensor collectives (the old names warn); torch >= 2.3 has the old ones.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)

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


def field_name(kind: str) -> str:
    """The metrics field of `kind`: "tp all-reduce" -> "comm_bytes_tp_all_reduce"."""
    return "comm_bytes_" + kind.replace(" ", "_").replace("-", "_")


def interval_bytes(iterations: int) -> dict[str, float]:
    """This rank's payload per iteration (the mean over `iterations`) of every kind since the last call,
    which resets the counters: the per-log-interval view of `bytes_by_kind`, as `Timers.interval_ms` is of
    the phase times."""
    out = {field_name(kind): bytes_by_kind[kind] / iterations for kind in KINDS}
    reset()
    return out


def all_reduce(tensor: Tensor, group: dist.ProcessGroup | None, kind: str,
               op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """In place over `group`; returns `tensor`."""
    record(kind, nbytes(tensor))
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather_into_tensor(tensor: Tensor, group: dist.ProcessGroup | None, kind: str) -> Tensor:
    """Every rank's `tensor` (equal shapes) stacked in group rank order, [world, *tensor.shape]: the
    collective writes straight into the one buffer (the list API makes NCCL gather into a flat buffer and
    then copy out to each tensor)."""
    tensor = tensor.contiguous()
    record(kind, nbytes(tensor))
    world = dist.get_world_size(group)
    out = tensor.new_empty(world * tensor.numel())  # flat: gloo splits the output along dim 0
    _all_gather_single(out, tensor.view(-1), group=group)
    return out.view(world, *tensor.shape)


def reduce_scatter_tensor(tensor: Tensor, group: dist.ProcessGroup | None, kind: str) -> Tensor:
    """`tensor` is [world, *shape]: the sum over the group of `tensor[i]`, delivered to group rank i, of
    shape `shape`. The collective reads the one contiguous buffer (pass it contiguous: anything else is
    copied here)."""
    tensor = tensor.contiguous()
    record(kind, nbytes(tensor))
    out = tensor.new_empty(tensor.shape[1:])
    _reduce_scatter_single(out.view(-1), tensor.view(-1), group=group)
    return out


def broadcast(tensor: Tensor, src: int, group: dist.ProcessGroup | None, kind: str) -> Tensor:
    """In place from global rank `src`; returns `tensor`."""
    record(kind, nbytes(tensor))
    dist.broadcast(tensor, src=src, group=group)
    return tensor
