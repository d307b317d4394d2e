#!/usr/bin/env python
"""Is the allocation wired? About ten seconds of an all-reduce on the default group (NCCL on GPUs, gloo on
CPUs) and of a gloo ring exchange (the host-side group every NCCL run also opens), before a long job:
bandwidth and latency of the all-reduce and of every ring link, rank 0 printing them with the host of
each rank and the slowest link. A rank that cannot connect fails here, in seconds, on the interface
chosen (`MEGATRON_ESLM_IFNAME`, launch_scripts/README.md), not an hour into the job.

Start it as the job would be started, one process per GPU, e.g. inside a Slurm allocation:

    srun --nodes 2 --ntasks-per-node 1 torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint $MASTER_ADDR:29500 tools/cluster_check.py --seconds 10

Bandwidths: the all-reduce's algbw is bytes / time and busbw algbw x 2 (n - 1) / n (what each link carries
in a ring, comparable with nccl-tests); a ring link's is the bytes of one message / its time while every
rank sends to the next and receives from the previous at once (the pattern of a ring all-reduce).
"""
from __future__ import annotations

import argparse
import socket
import time
from typing import Callable

import torch
import torch.distributed as dist

from megatron_eslm.distributed import launch

SMALL = 8  # bytes of the latency probe


def _agreed_repeats(run: Callable[[], None], seconds: float) -> int:
    """How many times to repeat `run` to take about `seconds`: timed once (after a warm-up) on every rank,
    the slowest rank's time decides (over the host's gloo group), so that every rank runs the same count."""
    run()
    start = time.perf_counter()
    run()
    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX, group=launch.host_group())
    return max(1, int(seconds / max(took.item(), 1e-6)))


def _timed(run: Callable[[], None], repeats: int) -> float:
    """Seconds per call of `run`, over `repeats` calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def _all_reduce(size_bytes: int, seconds: float) -> dict:
    """The default group's all-reduce of `size_bytes` (float32), on the device it runs on."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.ones(max(1, size_bytes // 4), device=device)

    def run() -> None:
        dist.all_reduce(tensor)
        if device.type == "cuda":
            torch.cuda.synchronize()  # the time of the collective, not of queueing it

    repeats = _agreed_repeats(run, seconds)
    per_call = _timed(run, repeats)
    world, nbytes = dist.get_world_size(), tensor.numel() * 4
    algbw = nbytes / per_call
    return {"backend": dist.get_backend(), "bytes": nbytes, "repeats": repeats, "ms": 1e3 * per_call,
            "algbw_gbs": algbw / 1e9, "busbw_gbs": algbw * 2 * (world - 1) / world / 1e9}


def _ring(size_bytes: int, seconds: float) -> tuple[float, float]:
    """This rank's link to the next rank on the host's gloo group: (latency of an 8-byte message in
    seconds, bandwidth of a `size_bytes` one in bytes/s), every rank sending and receiving at once."""
    group, rank, world = launch.host_group(), dist.get_rank(), dist.get_world_size()
    to, source = (rank + 1) % world, (rank - 1) % world

    def exchange(buffers: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for request in (dist.isend(buffers[0], to, group=group), dist.irecv(buffers[1], source, group=group)):
                request.wait()
        return run

    times = []
    for nbytes in (SMALL, max(SMALL, size_bytes)):
        run = exchange((torch.zeros(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)))
        times.append(_timed(run, _agreed_repeats(run, seconds / 2)))
    return times[0], max(SMALL, size_bytes) / times[1]


def check(seconds: float = 10.0, size_bytes: int = 64 << 20) -> dict:
    """On every rank of an initialised default group: half of `seconds` on the all-reduce, half on the gloo
    ring; returns the report (every rank's link included) and its text."""
    all_reduce = _all_reduce(size_bytes, seconds / 2)
    latency, bandwidth = _ring(size_bytes, seconds / 2) if dist.get_world_size() > 1 else (0.0, 0.0)
    links: list[tuple[str, float, float]] = [("", 0.0, 0.0)] * dist.get_world_size()
    dist.all_gather_object(links, (socket.gethostname(), latency, bandwidth), group=launch.host_group())
    report = {"all_reduce": all_reduce, "links": links}
    return {**report, "text": format_report(report)}


def format_report(report: dict) -> str:
    """The lines rank 0 prints."""
    links, ar = report["links"], report["all_reduce"]
    world, hosts = len(links), {host for host, _, _ in links}
    lines = [f"cluster check: {world} ranks on {len(hosts)} host(s); default group {ar['backend']}, host group gloo",
             f"all-reduce ({ar['backend']}, {ar['bytes']} bytes, {ar['repeats']} times): {ar['ms']:.3f} ms, "
             f"algbw {ar['algbw_gbs']:.3f} GB/s, busbw {ar['busbw_gbs']:.3f} GB/s",
             f"gloo ring, every link at once: latency ({SMALL} bytes) and bandwidth per link",
             f"{'link':<44} {'latency_us':>10} {'GB/s':>8}"]
    if world == 1:
        return "\n".join(lines[:2] + ["one rank: no link to check"])
    for rank, (host, latency, bandwidth) in enumerate(links):
        to = (rank + 1) % world
        across = "  (across hosts)" if host != links[to][0] else ""
        lines.append(f"{f'rank {rank} ({host}) -> rank {to} ({links[to][0]})':<44} {1e6 * latency:>10.1f} "
                     f"{bandwidth / 1e9:>8.3f}{across}")
    slowest = min(range(world), key=lambda r: links[r][2])
    lines.append(f"slowest link: rank {slowest} -> rank {(slowest + 1) % world}, {links[slowest][2] / 1e9:.3f} GB/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="about how long the check runs (default 10)")
    parser.add_argument("--size-mb", type=float, default=64.0,
                        help="the all-reduce's and the ring's large message, in MiB (default 64)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.size_mb <= 0:
        parser.error(f"--seconds and --size-mb must be positive, got {args.seconds} and {args.size_mb}")
    launch.init_process_group(launch.default_device(), single_process=True)
    report = check(args.seconds, int(args.size_mb * (1 << 20)))
    if dist.get_rank() == 0:
        print(report["text"], flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
