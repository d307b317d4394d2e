"""Tokenise a JSONL corpus into Megatron indexed datasets, one document per JSON line.

Each JSON key gets its own ``{prefix}_{key}_document.bin/.idx``. Tokenising runs in a multiprocessing pool
whose workers each load the tokenizer once (pool initializer); the main process only writes, in input
order, with the smallest token dtype that fits the vocabulary.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from megatron_eslm.data.indexed_dataset import IndexedDatasetBuilder, best_dtype, get_bin_path, get_idx_path
from megatron_eslm.errors import UserError
from megatron_eslm.tokenizer import build_tokenizer


class _Encoder:
    """Turns one numbered JSONL line into token ids per key; a worker process holds one."""

    def __init__(
        self, tokenizer_type: str, tokenizer_model: str, input_path: str, json_keys: Sequence[str], append_eod: bool
    ) -> None:
        self.tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
        self.input_path = input_path
        self.json_keys = json_keys
        self.append_eod = append_eod

    def encode(self, numbered_line: tuple[int, bytes]) -> tuple[dict[str, list[int]], int]:
        """Token ids of each key (an empty text gives no ids, not even eod) and the line's size in bytes."""
        line_number, line = numbered_line
        where = f"{self.input_path}:{line_number}"
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: invalid JSON ({err.msg})") from None
        ids_per_key = {}
        for key in self.json_keys:
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise UserError(f"{where}: no string value for key {key!r} (--json-keys)")
            ids = self.tokenizer.tokenize(record[key])
            if ids and self.append_eod:
                ids.append(self.tokenizer.eod)
            ids_per_key[key] = ids
        return ids_per_key, len(line)


_encoder: _Encoder | None = None  # this process's encoder, set by _init_worker


def _init_worker(*encoder_args: object) -> None:
    global _encoder
    _encoder = _Encoder(*encoder_args)  # type: ignore[arg-type]


def _encode(numbered_line: tuple[int, bytes]) -> tuple[dict[str, list[int]], int]:
    assert _encoder is not None, "_init_worker must run first"
    return _encoder.encode(numbered_line)


def preprocess(
    input_path: str,
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    log_interval: int = 10_000,
) -> list[str]:
    """Write ``{output_prefix}_{key}_document.bin/.idx`` for each key; returns the dataset prefixes."""
    if not os.path.isfile(input_path):
        raise UserError(f"{input_path}: no such input file (--input)")
    if workers < 1:
        raise UserError(f"--workers must be positive, got {workers}")
    if log_interval < 1:
        raise UserError(f"--log-interval must be positive, got {log_interval}")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    if append_eod and tokenizer.eod is None:
        raise UserError(f"--append-eod: tokenizer {tokenizer_model} has no end-of-document (</s>) token")
    dtype = best_dtype(tokenizer.vocab_size)
    prefixes = {key: f"{output_prefix}_{key}_document" for key in json_keys}
    encoder_args = (tokenizer_type, tokenizer_model, input_path, tuple(json_keys), append_eod)

    with contextlib.ExitStack() as stack:
        builders = {
            key: stack.enter_context(IndexedDatasetBuilder(get_bin_path(prefix), dtype))
            for key, prefix in prefixes.items()
        }
        lines = stack.enter_context(open(input_path, "rb"))
        numbered_lines = ((number, line) for number, line in enumerate(lines, start=1) if line.strip())
        if workers > 1:
            pool = stack.enter_context(multiprocessing.Pool(workers, _init_worker, encoder_args))
            encoded = pool.imap(_encode, numbered_lines, chunksize=64)
        else:
            _init_worker(*encoder_args)
            encoded = map(_encode, numbered_lines)

        start_time = time.perf_counter()
        num_documents = num_bytes = 0
        for ids_per_key, line_bytes in encoded:
            for key, ids in ids_per_key.items():
                if ids:
                    builders[key].add_item(np.array(ids, dtype=dtype))
                builders[key].end_document()
            num_documents += 1
            num_bytes += line_bytes
            if num_documents % log_interval == 0:
                _log_progress("processed", num_documents, num_bytes, time.perf_counter() - start_time)
        for key, prefix in prefixes.items():
            builders[key].finalize(get_idx_path(prefix))
    _log_progress("done:", num_documents, num_bytes, time.perf_counter() - start_time)
    return list(prefixes.values())


def _log_progress(label: str, num_documents: int, num_bytes: int, elapsed: float) -> None:
    elapsed = max(elapsed, 1e-9)
    print(
        f"{label} {num_documents} documents ({num_documents / elapsed:.0f} docs/s, "
        f"{num_bytes / elapsed / 1e6:.2f} MB/s)",
        file=sys.stderr,
    )
