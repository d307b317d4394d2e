"""Tokenise JSONL or plain-text corpora into Megatron indexed datasets (``{prefix}_{key}_document``).

The reading process cuts the inputs into chunks of whole documents (``corpus.py``); a pool of workers,
each holding one tokenizer built once by the pool initializer, turns a chunk into one token array per JSON
key; the reading process writes the results in input order. Only raw bytes and finished token arrays cross
process boundaries, and at most two chunks per worker are in flight, so memory stays flat on any corpus.

``--partitions N`` runs N such pipelines side by side, each on a contiguous part of the input with
``workers // N`` workers, writing ``{prefix}.part{i}`` files that are then merged in order and removed:
the reading and writing parallelise too.
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import json
import multiprocessing
import os
import queue as queue_module
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from megatron_eslm.data.corpus import Chunk, Span, documents, input_format, plan_partitions, read_chunks
from megatron_eslm.data.indexed_dataset import IndexedDatasetBuilder, best_dtype, get_bin_path, get_idx_path
from megatron_eslm.data.merge import merge_datasets
from megatron_eslm.errors import UserError
from megatron_eslm.tokenizer import build_tokenizer


@dataclass
class EncodedChunk:
    """One chunk's tokens: per key, the documents' tokens back to back and each document's length."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    num_documents: int
    num_bytes: int


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything needed to build the tokenizer again in a worker process."""

    tokenizer_type: str
    tokenizer_model: str | None
    vocab_size: int | None


class _Encoder:
    """Tokenises chunks; a worker process holds one, so the tokenizer is loaded once per worker."""

    def __init__(self, spec: TokenizerSpec, json_keys: Sequence[str], append_eod: bool) -> None:
        self.tokenizer = build_tokenizer(spec.tokenizer_type, spec.tokenizer_model, spec.vocab_size)
        self.dtype = best_dtype(self.tokenizer.vocab_size)
        self.json_keys = tuple(json_keys)
        self.append_eod = append_eod

    def _tokenize(self, text: str, where: Callable[[], str]) -> list[int]:
        """Token ids of one text (an empty text gives no ids, not even eod)."""
        try:
            ids = self.tokenizer.tokenize(text)
        except ValueError as err:  # NullTokenizer: not an integer, or out of range
            raise UserError(f"{where()}: {err}") from None
        if ids and self.append_eod:
            ids.append(self.tokenizer.eod)
        return ids

    def texts(self, chunk: Chunk) -> Iterator[tuple[dict[str, str], Callable[[], str]]]:
        """Each document of the chunk as ``{key: text}``, with its ``path:line`` (computed only for errors)."""
        jsonl = input_format(chunk.span.path) == "jsonl"
        for where, document in documents(chunk):
            if not jsonl:
                yield {"text": document}, where
                continue
            try:
                record = json.loads(document)
            except json.JSONDecodeError as err:
                raise UserError(f"{where()}: invalid JSON ({err.msg})") from None
            for key in self.json_keys:
                if not isinstance(record, dict) or not isinstance(record.get(key), str):
                    raise UserError(f"{where()}: no string value for key {key!r} (--json-keys)")
            yield {key: record[key] for key in self.json_keys}, where

    def encode(self, chunk: Chunk) -> EncodedChunk:
        ids: dict[str, list[list[int]]] = {key: [] for key in self.json_keys}
        for texts, where in self.texts(chunk):
            for key, text in texts.items():
                ids[key].append(self._tokenize(text, where))
        tokens, lengths = {}, {}
        for key, per_document in ids.items():
            lengths[key] = np.fromiter(map(len, per_document), dtype=np.int64, count=len(per_document))
            flat = itertools.chain.from_iterable(per_document)
            tokens[key] = np.fromiter(flat, dtype=np.int64, count=int(lengths[key].sum())).astype(self.dtype)
        return EncodedChunk(tokens, lengths, len(next(iter(ids.values()))), len(chunk.data))


_encoder: _Encoder | None = None  # this process's encoder, set by _init_worker


def _init_worker(*encoder_args: object) -> None:
    global _encoder
    _encoder = _Encoder(*encoder_args)  # type: ignore[arg-type]


def _encode(chunk: Chunk) -> EncodedChunk:
    assert _encoder is not None, "_init_worker must run first"
    return _encoder.encode(chunk)


def _encoded_in_order(chunks: Iterator[Chunk], workers: int, encoder_args: tuple) -> Iterator[EncodedChunk]:
    """The chunks encoded by ``workers`` processes (inline for 1), in input order, few in flight."""
    if workers == 1:
        _init_worker(*encoder_args)
        yield from map(_encode, chunks)
        return
    with multiprocessing.Pool(workers, _init_worker, encoder_args) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _run_pipeline(
    spans: Sequence[Span],
    prefixes: dict[str, str],
    encoder_args: tuple,
    workers: int,
    dtype: np.dtype,
    report: Callable[[int, int, int], None],
) -> None:
    """Tokenise ``spans`` into one dataset per key at ``prefixes``; ``report(documents, bytes, tokens)``."""
    with contextlib.ExitStack() as stack:
        builders = {
            key: stack.enter_context(IndexedDatasetBuilder(get_bin_path(prefix), dtype))
            for key, prefix in prefixes.items()
        }
        chunks = (chunk for span in spans for chunk in read_chunks(span))
        for encoded in _encoded_in_order(chunks, workers, encoder_args):
            for key, builder in builders.items():
                builder.add_documents(encoded.tokens[key], encoded.lengths[key])
            report(encoded.num_documents, encoded.num_bytes, sum(t.size for t in encoded.tokens.values()))
        for key, prefix in prefixes.items():
            builders[key].finalize(get_idx_path(prefix))


class _Progress:
    """Documents, MB and tokens per second on stderr, every ``log_interval`` documents and at the end."""

    def __init__(self, log_interval: int) -> None:
        self.log_interval = log_interval
        self.start = time.perf_counter()
        self.documents = self.bytes = self.tokens = 0

    def update(self, documents: int, num_bytes: int, tokens: int) -> None:
        before = self.documents // self.log_interval
        self.documents += documents
        self.bytes += num_bytes
        self.tokens += tokens
        if self.documents // self.log_interval > before:
            self.log("processed")

    def log(self, label: str) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        print(
            f"{label} {self.documents} documents, {self.bytes / 1e6:.1f} MB, {self.tokens} tokens "
            f"({self.documents / elapsed:.0f} docs/s, {self.bytes / elapsed / 1e6:.2f} MB/s, "
            f"{self.tokens / elapsed:.0f} tokens/s)",
            file=sys.stderr,
        )


def _partition_main(spans, prefixes, encoder_args, workers, dtype, queue) -> None:
    """One partition's process: run the pipeline, sending progress and the outcome through ``queue``."""
    try:
        _run_pipeline(spans, prefixes, encoder_args, workers, dtype, lambda *counts: queue.put(("progress", counts)))
        queue.put(("done", None))
    except UserError as err:
        queue.put(("error", str(err)))
    except BaseException as err:  # report, then die: the parent must not wait forever
        queue.put(("error", f"{type(err).__name__}: {err}"))
        raise


