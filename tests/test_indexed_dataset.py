"""The indexed dataset must be Megatron's format byte for byte, and reject broken files with a clear UserError."""
import struct

import numpy as np
import pytest
import torch

from helpers import build_indexed as build
from megatron_eslm.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    best_dtype,
    get_bin_path,
    get_idx_path,
)
from megatron_eslm.errors import UserError


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.float32, np.float64])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    documents = [[rng.integers(0, 100, size=rng.integers(1, 20)).tolist()] for _ in range(30)]
    ds = IndexedDataset(build(str(tmp_path / "ds"), documents, dtype))
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == 30
    for i, (sequence,) in enumerate(documents):
        assert ds[i].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(ds[i], sequence)
    np.testing.assert_array_equal(ds.document_indices, np.arange(31))
    np.testing.assert_array_equal(ds.get(3, offset=1, length=1), documents[3][0][1:2])


def test_idx_byte_layout(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetBuilder(get_bin_path(prefix), np.uint16) as builder:
        builder.add_item(torch.tensor([5, 6, 7]))
        builder.add_item(np.array([8], dtype=np.int64))
        builder.end_document()
        builder.add_document([9, 10, 11, 12], [1, 3])
        builder.finalize(get_idx_path(prefix))

    idx = (tmp_path / "ds.idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<Q", idx, 9) == (1,)
    assert struct.unpack_from("<B", idx, 17) == (8,)  # uint16
    assert struct.unpack_from("<Q", idx, 18) == (4,)  # sequences
    assert struct.unpack_from("<Q", idx, 26) == (3,)  # document indices: 2 documents + 1
    assert struct.unpack_from("<4i", idx, 34) == (3, 1, 1, 3)
    assert struct.unpack_from("<4q", idx, 50) == (0, 6, 8, 10)  # byte offsets, 2 bytes a token
    assert struct.unpack_from("<3q", idx, 82) == (0, 2, 4)
    assert len(idx) == 82 + 3 * 8
    assert (tmp_path / "ds.bin").read_bytes() == np.arange(5, 13, dtype="<u2").tobytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_empty_documents_and_sequences(tmp_path):
    ds = IndexedDataset(build(str(tmp_path / "ds"), [[], [[1, 2]], [[]], []]))
    np.testing.assert_array_equal(ds.document_indices, [0, 0, 1, 2, 2])
    np.testing.assert_array_equal(ds.sequence_lengths, [2, 0])
    assert ds[1].size == 0


def test_no_tokens_at_all(tmp_path):
    ds = IndexedDataset(build(str(tmp_path / "ds"), [[]]))
    assert len(ds) == 0
    np.testing.assert_array_equal(ds.document_indices, [0, 0])


def test_documents_of_several_sequences(tmp_path):
    documents = [[[1, 2], [3]], [[4]], [[5, 6, 7], [8], [9, 10]]]
    ds = IndexedDataset(build(str(tmp_path / "ds"), documents))
    np.testing.assert_array_equal(ds.document_indices, [0, 2, 3, 6])
    np.testing.assert_array_equal(ds.sequence_lengths, [2, 1, 1, 3, 1, 2])
    assert ds.sequence_lengths.dtype == np.int32 and ds.document_indices.dtype == np.int64
    np.testing.assert_array_equal(np.concatenate([ds[i] for i in range(len(ds))]), np.arange(1, 11))


def test_best_dtype():
    assert best_dtype(32000) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert DTYPE_CODES[8] == np.uint16 and DTYPE_CODES[4] == np.int32


def test_builder_rejects_ids_outside_dtype(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "ds.bin"), np.uint16) as builder:
        with pytest.raises(ValueError, match="range"):
            builder.add_item(np.array([70000]))
    assert not list(tmp_path.iterdir())  # the unfinished temporary .bin is removed


def test_failed_rebuild_keeps_existing_files(tmp_path):
    prefix = build(str(tmp_path / "ds"), [[[1, 2, 3]]])
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(get_bin_path(prefix)) as builder:
            builder.add_item([4])
            raise RuntimeError("tokenizer crashed")
    np.testing.assert_array_equal(IndexedDataset(prefix)[0], [1, 2, 3])


