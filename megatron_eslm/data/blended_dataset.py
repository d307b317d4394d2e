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


def _quota_order(numerators: list[int], denominator: int, steps: int) -> np.ndarray:
    """The dataset of each of the first ``steps`` positions (module docstring: earliest deadline first)."""
    live = [d for d, a in enumerate(numerators) if a > 0]
    count = [0] * len(numerators)
    release = [1] * len(numerators)  # of each dataset's next sample, as 1-based positions
    deadline = [-(-denominator // a) if a else 0 for a in numerators]
    order = []
    for position in range(1, steps + 1):
        best = -1
        for d in live:
            if release[d] <= position and (best < 0 or deadline[d] < deadline[best]):
                best = d
        order.append(best)
        k = count[best] = count[best] + 1
        a = numerators[best]
        release[best] = k * denominator // a + 1  # sample k + 1 of this dataset
        deadline[best] = -(-(k + 1) * denominator // a)
    return np.array(order, dtype=np.int16)


def blending_indices(weights: Sequence[Fraction], size: int) -> Arrays:
    """``dataset_index[i]`` (the dataset of blended sample i) and ``dataset_sample_index[i]`` (its sample)."""
    if len(weights) > np.iinfo(np.int16).max:
        raise UserError(f"at most {np.iinfo(np.int16).max} datasets can be blended, got {len(weights)}")
    denominator = math.lcm(*(w.denominator for w in weights))
    numerators = [int(w * denominator) for w in weights]
    order = _quota_order(numerators, denominator, min(size, denominator))
    dataset_index = np.resize(order, size)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    for d in range(len(weights)):
        chosen = dataset_index == d
        dataset_sample_index[chosen] = np.arange(np.count_nonzero(chosen))
    return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}


def cached_blending_indices(weights: Sequence[Fraction], size: int, cache_dir: str | None) -> Arrays:
    description = {"class": "BlendedDataset", "format": _INDEX_FORMAT, "weights": [str(w) for w in weights],
                   "size": size}
    return cached_arrays(cache_dir, description, lambda: blending_indices(weights, size))


class BlendedDataset(torch.utils.data.Dataset):
    """Sample i is sample ``dataset_sample_index[i]`` of dataset ``dataset_index[i]`` (None: weight 0)."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset | None], indices: Arrays) -> None:
        self.datasets = list(datasets)
        self.dataset_index = indices["dataset_index"]
        self.dataset_sample_index = indices["dataset_sample_index"]

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
        sample["index"] = torch.tensor(i)  # the blended stream's sample id, not the source dataset's
        return sample
