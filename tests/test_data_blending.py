"""Blends: --data-path weight/prefix pairs, the quota order (every prefix within one sample of the weights, and
the vectorised construction equal to a plain loop), per-split paths, and resuming a blended stream."""
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_eslm.config import DataConfig
from megatron_eslm.data.blend_spec import parse_blend
from megatron_eslm.data.blended_dataset import _mul_div, _quota_order, blending_indices
from megatron_eslm.data.builder import build_train_valid_test_datasets
from megatron_eslm.data.indexed_dataset import IndexedDatasetBuilder
from megatron_eslm.data.samplers import ResumableBatchSampler
from megatron_eslm.errors import UserError


def within_quota(weights, dataset_index):
    """floor(w n) <= count <= ceil(w n) for every dataset at every prefix n (exact integer arithmetic)."""
    denominator = np.lcm.reduce([w.denominator for w in weights])
    numerators = np.array([int(w * denominator) for w in weights], dtype=object)
    counts = np.zeros(len(weights), dtype=object)
    for n, d in enumerate(dataset_index.tolist(), start=1):
        counts[d] += 1
        scaled = numerators * n
        if np.any(counts * denominator < scaled - (denominator - 1)) or np.any(counts * denominator > scaled + denominator - 1):
            return False
    return True


def test_parse_blend():
    assert parse_blend(["data/a"], "--data-path") == [(1, "data/a")]
    assert parse_blend(["0.3", "a", "0.7", "b"], "--data-path") == [(Fraction(3, 10), "a"), (Fraction(7, 10), "b")]
    assert parse_blend(["3", "a", "1", "b"], "--data-path") == [(Fraction(3, 4), "a"), (Fraction(1, 4), "b")]
    assert parse_blend(["1e-1", "a", "0", "b"], "--data-path") == [(1, "a"), (0, "b")]


@pytest.mark.parametrize("values, message", [
    (["0.3", "a", "b"], "one dataset prefix or weight/prefix pairs, got 3"),
    (["-1", "a", "2", "b"], "weight -1 of a is negative"),
    (["0", "a", "0.0", "b"], "all weights are zero"),
    (["nan", "a", "1", "b"], "weight 'nan' of a is not a finite number"),
    (["a", "0.5", "b", "0.5"], "weight 'a' of 0.5 is not a finite number"),
])
def test_bad_blends_are_one_line(values, message):
    with pytest.raises(UserError, match=message):
        parse_blend(values, "--train-data-path")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=2, max_size=7).filter(lambda a: sum(a) > 0), st.integers(1, 400))
def test_every_prefix_is_within_one_sample_of_the_weights(raw, size):
    weights = [Fraction(a, sum(raw)) for a in raw]
    indices = blending_indices(weights, size)
    assert within_quota(weights, indices["dataset_index"])
    for d in range(len(raw)):  # each dataset's samples are drawn in order 0, 1, 2, ...
        np.testing.assert_array_equal(indices["dataset_sample_index"][indices["dataset_index"] == d],
                                      np.arange(np.count_nonzero(indices["dataset_index"] == d)))


def test_order_repeats_with_the_weights_denominator():
    weights = [Fraction(3, 10), Fraction(2, 10), Fraction(5, 10)]
    tiled = blending_indices(weights, 1000)["dataset_index"]
    np.testing.assert_array_equal(tiled, _quota_order([3, 2, 5], 10, 1000))
    assert within_quota(weights, tiled)
    assert np.bincount(tiled[:10]).tolist() == [3, 2, 5]


def reference_blending_indices(weights, size):
    """The plain loop the vectorised blending must equal: position by position, among the datasets whose next
    sample is released (may come now without passing ceil(w n)), the one with the earliest deadline (must
    come by ceil(k / w)); ties to the lower dataset. Exact integers, no tiling."""
    denominator = math.lcm(*(w.denominator for w in weights))
    numerators = [int(w * denominator) for w in weights]
    count = [0] * len(weights)
    release = [1] * len(weights)
    deadline = [-(-denominator // a) if a else 0 for a in numerators]
    dataset_index, dataset_sample_index = [], []
    for position in range(1, size + 1):
        best = -1
        for d, a in enumerate(numerators):
            if a and release[d] <= position and (best < 0 or deadline[d] < deadline[best]):
                best = d
        assert best >= 0
        dataset_index.append(best)
        dataset_sample_index.append(count[best])
        k = count[best] = count[best] + 1
        release[best] = k * denominator // numerators[best] + 1
        deadline[best] = -(-(k + 1) * denominator // numerators[best])
    return np.array(dataset_index, np.int16), np.array(dataset_sample_index, np.int64)


def assert_equals_reference(weights, size):
    indices = blending_indices(weights, size)
    dataset_index, dataset_sample_index = reference_blending_indices(weights, size)
    assert indices["dataset_index"].dtype == np.int16 and indices["dataset_sample_index"].dtype == np.int64
    np.testing.assert_array_equal(indices["dataset_index"], dataset_index)
    np.testing.assert_array_equal(indices["dataset_sample_index"], dataset_sample_index)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 12), st.integers(0, 10**7), st.integers(0, 10**22)), min_size=1,
                max_size=9).filter(lambda a: sum(a) > 0),
       st.integers(0, 3000))
