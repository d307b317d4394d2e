"""What the step needs on real GPUs that a CPU can still check (issue 12): the device is bound and the
timeout reaches the process group on every path; long single-rank phases wait on the host and every rank
learns of a failure; the collectives, the pipeline p2p and the gradient clip."""
from __future__ import annotations

import datetime
import multiprocessing
import os
import traceback

import pytest
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_eslm import parallel_state
from megatron_eslm.data import index_cache
from megatron_eslm.distributed import collectives, launch
from megatron_eslm.distributed.grads import clip_grad_norm
from megatron_eslm.errors import UserError
from megatron_eslm.training import checkpointing

# ------------------------------------------------------------------------------------ launch.py


@pytest.fixture
def fake_dist(monkeypatch):
    """Records init_process_group and set_device calls instead of making a group or touching CUDA."""
    calls: dict[str, list] = {"init": [], "set_device": []}
    monkeypatch.setattr(launch, "_timeout", launch._timeout)  # restored after the test
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls["init"].append((a, k)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls["set_device"].append(device))
    return calls


def _groups_created(monkeypatch, world: int, tp: int, pp: int, cp: int, self_group: bool = False) -> list[list[int]]:
    """The member lists `initialize_model_parallel` passes to new_group on rank 0 of `world` (a fake dist)."""
    created: list[list[int]] = []
    monkeypatch.setattr(parallel_state, "_layout", parallel_state._layout)  # restored after the test
    monkeypatch.setattr(parallel_state, "_groups", parallel_state._Groups())
    monkeypatch.setattr(parallel_state.dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(parallel_state.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(parallel_state.dist, "new_group", lambda ranks: created.append(list(ranks)) or object())
    monkeypatch.setattr(parallel_state.dist, "destroy_process_group", lambda group=None: None)
    parallel_state.initialize_model_parallel(tp, pp, cp, self_group=self_group)
    return created


def _needed(world: int, tp: int, pp: int, cp: int) -> int:
    """Groups of size > 1 a layout needs: tensor, context, data, data x context, pipeline, model (tensor x
    pipeline) and, with pipelining, embedding (first and last stage)."""
    dp = world // (tp * pp * cp)
    embedding = world // pp if pp > 1 else 0
    return sum(world // size for size in (tp, cp, dp, dp * cp, pp, tp * pp) if size > 1) + embedding


@pytest.mark.parametrize("world,tp,pp,cp", [(2, 1, 1, 1), (2, 2, 1, 1), (8, 2, 2, 1), (8, 1, 1, 2), (1024, 1, 1, 1),
                                            (1024, 8, 1, 1), (1024, 8, 4, 1), (1024, 4, 2, 2)])
def test_only_groups_of_more_than_one_rank_are_created(monkeypatch, world, tp, pp, cp):
    """Each new_group is a world-wide collective (an NCCL communicator split): a layout creates exactly the
    groups of size > 1 it needs, and the getters of the others return None (the one-rank paths)."""
    created = _groups_created(monkeypatch, world, tp, pp, cp)
    assert all(len(ranks) > 1 for ranks in created)
    assert len(created) == _needed(world, tp, pp, cp)
    dp = world // (tp * pp * cp)
    for size, group in [(tp, parallel_state.tensor_model_parallel_group()),
                        (cp, parallel_state.context_parallel_group()), (dp, parallel_state.data_parallel_group()),
                        (dp * cp, parallel_state.data_context_parallel_group()),
                        (pp, parallel_state.pipeline_model_parallel_group()),
                        (tp * pp, parallel_state.model_parallel_group())]:
        assert (group is None) == (size == 1)
        assert parallel_state.group_or_self(group) is group  # no one-rank group without self_group
    assert parallel_state.pipeline_last_rank() == (pp - 1) * world // pp


def test_deepspeed_gets_a_one_rank_group_for_its_size_one_groups(monkeypatch):
    """DeepSpeed's mpu runs collectives on the groups it is given whatever their size: under --deepspeed a
    one-rank group per rank (world-many, once) stands in for each size-1 group; none when none has size 1."""
    created = _groups_created(monkeypatch, 16, 1, 1, 1, self_group=True)
    assert created[-16:] == [[r] for r in range(16)] and len(created) == _needed(16, 1, 1, 1) + 16
    mine = parallel_state.group_or_self(None)
    assert mine is not None and parallel_state.group_or_self(parallel_state.tensor_model_parallel_group()) is mine
    assert len(_groups_created(monkeypatch, 16, 2, 2, 1, self_group=True)) == _needed(16, 2, 2, 1)


@pytest.mark.parametrize("world", [1, 2])
def test_timeout_reaches_init_process_group(fake_dist, monkeypatch, world):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert launch.init_process_group(torch.device("cpu"), single_process=True, timeout_minutes=3)
    (args, kwargs), = fake_dist["init"]
    assert args == ("gloo",) and kwargs["timeout"] == datetime.timedelta(minutes=3)
    assert kwargs["device_id"] is None and ("store" in kwargs) == (world == 1)
    assert fake_dist["set_device"] == []


def test_nccl_gets_the_device(fake_dist, monkeypatch):
    """NCCL's group: the device, twice the watchdog's timeout, and the flight recorder (a user's setting kept)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCH_NCCL_DUMP_ON_TIMEOUT", raising=False)
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "500")
    cuda1 = torch.device("cuda", 1)
    assert launch.init_process_group(cuda1)
    (args, kwargs), = fake_dist["init"]
    assert args == ("nccl",) and kwargs["device_id"] == cuda1
    assert kwargs["timeout"] == datetime.timedelta(minutes=20)  # twice Megatron's default of 10
    assert fake_dist["set_device"] == [cuda1]
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "500"


@pytest.mark.parametrize("minutes", [0.05, 0.1, 1, 10, 60])
def test_nccl_times_out_after_the_watchdog_decides(minutes):
    """NCCL's abort names no culprit and saves nothing: its timeout is strictly longer than the watchdog's
    decision time, with room for a step queued ahead of the host (here: a tenth of the timeout)."""
    from megatron_eslm.distributed import watchdog
    decision = watchdog.decision_s(60 * minutes)
    assert 60 * minutes < decision < launch.nccl_timeout(minutes).total_seconds() - 6 * minutes


def test_watchdog_acts_on_a_stale_peer_before_its_own_timeout(monkeypatch):
    """A peer whose heartbeat did not change for three beats is named within five, without waiting for this
    rank's own timeout; a closed watchdog leaves a heartbeat that never goes stale. (A fake two-rank job on a HashStore;
    the exit is recorded, not taken.)"""
    import time

    from megatron_eslm.distributed import watchdog
    store = dist.HashStore()
    monkeypatch.setattr(watchdog.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(watchdog.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(watchdog.dist.distributed_c10d, "_get_default_store", lambda: store)
    exits = []
    monkeypatch.setattr(watchdog.Watchdog, "_exit",
                        lambda self, why: exits.append((time.monotonic(), why)) or self._stop.set())
    store.set(watchdog.KEY.format(rank=1), f"{time.time():.3f} 0")  # rank 1's last beat
    start = time.monotonic()
    dog = watchdog.Watchdog(timeout_s=3)  # a beat every 0.5 s, stale after 1.5 s
    while not exits and time.monotonic() - start < 10:
        dog.progress(1)  # this rank is making progress: its own timeout never comes
        time.sleep(0.05)
    dog.close()
    (when, why), = exits
    assert why.startswith("rank 1 stopped answering (its last heartbeat") and when - start <= 5 * 0.5 + 0.2
    assert dog.dead_ranks() == {1} and store.get(watchdog.KEY.format(rank=0)).decode() == "inf 1"


def test_device_is_bound_when_the_group_already_exists(fake_dist, monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    assert not launch.init_process_group(torch.device("cuda", 1))
    assert fake_dist["set_device"] == [torch.device("cuda", 1)] and fake_dist["init"] == []


# ------------------------------------------------------------------------ on 3 gloo ranks (fork)

WORLD = 3


def _run_rank(rank: int, init: str, tmp: str, job, args: tuple) -> None:
    """Joins the group, runs `job(rank, tmp, *args)` and writes its outcome lines for the parent."""
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
        outcomes = job(rank, tmp, *args)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 -- reported to the parent through the file
        outcomes = [traceback.format_exc()]
    with open(os.path.join(tmp, f"outcome{rank}"), "w") as f:
        f.write("\n".join(outcomes))


def _on_every_rank(tmp_path, job, *args) -> list[list[str]]:
    context = multiprocessing.get_context("fork")
    init = f"file://{tmp_path / 'rendezvous'}"
    processes = [context.Process(target=_run_rank, args=(rank, init, str(tmp_path), job, args))
                 for rank in range(WORLD)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    return [(tmp_path / f"outcome{rank}").read_text().split("\n") for rank in range(WORLD)]


def _single_rank_phases(rank: int, tmp: str, twin: bool) -> list[str]:
    """Each phase's outcome on this rank: 'ok' or the type and message of what it raised."""
    if twin:  # what an NCCL default group gets: a gloo twin for the host-side waits
        dist.get_backend = lambda group=None: "nccl"
    parallel_state.initialize_model_parallel(1, 1)
    outcomes = []

    def phase(run):
        try:
            run()
            outcomes.append("ok")
        except Exception as err:  # noqa: BLE001 -- the outcome is what the test compares
            outcomes.append(f"{type(err).__name__}: {err}")

    def bad_build():
        raise UserError("rank 0 cannot build")

    blocked = os.path.join(tmp, "a file")  # a save root that is a file: rank 0's makedirs fails
    phase(lambda: checkpointing.save_checkpoint(blocked, 1, {}))
    phase(lambda: index_cache.cached_arrays(os.path.join(tmp, "cache"), {"x": 1}, bad_build))
    phase(lambda: checkpointing.save_checkpoint(os.path.join(tmp, "ckpt"), 2, {"rank": rank}))
    if twin:
        assert launch.host_group() is launch.host_group() is not None
    parallel_state.destroy_model_parallel()
    return outcomes


@pytest.mark.parametrize("twin", [False, True], ids=["gloo-default", "gloo-twin"])
def test_every_rank_learns_of_a_single_rank_failure(tmp_path, twin):
    (tmp_path / "a file").write_text("")
    outcomes = _on_every_rank(tmp_path, _single_rank_phases, twin)
    assert all(len(o) == 3 for o in outcomes), outcomes
    first, cache, saved = zip(*outcomes)
    assert first[0].startswith("NotADirectoryError: ")
    assert set(first[1:]) == {f"UserError: rank 0: {first[0]}"}
    assert set(cache) == {"UserError: rank 0 cannot build"}
    assert set(saved) == {"ok"}
    assert (tmp_path / "ckpt" / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt").is_file()


def _tensor_collectives(rank: int, tmp: str) -> list[str]:
    collectives.reset()
    x = torch.arange(6.0).view(2, 3) + 10 * rank
    gathered = collectives.all_gather_into_tensor(x.t(), None, collectives.TP_ALL_GATHER)  # non-contiguous in
    assert torch.equal(gathered, torch.stack([(torch.arange(6.0).view(2, 3) + 10 * r).t() for r in range(WORLD)]))
    scalar = collectives.all_gather_into_tensor(torch.tensor(float(rank)), None, collectives.ESLM_THRESHOLD)
    assert torch.equal(scalar, torch.arange(float(WORLD)))
    assert collectives.all_gather_into_tensor(torch.tensor([rank]), None, collectives.ESLM_THRESHOLD).tolist() == \
        [[0], [1], [2]]
    pieces = torch.arange(float(WORLD)).view(WORLD, 1, 1).expand(WORLD, 2, 2) + rank  # piece i: i + rank
    reduced = collectives.reduce_scatter_tensor(pieces, None, collectives.TP_REDUCE_SCATTER)
    assert torch.equal(reduced, torch.full((2, 2), WORLD * rank + 3.0))  # sum over ranks r of (rank + r)
    assert collectives.bytes_by_kind == {collectives.TP_ALL_GATHER: 24, collectives.ESLM_THRESHOLD: 4 + 8,
                                         collectives.TP_REDUCE_SCATTER: 4 * WORLD * 4}
    return ["ok"]


def test_tensor_collectives(tmp_path):
    assert _on_every_rank(tmp_path, _tensor_collectives) == [["ok"]] * WORLD


# ------------------------------------------------------------------------------ clip_grad_norm


def _model_with_grads() -> torch.nn.Module:
    """Four gradients of at least 64 elements each (a copy of one is far larger than the per-tensor norms)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    model(torch.randn(8, 32)).square().sum().backward()
    return model


@pytest.mark.parametrize("max_norm", [0.1, 1e6, 0.0])
def test_clip_grad_norm_matches_torch(max_norm):
    ours, theirs = _model_with_grads(), _model_with_grads()
    norm = clip_grad_norm(list(ours.parameters()), max_norm)
    want = torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), max_norm if max_norm > 0 else float("inf"))
    assert norm.dim() == 0 and norm.dtype == torch.float64
    torch.testing.assert_close(norm, want.double(), rtol=1e-6, atol=0)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    if max_norm != 0.1:  # no clipping: every gradient bitwise as the backward left it
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours.parameters(), _model_with_grads().parameters()))


class _Ops(TorchDispatchMode):
    """Every op that runs, with the dtype and size of each tensor it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[str, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.outputs += [(str(func), t.dtype, t.numel()) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


def test_clip_grad_norm_neither_syncs_nor_copies_a_gradient():
    params = list(_model_with_grads().parameters())
    with _Ops() as ops:
        clip_grad_norm(params, 0.1)
    assert ops.outputs and not any("_local_scalar_dense" in name for name, _, _ in ops.outputs)  # .item(), float()
    assert not [o for o in ops.outputs if o[1] == torch.float64 and o[2] > len(params)]
    # Allocations inside kernels are invisible to a dispatch mode (the old float64 norm copied every
    # gradient inside linalg_vector_norm): the profiler's memory events see them.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        clip_grad_norm(params, 0.1)
    smallest = min(p.grad.numel() * p.grad.element_size() for p in params)
    assert max(e.cpu_memory_usage for e in prof.events()) < smallest


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (tools/device_check.sh: nccl_faults)")
def test_eight_device_rng_checkpoint_loads_on_one_gpu(tmp_path):
    """A checkpoint whose rng["cuda"] holds 8 devices' generators (the older `get_rng_state_all` format)
    loads on one GPU and restores the generator this device had."""
    states = []
    for seed in range(8):
        torch.cuda.manual_seed(seed)  # the current device only: the 8 states stand for 8 devices
        states.append(torch.cuda.get_rng_state())
    torch.save({"rng": [{**checkpointing.rng_state(), "cuda": states}]}, tmp_path / "rng.pt")
    checkpointing.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=False)["rng"][0])
    drawn = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(torch.cuda.current_device())
    assert torch.equal(drawn, torch.rand(4, device="cuda"))
    assert torch.equal(checkpointing.rng_state()["cuda"], torch.cuda.get_rng_state())


def test_watchdog_hears_of_each_eval_micro_batch_and_save_phase(tiny_corpus, tmp_path, monkeypatch):
    """An evaluation and a large save (with its CRC read-back) may outlast the timeout together: the watchdog
    is told of every evaluation micro-batch and every phase of a save, not only when both are over."""
    from helpers import flags
    from megatron_eslm.config import parse_args
    from megatron_eslm.distributed import watchdog
    from megatron_eslm.training.trainer import Trainer

    class Recorder:
        touches = 0

        def touch(self) -> None:
            self.touches += 1

    recorder = Recorder()
    monkeypatch.setattr(watchdog, "_active", recorder)
    trainer = Trainer(parse_args(flags(tiny_corpus, "--eval-iters", "3")))
    trainer.evaluate()
    assert recorder.touches == trainer._eval_samples() // trainer.cfg.training.micro_batch_size > 1
    trainer.close()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # the save's phases are collective
    phases = []
    outcome = launch.shared_outcome
    monkeypatch.setattr(launch, "shared_outcome", lambda: phases.append(1) or outcome())
    try:
        recorder.touches = 0
        checkpointing.save_checkpoint(str(tmp_path / "ckpt"), 1, {"w": torch.zeros(2)})
        checkpointing.save_checkpoint(str(tmp_path / "ds"), 1, {}, write=lambda d, s: torch.save(s, f"{d}/x") or None)
    finally:
        dist.destroy_process_group()
    assert recorder.touches == len(phases) + 1 >= 7  # + 1: the one file checksummed after the fake engine's write


BLOCKED_NCCL_RANK = """
import os, sys, time
import torch, torch.distributed as dist
from megatron_eslm.distributed import launch, watchdog
launch.init_process_group(torch.device("cuda", 0), single_process=True, timeout_minutes=0.1)
dog = watchdog.Watchdog(6.0)
dog.progress(1)
torch.cuda._sleep(200_000_000_000)  # the stream blocked for about two minutes
x = torch.ones(1, device="cuda")
dist.all_reduce(x)  # queued behind the sleep: NCCL's clock runs from here
print(f"queued at {time.monotonic():.1f}", file=sys.stderr, flush=True)
x.item()  # the host waits: the watchdog (6 s + a beat) must act before NCCL (12 s)
print("the all-reduce finished", file=sys.stderr, flush=True)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (tools/device_check.sh: nccl_faults)")
def test_watchdog_line_comes_before_nccl_timeout_on_gpu(tmp_path):
    """A one-rank NCCL group, --distributed-timeout-minutes 0.1, the stream blocked by torch.cuda._sleep under
    an all-reduce: the watchdog's one line ends the process before NCCL's own timeout (12 s) aborts it."""
    import subprocess
    import sys
    import time
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", BLOCKED_NCCL_RANK], env=env, capture_output=True, text=True,
                          timeout=90)
    waited = time.monotonic() - start
    lines = [line for line in proc.stderr.splitlines() if "error: rank 0" in line or "Watchdog caught" in line
             or "timeout" in line.lower()]
    print(proc.stderr[-3000:], f"({waited:.1f} s)")
    assert proc.returncode == 1 and lines and lines[0].startswith("error: rank 0 at iteration 1: no progress for"), \
        proc.stderr[-3000:]
    assert "the all-reduce finished" not in proc.stderr
