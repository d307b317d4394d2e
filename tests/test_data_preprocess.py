"""Preprocessing inputs (JSONL, gzip, plain text), workers and partitions, merging, and the other tokenizers."""
import gzip
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_eslm.data.corpus import (Chunk, Span, document_location, document_texts, documents, plan_partitions,
                                      read_chunks)
from megatron_eslm.data.indexed_dataset import IndexedDataset
from megatron_eslm.data.merge import merge_datasets
from megatron_eslm.data.preprocess import preprocess
from megatron_eslm.errors import UserError
from megatron_eslm.tokenizer import build_tokenizer
from megatron_eslm.tokenizer.train import train_sentencepiece

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["river", "stone", "light", "garden", "night", "über", "café", "morning", "paper", "window"]


def sentence(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """JSONL with two keys (one empty text), the same gzipped, a plain-text file, and a tokenizer."""
    root = tmp_path_factory.mktemp("pre")
    rng = random.Random(0)
    records = [{"text": sentence(rng), "title": sentence(rng) if i % 7 else ""} for i in range(600)]
    jsonl = root / "c.jsonl"
    jsonl.write_text("".join(json.dumps(r) + ("\n\n" if i % 50 == 0 else "\n") for i, r in enumerate(records)))
    with gzip.open(root / "c.jsonl.gz", "wb") as f:
        f.write(jsonl.read_bytes())
    blocks = ["\n".join(sentence(rng) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    text = root / "c.txt"
    text.write_text("\n\n".join(blocks[:100]) + "\n \n\n\n" + "\n\n".join(blocks[100:]) + "\n")
    model = train_sentencepiece([str(jsonl)], 300, str(root / "tok"))
    return {"root": root, "records": records, "blocks": blocks, "model": model}


def read_documents(prefix):
    ds = IndexedDataset(prefix)
    offsets = ds.document_offsets
    return [ds.tokens(offsets[d], offsets[d + 1]).tolist() for d in range(ds.num_documents)]


def sp(corpus, inputs, out, **kwargs):
    return preprocess(inputs, str(corpus["root"] / out), "SentencePieceTokenizer", corpus["model"], **kwargs)


def test_jsonl_keys_gzip_and_eod(corpus):
    tokenizer = build_tokenizer("SentencePieceTokenizer", corpus["model"])
    plain = sp(corpus, str(corpus["root"] / "c.jsonl"), "plain", json_keys=["text", "title"], append_eod=True)
    gz = sp(corpus, str(corpus["root"] / "c.jsonl.gz"), "gz", json_keys=["text", "title"], append_eod=True)
    for key, prefix, gz_prefix in zip(["text", "title"], plain, gz):
        assert prefix.endswith(f"plain_{key}_document")
        docs = read_documents(prefix)
        assert docs == read_documents(gz_prefix)
        expected = [tokenizer.tokenize(r[key]) + [tokenizer.eod] if r[key] else [] for r in corpus["records"]]
        assert docs == expected  # one document per line, blank lines skipped, empty text: an empty document


def test_plain_text_one_document_per_block(corpus):
    tokenizer = build_tokenizer("SentencePieceTokenizer", corpus["model"])
    (prefix,) = sp(corpus, str(corpus["root"] / "c.txt"), "txt")
    assert read_documents(prefix) == [tokenizer.tokenize(block) for block in corpus["blocks"]]


@pytest.mark.parametrize("workers, partitions", [(2, 1), (2, 2), (1, 3)])
def test_workers_and_partitions_give_identical_files(corpus, workers, partitions):
    inputs = [str(corpus["root"] / "c.jsonl"), str(corpus["root"] / "c.txt")]
    (reference,) = sp(corpus, inputs, "ref", append_eod=True)
    (prefix,) = sp(corpus, inputs, f"w{workers}p{partitions}", append_eod=True, workers=workers, partitions=partitions)
    for suffix in (".bin", ".idx"):
        assert open(prefix + suffix, "rb").read() == open(reference + suffix, "rb").read()
    assert not [p for p in os.listdir(corpus["root"]) if ".part" in p or p.endswith(".tmp")]


def test_chunks_hold_whole_documents(corpus):
    for name in ("c.jsonl", "c.txt"):
        span = Span(str(corpus["root"] / name))
        whole = [d for chunk in read_chunks(span, 1 << 30) for _, d in documents(chunk)]
        small = [d for chunk in read_chunks(span, 97) for _, d in documents(chunk)]
        cut = [d for group in plan_partitions([span.path], 5) for s in group for c in read_chunks(s, 300)
               for _, d in documents(c)]
        assert small == whole == cut and len(whole) > 100


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b c", " ", "\t", "\n", "\n", "\n\n", "\r", "\u3000", "\xa0", "\x1c", "\x85",
                                 "é"]), max_size=40).map("".join), st.sampled_from(["x.txt", "x.jsonl"]))
def test_document_texts_are_the_documents(text, name):
    """The fast split (only empty blank lines) and the general rule give the same documents; so do locations."""
    chunk = Chunk(Span(name), text.encode("utf-8"), 1)
    expected = [(where(), document) for where, document in documents(chunk)]
    assert document_texts(chunk) == [document for _, document in expected]
    assert [document_location(chunk, i) for i in range(len(expected))] == [where for where, _ in expected]


def test_batched_sentencepiece_encode_matches_tokenize(corpus, tmp_path):
    """Preprocessing encodes SentencePiece text in batches to int32 arrays: the ids of tokenize, text by text."""
    tokenizer = build_tokenizer("SentencePieceTokenizer", corpus["model"])
    texts = ["", "river stone", "  café über\tnight  ", "ünïcödé ☃ 𝄞", "x" * 5000, " ", "\r"]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (prefix,) = preprocess(str(data), str(tmp_path / "t"), "SentencePieceTokenizer", corpus["model"], append_eod=True)
    assert read_documents(prefix) == [tokenizer.tokenize(t) + [tokenizer.eod] if tokenizer.tokenize(t) else []
                                      for t in texts]


