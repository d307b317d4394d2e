"""The VaR threshold of `threshold.py`, taken over every score of a selection group (the ranks holding
distinct tokens of the batch) without gathering the scores.

Modes (the rule, proofs and costs are in docs/threshold.md):
  sketch        one all-gather of a fixed-size quantile sketch (`sketch.py`) and an 8-byte all-reduce of
                the kept count; the threshold is the exact rule's at a rank in [k - rank_error_bound, k],
                so it keeps at least the tokens the exact rule keeps.
  sketch-exact  the sketch, then the exact order statistic from the few scores inside the sketch's
                proven bracket: one all-gather of three counts per rank and, only when the target lies
                strictly inside, one all-gather of the in-bracket scores padded to the largest rank's.
  exact         radix select over order-preserving 32-bit keys: four 8-bit rounds of 256-bin histogram
                all-reduces (the first also carries the non-finite count).
The exact modes equal `var_threshold` on the concatenated scores.

Non-finite scores of valid tokens (NaN, +-inf) are left out of the quantile and of the kept set and
counted in `nonfinite`: raising on the one rank that sees them would leave the others waiting in a
collective. Scores are compared in float32, the precision of the threshold.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_eslm.distributed import collectives
from megatron_eslm.eslm.sketch import MergedSketch, build_sketch
from megatron_eslm.eslm.threshold import var_index

MODES = ("sketch", "sketch-exact", "exact")
RADIX_BITS = 8
RADIX_BINS = 1 << RADIX_BITS
RADIX_SHIFTS = (24, 16, 8, 0)  # most significant digit first


@dataclass
class ThresholdResult:
    threshold: Tensor | None  # 0-dim fp32; None when no rank of the group has a finite valid score
    kept_local: Tensor  # [N] bool: valid & finite & score >= threshold
    kept_global: int  # kept tokens over the group: the loss normalizer
    valid_global: int  # finite valid scores over the group: the n of the rule
    rank_error_bound: int  # threshold = exact rule's at a rank in [k - this, k] (0 for exact modes)
    bytes_sent: int  # payload this rank handed to the collectives of this call
    nonfinite: int  # valid tokens of the group whose score was NaN or +-inf (excluded)


class Collectives(ABC):
    """The collectives the threshold needs, over the selection group, counting this rank's payload."""

    def __init__(self) -> None:
        self.bytes_sent = 0

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's `tensor` (equal shapes), stacked in rank order: [world, *tensor.shape]."""
        self.bytes_sent += tensor.numel() * tensor.element_size()
        return self._all_gather(tensor)

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Elementwise sum over the group."""
        self.bytes_sent += tensor.numel() * tensor.element_size()
        return self._all_reduce(tensor)

    @abstractmethod
    def _all_gather(self, tensor: Tensor) -> Tensor: ...

    @abstractmethod
    def _all_reduce(self, tensor: Tensor) -> Tensor: ...


class LocalCollectives(Collectives):
    """A group of one process: the same code path, nothing leaves the process."""

    def _all_gather(self, tensor: Tensor) -> Tensor:
        return tensor.unsqueeze(0)

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        return tensor


class TorchCollectives(Collectives):
    """torch.distributed over the group, through the counted wrappers (tools/bench_comm.py)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group

    def _all_gather(self, tensor: Tensor) -> Tensor:
        return torch.stack(collectives.all_gather(tensor, self.group, collectives.ESLM_THRESHOLD))

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        return collectives.all_reduce(tensor.clone(), self.group, collectives.ESLM_THRESHOLD)


