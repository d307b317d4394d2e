"""Tokenizer training and JSONL preprocessing, through the library and through the command-line tools."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece

from megatron_eslm.data.indexed_dataset import IndexedDataset
from megatron_eslm.data.preprocess import preprocess
from megatron_eslm.errors import UserError
from megatron_eslm.tokenizer import build_tokenizer
from megatron_eslm.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer
from megatron_eslm.tokenizer.train import train_sentencepiece

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["river", "stone", "light", "garden", "night", "über", "café", "morning", "paper", "window", "thé"]


def texts(count, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL corpus and a SentencePiece model trained on it (vocab 300)."""
    directory = tmp_path_factory.mktemp("corpus")
    jsonl = directory / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts(400))))
    model = train_sentencepiece([str(jsonl)], 300, str(directory / "tok"))
    return jsonl, model


def run_tool(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_round_trip(corpus):
    _, model = corpus
    tokenizer = SentencePieceTokenizer(model)
    assert tokenizer.vocab_size == 300
    assert tokenizer.eod == 2
    for text in texts(20, seed=1) + ["unseen ✓ 漢字 symbols"]:  # byte fallback covers unseen characters
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    assert not os.path.exists(model + ".tmp") and os.path.exists(model[: -len(".model")] + ".vocab")


def test_plain_text_with_long_lines(tmp_path):
    text_file = tmp_path / "long.txt"
    text_file.write_text("\n".join(" ".join(texts(200, seed=s)) for s in range(3)))  # lines of ~20 KB
    model = train_sentencepiece([str(text_file)], 300, str(tmp_path / "tok"))
    assert SentencePieceTokenizer(model).vocab_size == 300


def test_tokenizer_user_errors(tmp_path):
    with pytest.raises(UserError, match="--tokenizer-type"):
        build_tokenizer("GPT2BPETokenizer", "x.model")
    with pytest.raises(UserError, match="missing.model"):
        SentencePieceTokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="junk.model"):
        SentencePieceTokenizer(str(tmp_path / "junk.model"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: .*'text'"):
        train_sentencepiece([str(bad)], 300, str(tmp_path / "tok"))


def test_preprocess_missing_key_names_file_line_and_key(tmp_path, corpus):
    _, model = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "river stone"}\n\n{"body": "x"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:3: .*'text'"):
        preprocess(str(bad), str(tmp_path / "out"), "SentencePieceTokenizer", model)
    assert not list(tmp_path.glob("out*"))


def test_append_eod_needs_an_eod_token(tmp_path, corpus):
    jsonl, _ = corpus
    sentencepiece.SentencePieceTrainer.train(
        input=str(jsonl), model_prefix=str(tmp_path / "no_eos"), vocab_size=60, eos_id=-1, minloglevel=2
    )
    model = str(tmp_path / "no_eos.model")
    assert SentencePieceTokenizer(model).eod is None
    with pytest.raises(UserError, match="--append-eod"):
        preprocess(str(jsonl), str(tmp_path / "out"), "SentencePieceTokenizer", model, append_eod=True)


def test_tools_train_tokenizer_and_preprocess(tmp_path, corpus):
    jsonl, _ = corpus
    trained = run_tool("tools/train_tokenizer.py", "--input", str(jsonl), "--vocab-size", "300",
                       "--output-prefix", str(tmp_path / "tok"))
    assert trained.returncode == 0, trained.stderr
    model = str(tmp_path / "tok.model")

    processed = run_tool("tools/preprocess_data.py", "--input", str(jsonl), "--output-prefix", str(tmp_path / "data"),
                         "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
                         "--append-eod", "--workers", "2", "--log-interval", "100")
    assert processed.returncode == 0, processed.stderr
    assert "docs/s" in processed.stderr and "MB/s" in processed.stderr

    ds = IndexedDataset(str(tmp_path / "data_text_document"))
    tokenizer = SentencePieceTokenizer(model)
    documents = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    assert ds.dtype == np.uint16
    assert len(ds.document_indices) == len(documents) + 1
    for i in (0, 1, 199, len(documents) - 1):  # documents keep the input order through the worker pool
        (sequence,) = range(ds.document_indices[i], ds.document_indices[i + 1])
        assert ds[sequence][-1] == tokenizer.eod
        assert ds[sequence][:-1].tolist() == tokenizer.tokenize(documents[i])
    all_tokens = np.concatenate([ds[i] for i in range(len(ds))])
    assert np.count_nonzero(all_tokens == tokenizer.eod) == len(documents)


def test_tool_missing_input_is_one_error_line(tmp_path, corpus):
    _, model = corpus
    missing = str(tmp_path / "missing.jsonl")
    result = run_tool("tools/preprocess_data.py", "--input", missing, "--output-prefix", str(tmp_path / "data"),
                      "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and missing in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
