"""Gloo ranks that live for the whole test session and run the tests' multi-rank jobs.

Starting a rank costs seconds of CPU (torch, torch._dynamo, which torch.optim imports at the first optimizer,
and the project), and a fresh spawn per test paid it again for every rank. A pool of `world` ranks is
started the first time a test asks for that world size, joins one gloo group, and runs each job function
on every rank with the group up; the suite's 2- and 4-rank tests share two pools.

    per_rank = run_on_ranks(4, module.function, *args)   # [function's result on rank 0, 1, 2, 3]

The function must be importable by the ranks (a module-level function of a test module or helper) and
leave the process as it found it: the pool restores the default dtype and the thread count after each job,
and a job that fails, hangs or kills a rank ends the pool (the next job starts a new one) after reporting
every rank's traceback.
"""
from __future__ import annotations

import atexit
import datetime
import gc
import os
import queue
import shutil
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

JOB_TIMEOUT_S = 900  # the longest a job may take on every rank together
_pools: dict[int, "RankPool"] = {}


def _serve(rank: int, world: int, rendezvous: str, tasks: "mp.Queue", results: "mp.Queue") -> None:
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton, which reads it once
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's jobs (tests/deepspeed_jobs.py) on these ranks
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # as a launcher sets them
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    while (task := tasks.get()) is not None:
        function, args, out = task
        # What lives now (torch, the project, the job's module) lives for the rank's life: frozen, the
        # job's garbage collections scan only its own objects.
        gc.collect()
        gc.freeze()
        try:
            torch.save(function(*args), out)
            results.put((rank, None))
        except BaseException:  # noqa: BLE001  (reported to the test, which fails)
            results.put((rank, traceback.format_exc()))
        finally:
            torch.set_default_dtype(torch.float32)
            torch.set_num_threads(1)
    dist.destroy_process_group()


class RankPool:
    """`world` spawned processes in one gloo group, each waiting for jobs on its own queue."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.dir = tempfile.mkdtemp(prefix=f"rank_pool{world}_")
        context = mp.get_context("spawn")
        self.tasks = [context.Queue() for _ in range(world)]
        self.results = context.Queue()
        self.procs = [context.Process(target=_serve, args=(rank, world, os.path.join(self.dir, "rendezvous"),
                                                            self.tasks[rank], self.results), daemon=True)
                      for rank in range(world)]
        for proc in self.procs:
            proc.start()
        self.jobs = 0

    def run(self, function: Callable[..., Any], *args: Any) -> list[Any]:
        self.jobs += 1
        outs = [os.path.join(self.dir, f"job{self.jobs}-rank{rank}.pt") for rank in range(self.world)]
        for rank, tasks in enumerate(self.tasks):
            tasks.put((function, args, outs[rank]))
        errors: dict[int, str] = {}
        pending = set(range(self.world))
        start = time.monotonic()
        give_up = start + JOB_TIMEOUT_S
        while pending:
            try:
                rank, error = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = {r for r in pending if not self.procs[r].is_alive()}
                if dead or time.monotonic() > give_up:
                    # a dead rank, or every rank out of time: the others wait in a collective forever
                    errors.update({r: "the process died" if r in dead else "no answer" for r in pending})
                    break
                continue
            pending.discard(rank)
            if error is not None:
                errors[rank] = error
                give_up = min(give_up, time.monotonic() + 10)  # the others' moment to fail too
        if errors:
            self.close()
            raise AssertionError(f"{getattr(function, '__qualname__', function)} failed on {self.world} ranks:\n"
                                 + "\n".join(f"--- rank {rank}:\n{text}" for rank, text in sorted(errors.items())))
        results = [torch.load(out, weights_only=False) for out in outs]
        for out in outs:
            os.remove(out)
        return results

    def close(self) -> None:
        """Stop the ranks (politely if they are idle) and remove the pool's folder."""
        _pools.pop(self.world, None)
        for tasks in self.tasks:
            tasks.put(None)
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_on_ranks(world: int, function: Callable[..., Any], *args: Any) -> list[Any]:
    """`function(*args)` on every rank of the session's `world`-rank gloo group; the results by rank."""
    if world not in _pools:
        _pools[world] = RankPool(world)
    return _pools[world].run(function, *args)


@atexit.register
def _close_all() -> None:
    for pool in list(_pools.values()):
        pool.close()
