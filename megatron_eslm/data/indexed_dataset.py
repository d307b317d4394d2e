"""Megatron-LM's memory-mapped indexed dataset (``prefix.idx`` + ``prefix.bin``), byte for byte.

Keeping the exact format means datasets preprocessed by Megatron-LM load here unchanged and vice versa.

The .idx file is a header ``MMIDIDX\\x00\\x00``, version ``<Q`` (1), dtype code ``<B``, sequence count ``<Q``,
document-index count ``<Q``, then the int32 sequence lengths, the int64 byte offsets of each sequence in
the .bin, and the int64 document indices (``[0, end of doc 0, end of doc 1, ...]`` in sequences).
The .bin file is the token arrays back to back.
"""
from __future__ import annotations

import contextlib
import os
import struct

import numpy as np

from megatron_eslm.errors import UserError

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index count

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}


def get_idx_path(prefix: str) -> str:
    return prefix + ".idx"


def get_bin_path(prefix: str) -> str:
    return prefix + ".bin"


def best_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype for a vocabulary (Megatron's rule: uint16 below 65500 ids, else int32)."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


class IndexedDatasetBuilder:
    """Writes one .bin/.idx pair; both appear under their final names only after :meth:`finalize`.

    Use as a context manager so a failure before ``finalize`` removes the temporary .bin.
    """

    def __init__(self, bin_path: str, dtype: np.dtype | type = np.int32) -> None:
        self._dtype = np.dtype(dtype)
        if self._dtype not in _CODE_OF_DTYPE:
            raise ValueError(f"dtype {self._dtype} has no code in the indexed dataset format")
        self._bin_path = bin_path
        self._tmp_bin_path = bin_path + ".tmp"
        try:
            self._bin = open(self._tmp_bin_path, "wb")
        except OSError as err:
            raise UserError(f"{bin_path}: cannot write ({err.strerror})") from None
        self._lengths: list[int] = []
        self._document_indices = [0]
        self._finalized = False

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._finalized:
            self._bin.close()
            os.remove(self._tmp_bin_path)

    def add_item(self, tokens: object) -> None:
        """Append one sequence (a 1-D numpy array, torch CPU tensor or list of ints)."""
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {array.shape}")
        if array.size and self._dtype.kind in "iu":
            info = np.iinfo(self._dtype)
            if array.min() < info.min or array.max() > info.max:
                raise ValueError(f"token ids outside {self._dtype}'s range [{info.min}, {info.max}]")
        self._bin.write(array.astype(self._dtype, copy=False).tobytes(order="C"))
        self._lengths.append(array.size)

    def end_document(self) -> None:
        """Close the current document: the sequences added since the last call form one document."""
        self._document_indices.append(len(self._lengths))

    def add_document(self, tokens: object, lengths: list[int]) -> None:
        """Append one document whose concatenated ``tokens`` split into sequences of ``lengths``."""
        array = np.asarray(tokens)
        if sum(lengths) != array.size:
            raise ValueError(f"sequence lengths sum to {sum(lengths)} but the document has {array.size} tokens")
        for sequence in np.split(array, np.cumsum(lengths)[:-1]):
            self.add_item(sequence)
        self.end_document()

    def finalize(self, idx_path: str) -> None:
        """Write the index and move both files to their final names (an unfinished document is closed)."""
        if self._document_indices[-1] != len(self._lengths):
            self.end_document()
        self._bin.close()
        lengths = np.array(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self._dtype.itemsize
        document_indices = np.array(self._document_indices, dtype=np.int64)
        header = _HEADER.pack(_MAGIC, _VERSION, _CODE_OF_DTYPE[self._dtype], len(lengths), len(document_indices))
        tmp_idx_path = idx_path + ".tmp"
        try:
            with open(tmp_idx_path, "wb") as f:
                f.write(header)
                f.write(lengths.tobytes())
                f.write(pointers.tobytes())
                f.write(document_indices.tobytes())
        except OSError as err:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp_idx_path)
            raise UserError(f"{idx_path}: cannot write ({err.strerror})") from None
        os.replace(self._tmp_bin_path, self._bin_path)
        os.replace(tmp_idx_path, idx_path)
        self._finalized = True


class IndexedDataset:
    """Read-only view of ``prefix.idx``/``prefix.bin`` through numpy memmaps; ``ds[i]`` is sequence i."""

    def __init__(self, path_prefix: str) -> None:
        idx_path, bin_path = get_idx_path(path_prefix), get_bin_path(path_prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise UserError(f"{path}: no such file (an indexed dataset needs both .idx and .bin)")
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise UserError(f"{idx_path}: truncated index ({idx_size} bytes, the header alone needs {_HEADER.size})")
        magic, version, code, sequence_count, document_count = _HEADER.unpack(header)
        if magic != _MAGIC:
            raise UserError(f"{idx_path}: not a Megatron indexed dataset index (magic {magic!r}, expected {_MAGIC!r})")
        if version != _VERSION:
            raise UserError(f"{idx_path}: unsupported index version {version} (only {_VERSION} is known)")
        if code not in DTYPE_CODES:
            raise UserError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        needed = _HEADER.size + sequence_count * (4 + 8) + document_count * 8
        if idx_size < needed:
            raise UserError(
                f"{idx_path}: truncated index ({idx_size} bytes, but {sequence_count} sequences and "
                f"{document_count} document indices need {needed})"
            )
        self.dtype = DTYPE_CODES[code]
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(index, dtype=np.int32, count=sequence_count, offset=offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(index, dtype=np.int64, count=sequence_count, offset=offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=document_count, offset=offset)
        if document_count == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != sequence_count:
            raise UserError(f"{idx_path}: document indices must run from 0 to the sequence count {sequence_count}")

        bin_size = os.path.getsize(bin_path)
        expected_bin_size = 0
        if sequence_count:
            expected_bin_size = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
        if bin_size != expected_bin_size:
            raise UserError(f"{bin_path}: {bin_size} bytes, but {idx_path} says it holds {expected_bin_size}")
        # numpy cannot memmap an empty file, and an empty .bin is valid (no tokens at all).
        self._tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if bin_size else np.empty(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence i (to its end when length is None)."""
        sequence_length = int(self.sequence_lengths[i])
        if length is None:
            length = sequence_length - offset
        if offset < 0 or length < 0 or offset + length > sequence_length:
            raise IndexError(f"slice [{offset}, {offset + length}) outside sequence {i} of length {sequence_length}")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return np.asarray(self._tokens[start : start + length])
