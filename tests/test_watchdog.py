"""A killed or stopped rank of a 2-rank run (distributed/watchdog.py): the other rank exits within the timeout
with one line naming it, instead of hanging. The ranks are two plain processes (no launcher agent that
would tear the job down itself), as two nodes would be."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import forked
from helpers import REPO, flags

pytestmark = pytest.mark.slow  # the whole file (pytest.ini)

TIMEOUT_MINUTES = 0.1  # 6 s: a heartbeat every second, stale after three


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(corpus, tmp_path) -> tuple[list[subprocess.Popen], str]:
    metrics = str(tmp_path / "metrics.jsonl")
    argv = flags(corpus, "--train-iters", "10000", "--metrics-file", metrics, "--distributed-timeout-minutes",
                 str(TIMEOUT_MINUTES))
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(forked.Popen([sys.executable, "-m", "megatron_eslm.pretrain", *argv], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))

    deadline = time.monotonic() + 120
    while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run did not start"
        time.sleep(0.05)
    return procs, metrics


def hit(procs: list[subprocess.Popen], victim: int, how: signal.Signals, survivor: int) -> tuple[list[str], str, float]:
    """Send `how` to rank `victim`, wait for rank `survivor` to exit, kill what is left: the survivor's
    "error: " lines, its stderr and the seconds it took."""
    try:
        os.kill(procs[victim].pid, how)
        start = time.monotonic()
        _, err = procs[survivor].communicate(timeout=60)
        waited = time.monotonic() - start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert procs[survivor].returncode != 0, err[-2000:]
    return [line for line in err.strip().splitlines() if line.startswith("error: ")], err, waited


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_survivor_exits_naming_the_rank(tiny_corpus, tmp_path, how):
    lines, err, waited = hit(start_ranks(tiny_corpus, tmp_path)[0], 1, how, 0)
    assert lines and "rank 1 stopped answering" in lines[-1], err[-2000:]
    print(lines[-1], f"({waited:.1f} s)")
    assert waited < 60 * TIMEOUT_MINUTES + 15, waited


def test_rank_zero_killed_is_named_by_the_others(tiny_corpus, tmp_path):
    lines, err, _ = hit(start_ranks(tiny_corpus, tmp_path)[0], 0, signal.SIGKILL, 1)
    assert lines and "rank 0 is gone" in lines[-1], err[-2000:]


def test_a_failing_survivor_is_no_culprit_and_rank_zero_lingers(monkeypatch):
    """A survivor saving after a failure beats "failing", which never goes stale, so the others do not name
    it; rank 0, whose exit takes the store down, lingers until every survivor has decided (found by the
    4-rank drill: rank 0 exited at once and the other survivors named rank 0 instead of the dead rank)."""
    import threading

    import torch.distributed as dist
    from megatron_eslm.distributed import watchdog
    store = dist.HashStore()
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", lambda: store)
    dog = watchdog.Watchdog(timeout_s=0.6)  # a beat every 0.5 s, stale after three
    assert dog.claim()  # as the trainer does: the thread, finding rank 1 dead, leaves the failure to it
    try:
        store.set(watchdog.KEY.format(rank=1), "100.0 7")  # stops beating: dead
        store.set(watchdog.KEY.format(rank=2), "failing 7")  # handling the failure, saving
        dog.dead_ranks()
        time.sleep(3.5 * dog.interval)
        dead = dog.fail()
        assert dead == {1} and store.get(watchdog.KEY.format(rank=0)).decode() == "failing 0"
        store.set(watchdog.KEY.format(rank=2), "101.0 7")  # not decided yet: rank 0 waits
        lingering = threading.Thread(target=dog.linger, args=(dead,))
        lingering.start()
        time.sleep(dog.interval)
        assert lingering.is_alive()
        store.set(watchdog.KEY.format(rank=2), "failing 7")
        lingering.join(timeout=dog.interval)
        assert not lingering.is_alive()
    finally:
        dog.close()
