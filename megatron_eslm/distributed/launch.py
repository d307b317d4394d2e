"""Find this process's place the usual way, join the process group, and let ranks wait on the host while
one of them works alone.

torchrun and `deepspeed --module megatron_eslm.pretrain` both export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT (deepspeed also passes --local_rank, which the parser accepts); the default
process group is joined through `env://`, with gloo on CPU and nccl on CUDA. A caller that already
initialised torch.distributed (the tests, a library) keeps its group, but this process's CUDA device is
bound either way: otherwise barriers, object collectives, CUDA seeding and Triton launches would go to
cuda:0 while the model sits on cuda:LOCAL_RANK.

Process groups and timeouts (docs/parallelism.md, docs/fault_tolerance.md). Every collective of a gloo
default group may wait --distributed-timeout-minutes. NCCL's group waits twice as long (`nccl_timeout`):
its clock starts when the host queues a collective, a sync-free host queues a step ahead, and its own
timeout aborts the process from NCCL's thread (no culprit named, no emergency snapshot), so the heartbeat
watchdog (`watchdog.py`) must decide first. Should NCCL time out anyway, its flight recorder names the
collective (`NCCL_DEBUG_ENV`). Phases where rank 0 alone works for long on the host (writing a
checkpoint, building the index cache) are not waited for in an NCCL barrier, which would hold the GPUs
of the other ranks under NCCL's watchdog, but in `shared_outcome` on `host_group()`: a gloo group with
the same timeout, through which every rank also learns whether the work failed anywhere.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_eslm.config.parallel import ParallelConfig
from megatron_eslm.distributed import watchdog
from megatron_eslm.errors import UserError

_timeout = datetime.timedelta(minutes=ParallelConfig.distributed_timeout_minutes)
# Set for NCCL runs unless the user set them: on a timeout NCCL dumps its flight recorder (the last
# collectives of each group, with sequence numbers and sizes) to /tmp/nccl_trace_rank_<rank>, so the
# collective that hung is named even when NCCL, not the watchdog, ends the run.
NCCL_DEBUG_ENV = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
_host_group: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None  # (default group, its gloo twin)


def world_size() -> int:
    """Processes in the job, known before any collective (from the group, else the launcher's env)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def temp_path(path: str) -> str:
    """A temporary name beside `path` that no other process writes: host, rank and PID. PIDs alone repeat
    across containers and hosts sharing a file system, so two writers could share (and tear) one file."""
    return f"{path}.{socket.gethostname()}.{rank()}.{os.getpid()}.part"


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def nccl_timeout(timeout_minutes: float) -> datetime.timedelta:
    """NCCL's timeout: twice --distributed-timeout-minutes, strictly longer than the watchdog's decision
    time (`watchdog.decision_s`: the timeout and one heartbeat) plus a step queued ahead of the host."""
    return datetime.timedelta(minutes=2 * timeout_minutes)


def init_process_group(device: torch.device, single_process: bool = False,
                       timeout_minutes: float = ParallelConfig.distributed_timeout_minutes) -> bool:
    """Bind `device` and join the default group when launched with several processes (or, with
    `single_process`, make a one-process group: DeepSpeed needs one even alone); True if this call created
    it. `timeout_minutes` (--distributed-timeout-minutes) bounds every wait of a gloo group and of
    `host_group()`; an NCCL group gets `nccl_timeout` and the flight recorder's settings."""
    global _timeout
    _timeout = datetime.timedelta(minutes=timeout_minutes)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized() or (world_size() == 1 and not single_process):
        return False
    backend, device_id = ("nccl", device) if device.type == "cuda" else ("gloo", None)
    timeout = _timeout
    if backend == "nccl":
        timeout = nccl_timeout(timeout_minutes)
        for name, value in NCCL_DEBUG_ENV.items():  # read when the group is made
            os.environ.setdefault(name, value)
    if world_size() == 1:  # no launcher needed: an in-memory store instead of MASTER_ADDR/PORT
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=device_id)
    else:
        dist.init_process_group(backend, init_method="env://", timeout=timeout, device_id=device_id)
    return True


def host_group() -> dist.ProcessGroup | None:
    """A gloo group over every rank for waits on host-side work: the default group when it is gloo, else a
    gloo twin made once per default group, with the timeout of `init_process_group`. Collective: the
    first call must be made by every rank."""
    global _host_group
    if dist.get_backend() == "gloo":
        return None
    default = dist.group.WORLD
    if _host_group is None or _host_group[0] is not default:
        _host_group = (default, dist.new_group(backend="gloo", timeout=_timeout))
    return _host_group[1]


@contextlib.contextmanager
def shared_outcome() -> Iterator[None]:
    """Run the body on every rank (empty on ranks with nothing to do), then wait on the host until every
    rank is through it; if the body raised anywhere, every rank raises: the failing rank its own error, the
    others a UserError repeating it, instead of hanging in a later collective. Without torch.distributed
    the body just runs."""
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    failure: Exception | None = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 -- re-raised below, after the others have heard of it
        failure = err
    reports: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if failure is None else _report(failure), group=host_group())
    watchdog.alive()  # a phase (of a save, say) is through on every rank
    if failure is not None:
        raise failure
    report = next((r for r in reports if r is not None), None)
    if report is not None:
        raise UserError(report)


def _report(err: Exception) -> str:
    """A UserError already names the flag or file: repeated as it is; anything else with its rank."""
    return str(err) if isinstance(err, UserError) else f"rank {dist.get_rank()}: {type(err).__name__}: {err}"
