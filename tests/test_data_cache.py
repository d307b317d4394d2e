"""Index caching (built once, shared, never reused for other settings) and the checks made at start:
token ids against the vocabulary, empty datasets."""
import json
import multiprocessing
import os
import time

import numpy as np
import pytest
import torch

from megatron_eslm.config import DataConfig
from megatron_eslm.data import gpt_dataset
from megatron_eslm.data.builder import build_train_valid_test_datasets, check_token_ids
from megatron_eslm.data.gpt_dataset import GPTDataset
from megatron_eslm.data.index_cache import description_hash
from megatron_eslm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_eslm.errors import UserError


def write(prefix, documents, dtype=np.uint16):
    with IndexedDatasetBuilder(prefix + ".bin", dtype) as builder:
        for document in documents:
            if len(document):
                builder.add_item(np.asarray(document))
            builder.end_document()
        builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture
def prefix(tmp_path):
    rng = np.random.default_rng(0)
    return write(str(tmp_path / "ds"), [rng.integers(0, 500, size=rng.integers(0, 30)) for _ in range(200)])


def samples(ds):
    return torch.stack([ds[i]["tokens"] for i in range(len(ds))])


def test_cache_is_built_once_then_memory_mapped(prefix, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    built = []
    real = gpt_dataset.build_gpt_indices
    monkeypatch.setattr(gpt_dataset, "build_gpt_indices", lambda *a: built.append(1) or real(*a))
    first = GPTDataset(IndexedDataset(prefix), (0, 200), 16, 300, 7, "train", cache)
    second = GPTDataset(IndexedDataset(prefix), (0, 200), 16, 300, 7, "train", cache)
    assert len(built) == 1
    assert isinstance(second.sample_index, np.memmap)
    assert torch.equal(samples(first), samples(second))
    assert torch.equal(samples(first), samples(GPTDataset(IndexedDataset(prefix), (0, 200), 16, 300, 7, "train")))
    assert len(built) == 2  # without a cache directory, built in memory
    files = sorted(os.listdir(cache))
    assert len(files) == 5 and sum(f.endswith(".npy") for f in files) == 3  # + description and lock
    GPTDataset(IndexedDataset(prefix), (0, 200), 16, 300, 8, "train", cache)  # another seed: other files
    assert len(built) == 3 and len(os.listdir(cache)) == 10


def test_a_cache_written_by_other_settings_is_refused(prefix, tmp_path):
    cache = tmp_path / "cache"
    ds = IndexedDataset(prefix)
    GPTDataset(ds, (0, 200), 16, 300, 7, "train", str(cache))
    (description_file,) = cache.glob("*-description.json")
    record = json.loads(description_file.read_text())
    old = description_hash(record["description"])
    record["description"]["seed"] = 8  # as if the files of seed 7 sat under seed 8's name
    new = description_hash(record["description"])
    for path in cache.iterdir():
        path.rename(str(path).replace(old, new))
    record["description"]["seed"] = 7
    (cache / f"{new}-description.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"-description.json: index cache written by different settings \(seed differ"):
        GPTDataset(ds, (0, 200), 16, 300, 8, "train", str(cache))


def test_a_damaged_cache_names_the_file(prefix, tmp_path):
    cache = tmp_path / "cache"
    GPTDataset(IndexedDataset(prefix), (0, 200), 16, 300, 7, "train", str(cache))
    (shuffle,) = cache.glob("*-shuffle_index.npy")
    shuffle.write_bytes(shuffle.read_bytes()[:100])
    with pytest.raises(UserError, match="shuffle_index.npy: unreadable index cache"):
        GPTDataset(IndexedDataset(prefix), (0, 200), 16, 300, 7, "train", str(cache))


def _build_in_process(prefix, cache, log, rank=None, world=None, init=None):
    real = gpt_dataset.build_gpt_indices

    def slow_build(*args):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # long enough for the other processes to arrive and wait
        return real(*args)

    gpt_dataset.build_gpt_indices = slow_build
    if world is not None:
        torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    ds = GPTDataset(IndexedDataset(prefix), (0, 200), 16, 300, 7, "train", cache)
    np.save(f"{log}.{os.getpid()}.npy", samples(ds).numpy())
    if world is not None:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("distributed", [False, True], ids=["file-lock", "barrier"])
def test_concurrent_starts_build_once(prefix, tmp_path, distributed):
    cache, log = str(tmp_path / "cache"), str(tmp_path / "builds")
    context = multiprocessing.get_context("fork")
    init = f"file://{tmp_path / 'rendezvous'}"
    processes = [
        context.Process(target=_build_in_process, args=(prefix, cache, log) + ((rank, 3, init) if distributed else ()))
        for rank in range(3)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert len(open(log).read().split()) == 1
    results = [np.load(str(path)) for path in tmp_path.glob("builds.*.npy")]
    assert len(results) == 3 and all(np.array_equal(results[0], r) for r in results)


def test_token_ids_beyond_the_vocabulary(tmp_path):
    ok = IndexedDataset(write(str(tmp_path / "ok"), [[1, 2, 3], [499]]))
    check_token_ids(ok, 500)
    with pytest.raises(UserError, match=r"ok\.bin: token id 499 at token 3 is outside the tokenizer's vocabulary \[0, 300\)"):
        check_token_ids(ok, 300)
    negative = IndexedDataset(write(str(tmp_path / "neg"), [[1, -5]], np.int32))
    with pytest.raises(UserError, match="token id -5 at token 1"):
        check_token_ids(negative, 300)
    floats = IndexedDataset(write(str(tmp_path / "f"), [[1.5]], np.float32))
    with pytest.raises(UserError, match=r"f\.bin: holds float32 values, not token ids"):
        check_token_ids(floats, 300)
    data = DataConfig(data_path=[str(tmp_path / "ok")], split="1,0,0")
    with pytest.raises(UserError, match="ok.bin: token id 499"):
        build_train_valid_test_datasets(data, 2, 1, (4, 0, 0), vocab_size=300)


def test_empty_datasets(tmp_path):
    for name, documents, message in (("none", [], r"none\.idx: the dataset holds no documents"),
                                     ("hollow", [[], []], r"documents \[0, 2\) of .*hollow hold no tokens")):
        data = DataConfig(data_path=[write(str(tmp_path / name), documents)], split="1,0,0")
        with pytest.raises(UserError, match=message):
            build_train_valid_test_datasets(data, 2, 1, (4, 0, 0), vocab_size=300)
    data = DataConfig(data_path=[write(str(tmp_path / "x"), [[1, 2, 3]] * 10)], split="0,1,0")
    with pytest.raises(UserError, match="--split 0,1,0: the train split is empty"):
        build_train_valid_test_datasets(data, 2, 1, (4, 1, 0), vocab_size=300)
