"""CRC-32 of what is written and of what is read back: how checkpoints (`checkpoint/integrity.py`) and the
dataset index cache (`data/index_cache.py`) find damaged files before parsing them."""
from __future__ import annotations

import zlib
from typing import BinaryIO

_CHUNK = 1 << 24


class ChecksumWriter:
    """A write-only file object that passes writes on and keeps their size and CRC-32 (torch.save and
    np.save stream into it: no second read of a file just written)."""

    def __init__(self, fh: BinaryIO):
        self.fh, self.crc, self.size = fh, 0, 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.crc = zlib.crc32(view, self.crc)
        self.size += view.nbytes
        return self.fh.write(view)

    def flush(self) -> None:
        self.fh.flush()


def file_checksum(path: str) -> tuple[int, int]:
    """(size, CRC-32) of a file, read sequentially in large chunks."""
    crc, size = 0, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return size, crc
