"""Format compatibility both ways with megatron-core's own indexed dataset writer and reader.

Files megatron-core writes must read identically here; files written here must be byte-identical to what
megatron-core writes for the same input (documents, merges), for every dtype code.
"""
import warnings

import numpy as np
import pytest
import torch

from megatron_eslm.data.indexed_dataset import DTYPE_CODES, IndexedDataset, IndexedDatasetBuilder

mcore = None  # megatron-core's indexed dataset module, once this file's tests run


@pytest.fixture(scope="module", autouse=True)
def megatron_core():
    """Imported when the tests run, not when pytest collects the file (5 CPU-s, paid by every xdist worker)."""
    global mcore
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core warns at import that apex/transformer-engine are absent
        mcore = pytest.importorskip(
            "megatron.core.datasets.indexed_dataset", reason="megatron-core is not installed (pip install -e .[test])"
        )


def documents(dtype, seed=0):
    """Documents of zero, one and several sequences, some sequences empty, ids spanning the dtype's range."""
    rng = np.random.default_rng(seed)
    high = 120 if np.dtype(dtype).itemsize == 1 else 30000
    low = -high if np.dtype(dtype).kind in "if" else 0
    docs = []
    for d in range(25):
        count = [0, 1, 1, 3][d % 4]
        docs.append([rng.integers(low, high, size=int(rng.integers(0, 12))).astype(dtype) for _ in range(count)])
    return docs


def write_ours(prefix, docs, dtype):
    with IndexedDatasetBuilder(prefix + ".bin", dtype) as builder:
        for doc in docs:
            for sequence in doc:
                builder.add_item(sequence)
            builder.end_document()
        builder.finalize(prefix + ".idx")


def write_theirs(prefix, docs, dtype):
    builder = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        for sequence in doc:
            builder.add_item(torch.from_numpy(sequence))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def same_bytes(a, b):
    for suffix in (".bin", ".idx"):
        with open(a + suffix, "rb") as fa, open(b + suffix, "rb") as fb:
            assert fa.read() == fb.read(), suffix


DTYPES = [DTYPE_CODES[code].type for code in sorted(DTYPE_CODES)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_theirs_read_here_and_ours_are_byte_identical(tmp_path, dtype):
    docs = documents(dtype)
    theirs, ours = str(tmp_path / "theirs"), str(tmp_path / "ours")
    write_theirs(theirs, docs, dtype)
    write_ours(ours, docs, dtype)
    same_bytes(ours, theirs)

    ds, reference = IndexedDataset(theirs), mcore.IndexedDataset(theirs)
    assert ds.dtype == np.dtype(dtype) and len(ds) == len(reference)
    np.testing.assert_array_equal(ds.sequence_lengths, reference.sequence_lengths)
    np.testing.assert_array_equal(ds.document_indices, reference.document_indices)
    flat = [sequence for doc in docs for sequence in doc]
    for i, sequence in enumerate(flat):
        np.testing.assert_array_equal(ds[i], sequence)
        np.testing.assert_array_equal(ds[i], reference[i])
        if len(sequence) > 2:
            np.testing.assert_array_equal(ds.get(i, 1, 2), reference.get(i, offset=1, length=2))


def test_documents_of_several_sequences_and_empty_documents(tmp_path):
    docs = [[], [np.array([1, 2], np.uint16), np.array([3], np.uint16)], [np.array([], np.uint16)], []]
    prefix = str(tmp_path / "theirs")
    write_theirs(prefix, docs, np.uint16)
    ds = IndexedDataset(prefix)
    np.testing.assert_array_equal(ds.document_indices, [0, 0, 2, 3, 3])
    np.testing.assert_array_equal(ds.document_offsets, [0, 0, 3, 3, 3])
    assert ds.num_documents == 4 and ds.num_tokens == 3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # megatron-core's numpy.array(tensor) under numpy 2
def test_add_document_matches(tmp_path):
    theirs, ours = str(tmp_path / "theirs"), str(tmp_path / "ours")
    builder = mcore.IndexedDatasetBuilder(theirs + ".bin", dtype=np.int32)
    builder.add_document(torch.tensor([1, 2, 3, 4]), [1, 3])
    builder.add_document(torch.tensor([5]), [1])
    builder.finalize(theirs + ".idx")
    with IndexedDatasetBuilder(ours + ".bin", np.int32) as mine:
        mine.add_document([1, 2, 3, 4], [1, 3])
        mine.add_documents(np.array([5], np.int32), np.array([1]))
        mine.finalize(ours + ".idx")
    same_bytes(ours, theirs)


def test_merge_matches_add_index(tmp_path):
    parts = []
    for seed in range(3):
        prefix = str(tmp_path / f"part{seed}")
        write_theirs(prefix, documents(np.uint16, seed), np.uint16)
        parts.append(prefix)
    theirs, ours = str(tmp_path / "merged_theirs"), str(tmp_path / "merged_ours")
    builder = mcore.IndexedDatasetBuilder(theirs + ".bin", dtype=np.uint16)
    for prefix in parts:
        builder.add_index(prefix)
    builder.finalize(theirs + ".idx")
    with IndexedDatasetBuilder(ours + ".bin", np.uint16) as mine:
        for prefix in parts:
            mine.add_index(prefix)
        mine.finalize(ours + ".idx")
    same_bytes(ours, theirs)


def test_sample_index_matches_megatron_core(tmp_path):
    """Same document order in, same (document position, offset) pairs out as megatron-core's C++ helper."""
    helpers = pytest.importorskip("megatron.core.datasets.helpers", reason="megatron-core's compiled helpers")
    from megatron_eslm.data.gpt_dataset import build_gpt_indices

    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 40, size=300)
    lengths[:3] = 0  # empty documents are stepped over
    seq_length, num_samples = 32, 700
    ours = build_gpt_indices(lengths, 0, seq_length, num_samples, seed=5)
    document_index = ours["document_index"].astype(np.int32)
    num_epochs = len(document_index) // len(lengths)
    theirs = helpers.build_sample_idx(lengths.astype(np.int32), document_index, seq_length, num_epochs,
                                      int(lengths.sum()), True, True)
    np.testing.assert_array_equal(ours["sample_index"], theirs[: num_samples + 1])


def test_megatron_greedy_blending_drifts_where_the_quota_order_does_not():
    """Why blending differs from megatron-core's build_blending_indices: its greedy rule can put a dataset
    more than one sample off its weight; the quota order never does."""
    helpers = pytest.importorskip("megatron.core.datasets.helpers", reason="megatron-core's compiled helpers")
    from fractions import Fraction

    from megatron_eslm.data.blended_dataset import blending_indices

    weights = [Fraction(113, 849), Fraction(711, 849), Fraction(25, 849)]
    size = 300
    theirs = np.zeros(size, np.int16)
    helpers.build_blending_indices(theirs, np.zeros(size, np.int64), np.array([float(w) for w in weights]),
                                   len(weights), size, False)
    ours = blending_indices(weights, size)["dataset_index"]

    def worst_drift(order):
        onehot = np.eye(len(weights))[order]
        expected = np.arange(1, size + 1)[:, None] * np.array([float(w) for w in weights])
        return np.abs(onehot.cumsum(0) - expected).max()

    assert worst_drift(ours) < 1 < worst_drift(theirs)
