"""Megatron's NullTokenizer: the text already is token ids, written as whitespace-separated integers.

For corpora tokenized elsewhere (GPT-NeoX or Megatron-DeepSpeed pipelines): ``--vocab-size V`` says the
ids are below V; the end-of-document token is the extra id V, so ``vocab_size`` is V + 1, as in Megatron.
"""
from __future__ import annotations

from collections.abc import Sequence


class NullTokenizer:
    def __init__(self, vocab_size: int) -> None:
        self.eod: int | None = int(vocab_size)
        self.vocab_size = int(vocab_size) + 1

    def tokenize(self, text: str) -> list[int]:
        """The ids of ``"12 7 431"``; raises ValueError naming the first word that is not an id in range."""
        ids = []
        for word in text.split():
            try:
                token = int(word)
            except ValueError:
                raise ValueError(f"{word[:20]!r} is not a token id (NullTokenizer reads integers)") from None
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside [0, {self.vocab_size}) (--vocab-size {self.eod})")
            ids.append(token)
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)
