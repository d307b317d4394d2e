"""Tokenizers, chosen by ``--tokenizer-type`` as in Megatron."""
from __future__ import annotations

from megatron_eslm.errors import UserError
from megatron_eslm.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer

TOKENIZER_TYPES = ("SentencePieceTokenizer",)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None) -> SentencePieceTokenizer:
    """The tokenizer named by ``--tokenizer-type``, loaded from ``--tokenizer-model``."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise UserError(f"--tokenizer-type {tokenizer_type!r}: unknown (choose from {', '.join(TOKENIZER_TYPES)})")
    if not tokenizer_model:
        raise UserError(f"--tokenizer-model is required for --tokenizer-type {tokenizer_type}")
    return SentencePieceTokenizer(tokenizer_model)
