"""Raw corpus files cut into chunks of whole documents, for tokenising in parallel.

Two input formats, chosen by file name (a trailing ``.gz`` is read through gzip):

- JSONL (``*.jsonl``, ``*.json``): one JSON object per line is one document; blank lines are skipped.
- plain text (any other name): one document per block of non-blank lines; blocks are separated by one
  or more blank (empty or whitespace-only) lines and keep their inner line breaks. A file without blank
  lines is therefore one document.

A chunk is a run of whole documents of about ``CHUNK_BYTES``, so a worker never sees half a document, and
it carries where it came from so an error can name the file and line. An uncompressed file can also be cut
into several byte ranges at document boundaries (``--partitions``); a gzip file cannot be sought and is
always one range.
"""
from __future__ import annotations

import gzip
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from megatron_eslm.errors import UserError

CHUNK_BYTES = 1 << 18  # small enough that two workers stay balanced on a few MB, large enough to be cheap
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")  # the end of a blank line: a text document boundary follows
_TEXT_DOCUMENT = re.compile(r"[^\n]*\S[^\n]*(?:\n[^\n]*\S[^\n]*)*")  # lines that are not blank, joined
# A blank line that is not empty (whitespace only), after a newline or first: then blocks need _TEXT_DOCUMENT.
_WHITESPACE_LINE = re.compile(r"\n[^\S\n]+(?=\n|\Z)")
_WHITESPACE_FIRST_LINE = re.compile(r"[^\S\n]+(?=\n|\Z)")


def input_format(path: str) -> str:
    """'jsonl' or 'text', from the file name."""
    name = path[: -len(".gz")] if path.endswith(".gz") else path
    return "jsonl" if name.endswith((".jsonl", ".json")) else "text"


@dataclass(frozen=True)
class Span:
    """Bytes ``[start, end)`` of one input (end None: to the end of the file); both at document boundaries."""

    path: str
    start: int = 0
    end: int | None = None


@dataclass(frozen=True)
class Chunk:
    """Whole documents of one input; ``first_line`` is the 1-based line of ``data`` counted from ``span.start``."""

    span: Span
    data: bytes
    first_line: int

    def location(self, line_in_chunk: int) -> str:
        """``path:line`` of a line of this chunk (counting the lines before the span only when needed)."""
        line = self.first_line + line_in_chunk
        if self.span.start:
            line += _count_newlines(self.span.path, self.span.start)
        return f"{self.span.path}:{line}"


def _count_newlines(path: str, end: int) -> int:
    count = 0
    with open(path, "rb") as f:
        while f.tell() < end:
            count += f.read(min(1 << 24, end - f.tell())).count(b"\n")
    return count


def _open(path: str):
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None


def _next_boundary(path: str, offset: int, size: int) -> int:
    """The first document boundary at or after ``offset`` of an uncompressed file."""
    if offset == 0:
        return 0
    with open(path, "rb") as f:
        f.seek(offset - 1)
        position = offset - 1 + len(f.readline())  # the start of the first line at or after offset
        if input_format(path) == "jsonl":
            return position
        for line in f:  # text: just after the next blank line
            position += len(line)
            if not line.strip():
                return position
    return size


