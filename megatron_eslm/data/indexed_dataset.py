"""Megatron-LM's memory-mapped indexed dataset (``prefix.idx`` + ``prefix.bin``), byte for byte.

Keeping the exact format means datasets preprocessed by Megatron-LM, Megatron-DeepSpeed or GPT-NeoX load
here unchanged and vice versa (tests/test_megatron_compat.py checks both directions against megatron-core).

The .idx file is a header ``MMIDIDX\\x00\\x00``, version ``<Q`` (1), dtype code ``<B``, sequence count ``<Q``,
document-index count ``<Q``, then the int32 sequence lengths, the int64 byte offsets of each sequence in
the .bin, and the int64 document indices (``[0, end of doc 0, end of doc 1, ...]`` in sequences).
The .bin file is the token arrays back to back. Multimodal files append one int8 mode per sequence to the
.idx; they read here with the modes ignored, and any other trailing bytes are refused.

The format has no redundancy for the dtype code beyond its item size, nor for document boundaries beyond
running from 0 to the sequence count without going back: a damaged .idx that changes only those reads
without error (int32 bytes as float32, other document ends). Random damage elsewhere in the .idx, and a
.bin of the wrong size, fail on opening (tests/test_fuzz_readers.py); the .bin has no checksum, so
flipped token bytes read as they are.
"""
from __future__ import annotations

import contextlib
import functools
import mmap
import os
import shutil
import struct
from array import array

import numpy as np

from megatron_eslm.errors import UserError

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index count
_CHECK_CHUNK = 1 << 22  # sequences per step when validating pointers, to bound temporary memory

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

    Use as a context manager so a failure before ``finalize`` removes the temporary .bin. Lengths are kept
    in compact arrays (12 bytes a sequence), so billions of tokens in short documents fit in memory.
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
        self._lengths = array("i")
        self._document_indices = array("q", [0])
        self._finalized = False

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._finalized:
            self._bin.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._tmp_bin_path)

    def _write_tokens(self, tokens: object) -> np.ndarray:
        array_ = np.asarray(tokens)
        if array_.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {array_.shape}")
        if array_.size and self._dtype.kind in "iu" and array_.dtype != self._dtype:
            info = np.iinfo(self._dtype)
            if array_.min() < info.min or array_.max() > info.max:
                raise ValueError(f"token ids outside {self._dtype}'s range [{info.min}, {info.max}]")
        self._bin.write(array_.astype(self._dtype, copy=False).tobytes(order="C"))
        return array_

    def add_item(self, tokens: object) -> None:
        """Append one sequence (a 1-D numpy array, torch CPU tensor or list of ints)."""
        self._lengths.append(self._write_tokens(tokens).size)

    def end_document(self) -> None:
        """Close the current document: the sequences added since the last call form one document."""
        self._document_indices.append(len(self._lengths))

    def add_document(self, tokens: object, lengths: list[int]) -> None:
        """Append one document whose concatenated ``tokens`` split into sequences of ``lengths``."""
        array_ = np.asarray(tokens)
        if sum(lengths) != array_.size:
            raise ValueError(f"sequence lengths sum to {sum(lengths)} but the document has {array_.size} tokens")
        self._write_tokens(array_)
        self._lengths.extend(int(length) for length in lengths)
        self.end_document()

    def add_documents(self, tokens: np.ndarray, document_lengths: np.ndarray) -> None:
        """Append many documents at once, each one sequence (none when empty): what preprocessing writes."""
        document_lengths = np.asarray(document_lengths, dtype=np.int64)
        if int(document_lengths.sum()) != len(tokens):
            raise ValueError(f"document lengths sum to {document_lengths.sum()} but there are {len(tokens)} tokens")
        self._write_tokens(tokens)
        nonempty = document_lengths > 0
        self._lengths.frombytes(document_lengths[nonempty].astype(np.int32).tobytes())
        ends = len(self._lengths) - int(np.count_nonzero(nonempty)) + np.cumsum(nonempty, dtype=np.int64)
        self._document_indices.frombytes(ends.astype(np.int64).tobytes())

    def add_index(self, prefix: str) -> None:
        """Append a whole dataset (as megatron-core's ``add_index``): its documents follow the ones so far."""
        if self._document_indices[-1] != len(self._lengths):
            raise ValueError("end the current document before appending another dataset")
        other = IndexedDataset(prefix)
        if other.dtype != self._dtype:
            raise UserError(f"{get_idx_path(prefix)}: tokens are {other.dtype}, but the merged dataset is {self._dtype}")
        offset = len(self._lengths)
        self._lengths.extend(other.sequence_lengths.tolist())
        self._document_indices.extend((other.document_indices[1:] + offset).tolist())
        with open(get_bin_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, 1 << 24)

    def finalize(self, idx_path: str) -> None:
        """Write the index and move both files to their final names (an unfinished document is closed)."""
        if self._document_indices[-1] != len(self._lengths):
            self.end_document()
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self._dtype.itemsize
        document_indices = np.asarray(self._document_indices, dtype=np.int64)
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


def _missing_file_hint(prefix: str) -> str:
    """Why `prefix`.idx/.bin may be missing: a prefix given with its file's suffix (`x.bin` looks for
    `x.bin.idx`) is the common slip."""
    stem, suffix = os.path.splitext(prefix)
    if suffix in (".bin", ".idx"):
        return f"a dataset is named by its prefix: give {stem}, without {suffix}"
    return "an indexed dataset needs both .idx and .bin"


