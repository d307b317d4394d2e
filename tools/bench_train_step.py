#!/usr/bin/env python
"""End-to-end training-step time: dense vs ESLM (and the random control), measured in one run.

Each variant runs the real step (`megatron_eslm.training.step`: forward, selective LM head, backward,
AdamW) on the same random token batches, from the same initial weights; the table gives the median
step time and its ratio to dense, the executed-FLOPs ratio from the FLOPs accounting, and the host syncs
of one step (`megatron_eslm/host_syncs.py`: what would make the host wait for a GPU), counted in an extra,
untimed step.

    python tools/bench_train_step.py --num-layers 4 --hidden-size 256 --vocab-size 8192 --seq-length 256

The GPU run of the GPT-2 124M recipe (examples/gpt2_124m: 12 layers, hidden 768, 12 heads, seq 1024,
SentencePiece vocabulary 32768, micro-batch 16), in bf16 autocast as the trainer runs it, with the LM head
the trainer would pick (auto: the Triton kernels on CUDA); explicit flags override the preset's values:

    python tools/bench_train_step.py --preset gpt2-124m --bf16 --lm-head-impl auto
    python tools/bench_train_step.py --preset gpt2-124m --bf16 --lm-head-impl auto --vocab-size 50304  # GPT-2 BPE
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time

import torch

from megatron_eslm.config import ModelConfig, OptimizerConfig, finalize_model
from megatron_eslm.errors import exit_on_user_error
from megatron_eslm.eslm.policies import ESLMPolicy, RandomPolicy
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.model.lm_head import resolve_impl
from megatron_eslm.host_syncs import HostSyncCounter
from megatron_eslm.training.optimizer import build_optimizer
from megatron_eslm.training.step import forward_backward, optimizer_step, reduce_step_stats


# The shape flags' values without --preset, and each preset's (flags given on the command line win).
DEFAULTS = {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "seq_length": 256, "vocab_size": 8192,
            "micro_batch_size": 8}
PRESETS = {
    # examples/gpt2_124m; --vocab-size 50304 for GPT-2's BPE padded to a multiple of 128
    "gpt2-124m": {"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "seq_length": 1024,
                  "vocab_size": 32768, "micro_batch_size": 16},
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="model shape and micro-batch of a recipe: " + "; ".join(
                       f"{name}: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in values.items())
                       for name, values in PRESETS.items()))
    for name, default in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {default}, or the preset's")
    p.add_argument("--lm-head-impl", choices=["auto", "torch", "triton"], default="torch",
                   help="LM-head kernels, passed to forward_backward (default torch; auto: triton on CUDA "
                        "when triton is installed, else torch, as the trainer's --lm-head-impl)")
    p.add_argument("--bf16", action="store_true",
                   help="run the forward under bf16 autocast, as the trainer's --bf16 (weights stay fp32)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--thresholds", nargs="+", default=["sketch-exact"], choices=["sketch", "sketch-exact", "exact"],
                   help="ESLM threshold modes (one ESLM row per alpha and mode)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warmup steps)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, default))
    return args


def time_variant(model: GPTModel, policy, batches: list[dict], device: torch.device, lm_head_impl: str = "torch",
                 bf16: bool = False, warmup: int = 2):
    def autocast():  # the trainer's: the forward only, backward outside it
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step(batch: dict):
        optimizer.zero_grad(set_to_none=True)
        stats = forward_backward(model, policy, iter([batch]), 1, device, lm_head_impl=lm_head_impl,
                                 autocast=autocast)
        optimizer_step(model, optimizer, 1e-4, 1.0)
        return stats

    model = copy.deepcopy(model)
    optimizer = build_optimizer(model, OptimizerConfig())
    times, kept = [], []
    for i, batch in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        stats = step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - tic)
            stats = reduce_step_stats(stats)  # after the clock stops: the trainer reads once per log interval
            kept.append(stats.kept / stats.valid)
    with HostSyncCounter() as syncs:
        step(batches[-1])
    return statistics.median(times), statistics.mean(kept), stats, syncs.total


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lm_head_impl = resolve_impl(args.lm_head_impl, device)
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
        for mode in args.thresholds:
            variants.append((f"eslm a={alpha} {mode}", ESLMPolicy(alpha, "loss", mode)))
        variants.append((f"random a={alpha}", RandomPolicy(ESLMPolicy(alpha, "loss", args.thresholds[0]))))
    print(f"device {device}, threads {args.threads}, layers {args.num_layers}, hidden {args.hidden_size}, "
          f"seq {args.seq_length}, vocab {args.vocab_size}, micro-batch {args.micro_batch_size}, "
          f"lm head {lm_head_impl}, {'bf16 autocast' if args.bf16 else 'fp32'}, median of {args.steps} steps\n")
    print("| variant | kept | step ms | time vs dense | executed FLOPs vs dense | host syncs per step |")
    print("|---|---:|---:|---:|---:|---:|")
    dense_ms = None
    for name, policy in variants:
        seconds, kept, stats, syncs = time_variant(model, policy, batches, device, lm_head_impl, args.bf16)
        ms = 1000 * seconds
        dense_ms = dense_ms or ms
        flops = stats.flops(cfg, args.vocab_size)
        print(f"| {name} | {kept:.3f} | {ms:.1f} | {ms / dense_ms:.3f} | {flops.executed / flops.dense:.3f} | "
              f"{syncs} |")


if __name__ == "__main__":
    main()
