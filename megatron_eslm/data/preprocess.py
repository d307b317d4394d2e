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

from megatron_eslm.data.corpus import (Chunk, Span, document_location, document_texts, input_format, plan_partitions,
                                      read_chunks)
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


def _batch_encoder(spec: TokenizerSpec) -> Callable[[list[str]], list[np.ndarray]] | None:
    """SentencePiece's batched encode, on one thread (the workers are the parallelism), to int32 arrays.

    The same ids as ``SentencePieceTokenizer.tokenize`` text by text (a processor with the same model and
    default options), without a Python call and a list of Python ints per document. None for the other
    tokenizers, which encode text by text.
    """
    if spec.tokenizer_type != "SentencePieceTokenizer":
        return None
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=spec.tokenizer_model)
    try:
        processor.encode([""], out_type="numpy", num_threads=1)
    except (TypeError, ValueError):  # sentencepiece before 0.2.1 has no numpy output
        return lambda texts: [np.array(ids, np.int32) for ids in processor.encode(texts, out_type=int, num_threads=1)]
    return lambda texts: processor.encode(texts, out_type="numpy", num_threads=1)


class _Encoder:
    """Tokenises chunks; a worker process holds one, so the tokenizer is loaded once per worker."""

    def __init__(self, spec: TokenizerSpec, json_keys: Sequence[str], append_eod: bool) -> None:
        self.tokenizer = build_tokenizer(spec.tokenizer_type, spec.tokenizer_model, spec.vocab_size)
        self.dtype = best_dtype(self.tokenizer.vocab_size)
        self.json_keys = tuple(json_keys)
        self.append_eod = append_eod
        self._encode_batch = _batch_encoder(spec)

    def texts(self, chunk: Chunk) -> dict[str, list[str]]:
        """Per key, the text of each document of the chunk."""
        documents = document_texts(chunk)
        if input_format(chunk.span.path) != "jsonl":
            return {"text": documents}
        texts: dict[str, list[str]] = {key: [] for key in self.json_keys}
        for i, document in enumerate(documents):
            try:
                record = json.loads(document)
            except json.JSONDecodeError as err:
                raise UserError(f"{document_location(chunk, i)}: invalid JSON ({err.msg})") from None
            for key, values in texts.items():
                value = record.get(key) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    raise UserError(f"{document_location(chunk, i)}: no string value for key {key!r} (--json-keys)")
                values.append(value)
        return texts

    def _tokenize(self, texts: list[str], chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
        """The texts' ids back to back (each non-empty one ending in eod if asked), and each one's length."""
        if self._encode_batch is not None:
            arrays = self._encode_batch(texts)
            lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
            flat = np.concatenate(arrays) if arrays else np.empty(0, np.int32)
        else:
            ids = []
            for i, text in enumerate(texts):
                try:
                    ids.append(self.tokenizer.tokenize(text))
                except ValueError as err:  # NullTokenizer: not an integer, or out of range
                    raise UserError(f"{document_location(chunk, i)}: {err}") from None
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        if self.append_eod:  # an empty text gives no ids, not even eod
            nonempty = lengths > 0
            flat = np.insert(flat, np.cumsum(lengths)[nonempty], self.tokenizer.eod)
            lengths += nonempty
        return flat.astype(self.dtype), lengths

    def encode(self, chunk: Chunk) -> EncodedChunk:
        tokens, lengths = {}, {}
        for key, texts in self.texts(chunk).items():
            tokens[key], lengths[key] = self._tokenize(texts, chunk)
        return EncodedChunk(tokens, lengths, len(next(iter(lengths.values()))), len(chunk.data))


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
