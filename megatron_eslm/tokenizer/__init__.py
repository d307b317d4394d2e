"""Tokenizers, chosen by ``--tokenizer-type`` as in Megatron, all with one small interface."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from megatron_eslm.errors import UserError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")


class Tokenizer(Protocol):
    """What training and preprocessing use; ``eod`` is None when the tokenizer has no end-of-document token."""

    vocab_size: int
    eod: int | None

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer named by ``--tokenizer-type``, from ``--tokenizer-model`` (or ``--vocab-size`` for NullTokenizer)."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise UserError(f"--tokenizer-type {tokenizer_type!r}: unknown (choose from {', '.join(TOKENIZER_TYPES)})")
    if tokenizer_type == "NullTokenizer":
        from megatron_eslm.tokenizer.null_tokenizer import NullTokenizer

        if vocab_size is None or vocab_size < 1:
            raise UserError(f"--tokenizer-type NullTokenizer needs a positive --vocab-size, got {vocab_size}")
        return NullTokenizer(vocab_size)
    if not tokenizer_model:
        raise UserError(f"--tokenizer-model is required for --tokenizer-type {tokenizer_type}")
    if tokenizer_type == "HuggingFaceTokenizer":
        from megatron_eslm.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer

        return HuggingFaceTokenizer(tokenizer_model)
    from megatron_eslm.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(tokenizer_model)
