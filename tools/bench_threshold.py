"""Benchmark the distributed VaR threshold on gloo process groups on this machine.

For each group size and scores per rank, every rank calls each method on its own distinct scores;
the table gives the payload bytes per rank per call and the median over repeats of the slowest rank's
time, for the three modes of `global_var_threshold` and a baseline that all-gathers every score. A
second table gives the sketch's measured rank error against the exact threshold, and its proven bound.

    python tools/bench_threshold.py --worlds 2 4 8 --scores 10000 100000 1000000
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_eslm.eslm.distributed_threshold import (MODES, Collectives, TorchCollectives, ThresholdResult,
                                                      global_var_threshold)
from megatron_eslm.eslm.threshold import var_index

BASELINE = "all-gather"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--scores", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="valid scores per rank")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--sketch-size", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=20,
                        help="timed calls per method at 1e4 scores per rank; fewer for larger sizes")
    return parser.parse_args(argv)


def all_gather_threshold(comm: Collectives, scores: torch.Tensor, alpha: float) -> float:
    """Baseline: gather every score (padded to the largest rank's count) and select on every rank."""
    counts = comm.all_gather(torch.tensor([scores.numel()]))
    width = int(counts.max())
    padded = torch.nn.functional.pad(scores, (0, width - scores.numel()), value=float("inf"))
    gathered = comm.all_gather(padded).flatten()
    threshold = gathered.kthvalue(var_index(alpha, int(counts.sum())) + 1).values
    comm.all_reduce((scores >= threshold).sum())  # the kept count, as the modes return it
    return float(threshold)


def time_call(method: str, scores: torch.Tensor,
              args: argparse.Namespace) -> tuple[float, int, ThresholdResult | None]:
    """(slowest rank's seconds, this rank's bytes, result) of one call, all ranks starting together."""
    valid = torch.ones_like(scores, dtype=torch.bool)
    dist.barrier()
    start = time.perf_counter()
    if method == BASELINE:
        comm = TorchCollectives(dist.group.WORLD)
        all_gather_threshold(comm, scores, args.alpha)
        result, sent = None, comm.bytes_sent
    else:
        result = global_var_threshold(scores, valid, args.alpha, method, args.sketch_size,
                                      group=dist.group.WORLD)
        sent = result.bytes_sent
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed), sent, result


def rank_main(rank: int, world: int, args: argparse.Namespace, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    torch.set_num_threads(1)
    rows = []
    for per_rank in args.scores:
        # Distinct scores (a shuffled range, split over the ranks), so kept counts measure rank error.
        total = per_rank * world
        shuffled = torch.randperm(total, generator=torch.Generator().manual_seed(0))
        scores = shuffled[rank::world].float() / total
        calls = max(3, args.calls * 10_000 // per_rank)
        kept = {}
        for method in (*MODES, BASELINE):
            time_call(method, scores, args)  # warm-up
            timed = [time_call(method, scores, args) for _ in range(calls)]
            _, sent, result = timed[-1]
            rows.append({"world": world, "per_rank": per_rank, "method": method, "bytes": sent,
                         "calls": calls, "ms": 1e3 * statistics.median(seconds for seconds, _, _ in timed)})
            if result is not None:
                kept[method] = (result.kept_global, result.rank_error_bound)
        rows.append({"world": world, "per_rank": per_rank, "method": "error", "n": total,
                     "error": kept["sketch"][0] - kept["exact"][0], "bound": kept["sketch"][1]})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def markdown(rows: list[dict]) -> str:
    timing = ["| ranks | scores/rank | method | bytes/rank/call | median ms/call | calls |",
              "|---:|---:|---|---:|---:|---:|"]
    errors = ["| ranks | scores/rank | n | sketch kept - exact kept | proven bound | bound / n |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["method"] == "error":
            errors.append(f"| {r['world']} | {r['per_rank']:.0e} | {r['n']} | {r['error']} | {r['bound']} | "
                          f"{r['bound'] / r['n']:.4%} |")
        else:
            timing.append(f"| {r['world']} | {r['per_rank']:.0e} | {r['method']} | {r['bytes']} | "
                          f"{r['ms']:.2f} | {r['calls']} |")
    return "\n".join(timing) + "\n\n" + "\n".join(errors)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            out = f"{tmp}/world{world}.json"
            mp.spawn(rank_main, args=(world, args, out), nprocs=world, join=True)
            rows += json.loads(Path(out).read_text())
    print(markdown(rows))


if __name__ == "__main__":
    main()
