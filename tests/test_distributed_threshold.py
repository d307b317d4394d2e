"""Every threshold mode on real gloo process groups of 2 and 4 ranks, against sorting all the scores.

One spawn per world size runs every case, mode, alpha and sketch size; the parent checks the results.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from megatron_eslm.eslm.distributed_threshold import MODES, ThresholdResult, global_var_threshold
from rank_pool import run_on_ranks
from test_sketch import Group, check_against_sorting, expected_bytes

ALPHAS = (0.0, 0.5, 0.9)
SKETCH_SIZES = (16, 2048)  # slack > 0 (a refinement round), and the default (every rank exact)


def cases(world: int) -> list[Group]:
    """Uneven ranks with bf16 ties and an empty rank, heavy ties, NaN/inf on one rank, no valid token."""
    g = torch.Generator().manual_seed(world)
    counts = [2500, 0] if world == 2 else [4000, 0, 700, 31]

    def group(values: Tensor, valid: Tensor) -> Group:
        return Group(list(values.split(counts)), list(valid.split(counts)))

    total = sum(counts)
    bf16 = (torch.randn(total, generator=g) * 3).bfloat16().float()
    few = torch.randint(0, 4, (total,), generator=g).float() / 2
    spoiled = bf16.clone()
    spoiled[:40:3] = torch.tensor([float("nan"), float("inf"), float("-inf")]).repeat(5)[:14]
    valid = torch.rand(total, generator=g) > 0.2
    return [group(bf16, valid), group(few, valid), group(spoiled, valid),
            group(bf16, torch.zeros(total, dtype=torch.bool))]


def calls(world: int):
    return list(itertools.product(range(len(cases(world))), MODES, ALPHAS, SKETCH_SIZES))


def thresholds(world: int) -> list[ThresholdResult]:
    """On every rank of a pool (tests/rank_pool.py): this rank's threshold of every call."""
    rank, groups = dist.get_rank(), cases(world)
    return [global_var_threshold(groups[case].scores[rank], groups[case].valid[rank], alpha, mode, size,
                                 group=dist.group.WORLD)
            for case, mode, alpha, size in calls(world)]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_gloo_group_every_mode_against_sorting(world: int):
    per_rank: list[list[ThresholdResult]] = run_on_ranks(world, thresholds, world)
    groups = cases(world)
    for i, (case, mode, alpha, size) in enumerate(calls(world)):
        results = [per_rank[r][i] for r in range(world)]
        label = f"case {case}, {mode}, alpha={alpha}, sketch size {size}"
        try:
            check_against_sorting(groups[case], results, alpha, exact=mode != "sketch")
            assert results[0].bytes_sent == expected_bytes(groups[case], mode, size, alpha)
        except AssertionError as err:
            raise AssertionError(label) from err
