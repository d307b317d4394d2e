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

Host syncs: none in `sketch` and `exact` (counts, ranks and thresholds stay 0-dim device tensors; a group
without a finite score gets the threshold +inf, which keeps nothing), one in `sketch-exact` (the width of
the in-bracket window sizes its all-gather), one per call in `mass_prefix_over` (none: its allowance is
computed on the device in exact integer arithmetic). The caller's kept-row backward adds the one inherent
sync of selection (docs/threshold.md, "Host syncs").
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_eslm import host_syncs
from megatron_eslm.distributed import collectives
from megatron_eslm.eslm.sketch import MergedSketch, build_sketch
from megatron_eslm.eslm.threshold import var_index_on
from megatron_eslm.training.timers import get_timers

MODES = ("sketch", "sketch-exact", "exact")
RADIX_BITS = 8
RADIX_BINS = 1 << RADIX_BITS
RADIX_SHIFTS = (24, 16, 8, 0)  # most significant digit first
MASS_UNIT_BITS = 32  # `mass_prefix_over` sums masses in [0, 1] as int64 multiples of 2^-32


@dataclass
class ThresholdResult:
    # 0-dim device tensors, read by nobody in the step (the metrics are reduced at the log interval):
    threshold: Tensor  # fp32; +inf when no rank of the group has a finite valid score (nothing kept)
    kept_local: Tensor  # [N] bool: valid & finite & score >= threshold
    kept_global: Tensor  # int64, kept tokens over the group: the loss normalizer
    valid_global: Tensor  # int64, finite valid scores over the group: the n of the rule
    rank_error_bound: Tensor  # int64: threshold = exact rule's at a rank in [k - this, k] (0 for exact modes)
    bytes_sent: int  # payload this rank handed to the collectives of this call (known from the shapes)
    nonfinite: Tensor  # int64, valid tokens of the group whose score was NaN or +-inf (excluded)
    sketch: Tensor | None = None  # with keep_sketch: the group's gathered sketch payloads [R, m + 2]


class Collectives(ABC):
    """The collectives the threshold needs, over the selection group, counting this rank's payload."""

    def __init__(self) -> None:
        self.bytes_sent = 0

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's `tensor` (equal shapes), stacked in rank order: [world, *tensor.shape]."""
        self.bytes_sent += tensor.numel() * tensor.element_size()
        with get_timers().phase("threshold_comm"):
            return self._all_gather(tensor)

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Elementwise sum over the group."""
        self.bytes_sent += tensor.numel() * tensor.element_size()
        with get_timers().phase("threshold_comm"):
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
        return collectives.all_gather_into_tensor(tensor, self.group, collectives.ESLM_THRESHOLD)

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

    def kept(self, threshold: Tensor) -> Tensor:
        return self.finite & (self.values >= threshold)


def var_threshold_over(comm: Collectives, scores: Tensor, valid: Tensor, alpha: float | Tensor,
                       mode: str = "sketch",
                       sketch_size: int = 2048, reference: MergedSketch | None = None,
                       keep_sketch: bool = False) -> ThresholdResult:
    """`global_var_threshold` over any `Collectives` (tests simulate a group in one process with it)."""
    if mode not in MODES:
        raise ValueError(f"unknown threshold mode {mode!r}; choose from {', '.join(MODES)}")
    if sketch_size < 1:
        raise ValueError(f"sketch size must be >= 1, got {sketch_size}")
    if not isinstance(alpha, Tensor) and not 0.0 <= alpha < 1.0:  # a tensor alpha is Ada-ESLM's, kept in range
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    if scores.dim() != 1 or valid.shape != scores.shape:
        raise ValueError(f"scores and valid must be flat and alike, got {tuple(scores.shape)} and "
                         f"{tuple(valid.shape)}")
    local = _LocalScores.of(scores, valid)
    if mode == "exact" and reference is None and not keep_sketch:
        return _exact(local, alpha, comm)
    payloads = comm.all_gather(build_sketch(local.sorted, local.count, local.nonfinite, sketch_size))
    merged = MergedSketch.merge(payloads, sketch_size)
    if reference is not None or mode == "sketch":
        result = _sketch(local, alpha, merged, comm, reference)
    elif mode == "exact":
        result = _exact(local, alpha, comm)
    else:
        result = _sketch_exact(local, alpha, merged, comm)
    if keep_sketch:
        result.sketch = payloads
    return result


def global_var_threshold(scores: Tensor, valid: Tensor, alpha: float | Tensor, mode: str = "sketch",
                         sketch_size: int = 2048, group: dist.ProcessGroup | None = None,
                         reference: MergedSketch | None = None, keep_sketch: bool = False) -> ThresholdResult:
    """The alpha-quantile threshold of the valid scores of every rank of `group` (the selection group),
    and this rank's kept tokens; `scores` and `valid` are this rank's flattened tokens, [N].

    Every rank of the group must call it, with the same alpha, mode and sketch size. `group=None` (or
    torch.distributed not initialised) means this process alone: the selection group is never guessed,
    since counting a tensor-parallel copy of a token twice would skew the quantile.

    `reference` (a sketch merged over the group, the same on every rank): the threshold is its
    alpha-quantile z_(k) instead, whatever `mode`, and `rank_error_bound` is stated against the reference's
    scores (k and B of docs/threshold.md computed on them); a reference without a finite score (a step
    whose scores were all NaN) defers to these scores' own sketch estimate, as `mode` "sketch" would. `keep_sketch`: return
    the group's sketch of these scores in `sketch` (gathered even in exact mode), to merge later."""
    with get_timers().phase("threshold"):
        return var_threshold_over(group_collectives(group), scores, valid, alpha, mode, sketch_size, reference,
                                  keep_sketch)


