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

The radix select is generic (`_radix_select`): the smallest key whose cumulative weight exceeds a target,
with the count of the keys below it. `_exact` weighs every score 1 (target k); `mass_prefix_over`, the
gradient-mass count of Ada-ESLM (`ada.py`), weighs each token by its mass in int64 fixed point (target
floor(budget x total mass)), with the same rounds and the same fixed-size payloads.

`reference`: the threshold is instead the alpha-quantile of a sketch merged earlier (the previous step's,
over the group), applied to these scores; the call still all-gathers these scores' sketch (for the
caller to accumulate, `keep_sketch`) and all-reduces the kept count.

Non-finite scores of valid tokens (NaN, +-inf) are left out of the quantile and of the kept set and
counted in `nonfinite`: raising on the one rank that sees them would leave the others waiting in a
collective. Scores are compared in float32, the precision of the threshold.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from fractions import Fraction
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
MASS_UNIT_BITS = 32  # `mass_prefix_over` sums masses in [0, 1] as int64 multiples of 2^-32


@dataclass
class ThresholdResult:
    threshold: Tensor | None  # 0-dim fp32; None when no rank of the group has a finite valid score
    kept_local: Tensor  # [N] bool: valid & finite & score >= threshold
    kept_global: int  # kept tokens over the group: the loss normalizer
    valid_global: int  # finite valid scores over the group: the n of the rule
    rank_error_bound: int  # threshold = exact rule's at a rank in [k - this, k] (0 for exact modes)
    bytes_sent: int  # payload this rank handed to the collectives of this call
    nonfinite: int  # valid tokens of the group whose score was NaN or +-inf (excluded)
    sketch: Tensor | None = None  # with keep_sketch: the group's gathered sketch payloads [R, m + 2]


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
                       sketch_size: int = 2048, reference: MergedSketch | None = None,
                       keep_sketch: bool = False) -> ThresholdResult:
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
    if reference is not None and reference.count == 0:  # a reference without scores sets no threshold
        reference = None
    local = _LocalScores.of(scores, valid)
    if mode == "exact" and reference is None and not keep_sketch:
        return _exact(local, alpha, comm)
    payloads = comm.all_gather(build_sketch(local.sorted, local.count, local.nonfinite, sketch_size))
    merged = MergedSketch.merge(payloads, sketch_size)
    if merged.count == 0:
        result = _nothing_valid(local, merged.nonfinite, comm)
    elif reference is not None or mode == "sketch":
        result = _sketch(local, alpha, merged, comm, reference)
    elif mode == "exact":
        result = _exact(local, alpha, comm)
    else:
        result = _sketch_exact(local, alpha, merged, comm)
    if keep_sketch:
        result.sketch = payloads
    return result


def global_var_threshold(scores: Tensor, valid: Tensor, alpha: float, mode: str = "sketch",
                         sketch_size: int = 2048, group: dist.ProcessGroup | None = None,
                         reference: MergedSketch | None = None, keep_sketch: bool = False) -> ThresholdResult:
    """The alpha-quantile threshold of the valid scores of every rank of `group` (the selection group),
    and this rank's kept tokens; `scores` and `valid` are this rank's flattened tokens, [N].

    Every rank of the group must call it, with the same alpha, mode and sketch size. `group=None` (or
    torch.distributed not initialised) means this process alone: the selection group is never guessed,
    since counting a tensor-parallel copy of a token twice would skew the quantile.

    `reference` (a sketch merged over the group, with at least one score; the same on every rank): the
    threshold is its alpha-quantile z_(k) instead, whatever `mode`, and `rank_error_bound` is stated
    against the reference's scores (k and B of docs/threshold.md computed on them). `keep_sketch`: return
    the group's sketch of these scores in `sketch` (gathered even in exact mode), to merge later."""
    return var_threshold_over(group_collectives(group), scores, valid, alpha, mode, sketch_size, reference,
                              keep_sketch)


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


def _sketch(local: _LocalScores, alpha: float, merged: MergedSketch, comm: Collectives,
            reference: MergedSketch | None = None) -> ThresholdResult:
    """z_(k) of `reference` (default: of these scores' merged sketch) applied to these scores."""
    source = merged if reference is None else reference
    threshold, bound = source.estimate(var_index(alpha, source.count))
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


def _digit_histogram(keys: Tensor, active: Tensor, prefix: Tensor, shift: int,
                     weights: Tensor | None = None) -> Tensor:
    """The digit at `shift` among active keys whose higher digits equal `prefix`: [1, RADIX_BINS] counts,
    or with int64 `weights` (one per key) [2, RADIX_BINS]: the counts and the weight sums. Integer sums,
    so the group's histogram is the same bits in any order of ranks and of tokens."""
    active = active & ((keys >> (shift + RADIX_BITS)) == prefix)
    digits = torch.where(active, (keys >> shift) & (RADIX_BINS - 1), RADIX_BINS)
    counts = torch.bincount(digits, minlength=RADIX_BINS + 1)[:RADIX_BINS]
    if weights is None:
        return counts.unsqueeze(0)
    sums = torch.zeros(RADIX_BINS + 1, dtype=torch.long, device=keys.device).index_add_(0, digits, weights)
    return torch.stack([counts, sums[:RADIX_BINS]])


def _first_histogram(keys: Tensor, active: Tensor, weights: Tensor | None = None) -> Tensor:
    """This rank's histogram of the most significant digit (every key matches the empty prefix)."""
    return _digit_histogram(keys, active, torch.zeros((), dtype=torch.long, device=keys.device),
                            RADIX_SHIFTS[0], weights)


