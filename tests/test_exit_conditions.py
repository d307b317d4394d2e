"""Megatron's exit flags (training/faults.py): --exit-interval, --exit-duration-in-mins and
--exit-signal-handler stop the run after the iteration it is in, save that iteration and exit 0, and the
resumed run equals the uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import forked
from helpers import REPO, flags, run, without_timing
from megatron_eslm.config import parse_args
from megatron_eslm.errors import UserError
from megatron_eslm.training.checkpointing import latest_iteration

pytestmark = pytest.mark.slow  # the whole file (pytest.ini)

ITERS = 8


@pytest.fixture(scope="module")
def straight(tiny_corpus):
    """The uninterrupted run's records, one per iteration."""
    return run(flags(tiny_corpus, "--train-iters", str(ITERS)))[1]


@pytest.mark.parametrize("stop", [["--exit-interval", "3"], ["--exit-duration-in-mins", "1e-9"]],
                         ids=["interval", "duration"])
def test_exit_saves_and_resumes_exactly(tiny_corpus, tmp_path, straight, stop):
    save = str(tmp_path / "ckpt")
    _, first = run(flags(tiny_corpus, "--train-iters", str(ITERS), "--save", save, *stop))
    stopped = first[-1]["iteration"]
    assert stopped == (3 if stop[0] == "--exit-interval" else 1) and latest_iteration(save) == stopped
    _, rest = run(flags(tiny_corpus, "--train-iters", str(ITERS), "--load", save))
    assert without_timing(first + rest) == without_timing(straight)


def test_sigterm_finishes_the_iteration_saves_and_exits_0(tiny_corpus, tmp_path):
    """A real SIGTERM to a running `python -m megatron_eslm.pretrain`: exit 0, a checkpoint of the iteration
    it stopped after, and the run resumed from it equals the uninterrupted run (both to 3 iterations past
    the stop, by --exit-interval: the same schedule of --train-iters, not its hundreds of steps twice)."""
    iters = 300
    save, metrics = str(tmp_path / "ckpt"), str(tmp_path / "metrics.jsonl")
    argv = flags(tiny_corpus, "--train-iters", str(iters), "--save", save, "--metrics-file", metrics,
                 "--exit-signal-handler")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = forked.Popen([sys.executable, "-m", "megatron_eslm.pretrain", *argv], cwd=REPO, env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    first = [json.loads(line) for line in open(metrics)]
    stopped = first[-1]["iteration"]
    assert 3 <= stopped < iters and latest_iteration(save) == stopped
    assert f"stopped after iteration {stopped}: SIGTERM (--exit-signal-handler)" in out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): the gradient norm's sums in its order
    try:
        until = ["--train-iters", str(iters), "--exit-interval", str(stopped + 3)]
        _, straight = run(flags(tiny_corpus, *until))
        _, rest = run(flags(tiny_corpus, *until, "--load", save))
    finally:
        torch.set_num_threads(threads)
    assert [r["iteration"] for r in rest] == [stopped + 1, stopped + 2, stopped + 3]
    assert without_timing(first + rest) == without_timing(straight)


@pytest.mark.parametrize("extra, message", [
    (["--exit-interval", "0"], "--exit-interval must be positive"),
    (["--exit-duration-in-mins", "-1"], "--exit-duration-in-mins must be positive"),
    (["--exit-signal", "SIGNOPE"], "--exit-signal SIGNOPE: not a signal name"),
])
def test_bad_exit_flags_are_one_line(tiny_corpus, extra, message):
    with pytest.raises(UserError, match=message):
        parse_args(flags(tiny_corpus, *extra))


def _signalled_rank(rank: int, world: int, tmp: str, argv: list[str]) -> None:
    """One rank of a DP2 run; rank 1 alone gets SIGTERM half a second in."""
    import datetime
    import threading

    import torch
    import torch.distributed as dist

    from megatron_eslm.training.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))

    torch.set_num_threads(1)
    trainer = Trainer(parse_args(argv), log=lambda *a: None)
    if rank == 1:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    records = trainer.train()
    trainer.close()
    with open(f"{tmp}/rank{rank}.json", "w") as fh:
        json.dump([r["iteration"] for r in records], fh)
    dist.destroy_process_group()


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_iteration(tiny_corpus, tmp_path):
    import torch.multiprocessing as mp

    save = str(tmp_path / "ckpt")
    argv = flags(tiny_corpus, "--train-iters", "400", "--save", save, "--exit-signal-handler")
    mp.spawn(_signalled_rank, args=(2, str(tmp_path), argv), nprocs=2, join=True)
    iterations = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    stopped = iterations[0][-1]
    assert iterations[0] == iterations[1] and 1 <= stopped < 400 and latest_iteration(save) == stopped


def test_stop_and_async_save_agree_once_per_log_interval(tiny_corpus, tmp_path, monkeypatch):
    """--exit-signal-handler and a pending --async-save each cost one host all-reduce per log interval, not
    one per iteration (counted on a fake world of two ranks: the all-reduces are recorded, not run)."""
    import types

    import torch.distributed as dist

    from megatron_eslm.distributed import launch
    from megatron_eslm.training import async_save, faults
    calls = {"exit": 0, "save": 0}

    def fake(kind: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, ReduceOp=dist.ReduceOp,
                                     get_world_size=lambda group=None: 2,
                                     all_reduce=lambda tensor, op, group: calls.__setitem__(kind, calls[kind] + 1))

    monkeypatch.setattr(faults, "dist", fake("exit"))
    monkeypatch.setattr(async_save, "dist", fake("save"))
    monkeypatch.setattr(launch, "host_group", lambda: None)
    _, records = run(flags(tiny_corpus, "--train-iters", "12", "--log-interval", "4", "--exit-signal-handler",
                           "--save", str(tmp_path / "ckpt"), "--save-interval", "2", "--async-save"))
    assert [r["iteration"] for r in records if "lm_loss" in r] == [4, 8, 12]
    assert calls["exit"] == 3 and 1 <= calls["save"] <= 3, calls
