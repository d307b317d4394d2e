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

from helpers import REPO, flags

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
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_eslm.pretrain", *argv], cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run did not start"
        time.sleep(0.05)
    return procs, metrics


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_survivor_exits_naming_the_rank(tiny_corpus, tmp_path, how):
    procs, _ = start_ranks(tiny_corpus, tmp_path)
    try:
        os.kill(procs[1].pid, how)
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert procs[0].returncode != 0 and lines, err[-2000:]
    assert "rank 1 stopped answering" in lines[-1], err[-2000:]
    print(lines[-1], f"({waited:.1f} s)")
    assert waited < 60 * TIMEOUT_MINUTES + 15, waited


def test_rank_zero_killed_is_named_by_the_others(tiny_corpus, tmp_path):
    procs, _ = start_ranks(tiny_corpus, tmp_path)
    try:
        os.kill(procs[0].pid, signal.SIGKILL)
        _, err = procs[1].communicate(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert procs[1].returncode != 0 and lines and "rank 0 is gone" in lines[-1], err[-2000:]
