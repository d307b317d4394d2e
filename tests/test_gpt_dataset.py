"""GPT samples follow Megatron's GPTDataset semantics; the sampler resumes exactly where a run stopped."""
import numpy as np
import pytest
import torch

from helpers import build_indexed
from megatron_eslm.config import DataConfig
from megatron_eslm.data.builder import build_train_valid_test_datasets, split_documents
from megatron_eslm.data.gpt_dataset import GPTDataset
from megatron_eslm.data.indexed_dataset import IndexedDataset
from megatron_eslm.data.samplers import ResumableBatchSampler
from megatron_eslm.errors import UserError


def make_dataset(tmp_path, documents):
    """Indexed uint16 dataset of documents, each a list of sequences."""
    return build_indexed(str(tmp_path / "ds"), documents, np.uint16)


def numbered_documents(lengths):
    """Document d holds tokens 100*d, 100*d+1, ...; documents with two sequences test the within-document order."""
    documents = []
    for d, length in enumerate(lengths):
        tokens = list(range(100 * d, 100 * d + length))
        documents.append([tokens[: length // 2], tokens[length // 2 :]] if d % 3 == 0 else [tokens])
    return documents


@pytest.fixture
def indexed(tmp_path):
    return IndexedDataset(make_dataset(tmp_path, numbered_documents([5, 9, 3, 12, 7, 1, 8, 0, 6, 10])))


def stream_of(ds):
    """The shuffled token stream: the documents in ds.document_index, concatenated."""
    index = ds.indexed_dataset
    return np.concatenate(
        [index[s] for d in ds.document_index for s in range(index.document_indices[d], index.document_indices[d + 1])]
    )


def test_samples_reproduce_the_shuffled_stream(indexed):
    seq_length, num_samples = 4, 40
    ds = GPTDataset(indexed, (1, 9), seq_length, num_samples, seed=3, name="train")
    assert len(ds) == num_samples
    stream = stream_of(ds)
    by_position = {}
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["tokens"].dtype == torch.int64 and sample["tokens"].shape == (seq_length,)
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
        by_position[int(ds.shuffle_index[i])] = torch.cat([sample["tokens"], sample["labels"][-1:]]).numpy()
    assert sorted(by_position) == list(range(num_samples))
    rebuilt = np.concatenate([by_position[k][:-1] for k in range(num_samples)] + [by_position[num_samples - 1][-1:]])
    np.testing.assert_array_equal(rebuilt, stream[: num_samples * seq_length + 1])
    # Only documents 1..8 are used, each once per epoch, and some sample spans a document boundary.
    per_epoch = ds.document_index.reshape(ds.num_epochs, -1)
    assert all(sorted(epoch) == list(range(1, 9)) for epoch in per_epoch)
    assert any(len({int(t) // 100 for t in s}) > 1 for s in by_position.values())


def test_deterministic_given_seed(indexed):
    def samples(seed):
        ds = GPTDataset(indexed, (0, 10), 5, 20, seed=seed, name="train")
        return torch.stack([ds[i]["tokens"] for i in range(len(ds))])

    assert torch.equal(samples(1), samples(1))
    assert not torch.equal(samples(1), samples(2))


def test_epochs_grow_with_requested_samples(indexed):
    tokens = int(indexed.sequence_lengths.sum())  # 61
    one = GPTDataset(indexed, (0, 10), 4, (tokens - 1) // 4, seed=0, name="train")
    many = GPTDataset(indexed, (0, 10), 4, 100, seed=0, name="train")
    assert one.num_epochs == 1
    assert many.num_epochs == -(-(100 * 4 + 1) // tokens) == 7
    assert len(many.document_index) == 70
    many[len(many) - 1]  # the last window fits in the stream


def test_empty_range_or_no_tokens_is_a_user_error(tmp_path, indexed):
    with pytest.raises(UserError, match="valid"):
        GPTDataset(indexed, (4, 4), 4, 10, seed=0, name="valid")
    with pytest.raises(UserError, match="test dataset: documents"):
        GPTDataset(indexed, (7, 8), 4, 10, seed=0, name="test")  # document 7 is empty


def test_split_documents():
    assert split_documents(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert split_documents(10, "1,0,0") == [(0, 10), (10, 10), (10, 10)]
    assert split_documents(10, "8,2") == [(0, 8), (8, 10), (10, 10)]
    assert split_documents(7, "1/1/1")[-1][1] == 7


@pytest.mark.parametrize("split", ["a,b,c", "1,-1,0", "0,0,0", "1,2,3,4", "", "nan,1,1"])
def test_bad_split_is_a_user_error(split):
    with pytest.raises(UserError, match="--split"):
        split_documents(100, split)


def test_build_train_valid_test_datasets(tmp_path):
    prefix = make_dataset(tmp_path, numbered_documents([5] * 20))
    data = DataConfig(data_path=[prefix], split="18,2,0")
    train, valid, test = build_train_valid_test_datasets(data, 4, 1234, (30, 3, 5), vocab_size=2000)
    assert test is None
    # 30 training samples take epochs; validation holds one pass: 10 tokens give two windows of 4 (+1), not 3
    assert len(train) == 30 and len(valid) == 2
    assert set(train.document_index) == set(range(18)) and set(valid.document_index) == {18, 19}
    assert build_train_valid_test_datasets(data, 4, 1234, (30, 0, 5), vocab_size=2000)[1] is None


def test_sampler_resume_continues_the_uninterrupted_run():
    full = list(ResumableBatchSampler(total_samples=50, consumed_samples=0, micro_batch_size=4))
    assert full[0] == [0, 1, 2, 3] and len(full) == 12  # the incomplete last step (48, 49) is dropped
    for k in (0, 8, 20):
        resumed = list(ResumableBatchSampler(total_samples=50, consumed_samples=k, micro_batch_size=4))
        assert resumed == full[k // 4 :]
    assert list(ResumableBatchSampler(50, 50, 4)) == []


def test_sampler_data_parallel_shards_cover_each_step_once():
    dp, micro = 3, 2
    ranks = [list(ResumableBatchSampler(40, 4, micro, rank, dp)) for rank in range(dp)]
    assert len({len(batches) for batches in ranks}) == 1
    for step, batches in enumerate(zip(*ranks)):
        flat = [i for batch in batches for i in batch]
        assert flat == list(range(4 + step * dp * micro, 4 + (step + 1) * dp * micro))


@pytest.mark.parametrize("args", [(10, 11, 2), (10, 0, 0), (10, 0, 2, 2, 2)])
def test_sampler_bad_arguments(args):
    with pytest.raises(UserError):
        ResumableBatchSampler(*args)
