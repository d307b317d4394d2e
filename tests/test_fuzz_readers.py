"""Fuzzing the readers of the indexed dataset (.idx/.bin) and of the GPT dataset's index cache (.npy + description).

A damaged file must either read back exactly what was written or fail with a one-line UserError naming the
file: never another exception, never other tokens, never a read past the file. The .idx format has no
redundancy for two things (indexed_dataset's docstring), so these two reads are allowed, and only when the
mutation touched them: a dtype code changed to another of the same item size (the bytes read are the bytes
written), and document indices changed but still running from 0 to the sequence count without going back.
Run with -s to see the counts of the seeded runs.
"""
import collections
import glob
import itertools
import json
import os
import pathlib
import random
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import build_indexed
from megatron_eslm.data.gpt_dataset import GPTDataset
from megatron_eslm.data.indexed_dataset import IndexedDataset
from megatron_eslm.errors import UserError

HEADER_FIELDS = {"magic": (0, 9), "version": (9, 17), "dtype code": (17, 18), "sequence count": (18, 26),
                 "document count": (26, 34)}
DTYPE_CODE_BYTE = 17
SEEDED_MUTATIONS = 2000
GPT_SETTINGS = ((0, 40), 16, 50, 7, "train")  # document range, seq length, samples, seed, name
_names = itertools.count()  # every example writes under a fresh name: nothing is reused from an earlier one


@dataclass(frozen=True)
class WrittenDataset:
    """A valid .idx/.bin pair's bytes and what reading it must give."""

    directory: str
    idx: bytes
    bin: bytes
    sequences: list[bytes]
    document_indices: np.ndarray
    dtype: np.dtype
    document_indices_start: int  # byte offset of the document indices in the .idx


@dataclass(frozen=True)
class WrittenCache:
    """A valid GPT index cache's files and what loading it must give."""

    directory: str
    dataset: IndexedDataset
    files: dict[str, bytes]
    arrays: dict[str, np.ndarray]
    samples: np.ndarray


@pytest.fixture(scope="module")
def written_dataset(tmp_path_factory: pytest.TempPathFactory) -> WrittenDataset:
    """int32 tokens (so a float32 code reads the same bytes), empty sequences and documents, 13 sequences.

    An odd sequence count means no whole number of int64 document indices can pass for multimodal modes.
    """
    rng = np.random.default_rng(0)
    documents = [[rng.integers(0, 2**31 - 1, size=int(rng.integers(0, 6))) for _ in range(count)]
                 for count in (1, 0, 3, 1, 2, 0, 1, 4, 1, 0)]
    documents[2][1] = np.array([], dtype=np.int64)
    directory = str(tmp_path_factory.mktemp("indexed"))
    prefix = build_indexed(os.path.join(directory, "written"), documents, np.int32)
    sequences = [np.asarray(s, dtype=np.int32).tobytes() for document in documents for s in document]
    assert len(sequences) % 2 == 1
    with open(prefix + ".idx", "rb") as f:
        idx = f.read()
    with open(prefix + ".bin", "rb") as f:
        bin_ = f.read()
    document_indices = np.cumsum([0] + [len(document) for document in documents])
    return WrittenDataset(directory, idx, bin_, sequences, document_indices, np.dtype(np.int32),
                          34 + 12 * len(sequences))


@pytest.fixture(scope="module")
def written_cache(tmp_path_factory: pytest.TempPathFactory) -> WrittenCache:
    rng = np.random.default_rng(1)
    directory = str(tmp_path_factory.mktemp("cache"))
    documents = [[rng.integers(0, 500, size=int(rng.integers(1, 30)))] for _ in range(40)]
    indexed = IndexedDataset(build_indexed(os.path.join(directory, "ds"), documents, np.uint16))
    written = GPTDataset(indexed, *GPT_SETTINGS, os.path.join(directory, "written"))
    files = {}
    for path in glob.glob(os.path.join(directory, "written", "*")):
        if not path.endswith(".lock"):
            with open(path, "rb") as f:
                files[os.path.basename(path)] = f.read()
    assert len(files) == 4  # three .npy files and the description
    arrays = {name: np.array(getattr(written, name)) for name in ("document_index", "sample_index", "shuffle_index")}
    return WrittenCache(directory, indexed, files, arrays, samples_of(written))


