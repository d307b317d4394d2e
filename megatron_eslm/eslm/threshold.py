"""The value-at-risk (VaR) threshold of ESLM.

Rule (tie rule included): among the n valid scores sorted ascending, the threshold is the order
statistic at 0-based index k = floor(alpha * n), and every token with score >= threshold is kept. So at
most k tokens fall strictly below it, at least n - k are kept, and tokens tied with the threshold are
all kept (never split arbitrarily). alpha = 0 keeps every valid token, which is dense training.
"""
from __future__ import annotations

import math

import torch


def var_index(alpha: float, n: int) -> int:
    """0-based rank of the threshold among n sorted scores."""
    return min(int(math.floor(alpha * n)), n - 1)


def var_index_on(alpha: float | torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """`var_index` on the device, for a 0-dim int64 `count` (and a float or 0-dim float64 `alpha`), so a
    threshold over a group's scores needs no host read of the count: floor(alpha * n) in float64 (the same
    IEEE product as Python's), clamped to [0, n - 1] (0 when n is 0)."""
    k = torch.floor(count.double() * alpha).long()
    return torch.minimum(k, count - 1).clamp(min=0)


def var_threshold(scores: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor | None:
    """Exact alpha-quantile of the valid scores (a 0-dim tensor), or None when no token is valid."""
    values = scores[valid]
    if values.numel() == 0:
        return None
    # kthvalue is a selection (O(n)), not a sort; it is 1-based.
    return values.kthvalue(var_index(alpha, values.numel()) + 1).values


def keep_mask(scores: torch.Tensor, valid: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """Tokens at or above the threshold, among the valid ones."""
    if threshold is None:
        return torch.zeros_like(valid)
    return valid & (scores >= threshold)
