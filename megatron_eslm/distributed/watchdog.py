"""A dead or stalled rank named in one line, instead of every other rank hanging until the scheduler kills it.

Each rank runs a daemon thread that writes a heartbeat into the job's rendezvous store (the TCPStore that
torch.distributed already runs on rank 0's host) every few seconds (a sixth of the timeout, 0.5 to 10 s):
the time and the iteration it had finished then. The training loop reports progress (`progress`) after
every iteration, and `alive` marks work inside the longer phases: each evaluation micro-batch and each
phase of a save (every `launch.shared_outcome`, every file of the CRC read-back), so that an evaluation
plus a large save is not taken for a stall. Three ways a run ends through it:

  dead peer   after each beat the thread reads every rank's heartbeat: one that has not changed for three
              beats (dead, or stopped: SIGSTOP, a hung node) is named in one line and this rank exits with
              status 1, whatever its own progress: within five beats, long before any timeout.
  watchdog    this rank has made no progress for --distributed-timeout-minutes while every rank beats
              (stuck in a collective, or in a hung peer's p2p): the line names the ranks furthest behind
              (alive but stuck). NCCL's own timeout is twice as long (`launch.nccl_timeout` >
              `decision_s`): its abort would name no culprit and save no snapshot.
  diagnose    a collective raised (gloo reports a closed connection at once): the trainer asks which rank
              stopped beating (`culprits`, waiting up to five heartbeats for it: a heartbeat is stale after
              three unchanged), and raises that as the one-line error.

Each way the rank first writes the snapshots it holds (`on_failure`, `training/snapshot_replicas.py`).
While it does, its heartbeat says "failing", which is never stale: a survivor saving is not taken for a
culprit by the others. If rank 0 dies, the store dies with it: the line then says that rank 0 is gone. So
a failing rank 0 lingers before exiting (`linger`, up to five beats) until every other survivor has
decided what died, lest they find the store gone and name rank 0.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Callable

import torch.distributed as dist

KEY = "eslm/heartbeat/{rank}"
_active: "Watchdog | None" = None  # the running one, for `alive`


def alive() -> None:
    """Work is going on inside a long phase (an evaluation micro-batch, a save phase): the running watchdog,
    if any, does not count the time so far as a stall. Host-only and cheap: no sync, no communication."""
    if _active is not None:
        _active.touch()


def _beat_interval(timeout_s: float) -> float:
    return max(0.5, min(10.0, timeout_s / 6))


def decision_s(timeout_s: float) -> float:
    """The longest this rank's watchdog takes to act after its last progress: a stale peer is seen within
    five beats, a stall after the timeout, each checked once a beat."""
    interval = _beat_interval(timeout_s)
    return max(timeout_s, 5 * interval) + interval


def _describe(stale: dict[int, float]) -> str:
    return "; ".join(f"rank {r} stopped answering (its last heartbeat {age:.0f} s ago)"
                     for r, age in sorted(stale.items()))


class Watchdog:
    """`on_failure(dead)`, called before this rank exits for a stalled or dead peer with the ranks whose
    heartbeat stopped (`dead_ranks`), may save what it can and returns what it did, for the line (the trainer
    writes its snapshots: `training/snapshot_replicas.py`)."""

    def __init__(self, timeout_s: float, on_failure: Callable[[set[int]], str | None] = lambda dead: None):
        self.timeout_s = timeout_s
        self.on_failure = on_failure
        self.interval = _beat_interval(timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.store = dist.distributed_c10d._get_default_store()
        self.iteration = 0
        self.last_progress = time.monotonic()
        self._stop = threading.Event()
        self._failing = threading.Lock()  # held by whoever saves and reports a failure: once per process
        self._state = ""  # "failing" once this rank handles a failure: its heartbeat then never goes stale
        self._seen: dict[int, tuple[list[str], float]] = {}  # each rank's last heartbeat, and when it changed
        self._beat()
        self._thread = threading.Thread(target=self._run, name="eslm-watchdog", daemon=True)
        self._thread.start()
        global _active
        _active = self

    def progress(self, iteration: int) -> None:
        """The training loop finished something (an iteration, an evaluation, a save)."""
        self.iteration, self.last_progress = iteration, time.monotonic()

    def touch(self) -> None:
        """Progress within the iteration (`alive`)."""
        self.last_progress = time.monotonic()

    def _beat(self) -> None:
        self.store.set(KEY.format(rank=self.rank), f"{self._state or f'{time.time():.3f}'} {self.iteration}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 -- the store's host (rank 0) is gone
                if self.rank != 0:
                    self._exit("cannot reach the rendezvous store on rank 0's host: rank 0 is gone")
                return
            beats = self._beats()
            stale = self._stale(beats) if beats is not None else {}
            idle = time.monotonic() - self.last_progress
            if stale:
                self._exit(_describe(stale))
            elif idle > self.timeout_s:
                self._exit(f"no progress for {idle:.0f} s (--distributed-timeout-minutes "
                           f"{self.timeout_s / 60:g}): {self.culprits(wait_s=0) or 'every rank is beating'}")

    def claim(self) -> bool:
        """Whether the caller (this thread, or the trainer after a collective raised) is the first to handle
        a failure: only it writes the snapshots and the line."""
        return self._failing.acquire(blocking=False)

    def join(self) -> None:
        """Wait for the thread, which, handling a failure, ends the process."""
        self._thread.join()

    def _exit(self, why: str) -> None:
        if not self.claim():  # the trainer is handling it
            self._stop.set()
            return
        dead = self.fail()
        try:
            saved = self.on_failure(dead)
        except Exception as err:  # noqa: BLE001 -- the line must still be printed
            saved = f"saving the snapshot failed ({type(err).__name__}: {err})"
        print(f"error: rank {self.rank} at iteration {self.iteration}: {why}{f'; {saved}' if saved else ''}; exiting",
              file=sys.stderr, flush=True)
        self.linger(dead)
        os._exit(1)

    def fail(self) -> set[int]:
        """This rank handles a failure (the caller holds `claim`): the dead ranks, as seen now; from here its
        heartbeat says "failing", so that the other survivors do not count it among them while it saves."""
        dead = self.dead_ranks()
        self._state = "failing"
        with contextlib.suppress(Exception):  # the store's host (rank 0) may be gone
            self._beat()
        return dead

    def linger(self, dead: set[int]) -> None:
        """On rank 0, whose exit takes the store down: wait, up to five beats, until every rank but `dead` has
        decided (its heartbeat "failing" or finished), so that none finds the store gone and names rank 0."""
        deadline = time.monotonic() + 5 * self.interval
        while self.rank == 0 and time.monotonic() < deadline:
            beats = self._beats()
            if not beats or all(beats[r][0] in ("failing", "inf") for r in beats if r not in dead | {self.rank}):
                return
            time.sleep(self.interval / 4)

    def culprits(self, wait_s: float | None = None) -> str | None:
        """Which ranks stopped beating (waiting up to `wait_s`, default five heartbeats, for one to go stale),
        or else which are furthest behind; None when every rank is beating at this rank's iteration."""
        deadline = time.monotonic() + (5 * self.interval if wait_s is None else wait_s)
        while True:
            beats = self._beats()
            if beats is None:
                return "cannot reach the rendezvous store on rank 0's host: rank 0 is gone"
            stale = self._stale(beats)
            if stale:
                return _describe(stale)
            if time.monotonic() >= deadline:
                break
            time.sleep(self.interval / 2)
        if not beats:
            return None
        lowest = min(int(i) for _, i in beats.values())
        behind = sorted(r for r, (_, i) in beats.items() if int(i) == lowest)
        if lowest >= self.iteration:
            return None
        return f"rank(s) {', '.join(map(str, behind))} alive but stuck after iteration {lowest}"

    def _beats(self) -> dict[int, list[str]] | None:
        """Every rank's last heartbeat (time, iteration), none before every rank has beaten once (a get would
        wait for it); None when the store (rank 0's host) is gone."""
        keys = [KEY.format(rank=r) for r in range(self.world)]
        try:
            if not self.store.check(keys):
                return {}
            return {r: self.store.get(key).decode().split() for r, key in enumerate(keys)}
        except Exception:  # noqa: BLE001
            return None

    def _stale(self, beats: dict[int, list[str]]) -> dict[int, float]:
        """The ranks whose heartbeat has not changed for three beats, with how long, in seconds. Measured on
        this host's monotonic clock from when a change was last seen, not from the time a rank wrote: the
        hosts' clocks may differ by more than a beat. A finished rank's heartbeat ("inf") and a failing one's
        are never stale."""
        now = time.monotonic()
        for r, beat in beats.items():
            if self._seen.get(r, (None,))[0] != beat:
                self._seen[r] = (beat, now)
        return {r: now - self._seen[r][1] for r, (t, _) in beats.items()
                if t not in ("inf", "failing") and now - self._seen[r][1] > 3 * self.interval}

    def dead_ranks(self) -> set[int]:
        """The ranks that stopped beating now (rank 0 when the store on its host is gone)."""
        beats = self._beats()
        return {0} if beats is None else set(self._stale(beats))

    def close(self) -> None:
        """Stop beating, leaving a heartbeat that never goes stale: a peer still finishing its run (or the
        next run on this store) must not take this rank for dead."""
        global _active
        if _active is self:
            _active = None
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):  # the store's host (rank 0) may be gone
            self.store.set(KEY.format(rank=self.rank), f"inf {self.iteration}")
