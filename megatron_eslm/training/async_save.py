"""--async-save: a checkpoint written by a background thread while training goes on.

At the save point the ranks do what a save always starts with (`checkpointing.begin_save`: the temporary
directory, the RNG states) and each copies its state into CPU buffers, reused from save to save (pinned
for device tensors and copied with non_blocking, so the host queues the copy and goes on; the step's
kernels that follow run after it on the same stream). A thread waits for the copy, writes and fsyncs this
rank's file. Training blocks only for that setup and the queueing of the copies.

The save is published by `checkpointing.finish_save` (manifest, rename, tracker) once every rank's thread is
done: `poll` asks every rank at each log interval while a save is pending (one host all-reduce on the gloo
group, none otherwise), and `wait` (the next save, the end of training, a stop) blocks until it is.
Until then the tracker names the previous checkpoint, so a kill -9 during the write leaves that one
loadable (tools/fault_drill.py rehearses it).
"""
from __future__ import annotations

import threading
from typing import Callable

import torch
import torch.distributed as dist

from megatron_eslm.distributed import launch
from megatron_eslm.training import checkpointing
from megatron_eslm.training.host_copy import HostCopy


class AsyncCheckpointer:
    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self._copy = HostCopy()  # CPU buffers of the state, reused by the next save
        self._pending: tuple[str, str, int] | None = None  # root, tmp, iteration
        self._thread: threading.Thread | None = None
        self._entries: dict | None = None
        self._error: BaseException | None = None

    def save(self, root: str, iteration: int, state: dict) -> None:
        """Start writing `state` (this rank's) for `iteration` under `root`; a pending save is finished first."""
        self.wait()
        tmp, full_state = checkpointing.begin_save(root, iteration, state)
        self._copy.take(full_state)
        self._pending, self._entries, self._error = (root, tmp, iteration), None, None
        self._thread = threading.Thread(target=self._write, args=(tmp,), name=f"async-save-{iteration}",
                                        daemon=True)
        self._thread.start()

    def _write(self, tmp: str) -> None:
        try:
            self._entries = checkpointing.write_shard(tmp, self._copy.result())
        except BaseException as err:  # noqa: BLE001 -- raised on every rank by finish_save's shared outcome
            self._error = err

    def poll(self) -> None:
        """At a log interval (every rank alike): publish the pending save if every rank has written its files."""
        if self._pending is None:
            return
        done = torch.tensor([0.0 if self._thread.is_alive() else 1.0])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=launch.host_group())
        if done.item():
            self._finish()

    def wait(self) -> None:
        """Block until the pending save (if any) is written and published."""
        if self._pending is not None:
            self._thread.join()
            self._finish()

    def _finish(self) -> None:
        (root, tmp, iteration), self._pending = self._pending, None
        self._thread.join()
        error, self._error = self._error, None
        with launch.shared_outcome():  # a failed write (a full disk) is raised on every rank
            if error is not None:
                raise error
        path = checkpointing.finish_save(root, tmp, iteration, self._entries)
        self.log(f"saved checkpoint {path} (written in the background)")
