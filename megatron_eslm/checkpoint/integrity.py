"""Checksums of checkpoint files: a damaged or partial checkpoint is found on load, named in one line, instead
of loading wrong weights or crashing in the unpickler.

Every published checkpoint directory holds `manifest.json`: each file's size and CRC-32, relative path
first. Our shard files get theirs while `torch.save` streams into them (`save_file`: no second pass);
DeepSpeed's files, which its engine writes, are read back once (`checksum_file`), each rank a share. The
manifest is written before the directory is renamed into place, so a published directory without one was
written by an older version or another tool: loaded unverified. fsync makes "published" mean "on disk": the
files before the manifest, the manifest before the rename, the parent directory after it.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from megatron_eslm.checksums import ChecksumWriter, file_checksum
from megatron_eslm.distributed import launch
from megatron_eslm.errors import UserError

MANIFEST = "manifest.json"


def _entry(size: int, crc: int) -> dict[str, int]:
    return {"bytes": size, "crc32": crc}


def save_file(obj: Any, path: str) -> dict[str, int]:
    """torch.save `obj` to `path`, fsynced; returns its manifest entry."""
    with open(path, "wb") as fh:
        writer = ChecksumWriter(fh)
        torch.save(obj, writer)
        fh.flush()
        os.fsync(fh.fileno())
    return _entry(writer.size, writer.crc)


def checksum_file(path: str) -> dict[str, int]:
    return _entry(*file_checksum(path))


def fsync_path(path: str) -> None:
    """fsync a file or a directory (a rename is durable once its parent directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def files_under(directory: str) -> list[str]:
    """Every file under `directory`, as sorted relative paths (the manifest excepted)."""
    found = [os.path.relpath(os.path.join(parent, name), directory)
             for parent, _, names in os.walk(directory) for name in names]
    return sorted(name for name in found if name != MANIFEST)


def write_manifest(directory: str, entries: dict[str, dict[str, int]]) -> None:
    """Write (atomically: survivors may race to write the same one) and fsync the manifest."""
    path = os.path.join(directory, MANIFEST)
    tmp = launch.temp_path(path)
    with open(tmp, "w") as fh:
        json.dump({"files": dict(sorted(entries.items()))}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_manifest(directory: str) -> dict[str, dict[str, int]] | None:
    """The manifest's entries, or None for a directory written without one."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            files = json.load(fh)["files"]
        if not all(isinstance(e, dict) and all(type(e.get(key)) is int for key in ("bytes", "crc32"))
                   for e in files.values()):
            raise ValueError("an entry without integer bytes and crc32")
        return files
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path}: damaged checkpoint manifest ({type(err).__name__}: {err})") from None


def verify(directory: str, names: list[str] | None = None) -> bool:
    """Check `names` (relative paths of the manifest; default: all of them) against the manifest: one line
    naming the first file that is missing, of another size or another checksum, or a file of the
    directory the manifest does not list. False when the directory
    has no manifest (nothing to check against), True when verified."""
    manifest = read_manifest(directory)
    if manifest is None:
        return False
    unlisted = sorted(set(files_under(directory)) - set(manifest))
    if unlisted:  # a file the reader might load unchecked
        raise UserError(f"{os.path.join(directory, unlisted[0])}: not in {os.path.join(directory, MANIFEST)} (a file "
                        "added or renamed after the save?)")
    for name in manifest if names is None else names:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise UserError(f"{path}: missing, although the checkpoint's manifest lists it (partial copy?)")
        expected, found = manifest[name], checksum_file(path)
        if found["bytes"] != expected["bytes"]:
            raise UserError(f"{path}: {found['bytes']} bytes, the manifest says {expected['bytes']} (truncated or "
                            "partial checkpoint)")
        if found["crc32"] != expected["crc32"]:
            raise UserError(f"{path}: checksum mismatch (CRC-32 {found['crc32']:08x}, the manifest says "
                            f"{expected['crc32']:08x}): the file is damaged")
    return True
