"""Index arrays built once, saved as .npy under ``--data-cache-path`` and memory-mapped by every rank.

Files are named by a hash of a JSON description of everything that determines the arrays, and that
description is written beside them (``{hash}-description.json``) and compared in full on every load, so a
cache is reused only for exactly the settings that wrote it. The description is written last, after the
arrays are complete under their final names, so its presence means the entry is whole. It also records each
.npy file's size and CRC-32, checked (one sequential read, C speed) before the file is parsed, so a damaged
cache fails in one line instead of feeding wrong samples or crashing numpy's header parser.

One process builds while the others wait: with torch.distributed initialised, rank 0 first, while the
others wait on the host (`launch.shared_outcome`: a gloo wait bounded by --distributed-timeout-minutes, not
an NCCL barrier under the NCCL watchdog) and then load, or raise rank 0's error; in every case under an
exclusive file lock on ``{hash}.lock``, so independent processes (or ranks on nodes with a local cache
directory) never race and never build twice.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

import numpy as np

from megatron_eslm.checksums import ChecksumWriter, file_checksum
from megatron_eslm.distributed import launch
from megatron_eslm.errors import UserError

Arrays = dict[str, np.ndarray]
# In the description, hence in the file names: entries of an older format (without the checksums) are not
# looked up, and are rebuilt beside the old files rather than refused.
CACHE_FORMAT = 2
T = TypeVar("T")


def description_hash(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


def cached_arrays(cache_dir: str | None, description: dict, build: Callable[[], Arrays]) -> Arrays:
    """The arrays ``build()`` returns, from the cache when it has them (memory-mapped), else built and saved.

    Without a cache directory every process builds in memory (index building is vectorised: fast, and
    deterministic, so all ranks agree).
    """
    if cache_dir is None:
        return build()
    description = {**description, "cache_format": CACHE_FORMAT}
    arrays = None
    with launch.shared_outcome():  # rank 0 builds first; its failure is raised on every rank
        if launch.rank() == 0:
            arrays = _load_or_build(cache_dir, description, build)
    return arrays if arrays is not None else _load_or_build(cache_dir, description, build)


def _load_or_build(cache_dir: str, description: dict, build: Callable[[], Arrays]) -> Arrays:
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"--data-cache-path {cache_dir}: cannot create ({err.strerror})") from None
    base = os.path.join(cache_dir, description_hash(description))
    description_path = base + "-description.json"
    if not os.path.isfile(description_path):
        with _exclusive(base + ".lock"):
            if not os.path.isfile(description_path):  # nobody built it while we waited
                _save(base, description, build())
    return _load(base, description)


@contextlib.contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise UserError(f"{lock_path}: cannot create the cache lock ({err.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _write_atomically(path: str, write: Callable[[BinaryIO], T]) -> T:
    tmp = launch.temp_path(path)
    try:
        with open(tmp, "wb") as f:
            result = write(f)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise UserError(f"{path}: cannot write the index cache ({err.strerror})") from None
    return result


def _save_npy(f: BinaryIO, array: np.ndarray) -> tuple[int, int]:
    """Write ``array`` as .npy; returns the file's size and CRC-32."""
    writer = ChecksumWriter(f)
    np.save(writer, array, allow_pickle=False)
    return writer.size, writer.crc


def _save(base: str, description: dict, arrays: Arrays) -> None:
    entries = {}
    for name, array in arrays.items():
        size, crc = _write_atomically(f"{base}-{name}.npy", lambda f, a=array: _save_npy(f, a))
        entries[name] = [array.dtype.str, list(array.shape), size, crc]
    record = {"description": description, "arrays": entries}
    _write_atomically(base + "-description.json", lambda f: f.write(json.dumps(record, indent=1).encode()))


def _is_entry(entry: object) -> bool:
    """``[dtype, shape, size, crc]`` as :func:`_save` records it."""
    return (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str) and isinstance(entry[1], list)
            and all(type(x) is int for x in entry[1]) and type(entry[2]) is int and type(entry[3]) is int)


def _load_npy(npy: str, size: int, crc: int, description_path: str) -> np.ndarray:
    """The array, memory-mapped, once the file's size and CRC-32 match the description's: damage is never parsed."""
    try:
        actual_size, actual_crc = file_checksum(npy)
        if actual_size != size:
            damage = f"{actual_size} bytes, {size} when written"
        elif actual_crc != crc:
            damage = "its CRC-32 differs from when it was written"
        else:
            return np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        damage = str(err)
    raise UserError(f"{npy}: unreadable index cache ({damage}); delete {description_path} to rebuild")


def _load(base: str, description: dict) -> Arrays:
    path = base + "-description.json"
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable index cache description ({err}); delete it to rebuild") from None
    record = record if isinstance(record, dict) else {}
    cached = record.get("description")
    if cached != description:
        cached = cached if isinstance(cached, dict) else {}
        differing = sorted(k for k in set(cached) | set(description) if cached.get(k) != description.get(k))
        raise UserError(f"{path}: index cache written by different settings ({', '.join(differing) or 'format'} "
                        "differ); delete it or use another --data-cache-path")
    entries = record.get("arrays")
    if not isinstance(entries, dict) or not all(_is_entry(entry) for entry in entries.values()):
        raise UserError(f"{path}: index cache description without the dtype, shape, size and CRC-32 of each array "
                        "(damaged); delete it to rebuild")
    arrays = {}
    for name, (dtype, shape, size, crc) in entries.items():
        npy = f"{base}-{name}.npy"
        array = _load_npy(npy, size, crc, path)
        if array.dtype.str != dtype or list(array.shape) != shape:
            raise UserError(f"{npy}: holds {array.dtype.str}{list(array.shape)}, but {path} says {dtype}{shape}; "
                            "delete it to rebuild")
        arrays[name] = array
    return arrays
