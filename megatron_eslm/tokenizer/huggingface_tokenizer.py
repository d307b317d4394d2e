"""A HuggingFace ``tokenizers`` tokenizer (``tokenizer.json``), for models whose vocabulary comes from the Hub.

The optional ``tokenizers`` package is imported only here. The end-of-document token is the
``eos_token`` of a ``tokenizer_config.json`` beside the file when there is one, else the first of the
usual end-of-text pieces the vocabulary has; with neither, ``eod`` is None.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

from megatron_eslm.errors import UserError

_END_OF_TEXT_PIECES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def _eos_from_config(directory: str) -> str | None:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"{path}: not a readable tokenizer config ({err})") from None
    return eos.get("content") if isinstance(eos, dict) else eos


class HuggingFaceTokenizer:
    """``--tokenizer-model`` is a ``tokenizer.json`` file or a directory holding one."""

    def __init__(self, model_path: str) -> None:
        try:
            import tokenizers
        except ImportError:
            raise UserError("--tokenizer-type HuggingFaceTokenizer needs the 'tokenizers' package "
                            "(pip install tokenizers)") from None
        path = os.path.join(model_path, "tokenizer.json") if os.path.isdir(model_path) else model_path
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such tokenizer file (--tokenizer-model)")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as err:  # the Rust side raises a bare Exception for any unreadable file
            raise UserError(f"{path}: not a readable HuggingFace tokenizer ({str(err).splitlines()[0]})") from None
        self.model_path = path
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        eos = _eos_from_config(os.path.dirname(path))
        if eos is not None and self._tokenizer.token_to_id(eos) is None:
            raise UserError(f"{path}: eos_token {eos!r} of tokenizer_config.json is not in the vocabulary")
        pieces = [eos] if eos is not None else _END_OF_TEXT_PIECES
        ids = [self._tokenizer.token_to_id(piece) for piece in pieces]
        self.eod: int | None = next((i for i in ids if i is not None), None)

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
