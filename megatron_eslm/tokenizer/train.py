"""Train a SentencePiece model (BPE by default) from plain-text or JSONL files.

Byte fallback keeps every input encodable with a small vocabulary; the sentence cap and sentence shuffling
keep training to seconds on a few MB. The model is trained under a temporary prefix and renamed, so an
existing ``P.model``/``P.vocab`` survives a failed run.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
from collections.abc import Iterator, Sequence

import sentencepiece

from megatron_eslm.data.corpus import input_format
from megatron_eslm.errors import UserError

# SentencePiece silently drops sentences over max_sentence_length (4192 bytes); chunks of this many
# characters (at most 4 UTF-8 bytes each) always fit, so long lines still teach the model.
_MAX_SENTENCE_CHARS = 1024


def _texts(path: str, json_keys: Sequence[str]) -> Iterator[str]:
    """The texts of one file: each line of a text file, or the ``json_keys`` values of each JSONL line.

    Formats are told apart by name as in preprocessing (``*.jsonl``/``*.json``, optionally ``.gz``).
    """
    jsonl = input_format(path) == "jsonl"
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, start=1):
            if not jsonl:
                yield line
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_number}: invalid JSON ({err.msg})") from None
            for key in json_keys:
                if not isinstance(record, dict) or not isinstance(record.get(key), str):
                    raise UserError(f"{path}:{line_number}: no string value for key {key!r} (--json-keys)")
                yield record[key]


def _sentences(input_files: Sequence[str], json_keys: Sequence[str]) -> Iterator[str]:
    """Non-empty lines of all inputs, long ones cut into chunks SentencePiece accepts."""
    for path in input_files:
        for text in _texts(path, json_keys):
            for line in text.splitlines():
                for start in range(0, len(line), _MAX_SENTENCE_CHARS):
                    chunk = line[start : start + _MAX_SENTENCE_CHARS]
                    if chunk.strip():
                        yield chunk


def train_sentencepiece(
    input_files: Sequence[str],
    vocab_size: int,
    output_prefix: str,
    json_keys: Sequence[str] = ("text",),
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
) -> str:
    """Train on ``input_files`` and write ``output_prefix.model`` and ``.vocab``; returns the model path.

    Ids: 0 ``<unk>``, 1 ``<s>``, 2 ``</s>`` (the end-of-document token), no padding piece.
    """
    for path in input_files:
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such input file (--input)")
    if vocab_size < 1:
        raise UserError(f"--vocab-size must be positive, got {vocab_size}")
    output_dir = os.path.dirname(output_prefix) or "."
    if not os.path.isdir(output_dir):
        raise UserError(f"--output-prefix {output_prefix!r}: directory {output_dir!r} does not exist")

    input_errors: list[UserError] = []

    def sentences() -> Iterator[str]:
        # SentencePiece turns an exception raised by its sentence iterator into a RuntimeError: keep ours.
        try:
            yield from _sentences(input_files, json_keys)
        except UserError as err:
            input_errors.append(err)
            raise

    tmp_prefix = output_prefix + ".tmp"
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=tmp_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=0.9995,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        for suffix in (".vocab", ".model"):
            os.replace(tmp_prefix + suffix, output_prefix + suffix)
    except (RuntimeError, OSError) as err:
        if input_errors:
            raise input_errors[0] from None
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserError(f"sentencepiece training on {', '.join(input_files)} failed: {reason}") from None
    finally:
        for suffix in (".vocab", ".model"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp_prefix + suffix)
    return output_prefix + ".model"