def _radix_select(comm: Collectives, keys: Tensor, active: Tensor, weights: Tensor | None, histogram: Tensor,
                  target: int) -> tuple[Tensor, Tensor]:
    """The smallest key v whose weight W(<= v), summed over the group's active keys <= v, exceeds `target`
    (weight 1 per key without `weights`, so v is the key of rank `target`), and the group's count of active
    keys below v, both 0-dim int64 tensors. `histogram` is the group's first-round one, which the caller
    all-reduced to read its totals; the target must be below its total weight. Each round fixes one digit
    of v: the first digit whose cumulative weight, over the keys matching the digits fixed so far, exceeds
    what is left of the target; one histogram all-reduce per later round. Digits are chosen on the device,
    so there is no host sync; the weights are integers, so every layout of the group takes the same
    digits."""
    channel = 0 if weights is None else 1
    prefix = torch.zeros((), dtype=torch.long, device=keys.device)
    left = torch.tensor(target, dtype=torch.long, device=keys.device)  # target minus W(keys below prefix)
    below = torch.zeros_like(left)  # active keys below the prefix
    for shift in RADIX_SHIFTS:
        if shift != RADIX_SHIFTS[0]:
            histogram = comm.all_reduce(_digit_histogram(keys, active, prefix, shift, weights))
        cumulative = histogram.cumsum(1)
        digit = torch.searchsorted(cumulative[channel], left, right=True)
        under = cumulative[:, digit] - histogram[:, digit]  # the channels over the digits below `digit`
        left, below, prefix = left - under[channel], below + under[0], prefix * RADIX_BINS + digit
    return prefix, below


def _exact(local: _LocalScores, alpha: float, comm: Collectives) -> ThresholdResult:
    """Radix select of x_(k): each round fixes one digit of its key from the group's histogram of that
    digit among keys matching the digits fixed so far; after reading the group's count no host sync
    happens until the kept count."""
    keys = _order_keys(local.values)
    first = comm.all_reduce(torch.cat([_first_histogram(keys, local.finite)[0], local.nonfinite.view(1)]))
    histogram = first[:RADIX_BINS].unsqueeze(0)
    count, nonfinite = torch.stack([histogram.sum(), first[RADIX_BINS]]).tolist()
    if count == 0:
        return _nothing_valid(local, nonfinite, comm)
    key, below = _radix_select(comm, keys, local.finite, None, histogram, var_index(alpha, count))
    return _exact_result(local, _key_value(key), count - int(below), count, nonfinite, comm)


@dataclass
class MassPrefix:
    count: int  # tokens of the group below the boundary key: the droppable count
    total: int  # tokens of the group the rule counts (valid, finite score, finite mass)
    bytes_sent: int  # payload this rank handed to the collectives of this call


def fixed_point_mass(mass: Tensor) -> Tensor:
    """Masses clamped to [0, 1], as int64 multiples of 2^-MASS_UNIT_BITS (rounded to nearest)."""
    return torch.round(mass.double().clamp(0.0, 1.0) * 2.0**MASS_UNIT_BITS).long()


def mass_prefix_over(comm: Collectives, scores: Tensor, mass: Tensor, valid: Tensor, budget: float) -> MassPrefix:
    """The lowest-score tokens of the group that carry at most `budget` of its mass, whole ties at a time.

    Over the group's tokens that are valid with a finite score and a finite mass (the others are left
    out, as `_exact` leaves out non-finite scores), with every mass clamped to [0, 1] and rounded to a
    multiple of 2^-32 (`fixed_point_mass`), M their total: the boundary is the largest score key t with
    mass(key < t) <= budget * M, and `count` is the number of tokens with key < t. Tokens tied at the
    boundary score are never split: they are all below t or none is. budget >= 1, or M = 0, counts every
    token; budget 0 counts the tokens below the lowest score carrying any mass. Scores compare in float32
    (as the threshold does; -0.0 = 0.0). The sums are integers (exact while the group holds fewer than
    2^31 tokens), so the result is the same for any split of the tokens over any number of ranks.

    Payload: a [2, RADIX_BINS] int64 histogram (counts, masses) per round: 4 KB, and 4 rounds (16 KB)
    unless the first one settles it (no token, or every token counted)."""
    if not budget >= 0.0:
        raise ValueError(f"the mass budget must be >= 0, got {budget}")
    if scores.dim() != 1 or mass.shape != scores.shape or valid.shape != scores.shape:
        raise ValueError(f"scores, mass and valid must be flat and alike, got {tuple(scores.shape)}, "
                         f"{tuple(mass.shape)} and {tuple(valid.shape)}")
    mass = mass.detach()
    local = _LocalScores.of(scores, valid & torch.isfinite(mass))
    weights = torch.where(local.finite, fixed_point_mass(mass), 0)
    keys = _order_keys(local.values)
    histogram = comm.all_reduce(_first_histogram(keys, local.finite, weights))
    total, total_mass = histogram.sum(1).tolist()
    # budget * M, exactly, in mass units (a float is a fraction; an infinite budget allows everything)
    allowance = total_mass if budget >= 1.0 else math.floor(Fraction(budget) * total_mass)
    if total_mass <= allowance:  # also no token at all
        return MassPrefix(total, total, comm.bytes_sent)
    _, below = _radix_select(comm, keys, local.finite, weights, histogram, allowance)
    return MassPrefix(int(below), total, comm.bytes_sent)
