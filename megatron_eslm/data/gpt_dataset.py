"""GPT pretraining samples over a document range of an indexed dataset, with Megatron GPTDataset semantics.

The documents are concatenated, in a seeded shuffled order, into one token stream; sample k is stream
tokens ``[k * seq_length, (k + 1) * seq_length + 1)``, so samples run across document boundaries and
consecutive samples share one token (the last label of one is the first input of the next). The stream
repeats the documents for as many epochs, each a fresh permutation, as the requested samples need, and
the order in which samples are served is shuffled too.

Three arrays, built vectorised with numpy and cached (``index_cache.py``), hold all of it:

- ``document_index``: the document ids of the stream, epoch after epoch;
- ``sample_index``: ``(position in document_index, token offset)`` of the first token of each sample and,
  as row ``k + 1``, of its last (inclusive) token, as in Megatron;
- ``shuffle_index``: sample i serves stream window ``shuffle_index[i]``.

Unlike megatron-core, which treats every sequence (sentence) as a document, the documents here are the
.idx documents: a document of several sequences stays together.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from megatron_eslm.data.index_cache import Arrays, cached_arrays
from megatron_eslm.data.indexed_dataset import IndexedDataset, get_idx_path
from megatron_eslm.errors import UserError

_INDEX_FORMAT = 1  # bump when the way indices are built changes, so old caches are not reused


def _smallest_int(max_value: int) -> type:
    return np.int32 if max_value < np.iinfo(np.int32).max else np.int64


def build_gpt_indices(
    document_lengths: np.ndarray, first_document: int, seq_length: int, num_samples: int, seed: int
) -> Arrays:
    """The three index arrays for documents ``first_document + [0, len(document_lengths))``."""
    num_documents = len(document_lengths)
    tokens_per_epoch = int(document_lengths.sum(dtype=np.int64))
    num_epochs = -(-(num_samples * seq_length + 1) // tokens_per_epoch)  # the last sample ends at token N*L
    rng = np.random.default_rng(seed)
    document_index = np.empty(num_epochs * num_documents, dtype=_smallest_int(first_document + num_documents))
    stream_ends = np.empty(num_epochs * num_documents, dtype=np.int64)
    for epoch in range(num_epochs):
        order = rng.permutation(num_documents)
        part = slice(epoch * num_documents, (epoch + 1) * num_documents)
        document_index[part] = order + first_document
        stream_ends[part] = document_lengths[order]
    np.cumsum(stream_ends, out=stream_ends)

    # The document holding stream token b is the first whose end exceeds b (empty documents never are).
    boundaries = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    positions = np.searchsorted(stream_ends, boundaries, side="right")
    starts = np.where(positions > 0, stream_ends[np.maximum(positions - 1, 0)], 0)
    offsets = boundaries - starts
    sample_index = np.stack([positions, offsets], axis=1).astype(_smallest_int(max(len(stream_ends), seq_length)))
    shuffle_index = rng.permutation(num_samples).astype(_smallest_int(num_samples))
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


class GPTDataset(torch.utils.data.Dataset):
    """``num_samples`` samples of ``seq_length + 1`` tokens from documents ``document_range`` of a dataset.

    The index arrays come from ``cache_dir`` when it holds them for exactly these settings, else they are
    built (and saved there when ``cache_dir`` is set).
    """

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        document_range: tuple[int, int],
        seq_length: int,
        num_samples: int,
        seed: int,
        name: str,
        cache_dir: str | None = None,
    ) -> None:
        start, end = document_range
        prefix = indexed_dataset.path_prefix
        if not 0 <= start < end <= indexed_dataset.num_documents:
            raise UserError(f"{name} dataset: empty or invalid document range [{start}, {end}) of the "
                            f"{indexed_dataset.num_documents} documents of {prefix}")
        if seq_length < 1:
            raise UserError(f"{name} dataset: --seq-length must be positive, got {seq_length}")
        if num_samples < 1:
            raise UserError(f"{name} dataset: the number of samples must be positive, got {num_samples}")
        document_offsets = indexed_dataset.document_offsets
        if document_offsets[end] == document_offsets[start]:
            raise UserError(f"{name} dataset: documents [{start}, {end}) of {prefix} hold no tokens")

        self.indexed_dataset = indexed_dataset
        self.seq_length = seq_length
        self.name = name
        description = {
            "class": "GPTDataset",
            "format": _INDEX_FORMAT,
            "dataset": os.path.abspath(prefix),
            "idx_bytes": os.path.getsize(get_idx_path(prefix)),
            "documents": indexed_dataset.num_documents,
            "tokens": indexed_dataset.num_tokens,
            "document_range": [start, end],
            "seq_length": seq_length,
            "num_samples": num_samples,
            "seed": seed,
        }
        arrays = cached_arrays(
            cache_dir,
            description,
            lambda: build_gpt_indices(np.diff(document_offsets[start : end + 1]), start, seq_length, num_samples, seed),
        )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        self.num_epochs = len(self.document_index) // (end - start)

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = int(self.shuffle_index[i])
        sample = torch.from_numpy(self.window_tokens(window).astype(np.int64))
        # "index" identifies the sample for policies that track samples (--selection lfr).
        return {"tokens": sample[:-1], "labels": sample[1:], "index": torch.tensor(i)}

    def window_tokens(self, window: int) -> np.ndarray:
        """Stream tokens ``[window * seq_length, (window + 1) * seq_length]``, gathered from their documents."""
        (first, first_offset), (last, last_offset) = self.sample_index[window : window + 2].tolist()
        offsets = self.indexed_dataset.document_offsets
        documents = self.document_index[first : last + 1].tolist()
        if first == last:
            begin = int(offsets[documents[0]]) + first_offset
            return self.indexed_dataset.tokens(begin, begin + last_offset - first_offset + 1)
        parts = [self.indexed_dataset.tokens(int(offsets[documents[0]]) + first_offset, int(offsets[documents[0] + 1]))]
        parts += [self.indexed_dataset.tokens(int(offsets[d]), int(offsets[d + 1])) for d in documents[1:-1]]
        parts.append(self.indexed_dataset.tokens(int(offsets[documents[-1]]), int(offsets[documents[-1]]) + last_offset + 1))
        return np.concatenate(parts)
