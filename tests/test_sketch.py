"""The quantile sketch's proven bound, and every threshold mode against sorting, on groups of 1-8 ranks
simulated in one process (threads meeting at a barrier stand in for the collectives)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from megatron_eslm.eslm.distributed_threshold import (Collectives, ThresholdResult, global_var_threshold,
                                                      var_threshold_over)
from megatron_eslm.eslm.sketch import MergedSketch, RunningSketch, build_sketch, sketch_words
from megatron_eslm.eslm.threshold import var_index, var_threshold

SETTINGS = settings(max_examples=60, deadline=None)


@dataclass
class Group:
    """Per-rank scores and valid masks of one selection group."""

    scores: list[Tensor]
    valid: list[Tensor]

    @property
    def finite(self) -> Tensor:
        """All finite valid scores of the group, sorted: the x_(i) of the rule."""
        values = torch.cat([s[v] for s, v in zip(self.scores, self.valid)])
        return values[torch.isfinite(values)].sort().values

    @property
    def nonfinite(self) -> int:
        return sum(int((~torch.isfinite(s[v])).sum()) for s, v in zip(self.scores, self.valid))


def exact_kept(x: Tensor, rank: int) -> int:
    """Tokens the exact rule keeps when its threshold is x_(rank)."""
    return int((x >= x[rank]).sum())


@st.composite
def groups(draw, distinct: bool | None = None) -> Group:
    """1-8 ranks with uneven token counts (some empty), ignored tokens, ties and sometimes NaN/inf."""
    world = draw(st.integers(1, 8))
    sizes = st.sampled_from([0, 1, 3, 17, 64, 65, 200, 333, 1000])
    counts = draw(st.lists(sizes, min_size=world, max_size=world))
    kind = "distinct" if distinct else draw(st.sampled_from(["distinct", "bf16", "few"]))
    nonfinite = not distinct and draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    total = sum(counts)
    if kind == "distinct":
        values = (torch.randperm(total, generator=g).float() - total / 3) / 7
    elif kind == "bf16":
        values = (torch.randn(total, generator=g) * 4).bfloat16().float()
    else:
        values = torch.randint(-2, 3, (total,), generator=g).float()
    valid = torch.rand(total, generator=g) > 0.2
    if nonfinite:
        spoiled = torch.rand(total, generator=g) < 0.05
        values[spoiled] = torch.tensor([float("nan"), float("inf"), float("-inf")])[
            torch.randint(0, 3, (int(spoiled.sum()),), generator=g)]
    return Group(list(values.split(counts)), list(valid.split(counts)))


def merged_sketch_payloads(group: Group, size: int) -> Tensor:
    """Every rank's payload, stacked as all_gather would."""
    payloads = []
    for scores, valid in zip(group.scores, group.valid):
        finite = scores[valid & torch.isfinite(scores)]
        padded = torch.cat([finite.sort().values, torch.tensor([float("inf")])])
        payloads.append(build_sketch(padded, torch.tensor(finite.numel()), torch.tensor(0), size))
    return torch.stack(payloads)


def merged_sketch(group: Group, size: int) -> MergedSketch:
    """The pure sketch path: build every rank's payload, stack it as all_gather would, merge."""
    return MergedSketch.merge(merged_sketch_payloads(group, size), size)