def test_error_names_file_and_line_from_any_partition(corpus, tmp_path):
    lines = [json.dumps({"text": sentence(random.Random(i))}) for i in range(300)]
    lines[250] = '{"text": "unterminated'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    for partitions, workers in ((1, 1), (3, 2)):
        with pytest.raises(UserError, match=r"bad\.jsonl:251: invalid JSON"):
            preprocess(str(bad), str(tmp_path / "out"), "SentencePieceTokenizer", corpus["model"],
                       workers=workers, partitions=partitions)
        assert os.listdir(tmp_path) == ["bad.jsonl"]  # no output, parts or temporary files left
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not UTF-8"):
        preprocess(str(bad), str(tmp_path / "out"), "SentencePieceTokenizer", corpus["model"])


def test_gzip_cannot_be_partitioned_alone(corpus):
    with pytest.raises(UserError, match="--partitions 2: .* only 1 parts"):
        sp(corpus, str(corpus["root"] / "c.jsonl.gz"), "never", partitions=2)


def test_json_keys_with_plain_text_is_an_error(corpus):
    with pytest.raises(UserError, match="--json-keys title"):
        sp(corpus, str(corpus["root"] / "c.txt"), "never", json_keys=["title"])


def test_null_tokenizer_reads_ids_and_names_bad_ones(tmp_path):
    data = tmp_path / "ids.jsonl"
    data.write_text('{"text": "5 3 99"}\n{"text": ""}\n{"text": "7"}\n')
    (prefix,) = preprocess(str(data), str(tmp_path / "ids"), "NullTokenizer", None, append_eod=True, vocab_size=100)
    assert IndexedDataset(prefix).dtype == np.uint16
    assert read_documents(prefix) == [[5, 3, 99, 100], [], [7, 100]]  # eod is the id --vocab-size
    data.write_text('{"text": "5 3"}\n{"text": "1 100 2"}\n')
    with pytest.raises(UserError, match=r"ids\.jsonl:2: token id 100 is outside \[0, 100\) \(--vocab-size 99\)"):
        preprocess(str(data), str(tmp_path / "x"), "NullTokenizer", None, vocab_size=99)
    data.write_text('{"text": "5 three"}\n')
    with pytest.raises(UserError, match=r"ids\.jsonl:1: 'three' is not a token id"):
        preprocess(str(data), str(tmp_path / "x"), "NullTokenizer", None, vocab_size=99)
    with pytest.raises(UserError, match="--vocab-size"):
        build_tokenizer("NullTokenizer", None)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers", reason="the optional 'tokenizers' package is not installed")
    root = tmp_path_factory.mktemp("hf")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(1)
    tokenizer.train_from_iterator([sentence(rng) for _ in range(500)], trainer)
    tokenizer.save(str(root / "tokenizer.json"))
    return root


def test_huggingface_tokenizer(hf_tokenizer, tmp_path):
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(hf_tokenizer))  # a directory holding tokenizer.json
    assert tokenizer.eod == 1 and tokenizer.vocab_size == 300
    text = "garden über night"
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n")
    (prefix,) = preprocess(str(data), str(tmp_path / "hf"), "HuggingFaceTokenizer",
                           str(hf_tokenizer / "tokenizer.json"), append_eod=True)
    assert read_documents(prefix) == [tokenizer.tokenize(text) + [1]]

    # An eos_token named by tokenizer_config.json wins; a tokenizer with no end-of-text piece has no eod.
    (hf_tokenizer / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<unk>"}}))
    try:
        assert build_tokenizer("HuggingFaceTokenizer", str(hf_tokenizer)).eod == 0
        (hf_tokenizer / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<missing>"}))
        with pytest.raises(UserError, match="eos_token '<missing>'"):
            build_tokenizer("HuggingFaceTokenizer", str(hf_tokenizer))
    finally:
        os.remove(hf_tokenizer / "tokenizer_config.json")
    with pytest.raises(UserError, match="no such tokenizer file"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "nothing.json"))


def run_tool(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_merge_tool(corpus, tmp_path):
    first = sp(corpus, str(corpus["root"] / "c.jsonl"), "m1")[0]
    second = sp(corpus, str(corpus["root"] / "c.txt"), "m2")[0]
    out = str(tmp_path / "merged")
    result = run_tool("tools/merge_datasets.py", "--input", first, second, "--output-prefix", out)
    assert result.returncode == 0, result.stderr
    assert read_documents(out) == read_documents(first) + read_documents(second)

    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"text": "1 2 3"}\n')
    (wide,) = preprocess(str(ids), str(tmp_path / "wide"), "NullTokenizer", None, vocab_size=70000)  # int32 tokens
    fresh = str(tmp_path / "refused")  # the refusals below are of the inputs: `out` itself would be refused
    result = run_tool("tools/merge_datasets.py", "--input", first, wide, "--output-prefix", fresh)
    assert result.returncode == 2 and "wide_text_document.idx: tokens are int32" in result.stderr
    with pytest.raises(UserError, match="also an --input"):
        merge_datasets([first, second], first)
    result = run_tool("tools/merge_datasets.py", "--input", first, str(tmp_path / "missing"), "--output-prefix", fresh)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "missing.idx" in result.stderr


def test_tokenizer_trains_from_gzipped_jsonl(corpus, tmp_path):
    from megatron_eslm.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer

    model = train_sentencepiece([str(corpus["root"] / "c.jsonl.gz")], 300, str(tmp_path / "gz"))
    assert SentencePieceTokenizer(model).vocab_size == 300