def samples_of(gpt: GPTDataset) -> np.ndarray:
    return np.stack([gpt.window_tokens(int(gpt.shuffle_index[i])) for i in range(len(gpt))])


def assert_one_line_naming(err: UserError, *paths: str) -> None:
    message = str(err)
    assert "\n" not in message and any(path in message for path in paths), message


def read_dataset(written: WrittenDataset, idx: bytes, bin_: bytes) -> str:
    """Read every sequence of the files under a fresh name: the outcome, or AssertionError when not allowed."""
    prefix = os.path.join(written.directory, f"mutant{next(_names)}")
    for suffix, data in ((".idx", idx), (".bin", bin_)):
        with open(prefix + suffix, "wb") as f:
            f.write(data)
    try:
        dataset = IndexedDataset(prefix)
        sequences = [dataset[i].tobytes() for i in range(len(dataset))]
        dataset.document_offsets  # what the GPT dataset reads documents through
    except UserError as err:
        assert_one_line_naming(err, prefix + ".idx", prefix + ".bin")
        return "one-line error"
    finally:
        os.remove(prefix + ".idx")
        os.remove(prefix + ".bin")
    assert sequences == written.sequences, "tokens differ from those written"
    touched = {i for i, (a, b) in enumerate(zip(written.idx, idx)) if a != b}
    undetectable = []
    if dataset.dtype != written.dtype:
        assert DTYPE_CODE_BYTE in touched and dataset.dtype.itemsize == written.dtype.itemsize, dataset.dtype
        undetectable.append("dtype code of equal item size")
    if not np.array_equal(dataset.document_indices, written.document_indices):
        assert max(touched, default=-1) >= written.document_indices_start, dataset.document_indices
        undetectable.append("document indices moved")
    return "read exactly" if not undetectable else "undetectable: " + ", ".join(undetectable)


def read_cache(written: WrittenCache, name: str, data: bytes) -> str:
    """Load the cache with file ``name`` replaced by ``data`` from a fresh directory and read every sample."""
    directory = os.path.join(written.directory, f"mutant{next(_names)}")
    os.mkdir(directory)
    for file_name, content in written.files.items():
        with open(os.path.join(directory, file_name), "wb") as f:
            f.write(data if file_name == name else content)
    try:
        gpt = GPTDataset(written.dataset, *GPT_SETTINGS, directory)
        arrays = {array_name: np.array(getattr(gpt, array_name)) for array_name in written.arrays}
        samples = samples_of(gpt)
    except UserError as err:
        assert_one_line_naming(err, *(os.path.join(directory, file_name) for file_name in written.files))
        return "one-line error"
    finally:
        for file_name in os.listdir(directory):
            os.remove(os.path.join(directory, file_name))
        os.rmdir(directory)
    for array_name, array in written.arrays.items():
        assert arrays[array_name].dtype == array.dtype and np.array_equal(arrays[array_name], array), array_name
    assert np.array_equal(samples, written.samples)
    # Same values from a changed .npy would mean its checksum was skipped: only the description's text may vary.
    assert name.endswith("-description.json") or data == written.files[name], f"changed {name} loaded"
    return "read exactly"


def description_name(files: dict[str, bytes]) -> str:
    (name,) = (name for name in files if name.endswith("-description.json"))
    return name


def reindented(description: bytes, indent: int) -> bytes:
    return json.dumps(json.loads(description), indent=indent).encode()


def flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    mutated = bytearray(data)
    for position, mask in flips:
        mutated[position] ^= mask
    return bytes(mutated)


def with_header_field(idx: bytes, field: str, value: bytes) -> bytes:
    start, stop = HEADER_FIELDS[field]
    return idx[:start] + value[: stop - start].ljust(stop - start, b"\x00") + idx[stop:]


def header_values() -> st.SearchStrategy[bytes]:
    """Field values as little-endian bytes: small counts and codes near the real ones, or anything."""
    small = st.integers(0, 40).map(lambda v: v.to_bytes(9, "little"))
    return st.one_of(small, st.binary(min_size=9, max_size=9))


