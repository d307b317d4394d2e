"""Paths a checkpoint's run recorded (its tokenizer), checked when a later tool uses them.

Runs record their paths absolute (megatron_eslm/config/data.py), but older checkpoints hold paths relative
to the directory their run started in, and a checkpoint may move to another machine: a missing file then
fails in one line that says where the path came from and which flag overrides it.
"""
from __future__ import annotations

import os

from megatron_eslm.errors import UserError


def recorded_path(path: str | None, load: str, flag: str) -> str | None:
    """`path` as the checkpoint at `load` recorded it for `flag`, if it exists here (None stays None)."""
    if path is not None and not os.path.exists(path):
        raise UserError(f"{flag} {path}, recorded in the checkpoint --load {load}, does not exist here "
                        f"(a relative path is relative to where that run started); give {flag} to override it")
    return path
