"""Per-phase wall-clock timers (`--timing-log-level`), Megatron's `get_timers()` pattern: the trainer installs
one `Timers` for its run and any module (the ESLM threshold, the DeepSpeed engine) times its phase through
the global accessor, without objects threaded through the step.

The phases are disjoint: starting one pauses the phase running (a stack), and stopping it resumes that one,
so a nested phase's time is not also its parent's. Every stretch of the loop is in one phase, the work
between two steps included (`logging`), and a log interval's record reads the phases at the same moment it
reads the wall clock (`interval_ms` closes the running stretch there), so the phases of an interval add up
to its wall time at any --log-interval, 1 included: what the logging of a line costs after that moment
(writing the record, the console line) belongs to the next line's interval, as its wall time does.

  level 1  data            next() on the training batch iterator
           forward_backward the step's micro-batches (forward, loss, backward; on the last stage the LM
                           head), less the phases nested in it (data, threshold); under DeepSpeed ZeRO-2/3
                           also the data-parallel gradient reduction, which runs inside the backward
           threshold       the ESLM VaR threshold (`eslm/distributed_threshold.global_var_threshold`, every
                           policy's) and Ada-ESLM's gradient-mass count, with their collectives over the
                           selection group
           grads_reduce    the gradient sums after the backward (`finalize_model_grads`; ZeRO-1's
                           deferred reduction under DeepSpeed). With --overlap-grad-reduce the data-parallel
                           sums run under the backward: on CUDA the synchronisation that ends
                           forward_backward waits for them too (it waits for every stream, NCCL's
                           included), so they count in forward_backward and grads_reduce keeps the rest
           optimizer       gradient clipping and the optimizer step
           eval            an evaluation (its own data included)
           checkpoint      saving a checkpoint
           logging         the loop's work between the optimizer step and the next step's first
                           micro-batch: at a log interval the stats reduction (the interval's one host
                           read, an all-reduce on more ranks), the record, the metrics file, TensorBoard,
                           the console line and the snapshot/rollback check; at every step the
                           exit-condition and async-save agreements and the watchdog's heartbeat
  level 2  threshold_comm  the threshold's collectives (all-gathers and all-reduces over the selection
                           group), out of `threshold`. Forward and backward are not separable under 1F1B.
           pp_comm         the pipeline's sends and receives, out of `forward_backward`: the wait for a
                           neighbour stage (the 1F1B bubble) and the transfer

On CUDA every phase boundary synchronises the device (torch.cuda.synchronize), so a phase holds the device
work it queued rather than the time to queue it; that costs overlap, which is why level 0 (the default)
makes no timers: `get_timers()` then returns the inert level-0 one, whose calls time nothing and
synchronise nothing.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator, TypeVar

import torch

PHASES = {"data": 1, "forward_backward": 1, "threshold": 1, "grads_reduce": 1, "optimizer": 1, "eval": 1,
          "checkpoint": 1, "logging": 1, "threshold_comm": 2, "pp_comm": 2}  # phase -> the level that times it
T = TypeVar("T")


class Timers:
    """The phases of `PHASES` up to `level`, summed over a log interval (`interval_ms` reads and resets)."""

    def __init__(self, level: int, device: torch.device):
        self.level = level
        self._synchronize = device.type == "cuda"
        self._seconds = {name: 0.0 for name, at in PHASES.items() if at <= level}
        self._stack: list[list] = []  # [name, start of its running stretch]

    def _now(self) -> float:
        if self._synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self, name: str) -> None:
        """Start phase `name`, pausing the running one (a no-op for phases above the level)."""
        if PHASES[name] > self.level:
            return
        now = self._now()
        if self._stack:
            parent = self._stack[-1]
            self._seconds[parent[0]] += now - parent[1]
        self._stack.append([name, now])

    def stop(self, name: str) -> None:
        """Stop phase `name` (the innermost running one) and resume the one it paused."""
        if PHASES[name] > self.level:
            return
        now = self._now()
        running, start = self._stack.pop()
        assert running == name, f"timer {name!r} stopped while {running!r} runs"
        self._seconds[name] += now - start
        if self._stack:
            self._stack[-1][1] = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def interval_ms(self, iterations: int) -> dict[str, float]:
        """`time_<phase>_ms` per iteration (the mean over `iterations`) of every timed phase since the last
        call, which it resets; {} at level 0. The running phase's stretch so far counts in this interval,
        the rest of it in the next."""
        if self._stack:
            now = self._now()
            running = self._stack[-1]
            self._seconds[running[0]] += now - running[1]
            running[1] = now
        out = {f"time_{name}_ms": 1000.0 * seconds / iterations for name, seconds in self._seconds.items()}
        self._seconds = dict.fromkeys(self._seconds, 0.0)
        return out

    def timed(self, iterator: Iterator[T], name: str) -> Iterator[T]:
        """`iterator` with each next() timed as phase `name` (itself at level 0: nothing added)."""
        return iterator if PHASES[name] > self.level else _TimedIterator(iterator, self, name)


class _TimedIterator:
    def __init__(self, iterator: Iterator, timers: Timers, name: str):
        self.iterator, self.timers, self.name = iterator, timers, name

    def __iter__(self) -> _TimedIterator:
        return self

    def __next__(self):
        with self.timers.phase(self.name):
            return next(self.iterator)


_OFF = Timers(0, torch.device("cpu"))
_timers = _OFF


def get_timers() -> Timers:
    """The running trainer's timers (level 0, doing nothing, when none is installed)."""
    return _timers


def install_timers(level: int, device: torch.device) -> Timers:
    """Make a run's timers the global ones (level 0: the inert ones, no timer made)."""
    global _timers
    _timers = Timers(level, device) if level else _OFF
    return _timers


def uninstall_timers() -> None:
    global _timers
    _timers = _OFF