def _map(path: str) -> np.ndarray:
    """The file as a read-only uint8 array backed by mmap (plain ndarray: slicing it is cheap)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return np.empty(0, np.uint8)  # mmap cannot map an empty file
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)


class IndexedDataset:
    """Read-only, validated view of ``prefix.idx``/``prefix.bin`` through mmap; ``ds[i]`` is sequence i.

    Opening checks everything the reader relies on (header, sizes, pointers agreeing with lengths, the
    .bin size), so a damaged file fails here in one line instead of as garbage samples later.
    """

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = path_prefix
        idx_path, bin_path = get_idx_path(path_prefix), get_bin_path(path_prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise UserError(f"{path}: no such file ({_missing_file_hint(path_prefix)})")
        index = _map(idx_path)
        if index.size < _HEADER.size:
            raise UserError(f"{idx_path}: truncated index ({index.size} bytes, the header alone needs {_HEADER.size})")
        magic, version, code, sequence_count, document_count = _HEADER.unpack(index[: _HEADER.size].tobytes())
        if magic != _MAGIC:
            raise UserError(f"{idx_path}: not a Megatron indexed dataset index (magic {magic!r}, expected {_MAGIC!r})")
        if version != _VERSION:
            raise UserError(f"{idx_path}: unsupported index version {version} (only {_VERSION} is known)")
        if code not in DTYPE_CODES:
            raise UserError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        needed = _HEADER.size + sequence_count * (4 + 8) + document_count * 8
        if index.size < needed:
            raise UserError(
                f"{idx_path}: truncated index ({index.size} bytes, but {sequence_count} sequences and "
                f"{document_count} document indices need {needed})"
            )
        # Only multimodal modes may follow; anything else means a miscounted header or bytes appended.
        if index.size - needed not in (0, sequence_count):
            raise UserError(
                f"{idx_path}: {index.size - needed} bytes after the document indices (expected none, or one mode "
                f"byte for each of the {sequence_count} sequences)"
            )
        self.dtype = DTYPE_CODES[code]
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(index, dtype=np.int32, count=sequence_count, offset=offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(index, dtype=np.int64, count=sequence_count, offset=offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=document_count, offset=offset)
        self._check_index(idx_path)

        self.num_tokens = 0
        if sequence_count:
            self.num_tokens = int(self.sequence_pointers[-1]) // self.dtype.itemsize + int(self.sequence_lengths[-1])
        bin_size = os.path.getsize(bin_path)
        if bin_size != self.num_tokens * self.dtype.itemsize:
            raise UserError(
                f"{bin_path}: {bin_size} bytes, but {idx_path} points to {self.num_tokens * self.dtype.itemsize}"
            )
        self._tokens = _map(bin_path).view(self.dtype)

    def _check_index(self, idx_path: str) -> None:
        """Document indices run from 0 to the sequence count without going back; sequences lie back to back."""
        sequence_count, indices = len(self.sequence_lengths), self.document_indices
        if len(indices) == 0 or indices[0] != 0 or indices[-1] != sequence_count:
            raise UserError(f"{idx_path}: document indices must run from 0 to the sequence count {sequence_count}")
        backwards = np.flatnonzero(np.diff(indices) < 0)
        if backwards.size:
            raise UserError(f"{idx_path}: document indices go backwards at document {int(backwards[0])}")
        itemsize, expected = self.dtype.itemsize, 0
        for start in range(0, sequence_count, _CHECK_CHUNK):
            lengths = self.sequence_lengths[start : start + _CHECK_CHUNK].astype(np.int64)
            if np.any(lengths < 0):
                raise UserError(f"{idx_path}: negative length for sequence {start + int(np.argmax(lengths < 0))}")
            wanted = expected + np.concatenate(([0], np.cumsum(lengths[:-1]))) * itemsize
            bad = np.flatnonzero(self.sequence_pointers[start : start + _CHECK_CHUNK] != wanted)
            if bad.size:
                i = int(bad[0])
                raise UserError(
                    f"{idx_path}: sequence {start + i} starts at byte {int(self.sequence_pointers[start + i])} of the "
                    f".bin, but the lengths before it put it at {int(wanted[i])}"
                )
            expected = int(wanted[-1]) + int(lengths[-1]) * itemsize

    def __reduce__(self) -> tuple:
        # Pickle by path (DataLoader workers under spawn): the maps are reopened, never copied.
        return (IndexedDataset, (self.path_prefix,))

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @functools.cached_property
    def document_offsets(self) -> np.ndarray:
        """Token offset of each document in the .bin, plus the total: document d is tokens ``[o[d], o[d+1])``.

        Valid because opening checked that sequences lie back to back in file order.
        """
        offsets = np.empty(len(self.document_indices), dtype=np.int64)
        first = self.document_indices
        inside = first < len(self.sequence_pointers)
        offsets[inside] = self.sequence_pointers[first[inside]] // self.dtype.itemsize
        offsets[~inside] = self.num_tokens
        return offsets

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence i (to its end when length is None); a read-only view."""
        sequence_length = int(self.sequence_lengths[i])
        if length is None:
            length = sequence_length - offset
        if offset < 0 or length < 0 or offset + length > sequence_length:
            raise IndexError(f"slice [{offset}, {offset + length}) outside sequence {i} of length {sequence_length}")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self._tokens[start : start + length]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop`` of the whole .bin (a read-only view)."""
        return self._tokens[start:stop]