def _run_partitions(groups, prefixes, encoder_args, workers, dtype, progress: _Progress) -> None:
    """Run one pipeline per group in its own process, then merge the parts into ``prefixes`` in order."""
    parts = [{key: f"{prefix}.part{i}" for key, prefix in prefixes.items()} for i in range(len(groups))]
    queue: multiprocessing.Queue = multiprocessing.Queue()
    per_partition = max(1, workers // len(groups))
    processes = [
        multiprocessing.Process(target=_partition_main, args=(spans, part, encoder_args, per_partition, dtype, queue))
        for spans, part in zip(groups, parts)
    ]
    try:
        for process in processes:
            process.start()
        running = len(processes)
        while running:
            try:
                kind, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [i for i, process in enumerate(processes) if process.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"preprocessing partition {dead[0]} died (exit code {processes[dead[0]].exitcode})")
                continue
            if kind == "progress":
                progress.update(*payload)
            elif kind == "done":
                running -= 1
            else:
                raise UserError(payload)
        for process in processes:
            process.join()
        for key, prefix in prefixes.items():
            merge_datasets([part[key] for part in parts], prefix)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
        for part in parts:
            for prefix in part.values():
                for path in glob.glob(glob.escape(prefix) + ".*"):
                    os.remove(path)


def preprocess(
    inputs: str | Sequence[str],
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str | None,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    partitions: int = 1,
    log_interval: int = 10_000,
    vocab_size: int | None = None,
) -> list[str]:
    """Write ``{output_prefix}_{key}_document.bin/.idx`` for each key (``text`` for plain-text inputs).

    Returns the dataset prefixes. Documents keep the input order whatever the workers and partitions.
    """
    paths = [inputs] if isinstance(inputs, str) else list(inputs)
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such input file (--input)")
    if any(input_format(path) == "text" for path in paths) and tuple(json_keys) != ("text",):
        raise UserError(f"--json-keys {' '.join(json_keys)}: plain-text inputs have only 'text' (one document per "
                        "blank-line-separated block)")
    for value, flag in ((workers, "--workers"), (partitions, "--partitions"), (log_interval, "--log-interval")):
        if value < 1:
            raise UserError(f"{flag} must be positive, got {value}")
    output_dir = os.path.dirname(output_prefix) or "."
    if not os.path.isdir(output_dir):
        raise UserError(f"--output-prefix {output_prefix}: directory {output_dir} does not exist")
    spec = TokenizerSpec(tokenizer_type, tokenizer_model, vocab_size)
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size)
    if append_eod and tokenizer.eod is None:
        raise UserError(f"--append-eod: tokenizer {tokenizer_model} has no end-of-document token")
    dtype = best_dtype(tokenizer.vocab_size)
    prefixes = {key: f"{output_prefix}_{key}_document" for key in json_keys}
    encoder_args = (spec, tuple(json_keys), append_eod)
    groups = plan_partitions(paths, partitions)

    progress = _Progress(log_interval)
    if partitions == 1:
        _run_pipeline(groups[0], prefixes, encoder_args, workers, dtype, progress.update)
    else:
        _run_partitions(groups, prefixes, encoder_args, workers, dtype, progress)
    progress.log("done:")
    return list(prefixes.values())
