"""Ada-ESLM's grad-mass count over a selection group: on 1-8 simulated ranks (threads meeting at a
barrier, as in test_sketch.py) it equals one process's count on the concatenated tokens and a sorting
reference, with ties, ignored tokens and non-finite scores and losses, and its payload does not grow
with the tokens or the ranks."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from megatron_eslm.eslm.ada import droppable_count, droppable_over, gradient_mass, group_droppable_count
from megatron_eslm.eslm.distributed_threshold import (RADIX_BINS, LocalCollectives, MassPrefix,
                                                      fixed_point_mass)
from test_sketch import Group, ThreadCollectives, ThreadGroup, groups

ROUND_BYTES = 2 * RADIX_BINS * 8  # one round: [counts, masses] x 256 bins of int64


def losses_for(group: Group, kind: str, seed: int) -> list[Tensor]:
    """Per-rank losses: distinct, few-valued (tied masses), mostly zero (no mass), or with NaN/inf."""
    g = torch.Generator().manual_seed(seed)
    total = sum(s.numel() for s in group.scores)
    if kind == "distinct":
        loss = torch.empty(total).exponential_(generator=g)
    elif kind == "few":
        loss = torch.tensor([0.0, 0.05, 1.0, 3.0])[torch.randint(0, 4, (total,), generator=g)]
    elif kind == "zeros":
        loss = torch.where(torch.rand(total, generator=g) < 0.8, 0.0, torch.rand(total, generator=g))
    else:
        loss = torch.empty(total).exponential_(generator=g)
        spoiled = torch.rand(total, generator=g) < 0.1
        loss[spoiled] = torch.tensor([float("nan"), float("inf"), float("-inf")])[
            torch.randint(0, 3, (int(spoiled.sum()),), generator=g)]
    return list(loss.split([s.numel() for s in group.scores]))


def reference(scores: Tensor, loss: Tensor, valid: Tensor, budget: float) -> tuple[int, int]:
    """The rule by sorting, in Python integers: the tokens of the lowest whole score ties whose running
    mass stays within budget x the total (masses in the same 2^-32 units)."""
    mass = gradient_mass(loss)
    keep = valid & torch.isfinite(scores.float()) & torch.isfinite(mass)
    values = scores.float()[keep]
    values = values.masked_fill(values == 0, 0.0).tolist()  # -0.0 and 0.0 are one score
    units = fixed_point_mass(mass[keep]).tolist()
    ties: dict[float, list[int]] = {}
    for value, unit in zip(values, units):
        ties.setdefault(value, []).append(unit)
    allowance = Fraction(budget) * sum(units)
    dropped = running = 0
    for value in sorted(ties):
        running += sum(ties[value])
        if running > allowance:
            break
        dropped += len(ties[value])
    return dropped, len(values)


def run_group(group: Group, losses: list[Tensor], budget: float) -> list[MassPrefix]:
    shared = ThreadGroup(len(group.scores))

    def rank_main(rank: int) -> MassPrefix:
        try:
            return droppable_over(ThreadCollectives(shared, rank), group.scores[rank], losses[rank],
                                  group.valid[rank], budget)
        except BaseException:
            shared.barrier.abort()
            raise

    with ThreadPoolExecutor(len(group.scores)) as pool:
        return list(pool.map(rank_main, range(len(group.scores))))


@settings(max_examples=80, deadline=None)
@given(group=groups(), kind=st.sampled_from(["distinct", "few", "zeros", "nonfinite"]),
       seed=st.integers(0, 2**31 - 1),
       budget=st.one_of(st.sampled_from([0.0, 0.05, 0.3, 0.5, 1.0]), st.floats(0.0, 1.0)))
def test_simulated_group_equals_one_process_on_the_concatenation(group, kind, seed, budget):
    losses = losses_for(group, kind, seed)
    results = run_group(group, losses, budget)
    scores, loss, valid = torch.cat(group.scores), torch.cat(losses), torch.cat(group.valid)
    one = droppable_over(LocalCollectives(), scores, loss, valid, budget)
    assert {(int(r.count), int(r.total), r.bytes_sent) for r in results} == {
        (int(one.count), int(one.total), one.bytes_sent)}
    assert (one.count, one.total) == reference(scores, loss, valid, budget)
    assert droppable_count(scores, loss, valid, budget) == one.count
    assert group_droppable_count(scores, loss, valid, budget) == (one.count, one.total)
    # always 4 rounds: whether the first settles it (no token, or every token within the budget) is known
    # only on the device
    assert one.bytes_sent == ROUND_BYTES * 4
    if budget == 1.0:
        assert one.count == one.total


@pytest.mark.parametrize("world", [1, 3, 8])
def test_payload_does_not_grow_with_the_tokens_or_the_ranks(world):
    """4 rounds of one [2, 256] int64 histogram: 16,384 bytes per rank per call, at 10 or 100,000 tokens
    per rank (the all-gather this replaced sent 8 bytes a token)."""
    sent = set()
    for per_rank in (10, 1000, 100_000):
        g = torch.Generator().manual_seed(per_rank)
        scores = torch.rand(world * per_rank, generator=g)
        group = Group(list(scores.split(per_rank)), [torch.ones(per_rank, dtype=torch.bool)] * world)
        losses = list(torch.rand(world * per_rank, generator=g).split(per_rank))
        results = run_group(group, losses, 0.3)
        assert 0 < results[0].count < world * per_rank
        sent |= {r.bytes_sent for r in results}
    assert sent == {4 * ROUND_BYTES} == {16_384}


def test_boundary_ties_split_over_ranks_stay_whole():
    """A tie at the boundary spread over three ranks is dropped or kept whole, as on one process."""
    scores = [torch.tensor([1.0, 3.0]), torch.tensor([1.0]), torch.tensor([1.0, 0.5, 2.0])]
    losses = [torch.full_like(s, 1.0) for s in scores]
    group = Group(scores, [torch.ones_like(s, dtype=torch.bool) for s in scores])
    # masses are equal: 0.5 alone fits 0.3 x 6 = 1.8 masses, the three 1.0s after it do not (4 > 1.8)
    assert {(int(r.count), int(r.total)) for r in run_group(group, losses, 0.3)} == {(1, 6)}
    assert {(int(r.count), int(r.total)) for r in run_group(group, losses, 0.7)} == {(4, 6)}  # 4 <= 4.2
    assert math.isclose(float(gradient_mass(torch.tensor(1.0))), 1 - math.exp(-1.0))


def test_bad_budget_fails_before_any_collective():
    with pytest.raises(ValueError, match="budget"):
        droppable_count(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool), float("nan"))
    with pytest.raises(ValueError, match="budget"):
        droppable_count(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool), -0.1)