def test_vectorised_blending_equals_the_plain_loop(raw, size):
    """Random weights (small, token-count sized, and past int64) and sizes, periodic or not."""
    assert_equals_reference([Fraction(a, sum(raw)) for a in raw], size)


@pytest.mark.parametrize("raw, size", [
    ([1234567, 7654321], 5000),  # two datasets: the closed form, either order of the weights
    ([7654321, 1234567], 5000),
    ([5, 5], 1001),
    ([0, 3, 0, 7, 0], 777),  # zero weights anywhere
    ([9, 4, 24], 2000),  # swaps (a late sample served right after its neighbour)
    ([15, 17, 3, 11], 4000),  # longer repairs
    ([24, 28, 13, 1, 8], 4000),
    ([1, 10**20, 3 * 10**19, 7], 3000),  # a tiny weight: deadlines past int64, Python integers
    ([10**18 + 3, 10**18 + 7, 10**18 + 11], 3000),  # products past int64: floating point plus exact fixes
    ([3, 2, 5], 0),
])
def test_vectorised_blending_edge_cases(raw, size):
    assert_equals_reference([Fraction(a, sum(raw)) for a in raw], size)


@pytest.mark.parametrize("widths", [(1,), (2,), (3, 5), (8, 64)])
def test_repairs_agree_whichever_way_they_are_made(monkeypatch, widths):
    """Swaps, rotations (a dataset of weight 1% filling in far ahead of its deadline), lockstep replays of
    any width, the plain loop for longer ones, and far fillers that the sorted order never reaches."""
    from megatron_eslm.data import blended_dataset

    monkeypatch.setattr(blended_dataset, "_REPLAY_WIDTHS", widths)
    for raw in ([24, 28, 13, 1, 8], [9, 4, 24], [313, 171, 55, 1000, 7, 64], [2, 2, 3, 48],
                [415664778, 5652489, 4058610], [1, 10**20, 3 * 10**19, 7], [10, 730894183, 9907523, 5254419, 8]):
        assert_equals_reference([Fraction(a, sum(raw)) for a in raw], 3000)


def test_plain_loop_takes_over_where_repairs_are_most_of_the_work(monkeypatch):
    """With a very small weight among others, most positions need the plain loop: it runs to the end."""
    from megatron_eslm.data import blended_dataset

    monkeypatch.setattr(blended_dataset, "_PLAIN_AFTER", 50)
    for raw in ([4086864, 335336404, 292224, 5382749, 10, 5677599, 4779575], [9, 8, 2, 628322696, 6126750, 5, 7]):
        assert_equals_reference([Fraction(a, sum(raw)) for a in raw], 20000)


def test_vectorised_blending_on_many_random_blends():
    rng = np.random.default_rng(20261123)
    for _ in range(120):
        k = int(rng.integers(3, 9))
        raw = [int(a) for a in rng.integers(0, 10 ** int(rng.integers(1, 10)), size=k)]
        if sum(raw):
            assert_equals_reference([Fraction(a, sum(raw)) for a in raw], int(rng.integers(1, 4000)))


@pytest.mark.parametrize("num, den", [(7, 3), (3, 10**9 + 7), (10**15 + 37, 10**15 + 91), (10**21 + 1, 3),
                                      (5, 10**22 + 9)])
