"""Copies of a state tree in CPU memory that do not stop the host: what snapshots (`rollback.py`) and
--async-save (`async_save.py`) take of a rank's state while training goes on."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree


def copy_to_host(tree: Any, buffers: Any | None) -> Any:
    """`tree` with its tensors copied into CPU `buffers` of the same structure (allocated when None or
    when the structure changed; pinned for device tensors, so the copy does not block the host)."""
    leaves, spec = pytree.tree_flatten(tree)
    old = pytree.tree_flatten(buffers)[0] if buffers is not None else None
    if old is not None and (len(old) != len(leaves) or pytree.tree_flatten(buffers)[1] != spec):
        old = None
    copies = []
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            copies.append(leaf)
            continue
        buf = old[i] if old is not None else None
        if buf is None or buf.shape != leaf.shape or buf.dtype != leaf.dtype:
            buf = torch.empty(leaf.shape, dtype=leaf.dtype, pin_memory=leaf.is_cuda)
        copies.append(buf.copy_(leaf.detach(), non_blocking=True))
    return pytree.tree_unflatten(copies, spec)


class HostCopy:
    """A state tree copied into reused CPU buffers without stopping the host: `take` queues the copies (and,
    on a GPU, records an event after them), `result` waits for them to land."""

    def __init__(self) -> None:
        self._buffers = None
        self._copied: torch.cuda.Event | None = None

    def take(self, tree: Any) -> None:
        self._buffers = copy_to_host(tree, self._buffers)
        self._copied = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._copied = torch.cuda.Event()
            self._copied.record()

    def result(self) -> Any:
        if self._copied is not None:
            self._copied.synchronize()
        return self._buffers
