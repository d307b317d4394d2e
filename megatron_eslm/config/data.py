"""Dataset and tokenizer flags; the files themselves are checked when the datasets are built."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron_eslm.config.checks import one_of
from megatron_eslm.data.blend_spec import parse_blend
from megatron_eslm.errors import UserError
from megatron_eslm.tokenizer import TOKENIZER_TYPES

TITLE = "data"


@dataclass
class DataConfig:
    data_path: list[str] = field(default_factory=list)  # PREFIX, or W1 PREFIX1 W2 PREFIX2 ... (a blend)
    train_data_path: list[str] = field(default_factory=list)  # per-split blends instead of --data-path + --split
    valid_data_path: list[str] = field(default_factory=list)
    test_data_path: list[str] = field(default_factory=list)
    data_cache_path: str | None = None  # None: indices are built in memory by every process
    split: str = "969,30,1"
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: str | None = None
    vocab_size: int | None = None  # NullTokenizer only
    num_workers: int = 2


HELP = {
    "data_path": "dataset prefix (P for P.bin/P.idx), or a blend W1 P1 W2 P2 ... (weights are normalised); "
                 "each dataset is cut by --split",
    "train_data_path": "train datasets, used whole: P or W1 P1 W2 P2 ... (instead of --data-path)",
    "valid_data_path": "validation datasets, used whole: P or W1 P1 W2 P2 ...",
    "test_data_path": "test datasets, used whole: P or W1 P1 W2 P2 ...",
    "data_cache_path": "directory for the cached sample indices (.npy), built once and shared by all ranks",
    "split": "train,valid,test proportions over documents, e.g. 969,30,1",
    "tokenizer_type": "one of " + ", ".join(TOKENIZER_TYPES),
    "tokenizer_model": "SentencePiece .model, or HuggingFace tokenizer.json (or its directory)",
    "vocab_size": "NullTokenizer: token ids in the data are below this (the eod token is this id)",
    "num_workers": "DataLoader worker processes",
}


def _validate_tokenizer(d: DataConfig) -> None:
    one_of(d.tokenizer_type, TOKENIZER_TYPES, "--tokenizer-type")
    if d.tokenizer_type == "NullTokenizer":
        if d.vocab_size is None or d.vocab_size < 1:
            raise UserError(f"--tokenizer-type NullTokenizer needs a positive --vocab-size, got {d.vocab_size}")
        return
    if d.tokenizer_model is None:
        raise UserError("--tokenizer-model is required")
    if not os.path.exists(d.tokenizer_model):
        raise UserError(f"--tokenizer-model {d.tokenizer_model}: file not found")


def absolute_paths(d: DataConfig) -> None:
    """Make the dataset prefixes, the cache and the tokenizer absolute: a checkpoint records them, and tools
    that read it (evaluate, generate, export_hf) run from other directories."""
    def prefixes(values: list[str]) -> list[str]:
        if len(values) == 1:
            return [os.path.abspath(values[0])]
        return [value if i % 2 == 0 else os.path.abspath(value) for i, value in enumerate(values)]

    for name in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        setattr(d, name, prefixes(getattr(d, name)))
    if d.data_cache_path is not None:
        d.data_cache_path = os.path.abspath(d.data_cache_path)
    if d.tokenizer_model is not None:
        d.tokenizer_model = os.path.abspath(d.tokenizer_model)


def validate_data(d: DataConfig) -> None:
    per_split = (d.train_data_path, d.valid_data_path, d.test_data_path)
    if d.data_path and any(per_split):
        raise UserError("--data-path cannot be combined with --train-data-path/--valid-data-path/--test-data-path")
    if not d.data_path and not d.train_data_path:
        raise UserError("--data-path (or --train-data-path) is required")
    for values, flag in zip((d.data_path, *per_split), ("--data-path", "--train-data-path", "--valid-data-path",
                                                        "--test-data-path")):
        if values:
            parse_blend(values, flag)
    _validate_tokenizer(d)
    if d.num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {d.num_workers}")