@settings(max_examples=500, deadline=None)
@given(field=st.sampled_from(sorted(HEADER_FIELDS)), value=header_values())
def test_mutated_header_fields(written_dataset: WrittenDataset, field: str, value: bytes) -> None:
    read_dataset(written_dataset, with_header_field(written_dataset.idx, field, value), written_dataset.bin)


@settings(max_examples=700, deadline=None)
@given(data=st.data())
@pytest.mark.slow
def test_byte_flips_anywhere_in_the_idx(written_dataset: WrittenDataset, data: st.DataObject) -> None:
    position = st.integers(0, len(written_dataset.idx) - 1)
    flips = data.draw(st.lists(st.tuples(position, st.integers(1, 255)), min_size=1, max_size=4))
    read_dataset(written_dataset, flip(written_dataset.idx, flips), written_dataset.bin)


@settings(max_examples=300, deadline=None)
@given(truncate_idx=st.booleans(), data=st.data())
def test_truncations(written_dataset: WrittenDataset, truncate_idx: bool, data: st.DataObject) -> None:
    idx, bin_ = written_dataset.idx, written_dataset.bin
    if truncate_idx:
        idx = idx[: data.draw(st.integers(0, len(idx) - 1))]
    else:
        bin_ = bin_[: data.draw(st.integers(0, len(bin_) - 1))]
    read_dataset(written_dataset, idx, bin_)


@settings(max_examples=300, deadline=None)
@given(to_idx=st.booleans(), garbage=st.binary(min_size=1, max_size=64))
def test_appended_garbage(written_dataset: WrittenDataset, to_idx: bool, garbage: bytes) -> None:
    outcome = read_dataset(written_dataset, written_dataset.idx + garbage if to_idx else written_dataset.idx,
                           written_dataset.bin if to_idx else written_dataset.bin + garbage)
    modes = to_idx and len(garbage) == len(written_dataset.sequences)  # one byte per sequence: a multimodal index
    assert outcome == ("read exactly" if modes else "one-line error")


@st.composite
def cache_mutations(draw: st.DrawFn, files: dict[str, bytes]) -> tuple[str, bytes]:
    """One cache file, with bytes flipped, its header (the first 128 bytes) rewritten, truncated or appended to;
    or the description re-indented, which keeps its meaning and must load."""
    name = draw(st.sampled_from(sorted(files)))
    data = files[name]
    kind = draw(st.sampled_from(["flip", "header", "truncate", "append", "reindent"]))
    if kind == "reindent":
        name = description_name(files)
        return name, reindented(files[name], draw(st.integers(0, 4)))
    if kind == "flip":
        flips = st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255))
        return name, flip(data, draw(st.lists(flips, min_size=1, max_size=4)))
    if kind == "header":
        start = draw(st.integers(0, 127))
        return name, data[:start] + draw(st.binary(min_size=1, max_size=8)) + data[start + 8:]
    if kind == "truncate":
        return name, data[: draw(st.integers(0, len(data) - 1))]
    return name, data + draw(st.binary(min_size=1, max_size=64))


@settings(max_examples=400, deadline=None)
@given(data=st.data())
@pytest.mark.slow
def test_mutated_index_cache(written_cache: WrittenCache, data: st.DataObject) -> None:
    read_cache(written_cache, *data.draw(cache_mutations(written_cache.files)))


def random_dataset_mutation(rng: random.Random, written: WrittenDataset) -> tuple[str, bytes, bytes]:
    idx, bin_ = written.idx, written.bin
    kind = rng.choice(["header field", "byte flips", "truncated .idx", "truncated .bin", "appended .idx",
                       "appended .bin"])
    if kind == "header field":
        field = rng.choice(sorted(HEADER_FIELDS))
        value = rng.randrange(41) if rng.random() < 0.5 else rng.getrandbits(72)
        idx = with_header_field(idx, field, value.to_bytes(9, "little"))
    elif kind == "byte flips":
        idx = flip(idx, [(rng.randrange(len(idx)), rng.randrange(1, 256)) for _ in range(rng.randint(1, 4))])
    elif kind == "truncated .idx":
        idx = idx[: rng.randrange(len(idx))]
    elif kind == "truncated .bin":
        bin_ = bin_[: rng.randrange(len(bin_))]
    elif kind == "appended .idx":
        idx += rng.randbytes(rng.randint(1, 64))
    else:
        bin_ += rng.randbytes(rng.randint(1, 64))
    return kind, idx, bin_