@dataclass
class _LocalScores:
    """This rank's scores as fp32, with invalid and non-finite ones set to +inf and masked out."""

    values: Tensor
    finite: Tensor  # valid and finite
    nonfinite: Tensor  # 0-dim int64

    @classmethod
    def of(cls, scores: Tensor, valid: Tensor) -> _LocalScores:
        values = scores.detach().float()
        finite = valid & torch.isfinite(values)
        # -0.0 -> +0.0: equal as floats, so they must share one radix key.
        values = torch.where(finite, values.masked_fill(values == 0, 0.0), float("inf"))
        return cls(values, finite, (valid & ~finite).sum())

    @property
    def count(self) -> Tensor:
        return self.finite.sum()

    @cached_property
    def sorted(self) -> Tensor:
        """Ascending (finite scores first), plus a +inf sentinel so fixed-size reads never go out of range."""
        return torch.nn.functional.pad(self.values.sort().values, (0, 1), value=float("inf"))

    def kept(self, threshold: Tensor | None) -> Tensor:
        if threshold is None:
            return torch.zeros_like(self.finite)
        return self.finite & (self.values >= threshold)


def var_threshold_over(comm: Collectives, scores: Tensor, valid: Tensor, alpha: float, mode: str = "sketch",
                       sketch_size: int = 2048) -> ThresholdResult:
    """`global_var_threshold` over any `Collectives` (tests simulate a group in one process with it)."""
    if mode not in MODES:
        raise ValueError(f"unknown threshold mode {mode!r}; choose from {', '.join(MODES)}")
    if sketch_size < 1:
        raise ValueError(f"sketch size must be >= 1, got {sketch_size}")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    if scores.dim() != 1 or valid.shape != scores.shape:
        raise ValueError(f"scores and valid must be flat and alike, got {tuple(scores.shape)} and "
                         f"{tuple(valid.shape)}")
    local = _LocalScores.of(scores, valid)
    if mode == "exact":
        return _exact(local, alpha, comm)
    merged = MergedSketch.merge(comm.all_gather(build_sketch(local.sorted, local.count, local.nonfinite,
                                                             sketch_size)), sketch_size)
    if merged.count == 0:
        return _nothing_valid(local, merged.nonfinite, comm)
    if mode == "sketch":
        return _sketch(local, alpha, merged, comm)
    return _sketch_exact(local, alpha, merged, comm)


def global_var_threshold(scores: Tensor, valid: Tensor, alpha: float, mode: str = "sketch",
                         sketch_size: int = 2048, group: dist.ProcessGroup | None = None) -> ThresholdResult:
    """The alpha-quantile threshold of the valid scores of every rank of `group` (the selection group),
    and this rank's kept tokens; `scores` and `valid` are this rank's flattened tokens, [N].

    Every rank of the group must call it, with the same alpha, mode and sketch size. `group=None` (or
    torch.distributed not initialised) means this process alone: the selection group is never guessed,
    since counting a tensor-parallel copy of a token twice would skew the quantile."""
    return var_threshold_over(group_collectives(group), scores, valid, alpha, mode, sketch_size)


def group_collectives(group: dist.ProcessGroup | None) -> Collectives:
    """The collectives of the selection group; None (or no torch.distributed) is this process alone."""
    use_torch = group is not None and dist.is_available() and dist.is_initialized()
    return TorchCollectives(group) if use_torch else LocalCollectives()


def _exact_result(local: _LocalScores, threshold: Tensor | None, kept_global: int, valid_global: int,
                  nonfinite: int, comm: Collectives) -> ThresholdResult:
    return ThresholdResult(threshold, local.kept(threshold), kept_global, valid_global, 0, comm.bytes_sent,
                           nonfinite)


def _nothing_valid(local: _LocalScores, nonfinite: int, comm: Collectives) -> ThresholdResult:
    return _exact_result(local, None, 0, 0, nonfinite, comm)


def _sketch(local: _LocalScores, alpha: float, merged: MergedSketch, comm: Collectives) -> ThresholdResult:
    threshold, bound = merged.estimate(var_index(alpha, merged.count))
    kept = local.kept(threshold)
    kept_global = int(comm.all_reduce(kept.sum()))
    return ThresholdResult(threshold, kept, kept_global, merged.count, bound, comm.bytes_sent,
                           merged.nonfinite)


