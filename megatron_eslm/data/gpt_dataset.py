"""GPT pretraining samples over an indexed dataset, with Megatron GPTDataset semantics.

The documents of a split are concatenated, in a seeded shuffled order, into one token stream; sample k is
stream tokens ``[k * seq_length, (k + 1) * seq_length + 1)``, so samples run across document boundaries and
consecutive samples share one token (the last label of one is the first input of the next). The stream
repeats the documents for as many epochs, each in a fresh order, as the requested samples need, and the
order in which samples are served is shuffled too. Everything is decided by the seed, so a resumed run
sees the same samples.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from megatron_eslm.data.indexed_dataset import IndexedDataset
from megatron_eslm.errors import UserError


def _parse_split(split: str) -> list[float]:
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
    weights = _parse_split(split)
    total = sum(weights)
    cumulative = np.cumsum(weights) / total
    bounds = [0] + [int(round(fraction * num_documents)) for fraction in cumulative]
    bounds[-1] = num_documents  # no rounding drift at the end
    return list(zip(bounds[:-1], bounds[1:]))


def _sequence_order(document_indices: np.ndarray, document_order: np.ndarray) -> np.ndarray:
    """The sequence ids of the documents in ``document_order``, each document's sequences kept in order."""
    firsts = document_indices[document_order]
    counts = document_indices[document_order + 1] - firsts
    position_in_document = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(firsts, counts) + position_in_document


class GPTDataset(torch.utils.data.Dataset):
    """``num_samples`` samples of ``seq_length + 1`` tokens from documents ``document_range`` of a dataset.

    ``document_order`` (document ids, epoch after epoch) and ``sample_order`` (sample i serves stream window
    ``sample_order[i]``) are public so the stream can be checked against the samples.
    """

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        document_range: tuple[int, int],
        seq_length: int,
        num_samples: int,
        seed: int,
        name: str,
    ) -> None:
        start, end = document_range
        num_documents = len(indexed_dataset.document_indices) - 1
        if not 0 <= start < end <= num_documents:
            raise UserError(f"{name} dataset: empty or invalid document range [{start}, {end}) of {num_documents}")
        if seq_length < 1:
            raise UserError(f"{name} dataset: --seq-length must be positive, got {seq_length}")
        if num_samples < 1:
            raise UserError(f"{name} dataset: the number of samples must be positive, got {num_samples}")
        document_indices = indexed_dataset.document_indices
        lengths = indexed_dataset.sequence_lengths
        tokens_per_epoch = int(lengths[document_indices[start] : document_indices[end]].sum(dtype=np.int64))
        if tokens_per_epoch == 0:
            raise UserError(f"{name} dataset: documents [{start}, {end}) hold no tokens")

        self.indexed_dataset = indexed_dataset
        self.seq_length = seq_length
        self.name = name
        # The last sample ends at stream token num_samples * seq_length (inclusive).
        self.num_epochs = -(-(num_samples * seq_length + 1) // tokens_per_epoch)
        rng = np.random.default_rng(seed)
        epoch_permutations = np.argsort(rng.random((self.num_epochs, end - start)), axis=1)
        self.document_order = start + epoch_permutations.ravel()
        self._sequence_order = _sequence_order(document_indices, self.document_order)
        self._stream_offsets = np.zeros(len(self._sequence_order) + 1, dtype=np.int64)
        np.cumsum(lengths[self._sequence_order], dtype=np.int64, out=self._stream_offsets[1:])
        self.sample_order = rng.permutation(num_samples)

    def __len__(self) -> int:
        return len(self.sample_order)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        begin = int(self.sample_order[i]) * self.seq_length
        sample = torch.from_numpy(self._stream_slice(begin, begin + self.seq_length + 1).astype(np.int64))
        # "index" identifies the sample for policies that track samples (--selection lfr).
        return {"tokens": sample[:-1], "labels": sample[1:], "index": torch.tensor(i)}

    def _stream_slice(self, begin: int, end: int) -> np.ndarray:
        """Stream tokens ``begin:end``, gathered from the (few) sequences they span."""
        first = int(np.searchsorted(self._stream_offsets, begin, side="right")) - 1
        stop = int(np.searchsorted(self._stream_offsets, end, side="left"))
        parts = []
        for k in range(first, stop):
            sequence_start = int(self._stream_offsets[k])
            sequence_end = int(self._stream_offsets[k + 1])
            lo, hi = max(begin, sequence_start), min(end, sequence_end)
            parts.append(self.indexed_dataset.get(int(self._sequence_order[k]), lo - sequence_start, hi - lo))
        return np.concatenate(parts)


def build_train_valid_test_datasets(
    prefix: str,
    split: str,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    test_samples: int,
) -> tuple[GPTDataset | None, GPTDataset | None, GPTDataset | None]:
    """The three GPT datasets of ``prefix``; None where the split has no documents or no samples are asked."""
    indexed_dataset = IndexedDataset(prefix)
    ranges = split_documents(len(indexed_dataset.document_indices) - 1, split)
    datasets = []
    for name, document_range, num_samples in zip(
        ("train", "valid", "test"), ranges, (train_samples, valid_samples, test_samples)
    ):
        if document_range[1] > document_range[0] and num_samples > 0:
            datasets.append(GPTDataset(indexed_dataset, document_range, seq_length, num_samples, seed, name))
        else:
            datasets.append(None)
    return tuple(datasets)
