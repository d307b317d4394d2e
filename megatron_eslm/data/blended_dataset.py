"""Blending datasets by weight: ``--data-path 0.3 A 0.7 B``.

Which dataset serves blended sample i follows the quota method: after any n samples, dataset d has served
between ``floor(w_d * n)`` and ``ceil(w_d * n)`` of them, i.e. its share is within one sample of its weight
at every prefix of the stream. Megatron's greedy rule (serve the dataset with the largest error
``w_d * n - count_d``) has the same aim but drifts up to about 1.65 samples with several datasets; this one
keeps the bound exactly (docs/data.md gives the argument; tests check it on random weights).

Construction: the k-th sample of dataset d may not come before position ``floor((k - 1) / w_d) + 1``
(else its count would pass ``ceil(w_d n)``) and must come by position ``ceil(k / w_d)`` (else it would fall
below ``floor(w_d n)``). Each position takes, among the samples already allowed, the one with the earliest
deadline (ties: the lower dataset). Earliest-deadline-first meets every deadline whenever any order does,
and the quota method (Balinski and Young) shows one does. Weights are exact fractions (parsed from the
flag's decimal strings), so with denominator A the counts after A samples are exactly ``w_d * A`` and the
order repeats with period A: only ``min(A, size)`` positions are computed, the rest is tiled.

The earliest-deadline order is computed with numpy, mostly without a Python loop over positions
(``_quota_schedule``):

1. Sort all samples by (deadline, dataset). If the sample in sorted place p is always released by position
   p, this sorted order *is* the earliest-deadline order: by induction, at position p every sample of a
   smaller key is served, and the one in place p is allowed, so it is the earliest deadline on offer.
2. With two datasets that is always so, and the order has a closed form (``_two_schedule``): the first n
   positions hold ``floor((n + 1) w_0)`` samples of the first dataset.
3. With more, where the sample in place p is not released yet ("late"), earliest-deadline-first serves
   another one first. From a place where the served samples are exactly a prefix of the sorted order:
   - mostly it serves the next sample and the late one right after: a swap, applied everywhere at once;
   - or a later one first (a sample of small weight filling in) and then the others in order: a rotation;
   - other short repairs are replayed for all such places in lockstep with numpy;
   - the rest run as the plain loop until the served samples are a prefix again. A sample that the
     sorted order never reaches within the size (a tiny weight) counts as served for good, and the
     sorted order goes on shifted by one. When the plain loop does most of the work, it runs to the end.
   Each repair starts from such a prefix, so repairs are independent of each other.

All arithmetic is exact on integers: int64 where no product can overflow, else floating point with the
few near-integer quotients recomputed as Python integers, else Python integers throughout.
``tests/test_data_blending.py`` checks the result against a plain loop over positions.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch

from megatron_eslm.data.index_cache import Arrays, cached_arrays
from megatron_eslm.errors import UserError

_INDEX_FORMAT = 1
_INT64_SAFE = 1 << 62  # products below this cannot overflow int64, even after adding a denominator
_REPLAY_WIDTHS = (8, 64)  # positions lockstep replays cover, in two rounds; longer ones: the plain loop
_BATCH = 4096  # late ranks whose repairs are worked out at once
_PLAIN_AFTER = 1 << 16  # positions replayed as the plain loop after which it may run to the end


def _mul_div(x: np.ndarray, num: int, den: int, ceil: bool = False) -> np.ndarray:
    """``floor(x * num / den)`` (``ceil`` if asked) of each non-negative integer in ``x``, exactly.

    int64 when no product can overflow; otherwise ``x * (num // den)`` plus a floating-point quotient of the
    remainder, whose few near-integer values are recomputed as Python integers; otherwise (values past
    2^47) Python integers throughout, as an object array.
    """
    g = math.gcd(num, den)
    num, den = num // g, den // g
    up = den - 1 if ceil else 0
    if x.dtype == object:
        return (x * num + up) // den
    top = max(int(x.max()), 1) if x.size else 1  # at least 1: numpy must also hold num itself
    if top * num + den < _INT64_SAFE:
        y = x * num
        if up:
            y += up
        y //= den
        return y
    whole, rem = divmod(num, den)
    if top >= 1 << 47 or top * (whole + 1) >= _INT64_SAFE:
        return _mul_div(x.astype(object), num, den, ceil)
    quotient = x.astype(np.float64) * (rem / den)  # off by at most top * 2^-52 from the exact quotient
    part = (np.ceil(quotient) if ceil else np.floor(quotient)).astype(np.int64)
    near = np.flatnonzero(np.abs(quotient - np.rint(quotient)) <= top * 2.0**-48)
    if near.size:  # floor/ceil of a value this close to an integer could be off by one: recompute exactly
        part[near] = [(value * rem + up) // den for value in x[near].tolist()]
    part += x * whole
    return part


def _mul_div_range(start: int, stop: int, num: int, den: int, ceil: bool = False) -> np.ndarray:
    """``_mul_div(np.arange(start, stop), num, den, ceil)``, without the intermediate array when it fits."""
    up = den - 1 if ceil else 0
    if 0 <= start < stop and stop * num + den < _INT64_SAFE:
        y = np.arange(start * num + up, stop * num + up, num, dtype=np.int64)
        y //= den
        return y
    return _mul_div(np.arange(start, max(start, stop), dtype=np.int64), num, den, ceil)


def _replay_many(release: np.ndarray, starts: np.ndarray, steps: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Earliest-deadline-first from each of ``starts`` at once, where exactly the ranks below it are served,
    for up to ``width`` positions over ranks below start + width.

    Rank j is at position j + 1 in sorted order. Returns ``(ranks, lengths)``: row i serves ranks
    ``ranks[i, :lengths[i]]`` at positions ``starts[i] + 1, ...``, after which the served ranks are again
    exactly those below the position (or the position is ``steps``). Length 0 where that takes more than
    ``width`` positions or ranks: ``_replay`` does those.
    """
    rows = np.arange(starts.size)
    candidates = starts[:, None] + np.arange(width)
    offer = release[np.minimum(candidates, release.size - 1)]  # when each candidate rank may be served
    never = max(int(release.max()), steps) + 1
    offer[candidates >= release.size] = never  # ranks that do not exist, and below: ranks once served
    ranks = np.zeros(candidates.shape, np.int64)
    lengths = np.zeros(starts.size, np.int64)
    running = np.ones(starts.size, bool)
    highest = np.full(starts.size, -1)  # the highest column served so far
    for i in range(width):
        if not running.any():
            break
        position = starts + (i + 1)
        pick = (offer <= position[:, None]).argmax(axis=1)  # the smallest rank on offer
        running &= offer[rows, pick] <= position  # nothing on offer in the window: leave it to _replay
        offer[rows[running], pick[running]] = never
        ranks[running, i] = candidates[running, pick[running]]
        np.maximum(highest, pick, out=highest)
        # i + 1 distinct columns served, none above i: exactly the ranks below the position again.
        done = running & ((highest == i) | (position == steps))
        lengths[done] = i + 1
        running &= ~done
    return ranks, lengths


def _replay(numerators: list[int], denominator: int, ranks_of: dict[int, np.ndarray], pulled: dict[int, int],
            start: int, shift: int, steps: int, limit: int) -> tuple[list[int], int, list[int]] | None:
    """Earliest-deadline-first position by position, as the plain loop does, from where exactly the ranks
    below ``start`` are served, plus ``shift`` ranks of ``steps`` or more ("far": the sorted order never
    gets to them), at positions ``start + shift + 1, ...``.

    ``ranks_of[d]``: the ranks of dataset d's samples, increasing, without the ``pulled[d]`` far ones
    served already. Runs until that state holds again, counting the far ranks it serves too (or until
    ``steps``). Returns the ranks served, the position reached, and the far ranks among them; None after
    ``limit`` positions (then the plain loop had better run to the end: ``_plain``).
    """
    live = list(ranks_of)
    weights = [numerators[d] for d in live]
    rank_of = [ranks_of[d].item for d in live]
    before = [int(np.searchsorted(ranks_of[d], start)) for d in live]
    count = [b + pulled[d] for b, d in zip(before, live)]  # samples served so far
    skip = [pulled[d] for d in live]  # far samples served so far, not in ranks_of
    release = [c * denominator // a + 1 for c, a in zip(count, weights)]  # of each dataset's next sample
    deadline = [-(-(c + 1) * denominator // a) for c, a in zip(count, weights)]
    datasets = range(len(live))
    served, far, highest = [], [], start - 1
    for position in range(start + shift + 1, min(steps, start + shift + limit) + 1):
        best, best_due = -1, 0
        for i in datasets:
            if release[i] <= position and (best < 0 or deadline[i] < best_due):
                best, best_due = i, deadline[i]
        k = count[best]
        rank = rank_of[best](k - skip[best])
        served.append(rank)
        if rank >= steps:
            far.append(rank)
        elif rank > highest:
            highest = rank
        count[best] = k + 1
        release[best] = (k + 1) * denominator // weights[best] + 1
        deadline[best] = -(-(k + 2) * denominator // weights[best])
        if highest == position - shift - len(far) - 1:  # the ranks below the frontier, and far ones
            return served, position, far
    return (served, steps, far) if start + shift + limit >= steps else None


def _plain(numerators: list[int], denominator: int, count: dict[int, int], start: int,
           steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The plain loop from position ``start``, where dataset d has served ``count[d]`` samples: the dataset
    and its sample at each position up to ``steps``."""
    live = list(count)
    weights = [numerators[d] for d in live]
    served = [count[d] for d in live]
    release = [c * denominator // a + 1 for c, a in zip(served, weights)]
    deadline = [-(-(c + 1) * denominator // a) for c, a in zip(served, weights)]
    datasets = range(len(live))
    chosen = []
    for position in range(start + 1, steps + 1):
        best, best_due = -1, 0
        for i in datasets:
            if release[i] <= position and (best < 0 or deadline[i] < best_due):
                best, best_due = i, deadline[i]
        chosen.append(best)
        k = served[best] = served[best] + 1
        release[best] = k * denominator // weights[best] + 1
        deadline[best] = -(-(k + 1) * denominator // weights[best])
    chosen = np.array(chosen, np.int64)
    sample = np.empty(chosen.size, np.int64)
    for i, d in enumerate(live):
        at = np.flatnonzero(chosen == i)
        sample[at] = count[d] + np.arange(at.size)
    return np.array(live, np.int16)[chosen], sample


def _rotations(release_of: np.ndarray, ranks_of: dict[int, np.ndarray], late: np.ndarray,
               very_late: np.ndarray) -> np.ndarray:
    """For each late rank p, the rank j it rotates with, or -1.

    From a position p where exactly the ranks below p are served, earliest-deadline-first serves first the
    smallest rank on offer, j: for each dataset, its first rank above p is its next sample, and j is the
    smallest of those already released. When p is released one position later and every rank in (p, j)
    is at most one position late, the next positions serve p, p + 1, ..., j - 1 in order: positions
    p .. j hold ranks j, p, p + 1, ..., j - 1. This covers a sample of small weight served early to fill in.
    ``very_late``: the ranks more than one position late, increasing.
    """
    filler = np.full(late.size, release_of.size, np.int64)
    for ranks in ranks_of.values():
        if not ranks.size:
            continue
        i = np.searchsorted(ranks, late, side="right")
        ok = i < ranks.size
        candidate = ranks[np.minimum(i, ranks.size - 1)]
        ok &= release_of[candidate] <= late + 1
        filler = np.where(ok & (candidate < filler), candidate, filler)
    found = filler < release_of.size
    clean = np.searchsorted(very_late, late, side="right") == np.searchsorted(very_late, filler, side="left")
    valid = found & clean & (release_of[late] == late + 2)
    return np.where(valid, filler, -1)


def _two_schedule(live: list[int], a: int, denominator: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``_quota_schedule`` for two datasets, in closed form: the first n positions hold exactly
    ``floor((n + 1) a / A)`` samples of the first dataset (weight a / A), and so
    ``n - floor((n + 1) a / A) = ceil((n + 1) (A - a) / A) - 1`` of the second.

    In (deadline, dataset) order, sample k of the first dataset, due at ``D = ceil(k A / a)``, has k - 1
    samples of its own and ``floor((D - 1) (A - a) / A) = D - 1 - k`` of the second before it: rank D - 2.
    It is released by then, since ``D - floor((k - 1) A / a) >= 2`` when A / a > 1; likewise each sample of
    the second dataset. So no sample is late, and the sorted order is the schedule.
    """
    first, second = live
    if 2 * a >= denominator:  # count[p]: samples of the larger-weight dataset in the first p + 1 positions
        major, minor = first, second
        count = _mul_div_range(1, steps + 2, a, denominator)
    else:
        major, minor = second, first
        count = _mul_div_range(1, steps + 2, denominator - a, denominator, ceil=True)
        count -= 1
    served_by_major = count[1:] != count[:-1]
    order = served_by_major.astype(np.int16)
    order *= major - minor
    order += minor
    sample = count[:-1].astype(np.int64, copy=False)  # the larger-weight dataset's samples before each
    # position: its sample there; the smaller one's samples are counted below
    minor_positions = np.flatnonzero(~served_by_major)
    sample[minor_positions] = np.arange(minor_positions.size)
    return order, sample


def _quota_schedule(numerators: list[int], denominator: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The dataset (int16) and that dataset's sample (int64) at each of the first ``steps`` positions.

    The order is earliest deadline first (module docstring), computed as the sorted order plus repairs.
    """
    live = [d for d, a in enumerate(numerators) if a > 0]
    if steps == 0:
        return np.empty(0, np.int16), np.empty(0, np.int64)
    if len(live) == 1:
        return np.full(steps, live[0], np.int16), np.arange(steps, dtype=np.int64)
    if len(live) == 2:
        return _two_schedule(live, numerators[live[0]], denominator, steps)
    # The samples released by position `steps` (k = 1 .. ceil(steps a / A)): any position up to `steps`
    # serves one of them. Sample k of d is due by ceil(k A / a) and released at floor((k - 1) A / a) + 1,
    # which is the deadline of sample k - 1, plus one when (k - 1) A / a is an integer.
    counts = [-(-steps * numerators[d] // denominator) for d in live]
    starts = np.cumsum([0] + counts)[:-1].tolist()  # of each dataset's samples in the concatenations below
    deadlines, releases = [], []
    for d, n in zip(live, counts):
        due = _mul_div_range(0, n + 1, denominator, numerators[d], ceil=True)  # "sample 0" is due at 0
        deadlines.append(due[1:])
        releases.append(due[:-1])
    release = np.concatenate(releases)
    del releases
    for d, start, n in zip(live, starts, counts):
        a = numerators[d]
        release[start : start + n : a // math.gcd(a, denominator)] += 1
    # The (deadline, dataset) order: a stable sort of the deadlines, dataset after dataset.
    order = np.argsort(np.concatenate(deadlines), kind="stable")
    del deadlines
    release_of = release[order]
    del release
    dataset = np.repeat(np.array(live, np.int16), counts)[order]
    first_of = np.zeros(len(numerators), np.int64)
    first_of[live] = starts
    sample = order - first_of[dataset]
    rank_of = np.empty_like(order)  # the rank of each sample, dataset after dataset
    rank_of[order] = np.arange(order.size)
    del order
    ranks_of = {d: rank_of[start : start + n] for d, start, n in zip(live, starts, counts)}
    return _repair(release_of, dataset, sample, ranks_of, numerators, denominator, steps)


def _repair(release_of: np.ndarray, dataset: np.ndarray, sample: np.ndarray, ranks_of: dict[int, np.ndarray],
            numerators: list[int], denominator: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The earliest-deadline order at positions ``0 .. steps`` from the sorted one: dataset and sample at
    each position (``ranks_of[d]``: the ranks of dataset d's samples, increasing).

    Ranks not released by their position ("late"): where EDF serves the next rank first and the late one
    right after, swap them; where it serves a later rank first and then the others in order, rotate them
    (``_rotations``); else replay EDF from there, in lockstep for short repairs and as the plain loop for
    the others. Each repair starts where the served ranks are exactly those below it; a late rank inside
    another repair is part of it.
    """
    total = release_of.size
    pulled = {d: 0 for d in ranks_of}  # far samples served, per dataset
    pieces = []  # the ranks served, position after position
    shift = frontier = 0  # served: the ranks below the frontier and `shift` far ranks
    all_far: list[int] = []
    replayed_positions = 0  # by the plain loop, in _replay
    release = release_of  # from here on minus the shift: rank j is due at position j + 1 if not late
    tail = None  # where the plain loop takes over to the end, if it does
    while True:
        stop = steps - shift  # the rank served at the last position, unless repaired
        late = np.flatnonzero(release[frontier:stop] > np.arange(frontier + 1, stop + 1)) + frontier
        served = np.arange(frontier, min(stop + 1, total))
        after = np.minimum(late + 1, total - 1)
        swap = (late + 1 < total) & (release[late] == late + 2) & (release[after] <= late + 1)
        replays = late[~swap]
        repairs, event, end = [], None, stop
        del after
        if replays.size:
            # The ranks more than one position late, for _rotations.
            very_late = np.flatnonzero(release[frontier:] > np.arange(frontier + 2, total + 2)) + frontier
            # Batch by batch, for the late ranks that the walk below reaches: rotations, else lockstep
            # replays, short ones and then wider ones for the few that need it (else the plain loop).
            narrow = _REPLAY_WIDTHS[0]
            rotated = np.full(replays.size, -1, np.int64)
            lengths = np.zeros(replays.size, np.int64)  # of lockstep replays
            narrow_offsets = np.zeros((replays.size, narrow), np.int8)  # served ranks minus the start
            wide_ranks: dict[int, np.ndarray] = {}
            low = high = 0  # the late ranks low .. high have their repairs worked out, in the lists below
            kept_rotations, kept_locksteps = [], []
            i = 0
            while i < replays.size:  # the repairs that start where the previous one ended
                if i >= high:
                    batch = np.arange(i, min(i + _BATCH, replays.size))
                    rotated[batch] = _rotations(release, ranks_of, replays[batch], very_late)
                    rows = batch[rotated[batch] < 0]
                    ranks, lengths[rows] = _replay_many(release, replays[rows], stop, narrow)
                    narrow_offsets[rows] = ranks - replays[rows, None]
                    rows = rows[lengths[rows] == 0]
                    for width in _REPLAY_WIDTHS[1:]:
                        if not rows.size or 2 * rows.size > batch.size:
                            break
                        wide, lengths[rows] = _replay_many(release, replays[rows], stop, width)
                        wide_ranks.update(zip(rows.tolist(), wide))
                        rows = rows[lengths[rows] == 0]
                    ends = np.where(rotated[batch] >= 0, rotated[batch] + 1, replays[batch] + lengths[batch])
                    rotated_list, lengths_list = rotated[batch].tolist(), lengths[batch].tolist()
                    following = np.searchsorted(replays, ends).tolist()  # the first late rank after the end
                    low, high = i, int(batch[-1]) + 1
                if rotated_list[i - low] >= 0:
                    kept_rotations.append(i)
                    i = following[i - low]
                    continue
                if lengths_list[i - low]:
                    kept_locksteps.append(i)
                    i = following[i - low]
                    continue
                first = int(replays[i])
                limit = max(_PLAIN_AFTER, 4 * replayed_positions)
                if replayed_positions > _PLAIN_AFTER and replayed_positions > (first + shift) // 4:
                    limit = 0  # the plain loop does most of the work anyway: let it run to the end
                result = _replay(numerators, denominator, ranks_of, pulled, first, shift, steps, limit)
                if result is None:
                    event, end = ("plain", None), first
                    break
                replayed, reached, far = result
                replayed_positions += reached - shift - first
                if far:  # far ranks served: the sorted order goes on from `reached` with a larger shift
                    event, end = ("far", (replayed, reached, far)), first
                    break
                repairs.append((np.arange(first, reached - shift), np.array(replayed, np.int64)))
                i = int(np.searchsorted(replays, reached - shift))
            if kept_rotations:  # positions p .. j hold ranks j, p, ..., j - 1
                kept = np.array(kept_rotations, np.int64)
                first, last = replays[kept], rotated[kept]
                sizes = last - first + 1
                at = np.repeat(first - np.cumsum(sizes) + sizes, sizes) + np.arange(sizes.sum())
                source = at - 1
                source[np.cumsum(sizes) - sizes] = last
                repairs.append((at, source))
            kept = np.array([i for i in kept_locksteps if i not in wide_ranks], np.int64)
            wide_kept = np.array([i for i in kept_locksteps if i in wide_ranks], np.int64)
            filled = np.arange(narrow) < lengths[kept, None]
            repairs.append(((replays[kept, None] + np.arange(narrow))[filled],
                            (replays[kept, None] + narrow_offsets[kept])[filled]))
            for i in wide_kept.tolist():
                repairs.append((np.arange(replays[i], replays[i] + lengths[i]), wide_ranks[i][: lengths[i]]))
        swapped = late[swap] - frontier
        swapped = swapped[swapped + 1 < end - frontier + 1]
        served[swapped], served[swapped + 1] = served[swapped + 1], served[swapped]
        for at, source in repairs:
            keep = at - frontier < served.size
            served[at[keep] - frontier] = source[keep]
        pieces.append(served[: end - frontier])
        if event is None:
            break
        kind, detail = event
        if kind == "plain":
            count = {d: int(np.searchsorted(ranks_of[d], end)) + pulled[d] for d in ranks_of}
            tail = _plain(numerators, denominator, count, end + shift, steps)
            break
        replayed, reached, far = detail
        pieces.append(np.array(replayed, np.int64))
        if reached >= steps:
            break
        for rank in far:  # served: out of the sorted order for good
            d = int(dataset[rank])
            ranks_of[d] = ranks_of[d][ranks_of[d] != rank]
            pulled[d] += 1
        shift += len(far)
        all_far += far
        frontier = reached - shift
        release = release_of - shift
        release[all_far] = 2 * total + steps  # never on offer again
    served = np.concatenate(pieces)[: steps if tail is None else steps - tail[0].size]
    if tail is None:
        return dataset[served], sample[served]
    return np.concatenate([dataset[served], tail[0]]), np.concatenate([sample[served], tail[1]])


def _quota_order(numerators: list[int], denominator: int, steps: int) -> np.ndarray:
    """The dataset of each of the first ``steps`` positions (module docstring: earliest deadline first)."""
    return _quota_schedule(numerators, denominator, steps)[0]


def blending_indices(weights: Sequence[Fraction], size: int) -> Arrays:
    """``dataset_index[i]`` (the dataset of blended sample i) and ``dataset_sample_index[i]`` (its sample)."""
    if len(weights) > np.iinfo(np.int16).max:
        raise UserError(f"at most {np.iinfo(np.int16).max} datasets can be blended, got {len(weights)}")
    denominator = math.lcm(*(w.denominator for w in weights))
    numerators = [int(w * denominator) for w in weights]
    steps = min(size, denominator)
    order, sample = _quota_schedule(numerators, denominator, steps)
    if size > steps:  # period `denominator`, in which dataset d serves exactly numerators[d] samples
        periods = -(-size // steps)
        tiled = np.multiply.outer(np.arange(periods, dtype=np.int64), np.asarray(numerators, np.int64)[order])
        tiled += sample  # each period adds numerators[d] to the samples of dataset d
        sample = tiled.reshape(-1)[:size]
        order = np.broadcast_to(order, (periods, steps)).reshape(-1)[:size]
    return {"dataset_index": order, "dataset_sample_index": sample}


def cached_blending_indices(weights: Sequence[Fraction], size: int, cache_dir: str | None) -> Arrays:
    description = {"class": "BlendedDataset", "format": _INDEX_FORMAT, "weights": [str(w) for w in weights],
                   "size": size}
    return cached_arrays(cache_dir, description, lambda: blending_indices(weights, size))


class BlendedDataset(torch.utils.data.Dataset):
    """Sample i is sample ``dataset_sample_index[i]`` of dataset ``dataset_index[i]`` (None: weight 0); it
    carries ``dataset``, that position in the blend, for per-dataset evaluation under ``names``."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset | None], indices: Arrays,
                 names: Sequence[str] | None = None) -> None:
        self.datasets = list(datasets)
        self.dataset_index = indices["dataset_index"]
        self.dataset_sample_index = indices["dataset_sample_index"]
        self.names = list(names) if names is not None else [f"dataset{k}" for k in range(len(self.datasets))]

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        dataset = int(self.dataset_index[i])
        sample = self.datasets[dataset][int(self.dataset_sample_index[i])]
        sample["index"] = torch.tensor(i)  # the blended stream's sample id, not the source dataset's
        sample["dataset"] = torch.tensor(dataset)
        return sample
