"""Shared fixtures: a tiny tokenizer and dataset generated on the fly (no downloads, no shared files); each
test's torch thread count and default dtype restored after it; under CI, hypothesis derandomised and any
skip that does not need CUDA a failure (tests/ci_skips.py)."""
import contextlib
import json
import os
import random
import shutil
from typing import Iterator

import pytest
import torch
from hypothesis import settings

pytest.register_assert_rewrite("ci_skips")  # a plugin (pytest_plugins below), imported here first
from ci_skips import in_ci  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers on two cores: one torch thread each, or their OpenMP threads oversubscribe the cores
    # (measured: the fast tier took 3:04 with torch's default threads, against 1:44 in one process).
    torch.set_num_threads(1)

if not torch.cuda.is_available():
    # Triton reads this once, when it is first imported, and DeepSpeed imports it (tests/test_deepspeed.py
    # is collected before tests/test_lm_head_triton.py): set here, the kernel tests run in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron_eslm.data.preprocess import preprocess
from megatron_eslm.tokenizer.train import train_sentencepiece

pytest_plugins = ["pytester", "ci_skips", "exercised_modules"]

# Loaded before any test module is imported, so the tests' own @settings (max_examples, deadline) inherit
# it: under CI every hypothesis test draws the same examples on every run, and prints how to reproduce one.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if in_ci():
    settings.load_profile("ci")

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with more `slow` tests first, each file's tests in their order: xdist hands a worker the next
    file when it finishes one (--dist loadfile), so the long files start early and the short ones fill
    the end. In alphabetical order a long file often started last, and one worker waited up to a minute
    for the other at the end of the suite."""
    slow = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.path])


WORDS = ("the king queen castle river stone bread wine sword horse night morning speaks rides "
         "walks sings holds sees loves fears and with under over near far old young red green").split()


def synthetic_text(rng: random.Random, sentences: int) -> str:
    """Sentences from a tiny grammar: learnable structure, so a few steps visibly lower the loss."""
    out = []
    for _ in range(sentences):
        subject, verb, obj = rng.choice(WORDS[:8]), rng.choice(WORDS[12:18]), rng.choice(WORDS[:12])
        out.append(f"the {rng.choice(WORDS[26:])} {subject} {verb} the {obj} {rng.choice(WORDS[18:26])} the river.")
    return " ".join(out)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """(data_prefix, tokenizer_model) of ~400 small documents."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    jsonl = root / "corpus.jsonl"
    with open(jsonl, "w") as fh:
        for _ in range(400):
            fh.write(json.dumps({"text": synthetic_text(rng, rng.randint(3, 12))}) + "\n")
    train_sentencepiece([str(jsonl)], 320, str(root / "tok"))
    model = str(root / "tok.model")
    preprocess(str(jsonl), str(root / "corpus"), tokenizer_type="SentencePieceTokenizer",
               tokenizer_model=model, append_eod=True, workers=1)
    return str(root / "corpus_text_document"), model


@pytest.fixture(scope="session")
def two_corpora(tiny_corpus, tmp_path_factory):
    """The tiny corpus twice under two names (a blend of two validation datasets)."""
    prefix, tokenizer = tiny_corpus
    root = tmp_path_factory.mktemp("two")
    copies = []
    for name in ("alpha", "beta"):
        for ext in (".bin", ".idx"):
            shutil.copy(prefix + ext, root / (name + ext))
        copies.append(str(root / name))
    return copies, tokenizer


@contextlib.contextmanager
def torch_settings_restored() -> Iterator[None]:
    """torch's thread count and default dtype as they were before (a test's torch.set_num_threads(1) or
    torch.set_default_dtype would otherwise hold for every later test)."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)


@pytest.fixture(autouse=True)
def restore_torch_settings() -> Iterator[None]:
    with torch_settings_restored():
        yield
