"""--snapshot-replicas (training/snapshot_replicas.py): a TP2 run on two "nodes" (one rank each) loses rank 1
with SIGKILL; rank 0 holds rank 1's vetted snapshot, writes both shards as a checkpoint and exits naming
rank 1; resuming from that checkpoint equals the run that was never interrupted."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import forked
from helpers import REPO, flags, without_timing
from megatron_eslm.checkpoint import integrity
from megatron_eslm.training.checkpointing import latest_iteration
from rank_pool import run_on_ranks
from test_watchdog import free_port, hit


def launch(corpus, tmp_path, name: str, *extra: str) -> tuple[list[subprocess.Popen], str]:
    """Two plain processes, TP2, each its own node (LOCAL_WORLD_SIZE=1)."""
    metrics = str(tmp_path / f"{name}.jsonl")
    argv = flags(corpus, "--train-iters", "40", "--tensor-model-parallel-size", "2", "--snapshot-interval", "2",
                 "--snapshot-replicas", "1", "--distributed-timeout-minutes", "0.1", "--metrics-file", metrics,
                 "--hidden-dropout", "0", "--attention-dropout", "0", *extra)
    port = free_port()
    procs = [forked.Popen([sys.executable, "-m", "megatron_eslm.pretrain", *argv], cwd=REPO, text=True,
                              env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                   "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for rank in range(2)]
    return procs, metrics


def finish(procs: list[subprocess.Popen]) -> list[str]:
    errs = [proc.communicate(timeout=120)[1] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), errs[0][-2000:] + errs[1][-2000:]
    return errs


def records(metrics: str) -> dict[int, dict]:
    return {r["iteration"]: r for r in without_timing(map(json.loads, open(metrics))) if "lm_loss" in r}


@pytest.mark.slow
def test_survivor_saves_both_shards_and_the_resumed_run_is_exact(tiny_corpus, tmp_path):
    save = str(tmp_path / "ckpt")
    procs, metrics = launch(tiny_corpus, tmp_path, "killed", "--save", save)
    deadline = time.monotonic() + 120
    while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 7):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run did not start"
        time.sleep(0.02)
    lines, err, _ = hit(procs, 1, signal.SIGKILL, 0)
    line = lines[-1]
    assert "rank 1 stopped answering" in line and "saved as" in line, err[-2000:]
    print(line)
    snapshot = int(re.search(r"snapshot of iteration (\d+) saved", line)[1])
    assert snapshot >= 4 and latest_iteration(save) == snapshot
    assert integrity.verify(os.path.join(save, f"iter_{snapshot:07d}"))
    stop = str(snapshot + 2)
    finish(launch(tiny_corpus, tmp_path, "resumed", "--save", save, "--load", save, "--exit-interval", stop)[0])
    reference = str(tmp_path / "reference")
    procs, reference_metrics = launch(tiny_corpus, tmp_path, "reference", "--save", reference, "--exit-interval",
                                      stop)

    finish(procs)
    resumed, straight = records(str(tmp_path / "resumed.jsonl")), records(reference_metrics)
    assert sorted(resumed) == [snapshot + 1, snapshot + 2]
    assert all(resumed[i] == straight[i] for i in resumed)
    for tp_rank in range(2):
        files = [os.path.join(root, f"iter_{snapshot + 2:07d}", f"mp_rank_{tp_rank:02d}", "model_optim_rng.pt")
                 for root in (save, reference)]
        a, b = (torch.load(path, weights_only=False)["model"] for path in files)
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_one_node_has_no_peer_to_mirror_to(tiny_corpus):
    from megatron_eslm.config import parse_args
    from megatron_eslm.errors import UserError
    from megatron_eslm.training.trainer import Trainer
    with pytest.raises(UserError, match="--snapshot-replicas 1: every rank is on one node"):
        Trainer(parse_args(flags(tiny_corpus, "--snapshot-interval", "1", "--snapshot-replicas", "1")))


def _fake_job(monkeypatch, world: int, per_node: int, tp: int, dp: int, cp: int = 1) -> None:
    """A layout's sizes and this process's place, without process groups."""
    from megatron_eslm import parallel_state
    layout = parallel_state.Layout(tp=tp, pp=world // (tp * dp * cp), dp=dp, cp=cp)
    monkeypatch.setattr(parallel_state, "_layout", layout)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))


@pytest.mark.parametrize("world,per_node,tp,dp,cp", [(2, 1, 2, 1, 1), (8, 4, 2, 2, 1), (8, 2, 2, 1, 2),
                                                     (16, 4, 1, 4, 2)])
def test_each_emergency_shard_has_exactly_one_writer(monkeypatch, world, per_node, tp, dp, cp):
    """For every set of one or two dead ranks, each shard some survivor holds (its own, or its peer's one node
    behind) is written by exactly one survivor, and by none when all its holders died."""
    import itertools
    from megatron_eslm.training import snapshot_replicas
    _fake_job(monkeypatch, world, per_node, tp, dp, cp)
    shard = lambda rank: (rank % tp, rank // (tp * cp * dp))  # noqa: E731
    ones, twos = itertools.combinations(range(world), 1), itertools.combinations(range(world), 2)
    for dead in map(set, itertools.chain(ones, twos)):
        survivors = [r for r in range(world) if r not in dead]
        writes = {}
        for rank in survivors:
            for owner in (rank, snapshot_replicas.peer_behind(rank)):
                if snapshot_replicas.writer(owner, dead, mirrored=True) == rank:
                    writes.setdefault(shard(owner), set()).add(rank)
        held = {shard(owner) for rank in survivors for owner in (rank, snapshot_replicas.peer_behind(rank))}
        assert set(writes) == held and all(len(ranks) == 1 for ranks in writes.values()), (dead, writes)


def test_survivors_write_each_shard_once_under_host_and_rank_temp_names(monkeypatch, tmp_path):
    """TP2 x DP2 on two nodes of two ranks, rank 1 dead: the three survivors write the two shards once each,
    through temporary names carrying host, rank and PID, and the last writer publishes the checkpoint."""
    from megatron_eslm.training import checkpointing, snapshot_replicas
    _fake_job(monkeypatch, 4, 2, 2, 2)
    written = []
    save_file = integrity.save_file
    monkeypatch.setattr(integrity, "save_file", lambda state, path: written.append(path) or save_file(state, path))
    layout = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1, "data_parallel_size": 2}

    def snapshot(rank: int) -> dict:
        return {"iteration": 4, "layout": layout, "shard": checkpointing.shard_dir_name(rank % 2, 0, 1), "w": rank % 2}

    for rank in (0, 2, 3):
        monkeypatch.setenv("RANK", str(rank))
        peer = snapshot_replicas.peer_behind(rank)
        held = {rank: snapshot(rank), peer: snapshot(peer)}
        snapshot_replicas.write_emergency_checkpoint(str(tmp_path), held, {1}, mirrored=True)
    host = __import__("socket").gethostname()
    assert sorted(os.path.basename(path).rsplit(".", 4)[1:3] for path in written) == [[host, "0"], [host, "3"]]
    assert all(path.endswith(f".{os.getpid()}.part") for path in written)
    assert latest_iteration(str(tmp_path)) == 4


def test_ranks_per_node_from_torchrun_or_deepspeed(monkeypatch):
    """torchrun exports LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE: either places the peer one node ahead."""
    from megatron_eslm.training import snapshot_replicas
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    assert snapshot_replicas.ranks_per_node() == 16
    monkeypatch.setenv("LOCAL_SIZE", "8")
    assert snapshot_replicas.ranks_per_node() == 8 and snapshot_replicas.peer_behind(3) == 11
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert snapshot_replicas.ranks_per_node() == 4


def _state(rank: int, step: int) -> dict:
    """A snapshot-shaped state of every dtype and shape a rank holds, different per rank and step."""
    gen = torch.Generator().manual_seed(100 * rank + step)
    weight = torch.randn(3, 5, generator=gen)
    weight[0, 0] = float("nan")  # compared by bytes: NaN's payload too
    return {"model": {"w": weight, "b": torch.randn(5, generator=gen).bfloat16(), "empty": torch.empty(0, 4)},
            "optimizer": {"state": {0: {"step": torch.tensor(float(step)), "mask": torch.rand(4, generator=gen) > 0.5}},
                          "param_groups": [{"lr": 1e-3 * (rank + 1), "params": [0]}]},
            "rng": [{"torch": gen.get_state(), "python": (3, tuple(range(rank, rank + 5)), None)}],
            "iteration": step, "shard": f"mp_rank_{rank:02d}", "indices": torch.arange(7, dtype=torch.int64) + rank}


def _same_bytes(a, b) -> bool:
    leaves_a, spec_a = torch.utils._pytree.tree_flatten(a)
    leaves_b, spec_b = torch.utils._pytree.tree_flatten(b)
    return spec_a == spec_b and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.reshape(-1).view(torch.uint8),
                                                                  y.reshape(-1).view(torch.uint8))
        if isinstance(x, torch.Tensor) else type(x) is type(y) and x == y for x, y in zip(leaves_a, leaves_b))


def mirror_job() -> dict:
    """On each rank of two one-rank "nodes": three exchanges with no tensor pickled; what arrived equals the
    peer's state byte for byte, and the third reuses the first's buffers."""
    import torch.distributed as dist
    from megatron_eslm.training import snapshot_replicas
    rank, previous = dist.get_rank(), os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = "1"
    reduce_ex = torch.Tensor.__reduce_ex__

    def refuse(self, protocol):
        raise AssertionError("a tensor was pickled")

    torch.Tensor.__reduce_ex__ = refuse
    try:
        mirror, got, pointers = snapshot_replicas.Mirror(), [], []
        for step in range(3):
            mirror.exchange(_state(rank, step))
            got.append(_same_bytes(mirror.state, _state(1 - rank, step)))
            pointers.append(mirror.state["model"]["w"].data_ptr())
    finally:
        torch.Tensor.__reduce_ex__ = reduce_ex
        os.environ.pop("LOCAL_WORLD_SIZE")
        if previous is not None:
            os.environ["LOCAL_WORLD_SIZE"] = previous
    return {"equal": got, "reused": pointers[2] == pointers[0] != pointers[1]}


@pytest.mark.slow  # the suite's 2-rank pool: seconds to start when this worker has none yet
def test_mirror_sends_tensors_not_pickles():
    """--snapshot-replicas' exchange pickles only a header: the tensors go as tensors into reused buffers, and
    the mirrored state equals the peer's byte for byte (NaN, bf16, bool, empty and 0-d tensors, nested
    non-tensor values)."""
    from megatron_eslm.training import snapshot_replicas
    header, tensors = snapshot_replicas.encode(_state(0, 1))
    assert len(tensors) == 7 and len(header) < 2000
    assert run_on_ranks(2, mirror_job) == [{"equal": [True] * 3, "reused": True}] * 2
