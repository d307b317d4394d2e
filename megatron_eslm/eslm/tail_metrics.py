"""Tail metrics of an evaluation: the conditional value-at-risk of the token losses, the quantity ESLM
minimises, next to their mean.

CVaR_q is the mean of the worst m = n - floor(q n) of the n valid token losses (q = 0.5: the worst half;
0.9: the worst tenth), computed exactly over the selection group without gathering the losses: the exact
order statistic t = z_(floor(q n)) by the radix select of `distributed_threshold.py` (mode "exact"), then one
all-reduce of the sum and count of the losses strictly above t; the m - count slots left are losses equal
to t (ties), so

    CVaR_q = (sum_{L > t} L + (m - #{L > t}) t) / m.

Non-finite losses are left out, and losses are compared in float32, as in the threshold. `above_threshold_fraction` is the share of valid
tokens whose score is at or above a given threshold (the training's), over the group.
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_eslm.eslm.distributed_threshold import Collectives, var_threshold_over
from megatron_eslm.eslm.threshold import var_index_on


def cvar_over(comm: Collectives, losses: Tensor, valid: Tensor, q: float) -> Tensor:
    """CVaR_q of the valid finite `losses` of every rank of the group ([N] flat per rank): a 0-dim float64
    device tensor, NaN when the group has no finite valid loss."""
    result = var_threshold_over(comm, losses.float(), valid, q, mode="exact")
    n = result.valid_global
    m = (n - var_index_on(q, n)).double()
    values = losses.float().double()  # compared at the threshold's precision, float32
    above = valid & torch.isfinite(values) & (values > result.threshold.double())
    sums = comm.all_reduce(torch.stack([torch.where(above, values, 0.0).sum(), above.sum().double()]))
    cvar = (sums[0] + (m - sums[1]) * result.threshold.double()) / m
    return torch.where(n > 0, cvar, torch.full_like(cvar, float("nan")))


def above_threshold_fraction(comm: Collectives, scores: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """Share of the group's valid tokens whose score is at or above `threshold` (0-dim float64)."""
    counts = comm.all_reduce(torch.stack([(valid & (scores >= threshold)).sum(), valid.sum()]).double())
    return counts[0] / counts[1].clamp(min=1)
