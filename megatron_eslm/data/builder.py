"""Train/valid/test datasets from the data flags: one prefix or a weighted blend, split or per-split paths.

``--data-path`` (one prefix, or ``W1 P1 W2 P2 ...``) cuts every dataset into train/valid/test document
ranges by ``--split`` and blends each split with the same weights; ``--train-data-path``,
``--valid-data-path`` and ``--test-data-path`` instead give each split its own datasets, used whole.
Each dataset is opened and checked once (token ids against the tokenizer's vocabulary, on a sample).
"""
from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch

from megatron_eslm.config import DataConfig
from megatron_eslm.data.blend_spec import parse_blend
from megatron_eslm.data.blended_dataset import BlendedDataset, blending_indices, cached_blending_indices
from megatron_eslm.data.gpt_dataset import GPTDataset
from megatron_eslm.data.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path
from megatron_eslm.errors import UserError

SPLIT_NAMES = ("train", "valid", "test")
_CHECKED_TOKENS = 1 << 20  # tokens read at each end of a dataset when checking ids; plus _CHECKED_WINDOWS
_CHECKED_WINDOWS = 64  # random windows of 4096 tokens in between


def parse_split(split: str) -> list[float]:
    """Megatron's ``--split`` string ("969,30,1" or "969/30/1") as three train/valid/test weights."""
    parts = re.split(r"[,/]", split)
    if len(parts) > 3:
        raise UserError(f"--split {split!r}: at most 3 weights (train,valid,test), got {len(parts)}")
    try:
        weights = [float(part) for part in parts]
    except ValueError:
        raise UserError(f"--split {split!r}: weights must be numbers, like 969,30,1") from None
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise UserError(f"--split {split!r}: weights must be finite and non-negative")
    if sum(weights) == 0:
        raise UserError(f"--split {split!r}: at least one weight must be positive")
    return weights + [0.0] * (3 - len(weights))


def split_documents(num_documents: int, split: str = "969,30,1") -> list[tuple[int, int]]:
    """Train/valid/test ``(start, end)`` document ranges in proportion to the normalised split weights."""
    weights = parse_split(split)
    cumulative = np.cumsum(weights) / sum(weights)
    bounds = [0] + [int(round(fraction * num_documents)) for fraction in cumulative]
    bounds[-1] = num_documents  # no rounding drift at the end
    return list(zip(bounds[:-1], bounds[1:]))


def check_token_ids(dataset: IndexedDataset, vocab_size: int) -> None:
    """Reject ids outside ``[0, vocab_size)``, looking at both ends and random windows of the .bin."""
    bin_path = get_bin_path(dataset.path_prefix)
    if dataset.dtype.kind not in "iu":
        raise UserError(f"{bin_path}: holds {dataset.dtype} values, not token ids")
    if dataset.dtype.kind == "u" and np.iinfo(dataset.dtype).max < vocab_size:
        return  # every value the dtype can hold is an id
    total = dataset.num_tokens
    starts = np.random.default_rng(0).integers(0, max(total - 4096, 1), size=_CHECKED_WINDOWS)
    windows = [(0, _CHECKED_TOKENS), (max(total - _CHECKED_TOKENS, 0), total)] + [(s, s + 4096) for s in starts]
    for start, stop in windows:
        tokens = dataset.tokens(int(start), int(min(stop, total)))
        bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
        if bad.size:
            where = int(start) + int(bad[0])
            raise UserError(f"{bin_path}: token id {int(tokens[bad[0]])} at token {where} is outside the "
                            f"tokenizer's vocabulary [0, {vocab_size}) (wrong --tokenizer-model or --vocab-size?)")


