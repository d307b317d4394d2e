#!/usr/bin/env python
"""End-to-end training-step time: dense vs ESLM (and the random control), measured in one run.

Each variant runs the real step (`megatron_eslm.training.step`: forward, selective LM head, backward,
AdamW) on the same random token batches, from the same initial weights; the table gives the median
step time and its ratio to dense, plus the executed-FLOPs ratio from the FLOPs accounting.

    python tools/bench_train_step.py --num-layers 4 --hidden-size 256 --vocab-size 8192 --seq-length 256
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from megatron_eslm.config import ModelConfig, OptimizerConfig, finalize_model
from megatron_eslm.eslm.policies import ESLMPolicy, RandomPolicy
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.training.optimizer import build_optimizer
from megatron_eslm.training.step import forward_backward, optimizer_step


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warmup steps)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def time_variant(model: GPTModel, policy, batches: list[dict], device: torch.device, warmup: int = 2):
    model = copy.deepcopy(model)
    optimizer = build_optimizer(model, OptimizerConfig())
    times, kept = [], []
    for i, batch in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        stats = forward_backward(model, policy, iter([batch]), 1, device)
        optimizer_step(model, optimizer, 1e-4, 1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - tic)
            kept.append(stats.kept / stats.valid)
    return statistics.median(times), statistics.mean(kept), stats


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = finalize_model(ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                                     num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
                                     hidden_dropout=0.0, attention_dropout=0.0))
    torch.manual_seed(0)
    model = GPTModel(cfg, args.vocab_size).to(device)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps + 2):
        seq = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length + 1), generator=g)
        batches.append({"tokens": seq[:, :-1], "labels": seq[:, 1:]})
    variants = [("dense", None)]
    for alpha in args.alphas:
        variants.append((f"eslm a={alpha}", ESLMPolicy(alpha, "loss")))
        variants.append((f"random a={alpha}", RandomPolicy(ESLMPolicy(alpha, "loss"))))
    print(f"device {device}, threads {args.threads}, layers {args.num_layers}, hidden {args.hidden_size}, "
          f"seq {args.seq_length}, vocab {args.vocab_size}, micro-batch {args.micro_batch_size}, "
          f"median of {args.steps} steps\n")
    print("| variant | kept | step ms | time vs dense | executed FLOPs vs dense |")
    print("|---|---:|---:|---:|---:|")
    dense_ms = None
    for name, policy in variants:
        seconds, kept, stats = time_variant(model, policy, batches, device)
        ms = 1000 * seconds
        dense_ms = dense_ms or ms
        flops = stats.flops(cfg, args.vocab_size)
        print(f"| {name} | {kept:.3f} | {ms:.1f} | {ms / dense_ms:.3f} | {flops.executed / flops.dense:.3f} |")


if __name__ == "__main__":
    main()