def group_collectives(group: dist.ProcessGroup | None) -> Collectives:
    """The collectives of the selection group; None (or no torch.distributed) is this process alone."""
    use_torch = group is not None and dist.is_available() and dist.is_initialized()
    return TorchCollectives(group) if use_torch else LocalCollectives()


def _exact_result(local: _LocalScores, threshold: Tensor, kept_global: Tensor, valid_global: Tensor,
                  nonfinite: Tensor, comm: Collectives) -> ThresholdResult:
    return ThresholdResult(threshold, local.kept(threshold), kept_global, valid_global,
                           torch.zeros_like(kept_global), comm.bytes_sent, nonfinite)


def _sketch(local: _LocalScores, alpha: float | Tensor, merged: MergedSketch, comm: Collectives,
            reference: MergedSketch | None = None) -> ThresholdResult:
    """z_(k) of `reference` (default: of these scores' merged sketch) applied to these scores."""
    threshold, bound = merged.estimate(var_index_on(alpha, merged.count))
    if reference is not None:
        has_scores = reference.count > 0
        ref_threshold, ref_bound = reference.estimate(var_index_on(alpha, reference.count))
        threshold = torch.where(has_scores, ref_threshold, threshold)
        bound = torch.where(has_scores, ref_bound, bound)
    kept = local.kept(threshold)
    kept_global = comm.all_reduce(kept.sum())
    return ThresholdResult(threshold, kept, kept_global, merged.count, bound, comm.bytes_sent, merged.nonfinite)


def _sketch_exact(local: _LocalScores, alpha: float | Tensor, merged: MergedSketch,
                  comm: Collectives) -> ThresholdResult:
    """x_(k) from the bracket [a, b]: it is a or b, or a score strictly between them (see sketch.py). The
    window of in-bracket scores is all-gathered only when x_(k) lies strictly inside; its width (the
    largest rank's count inside, 0 when not needed) is this mode's one host read."""
    k = var_index_on(alpha, merged.count)
    lower, upper = merged.bracket(k)
    counts = torch.stack([torch.searchsorted(local.sorted, lower),  # scores < a
                          torch.searchsorted(local.sorted, lower, right=True),  # scores <= a
                          torch.searchsorted(local.sorted, upper)])  # scores < b
    per_rank = comm.all_gather(counts)
    below_lower, through_lower, below_upper = per_rank.sum(0).unbind()
    at_lower = k < through_lower
    threshold = torch.where(at_lower, lower, upper)
    below = torch.where(at_lower, below_lower, below_upper)
    inside = ~at_lower & (k < below_upper)
    with host_syncs.inherent("the in-bracket window's width sizes its all-gather"):
        width = int(torch.where(inside, (per_rank[:, 2] - per_rank[:, 1]).max(), 0))
    if width > 0:
        window = comm.all_gather(_window(local.sorted, counts[1], counts[2], width)).flatten().sort().values
        value = window.take((k - through_lower).clamp(0, window.numel() - 1))
        threshold = torch.where(inside, value, threshold)
        below = torch.where(inside, through_lower + (window < value).sum(), below)
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
    bins = torch.zeros(RADIX_BINS + 1, dtype=torch.long, device=keys.device)
    # not torch.bincount: on CUDA it reads the largest digit back to the host to size its output
    counts = bins.index_add(0, digits, torch.ones_like(digits))[:RADIX_BINS]
    if weights is None:
        return counts.unsqueeze(0)
    return torch.stack([counts, bins.index_add(0, digits, weights)[:RADIX_BINS]])


def _first_histogram(keys: Tensor, active: Tensor, weights: Tensor | None = None) -> Tensor:
    """This rank's histogram of the most significant digit (every key matches the empty prefix)."""
    return _digit_histogram(keys, active, torch.zeros((), dtype=torch.long, device=keys.device),
                            RADIX_SHIFTS[0], weights)