def _sketch_exact(local: _LocalScores, alpha: float, merged: MergedSketch,
                  comm: Collectives) -> ThresholdResult:
    """x_(k) from the bracket [a, b]: it is a or b, or a score strictly between them (see sketch.py)."""
    k = var_index(alpha, merged.count)
    lower, upper = merged.bracket(k)
    counts = torch.stack([torch.searchsorted(local.sorted, lower),  # scores < a
                          torch.searchsorted(local.sorted, lower, right=True),  # scores <= a
                          torch.searchsorted(local.sorted, upper)])  # scores < b
    per_rank = comm.all_gather(counts)
    below_lower, through_lower, below_upper = per_rank.sum(0).tolist()
    if k < through_lower:
        threshold, below = lower, below_lower
    elif k >= below_upper:
        threshold, below = upper, below_upper
    else:
        width = int((per_rank[:, 2] - per_rank[:, 1]).max())
        inside = comm.all_gather(_window(local.sorted, counts[1], counts[2], width)).flatten()
        threshold = inside.kthvalue(k - through_lower + 1).values
        below = through_lower + int((inside < threshold).sum())
    return _exact_result(local, threshold, merged.count - below, merged.count, merged.nonfinite, comm)


def _window(sorted_values: Tensor, start: Tensor, stop: Tensor, width: int) -> Tensor:
    """sorted_values[start:stop] padded with +inf to `width` entries, without a host sync."""
    index = start + torch.arange(width, device=sorted_values.device)
    values = sorted_values[index.clamp(max=sorted_values.numel() - 1)]
    return values.masked_fill(index >= stop, float("inf"))


def _order_keys(values: Tensor) -> Tensor:
    """int64 keys in [0, 2^32) that order like the fp32 values (non-negative floats above negative ones,
    negative floats with their magnitude bits reversed)."""
    bits = values.view(torch.int32).long()
    return torch.where(bits >= 0, bits + 2**31, -1 - bits)


def _key_value(key: Tensor) -> Tensor:
    """Inverse of `_order_keys`, for one 0-dim key."""
    bits = torch.where(key >= 2**31, key - 2**31, -1 - key)
    return bits.to(torch.int32).view(torch.float32)


def _digit_histogram(keys: Tensor, active: Tensor, prefix: Tensor, shift: int) -> Tensor:
    """Counts of the digit at `shift` among active keys whose higher digits equal `prefix`."""
    active = active & ((keys >> (shift + RADIX_BITS)) == prefix)
    digits = torch.where(active, (keys >> shift) & (RADIX_BINS - 1), RADIX_BINS)
    return torch.bincount(digits, minlength=RADIX_BINS + 1)[:RADIX_BINS]


def _exact(local: _LocalScores, alpha: float, comm: Collectives) -> ThresholdResult:
    """Radix select: each round fixes one digit of x_(k)'s key from the group's histogram of that digit
    among keys matching the digits fixed so far; digits are chosen on the device, so after reading the
    group's count no host sync happens until the kept count."""
    keys = _order_keys(local.values)
    prefix = torch.zeros((), dtype=torch.long, device=keys.device)
    first = comm.all_reduce(torch.cat([_digit_histogram(keys, local.finite, prefix, RADIX_SHIFTS[0]),
                                       local.nonfinite.view(1)]))
    histogram = first[:RADIX_BINS]
    count, nonfinite = torch.stack([histogram.sum(), first[RADIX_BINS]]).tolist()
    if count == 0:
        return _nothing_valid(local, nonfinite, comm)
    target = torch.tensor(var_index(alpha, count), device=keys.device)  # rank of x_(k) among matching keys
    below = torch.zeros_like(target)  # scores whose key is below the prefix
    for shift in RADIX_SHIFTS:
        if shift != RADIX_SHIFTS[0]:
            histogram = comm.all_reduce(_digit_histogram(keys, local.finite, prefix, shift))
        cumulative = histogram.cumsum(0)
        digit = torch.searchsorted(cumulative, target, right=True)
        under = cumulative[digit] - histogram[digit]
        target, below, prefix = target - under, below + under, prefix * RADIX_BINS + digit
    return _exact_result(local, _key_value(prefix), count - int(below), count, nonfinite, comm)