def corrupt(path, offset=None, data=None, truncate=None):
    content = bytearray(path.read_bytes())
    if data is not None:
        content[offset : offset + len(data)] = data
    if truncate is not None:
        content = content[:truncate]
    path.write_bytes(bytes(content))


@pytest.mark.parametrize(
    "damage, culprit, message",
    [
        (lambda p: (p / "ds.bin").unlink(), "ds.bin", "no such file"),
        (lambda p: (p / "ds.idx").unlink(), "ds.idx", "no such file"),
        (lambda p: corrupt(p / "ds.idx", 0, b"NOTANIDX\x00"), "ds.idx", "magic"),
        (lambda p: corrupt(p / "ds.idx", 9, struct.pack("<Q", 2)), "ds.idx", "version"),
        (lambda p: corrupt(p / "ds.idx", 17, struct.pack("<B", 9)), "ds.idx", "dtype code 9"),
        (lambda p: corrupt(p / "ds.idx", truncate=60), "ds.idx", "truncated"),
        (lambda p: corrupt(p / "ds.idx", truncate=20), "ds.idx", "truncated"),
        (lambda p: corrupt(p / "ds.bin", truncate=10), "ds.bin", "bytes"),
        (lambda p: corrupt(p / "ds.bin", data=b"\x00" * 4, offset=36), "ds.bin", "points to 36"),
        (lambda p: corrupt(p / "ds.idx", 34 + 3 * 4 + 8, struct.pack("<q", 16)), "ds.idx", "sequence 1 starts at byte 16"),
        (lambda p: corrupt(p / "ds.idx", 34 + 3 * 12 + 8, struct.pack("<q", 5)), "ds.idx", "go backwards"),
        (lambda p: corrupt(p / "ds.idx", 34, struct.pack("<i", -1)), "ds.idx", "negative length"),
    ],
)
def test_bad_files_raise_user_error_naming_the_file(tmp_path, damage, culprit, message):
    prefix = build(str(tmp_path / "ds"), [[[1, 2, 3], [4, 5]], [[6, 7, 8, 9]]])
    damage(tmp_path)
    with pytest.raises(UserError, match=message) as error:
        IndexedDataset(prefix)
    assert str(tmp_path / culprit) in str(error.value)
    assert "\n" not in str(error.value)


def test_add_documents_and_add_index(tmp_path):
    first = build(str(tmp_path / "a"), [[[1, 2]], [[3]]], np.uint16)
    second = build(str(tmp_path / "b"), [[], [[4, 5, 6]]], np.uint16)
    prefix = str(tmp_path / "merged")
    with IndexedDatasetBuilder(get_bin_path(prefix), np.uint16) as builder:
        builder.add_documents(np.array([7, 8, 9], np.uint16), np.array([2, 0, 1]))
        builder.add_index(first)
        builder.add_index(second)
        builder.finalize(get_idx_path(prefix))
    ds = IndexedDataset(prefix)
    np.testing.assert_array_equal(ds.document_indices, [0, 1, 1, 2, 3, 4, 4, 5])
    np.testing.assert_array_equal(ds.tokens(0, ds.num_tokens), [7, 8, 9, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(ds.document_offsets, [0, 2, 2, 3, 5, 6, 6, 9])


def test_add_index_rejects_another_dtype(tmp_path):
    other = build(str(tmp_path / "a"), [[[1, 2]]], np.int32)
    with IndexedDatasetBuilder(str(tmp_path / "m.bin"), np.uint16) as builder:
        with pytest.raises(UserError, match=r"a\.idx: tokens are int32, but the merged dataset is uint16"):
            builder.add_index(other)


def test_pickles_by_path(tmp_path):
    import pickle

    ds = IndexedDataset(build(str(tmp_path / "ds"), [[[1, 2, 3]]] * 1000))
    data = pickle.dumps(ds)
    assert len(data) < 500  # the maps are reopened, not copied
    np.testing.assert_array_equal(pickle.loads(data)[999], [1, 2, 3])