class _Datasets:
    """Opens and checks each prefix once, however many splits and blends use it."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.opened: dict[str, IndexedDataset] = {}

    def __call__(self, prefix: str) -> IndexedDataset:
        if prefix not in self.opened:
            dataset = IndexedDataset(prefix)
            if dataset.num_documents == 0:
                raise UserError(f"{get_idx_path(prefix)}: the dataset holds no documents")
            check_token_ids(dataset, self.vocab_size)
            self.opened[prefix] = dataset
        return self.opened[prefix]


def distinct_windows(dataset: IndexedDataset, document_range: tuple[int, int], seq_length: int) -> int:
    """Samples of `seq_length + 1` tokens that one pass over the documents holds (at least one)."""
    start, end = document_range
    tokens = int(dataset.document_offsets[end] - dataset.document_offsets[start])
    return max(1, (tokens - 1) // seq_length)


def _once(parts: Sequence[tuple[Fraction, IndexedDataset, tuple[int, int]]], seq_length: int, num_samples: int
          ) -> int:
    """The most samples, up to `num_samples`, that the blend of `parts` draws without reading any of its
    datasets twice: evaluation scores distinct text (a second epoch would score windows again)."""
    capacity = [distinct_windows(dataset, document_range, seq_length) for _, dataset, document_range in parts]
    if len(parts) == 1:
        return min(num_samples, capacity[0])
    total = sum(weight for weight, _, _ in parts)
    size = min(num_samples, *(math.floor(cap * total / weight) for (weight, _, _), cap in zip(parts, capacity)
                              if weight > 0))
    while size > 1:  # the blend's rounding may give one dataset a sample more than its share
        counts = np.bincount(blending_indices([w for w, _, _ in parts], size)["dataset_index"], minlength=len(parts))
        if all(count <= cap for count, cap in zip(counts, capacity)):
            break
        size -= 1
    return size


def _blend(
    parts: Sequence[tuple[Fraction, IndexedDataset, tuple[int, int]]],
    name: str,
    seq_length: int,
    seed: int,
    num_samples: int,
    cache_dir: str | None,
) -> torch.utils.data.Dataset:
    """One GPTDataset, or a BlendedDataset whose datasets have exactly the samples the blend draws."""
    if len(parts) == 1:
        _, dataset, document_range = parts[0]
        return GPTDataset(dataset, document_range, seq_length, num_samples, seed, name, cache_dir)
    indices = cached_blending_indices([weight for weight, _, _ in parts], num_samples, cache_dir)
    counts = np.bincount(indices["dataset_index"], minlength=len(parts))
    datasets = [
        GPTDataset(dataset, document_range, seq_length, int(count), seed, name, cache_dir) if count else None
        for (_, dataset, document_range), count in zip(parts, counts)
    ]
    return BlendedDataset(datasets, indices, dataset_names([dataset.path_prefix for _, dataset, _ in parts]))


def dataset_names(prefixes: Sequence[str]) -> list[str]:
    """Each blend member's name for the metrics: its prefix's base name, numbered when it repeats."""
    names = [os.path.basename(prefix) for prefix in prefixes]
    return [name if names.count(name) == 1 else f"{name}#{names[:k].count(name) + 1}" for k, name in enumerate(names)]


def build_train_valid_test_datasets(
    data: DataConfig, seq_length: int, seed: int, num_samples: Sequence[int], vocab_size: int,
    train_one_pass: bool = False,
) -> tuple[torch.utils.data.Dataset | None, ...]:
    """(train, valid, test) datasets with ``num_samples`` samples each (valid and test: at most as many as
    one pass over their documents holds, so no window is scored twice); None where a split has no data or
    no samples are asked. Each sample is ``{"tokens", "labels", "index"}``. `train_one_pass`: the train
    split is exactly one pass over its data, whatever its ``num_samples`` (--lfr-mode skip's blocks: the
    sampler revisits them epoch after epoch, so each index is the same window in every epoch)."""
    open_dataset = _Datasets(vocab_size)
    split_paths = (data.train_data_path, data.valid_data_path, data.test_data_path)
    if data.data_path:
        blend = [(weight, open_dataset(prefix)) for weight, prefix in parse_blend(data.data_path, "--data-path")]
        split_weights = parse_split(data.split)
        ranges = [split_documents(dataset.num_documents, data.split) for _, dataset in blend]
    datasets: list[torch.utils.data.Dataset | None] = []
    for s, (name, samples) in enumerate(zip(SPLIT_NAMES, num_samples)):
        if data.data_path:
            if samples == 0 or split_weights[s] == 0:
                datasets.append(None)
                continue
            parts = []
            for (weight, dataset), dataset_ranges in zip(blend, ranges):
                start, end = dataset_ranges[s]
                if end == start:
                    raise UserError(f"--split {data.split}: the {name} split of {dataset.path_prefix} gets none of "
                                    f"its {dataset.num_documents} documents")
                parts.append((weight, dataset, (start, end)))
        else:
            flag = f"--{name}-data-path"
            if samples == 0 or not split_paths[s]:
                datasets.append(None)
                continue
            parts = [(weight, (dataset := open_dataset(prefix)), (0, dataset.num_documents))
                     for weight, prefix in parse_blend(split_paths[s], flag)]
        if name != "train":  # evaluation splits: each window once, at most
            samples = _once(parts, seq_length, samples)
        elif train_one_pass:
            samples = _once(parts, seq_length, sys.maxsize)
        datasets.append(_blend(parts, name, seq_length, seed, samples, data.data_cache_path))
    if datasets[0] is None and num_samples[0] > 0:
        source = f"--split {data.split}: the train split" if data.data_path else "--train-data-path"
        raise UserError(f"{source} is empty (no training data)")
    return tuple(datasets)