@SETTINGS
@given(group=groups(), size=st.sampled_from([1, 2, 3, 8, 64]), alpha=st.floats(0.0, 0.999))
def test_sketch_estimate_is_exact_rule_at_a_rank_within_the_bound(group, size, alpha):
    x = group.finite
    n = x.numel()
    merged = merged_sketch(group, size)
    assert merged.count == n
    counts = [int((v & torch.isfinite(s)).sum()) for s, v in zip(group.scores, group.valid)]
    assert merged.slack == sum((c - 1) // size for c in counts if c)
    assert merged.slack * size <= max(n - sum(c > 0 for c in counts), 0)  # E <= (n - R') / m
    if n == 0:
        return
    k = var_index(alpha, n)
    estimate, bound = merged.estimate(k)
    assert bound == min(merged.slack, k)
    # The estimate is x_(k') for some k' in [k - B, k] (ties: some such rank carries that value).
    assert bool((x[k - bound:k + 1] == estimate).any())
    kept = int((x >= estimate).sum())
    assert exact_kept(x, k) <= kept <= exact_kept(x, k - bound)
    if alpha == 0.0:
        assert kept == n


@SETTINGS
@given(group=groups(distinct=True), size=st.sampled_from([1, 2, 8, 64]), alpha=st.floats(0.0, 0.999))
def test_sketch_kept_count_within_bound_tokens_for_distinct_scores(group, size, alpha):
    x = group.finite
    if x.numel() == 0:
        return
    k = var_index(alpha, x.numel())
    estimate, bound = merged_sketch(group, size).estimate(k)
    assert 0 <= int((x >= estimate).sum()) - exact_kept(x, k) <= bound


@SETTINGS
@given(group=groups(), size=st.sampled_from([1, 2, 3, 8, 64]), alpha=st.floats(0.0, 0.999))
def test_bracket_holds_the_order_statistic_and_few_scores(group, size, alpha):
    x = group.finite
    if x.numel() == 0:
        return
    merged = merged_sketch(group, size)
    k = var_index(alpha, x.numel())
    lower, upper = merged.bracket(k)
    assert lower <= x[k] <= upper
    assert int(((x > lower) & (x < upper)).sum()) <= max(2 * merged.slack - 1, 0)


class ThreadGroup:
    """The shared side of a simulated group: one slot per rank and a barrier."""

    def __init__(self, world: int):
        self.slots: list[Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=60)


class ThreadCollectives(Collectives):
    """One simulated rank: collectives are a barrier-separated write and read of the shared slots."""

    def __init__(self, group: ThreadGroup, rank: int):
        super().__init__()
        self.group, self.rank = group, rank

    def _all_gather(self, tensor: Tensor) -> Tensor:
        self.group.slots[self.rank] = tensor.clone()
        self.group.barrier.wait()
        shapes = {tuple(t.shape) for t in self.group.slots}
        out = torch.stack(self.group.slots)
        self.group.barrier.wait()  # nobody overwrites a slot before everyone has read them all
        assert len(shapes) == 1, f"all_gather of unequal shapes {shapes}"  # gloo would fail as well
        return out

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        return self._all_gather(tensor).sum(0)


def run_simulated(group: Group, call: Callable[[Collectives, Tensor, Tensor], ThresholdResult]
                  ) -> list[ThresholdResult]:
    """`call` on every simulated rank at once; one failing rank breaks the barrier for all."""
    shared = ThreadGroup(len(group.scores))

    def rank_main(rank: int) -> ThresholdResult:
        try:
            return call(ThreadCollectives(shared, rank), group.scores[rank], group.valid[rank])
        except BaseException:
            shared.barrier.abort()
            raise

    with ThreadPoolExecutor(len(group.scores)) as pool:
        return list(pool.map(rank_main, range(len(group.scores))))


def check_against_sorting(group: Group, results: list[ThresholdResult], alpha: float, exact: bool) -> None:
    """Shared checks of one call on every rank of a group (also used by the gloo tests)."""
    x = group.finite
    first = results[0]
    for r in results:  # every field a 0-dim device tensor (bytes_sent an int), equal on every rank
        assert torch.equal(r.threshold, first.threshold)
        assert (r.kept_global, r.valid_global, r.rank_error_bound, r.nonfinite, r.bytes_sent) == (
            first.kept_global, first.valid_global, first.rank_error_bound, first.nonfinite, first.bytes_sent)
    assert first.valid_global == x.numel() and first.nonfinite == group.nonfinite
    if x.numel() == 0:  # no finite score in the group: the threshold +inf keeps nothing
        assert first.threshold == float("inf") and first.kept_global == 0
        assert not any(r.kept_local.any() for r in results)
        return
    k = var_index(alpha, x.numel())
    if exact:
        assert first.rank_error_bound == 0
        assert first.threshold == var_threshold(x, torch.ones_like(x, dtype=torch.bool), alpha)
    else:
        assert bool((x[k - first.rank_error_bound:k + 1] == first.threshold).any())
    for r, scores, valid in zip(results, group.scores, group.valid):
        assert torch.equal(r.kept_local, valid & torch.isfinite(scores) & (scores >= first.threshold))
    assert first.kept_global == sum(int(r.kept_local.sum()) for r in results)
    assert exact_kept(x, k) <= first.kept_global <= exact_kept(x, k - first.rank_error_bound)


def expected_bytes(group: Group, mode: str, size: int, alpha: float) -> int:
    """This rank's payload for one call (every rank hands the collectives equal shapes)."""
    x = group.finite
    # Whether the group has a finite score is known only on the device: every round runs regardless.
    if mode == "exact":  # 4 histogram rounds of 256 int64 bins, the first with the non-finite count
        return 8 * (256 + 1) + 3 * 8 * 256
    sketch = 4 * sketch_words(size)
    if mode == "sketch":
        return sketch + 8  # the kept-count all-reduce
    if x.numel() == 0:
        return sketch + 24  # the three counts
    k = var_index(alpha, x.numel())
    lower, upper = merged_sketch(group, size).bracket(k)
    if not int((x <= lower).sum()) <= k < int((x < upper).sum()):
        return sketch + 24  # x_(k) is an end of the bracket: the three counts settle it
    inside = max(int((v & (s > lower) & (s < upper)).sum()) for s, v in zip(group.scores, group.valid))
    return sketch + 24 + 4 * inside


@SETTINGS
@given(group=groups(), mode=st.sampled_from(["sketch", "sketch-exact", "exact"]),
       size=st.sampled_from([1, 3, 8, 64]), alpha=st.floats(0.0, 0.999))
def test_simulated_group_modes_against_sorting(group, mode, size, alpha):
    results = run_simulated(group, lambda comm, s, v: var_threshold_over(comm, s, v, alpha, mode, size))
    check_against_sorting(group, results, alpha, exact=mode != "sketch")
    assert results[0].bytes_sent == expected_bytes(group, mode, size, alpha)


@SETTINGS
@given(group=groups(), size=st.sampled_from([1, 3, 8, 64]), alpha=st.floats(0.0, 0.999))
def test_simulated_group_previous_step_reference(group, size, alpha):
    """The previous-step scope on 1-8 simulated ranks: step 1 splits every rank's scores into three
    micro-batches and merges each one's gathered sketches into one running sketch of m blocks; step 2
    takes its threshold from it. Step 2 is given the same scores, so the threshold must be the exact
    rule's on them at a rank within the bound B = min(sigma, k): sigma = sum over micro-batches of E_t
    (summed over the ranks' payloads) plus floor((N_t - 1) / m), N_t the scores of micro-batches 1..t."""
    def parts(n: int) -> list[slice]:
        return [slice(0, n // 3), slice(n // 3, n // 2), slice(n // 2, n)]

    def call(comm: Collectives, scores: Tensor, valid: Tensor) -> ThresholdResult:
        running = None
        for part in parts(scores.numel()):
            payloads = var_threshold_over(comm, scores[part], valid[part], alpha, "sketch", size,
                                          keep_sketch=True).sketch
            running = RunningSketch.absorb(running, payloads, size)
            assert running.payload.shape == (sketch_words(size),)
        comm.bytes_sent = 0  # count step 2's call alone
        return var_threshold_over(comm, scores, valid, alpha, "exact", size, reference=running.merged(size))

    results = run_simulated(group, call)
    check_against_sorting(group, results, alpha, exact=False)
    x = group.finite
    if x.numel() == 0:
        return
    finite = [v & torch.isfinite(s) for s, v in zip(group.scores, group.valid)]
    slack, so_far = 0, 0
    for t in range(3):
        counts = [int(f[parts(f.numel())[t]].sum()) for f in finite]
        so_far += sum(counts)
        slack += sum((c - 1) // size for c in counts if c) + max(so_far - 1, 0) // size
    assert results[0].rank_error_bound == min(slack, var_index(alpha, x.numel()))
    assert results[0].bytes_sent == 4 * sketch_words(size) + 8  # its own sketch, the kept count


@SETTINGS
@given(group=groups(), size=st.sampled_from([1, 2, 3, 8, 64]), alpha=st.floats(0.0, 0.999))
def test_running_sketch_of_every_rank_as_a_micro_batch_within_the_summed_slack(group, size, alpha):
    """Many compactions: each rank's payload merged in as its own micro-batch (up to 8), one after
    another, must still give the exact rule at a rank within min(sigma, k)."""
    x = group.finite
    running, slack, so_far = None, 0, 0
    for scores, valid in zip(group.scores, group.valid):
        part = Group([scores], [valid])
        running = RunningSketch.absorb(running, merged_sketch_payloads(part, size), size)
        n = part.finite.numel()
        so_far += n
        slack += max(n - 1, 0) // size + max(so_far - 1, 0) // size
    merged = running.merged(size)
    assert (merged.count, merged.slack) == (x.numel(), slack)
    if x.numel() == 0:
        return
    k = var_index(alpha, x.numel())
    estimate, bound = merged.estimate(k)
    assert bound == min(slack, k)
    assert bool((x[k - bound:k + 1] == estimate).any())
    assert exact_kept(x, k) <= int((x >= estimate).sum()) <= exact_kept(x, k - bound)


EXTREMES = torch.tensor([float("-inf"), -3.4028235e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.17549435e-38, 1.0,
                         3.4028235e38, float("inf"), float("nan")])


@pytest.mark.parametrize("mode", ["sketch-exact", "exact"])
def test_exact_modes_order_extreme_floats_like_comparison(mode):
    """Signs, subnormals, -0.0 against 0.0 and the float range ends: the radix keys must order like <."""
    g = torch.Generator().manual_seed(0)
    values = EXTREMES[torch.randint(0, len(EXTREMES), (300,), generator=g)]
    counts = [100, 0, 200]
    group = Group(list(values.split(counts)), [torch.ones(c, dtype=torch.bool) for c in counts])
    for alpha in (0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.99):
        results = run_simulated(group, lambda comm, s, v: var_threshold_over(comm, s, v, alpha, mode, 4))
        check_against_sorting(group, results, alpha, exact=True)


def test_one_process_without_a_group_matches_the_single_process_rule():
    g = torch.Generator().manual_seed(1)
    scores = (torch.randn(5000, generator=g) * 3).bfloat16().float()
    valid = torch.rand(5000, generator=g) > 0.1
    for mode in ("sketch", "sketch-exact", "exact"):
        result = global_var_threshold(scores, valid, 0.6, mode=mode, sketch_size=64)
        check_against_sorting(Group([scores], [valid]), [result], 0.6, exact=mode != "sketch")
    assert global_var_threshold(scores, valid, 0.6, "exact").threshold == var_threshold(scores, valid, 0.6)


def test_default_sketch_fits_the_payload_and_error_budget():
    """--eslm-sketch-size 2048: at most 16 KB per rank, rank error below 0.05% of the tokens."""
    assert 4 * sketch_words(2048) <= 16 * 1024
    g = torch.Generator().manual_seed(2)
    counts = [100_000, 3, 0, 40_000]
    group = Group(list(torch.rand(sum(counts), generator=g).split(counts)),
                  [torch.ones(c, dtype=torch.bool) for c in counts])
    x = group.finite
    k = var_index(0.5, x.numel())
    estimate, bound = merged_sketch(group, 2048).estimate(k)
    assert bound / x.numel() < 0.0005
    assert exact_kept(x, k) <= int((x >= estimate).sum()) <= exact_kept(x, k - bound)


@pytest.mark.parametrize("kwargs", [{"mode": "median"}, {"sketch_size": 0}, {"alpha": 1.0}])
def test_bad_arguments_fail_before_any_collective(kwargs):
    args = {"alpha": 0.5, **kwargs}
    with pytest.raises(ValueError):
        global_var_threshold(torch.zeros(4), torch.ones(4, dtype=torch.bool), **args)
