"""Output directories of the tools: a tool never deletes or overwrites what it did not write.

A directory a tool writes to must be absent, empty, or that tool's own earlier output, which it recognises by
a marker file it leaves there; anything else is refused in one line unless the user passes ``--force``.
Whole directories are built under a temporary name beside the target and renamed into place, so a failed
run leaves the old output as it was.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from megatron_eslm.errors import UserError

MARKER = ".megatron_eslm_output"


def _owner(path: str) -> str | None:
    """The tool named by the directory's marker file, or None."""
    try:
        with open(os.path.join(path, MARKER)) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def check_output_dir(path: str, tool: str, flag: str, force: bool) -> bool:
    """Refuse (UserError) an existing `path` holding files `tool` did not write, unless `force`.

    Returns whether the directory is, or may become, the tool's own (absent, empty or marked by `tool`);
    False means the user forced writing into a directory of others."""
    if not os.path.lexists(path):
        return True
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: exists and is not a directory")
    entries = sorted(os.listdir(path))
    if not entries or _owner(path) == tool:
        return True
    if force:
        return False
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise UserError(f"{flag} {path}: not empty and not an earlier output of {tool} (holds {shown}); "
                    f"choose another directory, or pass --force to let {tool} write there")


def mark(path: str, tool: str) -> None:
    """Leave the marker saying `path` is `tool`'s output."""
    with open(os.path.join(path, MARKER), "w") as fh:
        fh.write(tool + "\n")


@contextlib.contextmanager
def staged_dir(path: str, tool: str) -> Iterator[str]:
    """A temporary directory beside `path` to write into; on success it replaces `path` (marked as `tool`'s),
    on failure it is removed and `path` is left untouched. Call `check_output_dir` first."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.tmp-", dir=parent)
    try:
        yield tmp
        mark(tmp, tool)
        old = None
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.old-", dir=parent)
            os.replace(path, os.path.join(old, "d"))
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_files(paths: list[str], flag: str, value: str, force: bool) -> None:
    """Refuse (UserError) to replace existing files, unless `force`: a file carries no marker saying which tool
    wrote it, so an existing one may be the user's (a corpus, a tokenizer) that a rerun would overwrite."""
    existing = [path for path in paths if os.path.lexists(path)]
    if existing and not force:
        raise UserError(f"{flag} {value}: {', '.join(existing)} already exist(s); choose another {flag}, or pass "
                        f"--force to replace")


def write_file(path: str, data: bytes | str) -> None:
    """Write one file under a temporary name and rename it into place."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)
    os.replace(tmp, path)


def check_checkpoint_save(save: str, source_flag: str, source: str, tool: str, force: bool) -> bool:
    """`check_output_dir` for a checkpoint tool's --save, which must also not be (in or around) the directory
    it reads (`source_flag`): writing there would replace the source checkpoint. --force does not lift that."""
    target, read = os.path.realpath(save), os.path.realpath(source)
    if os.path.commonpath([target, read]) in (target, read):
        raise UserError(f"--save {save}: the same directory as, or nested with, {source_flag} {source}; writing "
                        f"there would replace what is being read (choose another --save)")
    return check_output_dir(save, tool, "--save", force)
