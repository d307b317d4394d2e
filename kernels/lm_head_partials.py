"""Per-row softmax statistics of a vocabulary range, and how ranges merge: shared by the PyTorch and
Triton LM-head passes and by the vocab-parallel (tensor-parallel) head, which all-reduces them."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Partials(NamedTuple):
    """Per-row softmax statistics over one vocabulary range, mergeable across ranges.

    Fields are [N] (one range) or [R, N] (R ranges stacked); all in the score dtype.
    """

    row_max: Tensor  # max logit over the range
    sumexp: Tensor  # sum exp(logit - row_max)
    target: Tensor  # logit of the label, 0 when the label lies outside the range (or is ignored)
    sum_shifted: Tensor  # sum exp(logit - row_max) * (logit - row_max)


def rescale_partials(partials: Partials, new_max: Tensor) -> Partials:
    """The same statistics expressed relative to ``new_max`` (>= row_max, broadcastable)."""
    max_shift = partials.row_max - new_max
    alpha = max_shift.exp()
    return Partials(new_max.expand_as(partials.row_max), partials.sumexp * alpha, partials.target,
                    alpha * (partials.sum_shifted + max_shift * partials.sumexp))


def merge_partials(stacked: Partials) -> Partials:
    """Fold [R, N] partials of disjoint vocabulary ranges into the [N] partials of their union."""
    rescaled = rescale_partials(stacked, stacked.row_max.amax(dim=0))
    return Partials(rescaled.row_max[0], *(field.sum(dim=0) for field in rescaled[1:]))


def combine_partials(partials: Partials, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse, entropy) from the partials of the whole vocabulary; loss is 0 where ``valid`` is False.

    Accepts [R, N] partials of R disjoint shards (gathered from the vocab-parallel ranks), or [N] partials
    already reduced over the ranks. The all-reduce a vocab-parallel caller does (two collectives; see
    ``megatron_eslm/tensor_parallel/lm_head.py``)::

        p = lm_head_partials(hidden, weight_shard, labels, vocab_start, ignore_index)
        global_max = p.row_max.clone(); dist.all_reduce(global_max, op=ReduceOp.MAX, group=tp)
        q = rescale_partials(p, global_max)
        sums = torch.stack([q.sumexp, q.target, q.sum_shifted]); dist.all_reduce(sums, group=tp)  # SUM
        loss, lse, entropy = combine_partials(Partials(global_max, *sums), labels != ignore_index)
    """
    if partials.row_max.dim() == 2:
        partials = merge_partials(partials)
    log_z = partials.sumexp.log()
    lse = partials.row_max + log_z
    loss = torch.where(valid, lse - partials.target, 0.0)
    return loss, lse, log_z - partials.sum_shifted / partials.sumexp
