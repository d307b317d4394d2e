"""Benchmark the LM head: eager full-logits cross-entropy vs our fused dense and selective paths.

Prints a markdown table of forward+backward median time and peak extra memory per variant. A step is
``--micro-batches`` forward+backward passes accumulating into the weight's ``.grad``, from no gradient;
``--accumulate-into-grad`` makes our heads add the weight gradient in place (the trainer's setting without
DeepSpeed) rather than return it to autograd. With a 16-bit ``--dtype`` the hidden states are 16-bit and the
weight stays float32, as under ``--bf16`` autocast; our heads cast it once per step (``weight_cast_cache``),
eager dense casts it in every forward, as autocast does.

Which tool does what: this one times the PyTorch heads with perf_counter on any device (the CPU table of
docs/benchmarks.md); the GPU benchmark that issue 6 calls `tools/bench_lm_head.py` -- the Triton kernels
against eager, torch.compile and Liger-Kernel, timed with triton.testing.do_bench -- is
tools/bench_lm_head_triton.py.

* Memory: each variant runs one step in its own subprocess, because CPU peak memory (ru_maxrss) never
  goes down; the peak extra is ru_maxrss after the step minus ru_maxrss once the inputs exist
  (torch.cuda.max_memory_allocated on CUDA).
* Time: all variants share one process and are timed round-robin (A B C .. A B C ..), so load from
  other processes on a shared machine hits every variant alike and the ratios stay meaningful.
* Before/after a change: run the same command with PYTHONPATH pointing at the other checkout's package;
  the eager baseline is the same code in both runs, so the ratios to it compare across runs.

    python tools/bench_lm_head.py --tokens 4096 --hidden 512 --vocab 16384
    python tools/bench_lm_head.py --tokens 512 --hidden 768 --vocab 32768 --micro-batches 2 --accumulate-into-grad
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from megatron_eslm.model import lm_head
from megatron_eslm.model.lm_head import Selection, Selector, TokenScores, selective_lm_head_loss

VARIANTS = [("eager dense", 1.0), ("fused dense", 1.0)] + [("selective", keep) for keep in (1.0, 0.5, 0.3, 0.1)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant, after one warmup")
    parser.add_argument("--micro-batches", type=int, default=1, help="forward+backward passes per step")
    parser.add_argument("--accumulate-into-grad", action="store_true",
                        help="our heads add the weight gradient in place into .grad")
    parser.add_argument("--memory-worker", type=int, metavar="VARIANT_INDEX", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def top_fraction(keep: float) -> Selector:
    """A selector keeping the `keep` fraction of valid tokens with the highest loss."""

    def select(scores: TokenScores) -> Selection:
        count = round(keep * int(scores.valid.sum()))
        ranked = scores.loss.masked_fill(~scores.valid, float("-inf"))
        kept = torch.zeros_like(scores.valid)
        kept[ranked.topk(count).indices] = True
        return Selection(kept=kept, normalizer=float(count))

    return select


def make_inputs(args: argparse.Namespace) -> Inputs:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, generator=gen)
    # In place: a temporary would raise the baseline's peak RSS and hide part of a variant's peak.
    weight = torch.randn(args.vocab, args.hidden, device=device, generator=gen).mul_(0.02)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=gen)
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def make_step(variant: str, keep: float, inputs: Inputs, args: argparse.Namespace) -> Callable[[], None]:
    """One step of the named variant: ``--micro-batches`` forward+backward passes from empty gradients."""
    hidden, weight, labels = inputs
    # Both only when they exist and are asked for, so that the script also runs against a checkout from
    # before them (PYTHONPATH): the before/after comparison of docs/benchmarks.md.
    cast_cache = getattr(lm_head, "weight_cast_cache", contextlib.nullcontext)
    in_place = {"accumulate_into_grad": True} if args.accumulate_into_grad else {}
    if variant == "eager dense":
        def loss() -> torch.Tensor:
            return F.cross_entropy(F.linear(hidden, weight.to(hidden.dtype)).float(), labels)
    else:
        select = None if variant == "fused dense" else top_fraction(keep)

        def loss() -> torch.Tensor:
            return selective_lm_head_loss(hidden, weight, labels, select, **in_place).loss

    def step() -> None:
        hidden.grad = weight.grad = None
        with cast_cache():
            for _ in range(args.micro_batches):
                loss().backward()
        if hidden.device.type == "cuda":
            torch.cuda.synchronize(hidden.device)

    return step


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_memory(args: argparse.Namespace) -> float:
    """Peak memory (MiB) one step of the variant adds on top of its inputs; run in a fresh process."""
    inputs = make_inputs(args)
    device = inputs[0].device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    baseline = peak_bytes(device)
    make_step(*VARIANTS[args.memory_worker], inputs, args)()
    return (peak_bytes(device) - baseline) / 2**20


def spawn_memory_worker(index: int, argv: list[str]) -> float:
    command = [sys.executable, os.path.abspath(__file__), *argv, "--memory-worker", str(index)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def measure_times(args: argparse.Namespace) -> list[float]:
    """Median step time (ms) of every variant, timed round-robin after one warmup step each."""
    inputs = make_inputs(args)
    steps = [make_step(name, keep, inputs, args) for name, keep in VARIANTS]
    times: list[list[float]] = [[] for _ in steps]
    for repeat in range(1 + args.repeats):
        for step, samples in zip(steps, times):
            start = time.perf_counter()
            step()
            if repeat:
                samples.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(samples) for samples in times]


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker is not None:
        print(json.dumps(measure_memory(args)))
        return
    load_before = os.getloadavg()[0]
    peaks = [spawn_memory_worker(index, argv) for index in range(len(VARIANTS))]
    times = measure_times(args)
    print(f"tokens={args.tokens} hidden={args.hidden} vocab={args.vocab} dtype={args.dtype} device={args.device} "
          f"threads={args.threads} repeats={args.repeats} micro-batches={args.micro_batches} "
          f"accumulate-into-grad={args.accumulate_into_grad} "
          f"load average before/after={load_before:.2f}/{os.getloadavg()[0]:.2f}\n")
    print("| variant | keep | time ms | ratio | peak extra MiB | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for (name, keep), time_ms, peak in zip(VARIANTS, times, peaks):
        print(f"| {name} | {keep:.1f} | {time_ms:.1f} | {time_ms / times[0]:.2f}x "
              f"| {peak:.1f} | {peak / peaks[0]:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1:])
