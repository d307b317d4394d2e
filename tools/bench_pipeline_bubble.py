#!/usr/bin/env python
"""The pipeline bubble, measured: plain 1F1B against the interleaved schedule at PP stages (default 4) with
8 micro-batches, on PP gloo ranks of this machine, and the scaling model's prediction of their ratio.

    python tools/bench_pipeline_bubble.py [--pp 4] [--layers 8] [--hidden 128] [--steps 4]

Each run trains a small model (NullTokenizer, random tokens) at --timing-log-level 2 and reads the first
stage's `time_pp_comm_ms`: the time its sends and receives wait for the neighbour stages (the bubble, and
the transfers), per iteration, over the iterations after the first. The interleaved run uses one layer
per virtual stage (VP = layers / PP). Printed: both idle times, their ratio, and the ratio
tools/scaling_model.py predicts for the same points (its bubble + PP communication terms, its compute rate
taken from the plain run's forward_backward time, which the timers keep apart from pp_comm). On a CPU the
ranks share the cores: the wait of a rank then holds its neighbours' compute whenever there are more ranks
than cores, so measure with a core per rank (--pp 2 on 2 cores), on an otherwise idle machine, with
OMP_NUM_THREADS=1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_comm import write_dataset  # noqa: E402
from scaling_model import NETWORKS, Calibration, Point, predict, stage_flops  # noqa: E402

MICRO_BATCHES = 8
VOCAB = 256


def run_flags(args: argparse.Namespace, prefix: str, metrics: str, interleaved: bool) -> list[str]:
    return ["--num-layers", str(args.layers), "--hidden-size", str(args.hidden), "--num-attention-heads", "4",
            "--seq-length", str(args.seq_length), "--micro-batch-size", "1", "--global-batch-size",
            str(MICRO_BATCHES), "--train-iters", str(args.steps), "--lr", "1e-4", "--data-path", prefix,
            "--split", "100,0,0", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1),
            "--make-vocab-size-divisible-by", str(VOCAB), "--eval-iters", "0", "--log-interval", "1",
            "--num-workers", "0", "--hidden-dropout", "0", "--attention-dropout", "0", "--timing-log-level", "2",
            "--pipeline-model-parallel-size", str(args.pp), "--metrics-file", metrics,
            *(["--num-layers-per-virtual-pipeline-stage", "1"] if interleaved else [])]


def _rank(rank: int, world: int, tmp: str, argvs: list[list[str]]) -> None:
    from megatron_eslm.config import parse_args
    from megatron_eslm.training.trainer import Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(1)
    for argv in argvs:
        trainer = Trainer(parse_args(argv), log=lambda *a: None)
        trainer.train()
        trainer.close()
    dist.destroy_process_group()


def timings(metrics: str) -> dict[str, float]:
    """Mean per-iteration pp_comm and forward_backward of the training records after the first."""
    records = [json.loads(line) for line in open(metrics)]
    records = [r for r in records if r.get("split") != "valid" and r["iteration"] > 1]
    return {key: sum(r[f"time_{key}_ms"] for r in records) / len(records) for key in ("pp_comm", "forward_backward")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=4, help="pipeline stages, one gloo rank each")
    p.add_argument("--layers", type=int, default=8, help="a multiple of --pp; VP = layers / PP")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args(argv)
    from megatron_eslm.config import parse_args

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "tokens")
        write_dataset(prefix, VOCAB - 1)
        argvs = [run_flags(args, prefix, os.path.join(tmp, f"{name}.jsonl"), name == "interleaved")
                 for name in ("plain", "interleaved")]
        mp.spawn(_rank, args=(args.pp, tmp, argvs), nprocs=args.pp, join=True)
        plain, interleaved = (timings(os.path.join(tmp, f"{name}.jsonl")) for name in ("plain", "interleaved"))
    network = NETWORKS["cpu-gloo"]
    points = [Point.from_config(parse_args(argv), args.pp, VOCAB - 1) for argv in argvs]
    compute_ms = plain["forward_backward"]  # the first stage's, per iteration (pp_comm is timed apart)
    calibration = Calibration(compute_ms / 1e3 / stage_flops(points[0], 0), 0.0, 0.0, 0.0, ("plain run",))
    modelled = [predict(point, calibration, network) for point in points]
    idle = [result["bubble_ms"] + result["pp_comm_ms"] for result in modelled]
    measured = interleaved["pp_comm"] / plain["pp_comm"]
    print(f"PP{args.pp}, {MICRO_BATCHES} micro-batches, {args.layers} layers, hidden {args.hidden}, seq {args.seq_length}; "
          "first stage, ms per iteration")
    print(f"plain 1F1B        pp_comm {plain['pp_comm']:.1f} of forward_backward {plain['forward_backward']:.1f}")
    print(f"interleaved VP{args.layers // args.pp}  pp_comm {interleaved['pp_comm']:.1f} of forward_backward "
          f"{interleaved['forward_backward']:.1f}")
    print(f"idle ratio interleaved / plain: measured {measured:.2f}, scaling model {idle[1] / idle[0]:.2f}")


if __name__ == "__main__":
    main()