def plan_partitions(paths: Sequence[str], partitions: int) -> list[list[Span]]:
    """The inputs as ``partitions`` lists of spans of about equal size, in input order.

    Uncompressed files are cut at document boundaries; gzip files stay whole, so there must be enough
    bytes to go round (a partition is never empty).
    """
    sizes = {path: os.path.getsize(path) for path in paths}
    total = sum(sizes.values())
    spans: list[Span] = []
    for path in paths:
        if path.endswith(".gz") or partitions == 1:
            spans.append(Span(path))
            continue
        pieces = max(1, round(partitions * sizes[path] / max(total, 1)))
        cuts = sorted({_next_boundary(path, sizes[path] * k // pieces, sizes[path]) for k in range(pieces)})
        spans += [Span(path, start, end) for start, end in zip(cuts, cuts[1:] + [None]) if start < sizes[path]]
    if len(spans) < partitions:
        raise UserError(
            f"--partitions {partitions}: the input splits into only {len(spans)} parts at document boundaries "
            "(gzip files cannot be split; give several files or fewer partitions)"
        )
    groups: list[list[Span]] = [[] for _ in range(partitions)]
    # Contiguous groups keep the input order; balance by the number of spans (spans are of similar size).
    for k, span in enumerate(spans):
        groups[k * partitions // len(spans)].append(span)
    return groups


def read_chunks(span: Span, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """The span's documents in chunks of about ``chunk_bytes`` (more when one document is larger)."""
    jsonl = input_format(span.path) == "jsonl"
    line = 1
    with _open(span.path) as f:
        if span.start:
            f.seek(span.start)
        remaining = None if span.end is None else span.end - span.start
        buffer = bytearray()
        while True:
            size = chunk_bytes if remaining is None else min(chunk_bytes, remaining)
            try:
                block = f.read(size) if size else b""
            except (OSError, EOFError) as err:
                raise UserError(f"{span.path}: cannot read ({err})") from None
            if not block:
                if buffer:
                    yield Chunk(span, bytes(buffer), line)
                return
            if remaining is not None:
                remaining -= len(block)
            # Only the new bytes (and a little before them) can hold a boundary not searched for yet.
            search_from = max(0, len(buffer) - 64)
            buffer += block
            cut = _last_boundary(buffer, search_from, jsonl)
            if cut:
                data = bytes(buffer[:cut])
                del buffer[:cut]
                yield Chunk(span, data, line)
                line += data.count(b"\n")


def _last_boundary(buffer: bytearray, search_from: int, jsonl: bool) -> int:
    """The end of the last whole document in ``buffer`` found after ``search_from`` (0 if none)."""
    if jsonl:
        return buffer.rfind(b"\n", search_from) + 1
    empty_line = buffer.rfind(b"\n\n", search_from)  # the common blank line, found from the end
    if empty_line >= 0:
        return empty_line + 2
    end = 0
    for match in _BLANK_LINE.finditer(buffer, search_from):  # blank lines holding only whitespace
        end = match.end()
    return end


def _text(chunk: Chunk) -> str:
    try:
        return chunk.data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = chunk.data.count(b"\n", 0, err.start)
        raise UserError(f"{chunk.location(line)}: not UTF-8 text") from None


def document_texts(chunk: Chunk) -> list[str]:
    """The texts of the chunk's documents, in order: what :func:`documents` yields, without locations.

    Plain text whose blank lines are all empty (the usual case) is split with ``str.split`` at its empty
    lines and the pieces stripped of newlines: the same blocks as the general rule, several times faster.
    """
    text = _text(chunk)
    if input_format(chunk.span.path) == "jsonl":
        return [line for line in text.split("\n") if line.strip()]
    if _WHITESPACE_FIRST_LINE.match(text) or _WHITESPACE_LINE.search(text):
        return _TEXT_DOCUMENT.findall(text)
    return [block.strip("\n") for block in text.split("\n\n") if block.strip("\n")]


def document_location(chunk: Chunk, index: int) -> str:
    """``path:line`` of the chunk's document ``index`` (as counted by :func:`document_texts`), for errors."""
    for i, (where, _) in enumerate(documents(chunk)):
        if i == index:
            return where()
    raise IndexError(f"the chunk has no document {index}")


def documents(chunk: Chunk) -> Iterator[tuple[Callable[[], str], str]]:
    """Each document of a chunk as ``(its path:line, computed only if called; its text)``."""
    text = _text(chunk)

    def where(offset: int) -> Callable[[], str]:
        return lambda: chunk.location(text.count("\n", 0, offset))

    if input_format(chunk.span.path) == "text":
        for match in _TEXT_DOCUMENT.finditer(text):
            yield where(match.start()), match.group()
        return
    offset = 0
    for line in text.split("\n"):
        if line.strip():
            yield where(offset), line
        offset += len(line) + 1