@pytest.mark.parametrize("ceil", [False, True])
def test_mul_div_is_exact_on_every_path(num, den, ceil):
    """int64, floating point with exact fixes near integers, and Python integers all give the exact quotient."""
    rng = np.random.default_rng(num % 1000)
    values = np.concatenate([np.arange(0, 2000), rng.integers(0, 10**6, 2000), [den, 2 * den, 10**6]])
    values = np.sort(values[values < 2**40]).astype(np.int64)
    got = _mul_div(values, num, den, ceil)
    want = [(-(-int(v) * num // den)) if ceil else int(v) * num // den for v in values]
    assert [int(g) for g in got] == want


def write(prefix, num_documents, base):
    """Documents of 10 tokens whose ids say where they come from (base + document)."""
    with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
        for d in range(num_documents):
            builder.add_item(np.full(10, base + d))
            builder.end_document()
        builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture
def two_datasets(tmp_path):
    return write(str(tmp_path / "a"), 40, 0), write(str(tmp_path / "b"), 60, 1000)


def test_blended_train_valid_draws_each_dataset_by_weight(two_datasets, tmp_path):
    a, b = two_datasets
    data = DataConfig(data_path=["0.25", a, "0.75", b], split="80,20,0", data_cache_path=str(tmp_path / "cache"))
    train, valid, test = build_train_valid_test_datasets(data, 8, 1, (100, 12, 0), vocab_size=2000)
    assert test is None and len(train) == 100 and len(valid) == 12
    sources = [int(train[i]["tokens"][0] >= 1000) for i in range(len(train))]
    assert sources.count(0) == 25 and sources.count(1) == 75
    assert all(int(train[i]["index"]) == i for i in (0, 57, 99))
    # Each source dataset got exactly the samples the blend draws, from its own train documents.
    assert [len(ds) for ds in train.datasets] == [25, 75]
    assert set(train.datasets[0].document_index) <= set(range(32))
    valid_ids = {int(t) for i in range(len(valid)) for t in valid[i]["tokens"]}
    assert valid_ids <= set(range(32, 40)) | set(range(1048, 1060))


def test_per_split_paths(two_datasets):
    a, b = two_datasets
    data = DataConfig(train_data_path=["1", a, "1", b], valid_data_path=[b])
    train, valid, test = build_train_valid_test_datasets(data, 8, 1, (20, 4, 4), vocab_size=2000)
    assert len(train) == 20 and len(valid) == 4 and test is None
    assert valid.indexed_dataset.path_prefix == b and valid.num_epochs == 1
    with pytest.raises(UserError, match="--split 99,1,0: the valid split of .*a gets none of its 40 documents"):
        build_train_valid_test_datasets(DataConfig(data_path=[a], split="99,1,0"), 8, 1, (20, 4, 0), 2000)


def test_resuming_a_blended_stream_sees_the_same_batches(two_datasets):
    a, b = two_datasets
    data = DataConfig(data_path=["0.4", a, "0.6", b], split="1,0,0")

    def batches(consumed):
        train, _, _ = build_train_valid_test_datasets(data, 8, 5, (48, 0, 0), vocab_size=2000)
        sampler = ResumableBatchSampler(len(train), consumed, 4, data_parallel_rank=1, data_parallel_size=2)
        return [torch.stack([train[i]["tokens"] for i in batch]) for batch in sampler]

    straight, resumed = batches(0), batches(16)
    assert len(resumed) == len(straight) - 2
    for x, y in zip(straight[2:], resumed):
        assert torch.equal(x, y)


def test_data_flags(tmp_path):
    from megatron_eslm.config import parse_args

    model = tmp_path / "tok.model"
    model.write_text("x")
    base = ["--tokenizer-model", str(model)]
    cfg = parse_args(base + ["--data-path", "0.3", "a", "0.7", "b", "--data-cache-path", str(tmp_path / "c")])
    # prefixes recorded absolute (a checkpoint's paths must not depend on where a later command runs)
    a, b = os.path.abspath("a"), os.path.abspath("b")
    assert cfg.data.data_path == ["0.3", a, "0.7", b] and cfg.data.data_cache_path == str(tmp_path / "c")
    cfg = parse_args(["--tokenizer-type", "NullTokenizer", "--vocab-size", "50257", "--train-data-path", "a"])
    assert cfg.data.vocab_size == 50257 and cfg.data.train_data_path == [a]
    for flags, message in ((["--data-path", "a", "--train-data-path", "b"], "cannot be combined"),
                           (["--valid-data-path", "b"], r"--data-path \(or --train-data-path\) is required"),
                           (["--data-path", "1", "a", "b"], "--data-path: give one dataset prefix or weight/prefix"),
                           (["--train-data-path", "-1", "a", "1", "b"], "--train-data-path: weight -1 of a"),
                           (["--data-path", "a", "--tokenizer-type", "NullTokenizer"], "needs a positive --vocab-size"),
                           (["--data-path", "a", "--tokenizer-type", "GPT2BPETokenizer"], "--tokenizer-type must be")):
        with pytest.raises(UserError, match=message):
            parse_args(base + flags)


def test_training_resumes_exactly_on_a_blend(tiny_corpus, tmp_path):
    """Checkpoint at step 2 of 4 on a blended stream, resume: the same losses as the uninterrupted run."""
    import os

    from megatron_eslm.config import parse_args
    from megatron_eslm.training.trainer import Trainer

    prefix, model = tiny_corpus
    save = str(tmp_path / "ckpt")

    def run(*extra):
        argv = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
                "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "4", "--eval-iters", "0",
                "--data-path", "0.3", prefix, "0.7", prefix, "--split", "90,10,0", "--tokenizer-model", model,
                "--data-cache-path", str(tmp_path / "cache"), "--num-workers", "0", "--log-interval", "1",
                "--selection", "random", "--eslm-alpha", "0.5", *extra]
        trainer = Trainer(parse_args(argv), log=lambda *a: None)
        records = trainer.train()
        trainer.close()
        return [(r["iteration"], r["lm_loss"]) for r in records]

    straight = run("--save", save, "--save-interval", "2")
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as fh:
        fh.write("2\n")
    assert run("--load", save) == straight[2:]
