"""SentencePiece tokenizer with the Megatron tokenizer interface (vocab_size, eod, tokenize, detokenize)."""
from __future__ import annotations

import os
from collections.abc import Sequence

import sentencepiece

from megatron_eslm.errors import UserError


class SentencePieceTokenizer:
    """Wraps a ``.model`` file; ``eod`` is the id of ``</s>`` (None when the model has no eos piece)."""

    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise UserError(f"{model_path}: no such tokenizer model file (--tokenizer-model)")
        self.model_path = model_path
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.Load(model_file=model_path)
        except (OSError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise UserError(f"{model_path}: not a readable SentencePiece model ({reason})") from None
        eos_id = self._processor.eos_id()
        self.eod: int | None = eos_id if eos_id >= 0 else None

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    def tokenize(self, text: str) -> list[int]:
        return self._processor.encode(text, out_type=int)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._processor.decode([int(i) for i in ids])
