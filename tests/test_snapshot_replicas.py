"""--snapshot-replicas (training/snapshot_replicas.py): a TP2 run on two "nodes" (one rank each) loses rank 1
with SIGKILL; rank 0 holds rank 1's vetted snapshot, writes both shards as a checkpoint and exits naming
rank 1; resuming from that checkpoint equals the run that was never interrupted. A rank dying in the middle
of the mirror exchange (four ranks, some through it, some not) leaves the newest snapshot incomplete: the
survivors publish the one before, and resuming from it is exact too."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Iterator

import pytest
import torch

import forked
from helpers import REPO, flags, run, without_timing
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
        held = {rank: [snapshot(rank)], peer: [snapshot(peer)]}
        snapshot_replicas.write_emergency_checkpoint(str(tmp_path), held, {1}, mirrored=True)
    host = __import__("socket").gethostname()
    assert sorted(os.path.basename(path).rsplit(".", 4)[1:3] for path in written) == [[host, "0"], [host, "3"]]
    assert all(path.endswith(f".{os.getpid()}.part") for path in written)
    assert latest_iteration(str(tmp_path)) == 4


@pytest.mark.parametrize("case", ["broken", "through", "checkpoint"])
def test_survivors_publish_the_newest_snapshot_every_shard_survived_at(monkeypatch, tmp_path, case):
    """TP4 on two nodes of two ranks, rank 3 dead in the exchange at the vetting of 6 (snapshots every 2):
    ranks 0 and 2 went through it and hold 6 and 4 of their shards and their peer's; rank 1 holds 6 and 4 of
    its own, and of rank 3's only 4 ("broken": rank 3 died before sending) or also 6 ("through": after).
    Whatever order the survivors write in, the newest complete one is published: 4, or 6; and nothing with
    a checkpoint of 4 under --save ("checkpoint": the resume from it is as recent)."""
    import itertools
    from megatron_eslm.training import checkpointing, snapshot_replicas
    _fake_job(monkeypatch, 4, 2, 4, 1)
    layout = {"tensor_model_parallel_size": 4, "pipeline_model_parallel_size": 1, "data_parallel_size": 1}

    def snapshot(rank: int, iteration: int) -> dict:
        return {"iteration": iteration, "layout": layout, "shard": checkpointing.shard_dir_name(rank, 0, 1),
                "w": torch.full((2,), 10.0 * rank + iteration)}

    held = {0: {0: [6, 4], 2: [6, 4]}, 2: {2: [6, 4], 0: [6, 4]},
            1: {1: [6, 4], 3: [6, 4] if case == "through" else [4]}}
    for order in itertools.permutations(held):
        root = str(tmp_path / "".join(map(str, order)))
        if case == "checkpoint":
            os.makedirs(root)
            checkpointing.write_tracker(root, 4)
        lines = {}
        for rank in order:
            monkeypatch.setenv("RANK", str(rank))
            lines[rank] = snapshot_replicas.write_emergency_checkpoint(
                root, {owner: [snapshot(owner, i) for i in its] for owner, its in held[rank].items()}, {3},
                mirrored=True)
        expected = {"broken": 4, "through": 6, "checkpoint": 4}[case]
        assert latest_iteration(root) == expected, (order, lines)
        if case == "checkpoint":
            assert lines[1] == f"snapshot of iteration 4 not written: {root} holds iteration 4"
            assert sorted(os.listdir(os.path.join(root, "iter_0000006.emergency"))) == ["mp_rank_00", "mp_rank_02"]
            continue
        published = os.path.join(root, f"iter_{expected:07d}")
        assert integrity.verify(published) and sorted(os.listdir(published)) == \
            ["manifest.json", "mp_rank_00", "mp_rank_01", "mp_rank_02", "mp_rank_03"]
        for rank in range(4):
            state = torch.load(os.path.join(published, f"mp_rank_{rank:02d}", checkpointing.FILENAME))
            assert state["iteration"] == expected and state["w"][0] == 10.0 * rank + expected
        assert sum("saved as" in line for line in lines.values()) == 1, lines
        assert checkpointing.glob_leftovers(root) == \
            [os.path.join(root, name) for name in os.listdir(root) if name.endswith(".emergency")]


def test_a_late_tracker_write_of_the_older_snapshot_is_undone(tmp_path):
    """Two survivors publishing 4 and 6 at once: the tracker write of 4 landing after 6's is followed by the
    re-check, which points the tracker back at 6."""
    from megatron_eslm.training import checkpointing, snapshot_replicas
    for iteration in (4, 6):
        os.makedirs(checkpointing.iteration_dir(str(tmp_path), iteration))
    checkpointing.write_tracker(str(tmp_path), 4)
    snapshot_replicas._track_newest(str(tmp_path), [6, 4])
    assert latest_iteration(str(tmp_path)) == 6


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


@contextlib.contextmanager
def ranks_per_node(count: int) -> Iterator[None]:
    """A pool rank's LOCAL_WORLD_SIZE for one job: the pool's ranks, on one host, as nodes of `count`."""
    previous = os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = str(count)
    try:
        yield
    finally:
        os.environ.pop("LOCAL_WORLD_SIZE")
        if previous is not None:
            os.environ["LOCAL_WORLD_SIZE"] = previous


def mirror_job() -> dict:
    """On each rank of two one-rank "nodes": three exchanges with no tensor pickled; what arrived equals the
    peer's state byte for byte, and the third reuses the first's buffers."""
    import torch.distributed as dist
    from megatron_eslm.training import snapshot_replicas
    rank = dist.get_rank()
    reduce_ex = torch.Tensor.__reduce_ex__

    def refuse(self, protocol):
        raise AssertionError("a tensor was pickled")

    torch.Tensor.__reduce_ex__ = refuse
    try:
        with ranks_per_node(1):
            mirror, got, pointers = snapshot_replicas.Mirror(), [], []
            for step in range(3):
                mirror.exchange(_state(rank, step))
                got.append(_same_bytes(mirror.state, _state(1 - rank, step)))
                pointers.append(mirror.state["model"]["w"].data_ptr())
    finally:
        torch.Tensor.__reduce_ex__ = reduce_ex
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


class PeerGone(Exception):
    """What the broken exchange's calls raise: not a RuntimeError, which the trainer would take to the
    watchdog for a culprit (every pool rank is alive), but straight out of `train`."""


def broken_exchange_job(argv: list[str], save: str, reference: str) -> dict:
    """On four ranks as two nodes of two (TP4, snapshots every 2): rank 3 "dies" in the exchange at the
    vetting of 6, after receiving rank 1's snapshot and before sending its own (its send raises, and so does
    rank 1's receive); ranks 0 and 2 get through theirs, then raise as their next collective would. Ranks 0, 1
    and 2 write the emergency checkpoint (rank 3 dead), the run resumes from it on all four, and the
    uninterrupted run follows. Returns the survivors' lines, what was published and both runs' records."""
    import torch.distributed as dist
    from megatron_eslm.config import parse_args
    from megatron_eslm.training import snapshot_replicas
    from megatron_eslm.training.trainer import Trainer
    rank, exchange = dist.get_rank(), snapshot_replicas.Mirror.exchange

    def gone(*args, **kwargs):
        raise PeerGone("rank 3 died")

    def breaking(mirror, state: dict) -> None:
        if state["iteration"] == 6 and rank in (1, 3):
            calls = {"get_rank": dist.get_rank, "get_world_size": dist.get_world_size, "send": dist.send,
                     "recv": dist.recv, "send" if rank == 3 else "recv": gone}
            snapshot_replicas.dist = SimpleNamespace(**calls)
        exchange(mirror, state)
        if state["iteration"] == 6:
            raise PeerGone("rank 3 died")

    with ranks_per_node(2):
        trainer = Trainer(parse_args([*argv, "--save", save]), log=lambda *a: None)
        snapshot_replicas.Mirror.exchange = breaking
        try:
            with pytest.raises(PeerGone):
                trainer.train()
        finally:
            snapshot_replicas.Mirror.exchange, snapshot_replicas.dist = exchange, dist
        line = trainer.recovery.emergency_save({3}) if rank != 3 else None
        trainer.close()
        dist.barrier()
        published = latest_iteration(save)
        incomplete = sorted(os.listdir(os.path.join(save, "iter_0000006.emergency")))
        dist.barrier()  # read before the resumed run saves
        resumed = run([*argv, "--load", save, "--save", save])[1]
        straight = run([*argv, "--save", reference])[1]
    return {"line": line, "published": published, "incomplete": incomplete, "resumed": without_timing(resumed),
            "straight": without_timing(straight)}


@pytest.mark.slow  # the suite's 4-rank pool (tests/rank_pool.py), three short TP4 runs
def test_a_death_mid_exchange_publishes_the_snapshot_before_and_resumes_exactly(tiny_corpus, tmp_path):
    """Some ranks through the exchange of 6, rank 3's peer not: the survivors publish 4 (6 lacks rank 3's
    shard), and the run resumed from it equals the uninterrupted one, records and every shard's weights."""
    save, reference = str(tmp_path / "ckpt"), str(tmp_path / "reference")
    argv = flags(tiny_corpus, "--train-iters", "10", "--tensor-model-parallel-size", "4", "--snapshot-interval",
                 "2", "--snapshot-replicas", "1", "--save-interval", "1000", "--hidden-dropout", "0",
                 "--attention-dropout", "0")
    per_rank = run_on_ranks(4, broken_exchange_job, argv, save, reference)
    lines = [result["line"] for result in per_rank[:3]]
    print("\n".join(lines))
    assert per_rank[0]["published"] == 4 and per_rank[0]["incomplete"] == ["mp_rank_00", "mp_rank_02"], lines
    assert sum("snapshot of iteration 4 saved as" in line for line in lines) == 1, lines
    resumed, straight = per_rank[0]["resumed"], per_rank[0]["straight"]
    assert [r["iteration"] for r in resumed] == list(range(5, 11)) and resumed == straight[4:]
    for tp_rank in range(4):
        a, b = (torch.load(os.path.join(root, "iter_0000010", f"mp_rank_{tp_rank:02d}", "model_optim_rng.pt"),
                           weights_only=False)["model"] for root in (save, reference))
        assert all(torch.equal(a[name], b[name]) for name in a)