def random_cache_mutation(rng: random.Random, written: WrittenCache) -> tuple[str, str, bytes]:
    name = rng.choice(sorted(written.files))
    data = written.files[name]
    kind = rng.choice(["byte flips", "header bytes", "truncated", "appended", "reindented"])
    if kind == "reindented":
        name = description_name(written.files)
        data = reindented(written.files[name], rng.randint(0, 4))
    elif kind == "byte flips":
        data = flip(data, [(rng.randrange(len(data)), rng.randrange(1, 256)) for _ in range(rng.randint(1, 4))])
    elif kind == "header bytes":
        start = rng.randrange(128)
        data = data[:start] + rng.randbytes(rng.randint(1, 8)) + data[start + 8:]
    elif kind == "truncated":
        data = data[: rng.randrange(len(data))]
    else:
        data += rng.randbytes(rng.randint(1, 64))
    return f"{kind} of {name.split('-', 1)[1]}", name, data


def count_outcomes(label: str, run: Callable[[], tuple[str, Callable[[], str]]]) -> collections.Counter:
    """SEEDED_MUTATIONS outcomes of ``run`` (a mutation and how to read it), crashes counted, not raised."""
    counts: collections.Counter = collections.Counter()
    first_crash = {}
    for _ in range(SEEDED_MUTATIONS):
        kind, read = run()
        try:
            counts[read()] += 1
        except Exception as err:  # counted, so one run reports every kind
            counts[f"crash: {type(err).__name__}"] += 1
            first_crash.setdefault(type(err).__name__, f"{kind}: {err!r}")
    print(f"\n{label}, {SEEDED_MUTATIONS} seeded mutations: {dict(sorted(counts.items()))}")
    assert not first_crash, first_crash
    return counts


def test_seeded_dataset_mutations(written_dataset: WrittenDataset) -> None:
    rng = random.Random(20240917)

    def run() -> tuple[str, Callable[[], str]]:
        kind, idx, bin_ = random_dataset_mutation(rng, written_dataset)
        return kind, lambda: read_dataset(written_dataset, idx, bin_)

    counts = count_outcomes("indexed dataset", run)
    assert counts["one-line error"] > 0.9 * SEEDED_MUTATIONS and counts["read exactly"] > 0


@pytest.mark.slow
def test_seeded_cache_mutations(written_cache: WrittenCache) -> None:
    rng = random.Random(20240917)

    def run() -> tuple[str, Callable[[], str]]:
        kind, name, data = random_cache_mutation(rng, written_cache)
        return kind, lambda: read_cache(written_cache, name, data)

    counts = count_outcomes("index cache", run)
    assert counts["one-line error"] > 0.7 * SEEDED_MUTATIONS and counts["read exactly"] > 0


def test_what_the_idx_format_cannot_tell(written_dataset: WrittenDataset) -> None:
    """The two damages allowed above do happen, and read as the classification says (pinned, not hoped for)."""
    as_float32 = with_header_field(written_dataset.idx, "dtype code", bytes([7]))
    outcome = read_dataset(written_dataset, as_float32, written_dataset.bin)
    assert outcome == "undetectable: dtype code of equal item size"
    moved = bytearray(written_dataset.idx)
    moved[written_dataset.document_indices_start + 8] = 0  # the first document ends at sequence 0, not 1
    assert read_dataset(written_dataset, bytes(moved), written_dataset.bin) == "undetectable: document indices moved"


def test_megatron_core_multimodal_index_still_reads(tmp_path: pathlib.Path) -> None:
    """The trailing-bytes check must keep accepting the one thing megatron-core appends: a mode per sequence."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core warns at import that apex/transformer-engine are absent
        mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    prefix = str(tmp_path / "multimodal")
    builder = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32, multimodal=True)
    for mode, sequence in enumerate(([1, 2, 3], [], [4])):
        builder.add_item(torch.tensor(sequence, dtype=torch.int32), mode=mode)
        builder.end_document()
    builder.finalize(prefix + ".idx")
    dataset = IndexedDataset(prefix)
    assert [dataset[i].tolist() for i in range(len(dataset))] == [[1, 2, 3], [], [4]]