def _radix_select(comm: Collectives, keys: Tensor, active: Tensor, weights: Tensor | None, histogram: Tensor,
                  target: Tensor) -> tuple[Tensor, Tensor]:
    """The smallest key v whose weight W(<= v), summed over the group's active keys <= v, exceeds `target`
    (weight 1 per key without `weights`, so v is the key of rank `target`), and the group's count of active
    keys below v, both 0-dim int64 tensors. `histogram` is the group's first-round one, which the caller
    all-reduced for its totals; a 0-dim int64 `target` at or past its total weight gives a meaningless key
    (callers mask that case). Each round fixes one digit
    of v: the first digit whose cumulative weight, over the keys matching the digits fixed so far, exceeds
    what is left of the target; one histogram all-reduce per later round. Digits are chosen on the device,
    so there is no host sync; the weights are integers, so every layout of the group takes the same
    digits."""
    channel = 0 if weights is None else 1
    prefix = torch.zeros((), dtype=torch.long, device=keys.device)
    left = target.clone()  # target minus W(keys below prefix)
    below = torch.zeros_like(left)  # active keys below the prefix
    for shift in RADIX_SHIFTS:
        if shift != RADIX_SHIFTS[0]:
            histogram = comm.all_reduce(_digit_histogram(keys, active, prefix, shift, weights))
        cumulative = histogram.cumsum(1)
        digit = torch.searchsorted(cumulative[channel], left, right=True).clamp(max=RADIX_BINS - 1)
        # the channels over the digits below `digit` (index_select: indexing by a 0-dim tensor reads it)
        under = (cumulative.index_select(1, digit.view(1)) - histogram.index_select(1, digit.view(1))).squeeze(1)
        left, below, prefix = left - under[channel], below + under[0], prefix * RADIX_BINS + digit
    return prefix, below


def _exact(local: _LocalScores, alpha: float | Tensor, comm: Collectives) -> ThresholdResult:
    """Radix select of x_(k): each round fixes one digit of its key from the group's histogram of that
    digit among keys matching the digits fixed so far; no host sync."""
    keys = _order_keys(local.values)
    first = comm.all_reduce(torch.cat([_first_histogram(keys, local.finite)[0], local.nonfinite.view(1)]))
    histogram = first[:RADIX_BINS].unsqueeze(0)
    count = histogram.sum()
    key, below = _radix_select(comm, keys, local.finite, None, histogram, var_index_on(alpha, count))
    threshold = _key_value(key).masked_fill(count == 0, float("inf"))
    return _exact_result(local, threshold, count - below, count, first[RADIX_BINS], comm)


@dataclass
class MassPrefix:
    count: Tensor  # 0-dim int64: tokens of the group below the boundary key, the droppable count
    total: Tensor  # 0-dim int64: tokens of the group the rule counts (valid, finite score, finite mass)
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

    Payload: a [2, RADIX_BINS] int64 histogram (counts, masses) per round: 4 KB, 4 rounds (16 KB) always
    (whether the first round settles it is known only on the device); no host sync."""
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
    total, total_mass = histogram.sum(1).unbind()
    # budget * M, exactly, in mass units (an infinite budget allows everything)
    allowance = total_mass if budget >= 1.0 else floor_times(total_mass, budget)
    settled = total_mass <= allowance  # also no token at all
    target = torch.minimum(allowance, total_mass - 1).clamp(min=0)
    _, below = _radix_select(comm, keys, local.finite, weights, histogram, target)
    return MassPrefix(torch.where(settled, total, below), total, comm.bytes_sent)


LIMB_BITS = 16
LIMBS = 4  # an int64 (and a float's 53-bit numerator) in 16-bit limbs


def floor_times(value: Tensor, factor: float) -> Tensor:
    """floor(factor * value) exactly, on the device, for a 0-dim int64 value >= 0 and 0 <= factor < 1.

    factor is a dyadic fraction p / 2^e (every float is); p * value needs up to 116 bits, so both are cut
    into 16-bit limbs, multiplied column by column (each column < 2^34), the carries propagated, and the
    128-bit product shifted right by e. About 30 scalar kernels and no host sync, against the
    `math.floor(Fraction(factor) * value)` a host read would allow."""
    numerator, denominator = Fraction(factor).as_integer_ratio()
    shift = denominator.bit_length() - 1
    limbs = (value.unsqueeze(0) >> torch.arange(0, LIMB_BITS * LIMBS, LIMB_BITS, device=value.device)) & 0xFFFF
    columns = torch.zeros(2 * LIMBS, dtype=torch.long, device=value.device)
    for j in range(LIMBS):
        columns[j:j + LIMBS] += limbs * ((numerator >> (LIMB_BITS * j)) & 0xFFFF)
    for c in range(2 * LIMBS - 1):
        columns[c + 1] += columns[c] >> LIMB_BITS
        columns[c] &= 0xFFFF
    result = torch.zeros_like(value)
    for c in range(2 * LIMBS):  # normalised limbs: the bits below 2^shift never carry into the result
        offset = LIMB_BITS * c - shift
        if offset >= 0:
            result = result + (columns[c] << offset)
        elif offset > -LIMB_BITS:
            result = result + (columns[c] >> -offset)
    return result
