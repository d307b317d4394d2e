#!/usr/bin/env python
"""Would skipping dropped tokens' rows in the final norm's and the last MLP's backward pay? (issue 6)

With ESLM the LM head's gradient w.r.t. the final hidden states is exactly zero on dropped rows. What sits
between the last attention and the head -- the last block's MLP sub-block (post-attention LayerNorm,
dense_h_to_4h, GELU, dense_4h_to_h, residual add) and the final LayerNorm -- maps each row on its own, so
its weight gradients and input gradients from dropped rows are exactly zero as well: its backward may run
on the kept rows only. The forward still runs over all rows (every token is scored). The last block's
attention is not row-separable (kept queries send gradient to every key and value), so it stays dense.

This tool builds the real modules (a `TransformerBlock`'s `post_attention_layernorm` and `mlp` from
megatron_eslm.model.transformer and an `nn.LayerNorm` final norm, at TP 1, in eval mode so dropout is off)
and compares, on [tokens, hidden] activations:

  (a) dense:     the autograd backward of the tail over all rows, with an upstream gradient that is zero
                 on the dropped rows (what the model runs today);
  (b) kept rows: `RowSkipTail`, an autograd function whose forward runs the tail over all rows under
                 no_grad and saves only its input; its backward finds the rows whose upstream gradient is
                 non-zero, index_selects those input rows, recomputes the tail on them under enable_grad,
                 backpropagates, and index_adds the input gradient back into a zero [tokens, hidden] one.

Before timing, (a) and (b) are checked to give the same input and weight gradients in float64 (each
width, keep 1.0/0.5/0.3/0.1/0). Time is the median backward (torch.autograd.grad with retain_graph, so
the forward is not part of it and gradients never accumulate); the variants of one shape run
round-robin in one process, so load from other processes hits them alike. The last column is the share
of a whole GPT-2 124M training step's FLOPs (megatron_eslm.training.flops, selective LM head at that
keep ratio) that skipping the dropped rows of the last MLP's backward removes (8 h f FLOPs per dropped
token; norms are not counted, Megatron's convention).

    python tools/bench_row_skip.py                        # the docs/benchmarks.md table
    python tools/bench_row_skip.py --shapes 768x2048 --repeats 5
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
from torch import Tensor, nn

from megatron_eslm.config import ModelConfig, finalize_model
from megatron_eslm.model.gpt import init_generator
from megatron_eslm.model.transformer import TransformerBlock
from megatron_eslm.training.flops import micro_batch_flops

KEEPS = (1.0, 0.5, 0.3, 0.1)
GPT2_124M = ModelConfig(num_layers=12, hidden_size=768, num_attention_heads=12, ffn_hidden_size=3072,
                        seq_length=1024)
GPT2_124M_VOCABS = (32768, 50304)  # the recipe's SentencePiece vocabulary; GPT-2's padded BPE
GPT2_124M_MICRO_BATCH = 16


class Tail(nn.Module):
    """What lies between the last block's attention and the LM head: the last block's MLP sub-block
    (with its residual) and the final LayerNorm, built from the model's own modules."""

    def __init__(self, hidden: int, seed: int = 0):
        super().__init__()
        cfg = finalize_model(ModelConfig(hidden_size=hidden, num_attention_heads=max(1, hidden // 64),
                                         ffn_hidden_size=4 * hidden, hidden_dropout=0.0, attention_dropout=0.0))
        block = TransformerBlock(cfg, init_generator(seed, 1 + cfg.num_layers - 1))
        self.post_attention_layernorm = block.post_attention_layernorm
        self.mlp = block.mlp
        self.hidden_dropout = block.hidden_dropout
        self.final_layernorm = nn.LayerNorm(hidden, eps=cfg.norm_epsilon)
        self.ffn = cfg.ffn_hidden_size
        with torch.no_grad():  # non-trivial norms and biases, so every gradient is checked
            gen = torch.Generator().manual_seed(seed)
            for name, p in self.named_parameters():
                if "layernorm" in name or name.endswith("bias"):
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.hidden_dropout(self.mlp(self.post_attention_layernorm(x)))
        return self.final_layernorm(x)


class RowSkipTail(torch.autograd.Function):
    """tail(x) over all rows; the backward recomputes and backpropagates only the rows whose upstream
    gradient is non-zero (exact: a per-row map sends nothing back from a zero row)."""

    @staticmethod
    def forward(ctx, x: Tensor, tail: Tail, *params: Tensor) -> Tensor:
        ctx.tail = tail
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return tail(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, *params = ctx.saved_tensors
        rows = grad.ne(0).any(dim=-1).nonzero().squeeze(1)
        x_rows = x.index_select(0, rows).detach().requires_grad_(True)
        with torch.enable_grad():
            out = ctx.tail(x_rows)
        grad_x_rows, *grad_params = torch.autograd.grad(out, [x_rows, *params], grad.index_select(0, rows),
                                                        allow_unused=True)
        grad_x = torch.zeros_like(x).index_add_(0, rows, grad_x_rows)
        return (grad_x, None, *grad_params)


def row_skip(tail: Tail, x: Tensor) -> Tensor:
    return RowSkipTail.apply(x, tail, *tail.parameters())


def upstream_grad(tokens: int, hidden: int, keep: float, dtype: torch.dtype, seed: int) -> Tensor:
    """An LM-head-like gradient: random on `keep` of the rows (scattered, as a selection picks them),
    exactly zero on the others."""
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(tokens, hidden, generator=gen, dtype=dtype)
    kept = torch.zeros(tokens, dtype=torch.bool)
    kept[torch.randperm(tokens, generator=gen)[:round(keep * tokens)]] = True
    return grad * kept.unsqueeze(1).to(dtype)


def verify(hidden: int, tokens: int = 515) -> float:
    """(a) and (b) must agree in float64; returns the largest relative difference seen."""
    tail = Tail(hidden, seed=hidden).double()
    params = list(tail.parameters())
    x = torch.randn(tokens, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    worst = 0.0
    for keep in (*KEEPS, 0.0):
        grad = upstream_grad(tokens, hidden, keep, torch.float64, seed=2)
        dense = torch.autograd.grad(tail(x), [x, *params], grad)
        skipped = torch.autograd.grad(row_skip(tail, x), [x, *params], grad)
        for (name, _), a, b in zip([("input", x), *tail.named_parameters()], dense, skipped):
            scale = a.abs().max().item()
            diff = (a - b).abs().max().item()
            if not torch.allclose(a, b, rtol=1e-12, atol=1e-13 * max(scale, 1.0)):
                raise SystemExit(f"MISMATCH hidden {hidden} keep {keep} {name}: max |diff| {diff:.3e}")
            if scale:
                worst = max(worst, diff / scale)
    return worst


def time_shape(hidden: int, tokens: int, repeats: int, seed: int) -> dict[str, list[float]]:
    tail = Tail(hidden, seed=seed)
    params = list(tail.parameters())
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    grads = {keep: upstream_grad(tokens, hidden, keep, torch.float32, seed + 1) for keep in KEEPS}
    dense_out = tail(x)  # one forward each; the backward is repeated on the retained graph
    skip_out = row_skip(tail, x)

    def backward(out: Tensor, grad: Tensor) -> float:
        start = time.perf_counter()
        torch.autograd.grad(out, [x, *params], grad, retain_graph=True)
        return (time.perf_counter() - start) * 1e3

    backward(dense_out, grads[0.5])  # warmup: every variant once (allocations of each size, caches)
    for keep in KEEPS:
        backward(skip_out, grads[keep])
    times: dict[str, list[float]] = {"dense": [], **{f"kept {keep}": [] for keep in KEEPS}}
    for r in range(repeats):
        # The dense backward does the same work for every keep ratio (dense GEMMs over all rows); it is
        # timed once per round, with a different keep ratio's gradient each round.
        times["dense"].append(backward(dense_out, grads[KEEPS[r % len(KEEPS)]]))
        for keep in KEEPS:
            times[f"kept {keep}"].append(backward(skip_out, grads[keep]))
    return times


def step_flops_saved(keep: float, vocab: int) -> float:
    """% of a GPT-2 124M step's executed FLOPs (selective head at `keep`) removed by skipping the dropped
    rows of the last block's MLP backward: 2x its forward, 2 * (2 h f + 2 f h) per token."""
    cfg = GPT2_124M
    tokens = GPT2_124M_MICRO_BATCH * cfg.seq_length
    kept = round(keep * tokens)
    step = micro_batch_flops(cfg, vocab, tokens, tokens, kept, selective=True).executed
    mlp_backward_per_token = 2.0 * (4.0 * cfg.hidden_size * cfg.ffn_hidden_size)
    return 100.0 * mlp_backward_per_token * (tokens - kept) / step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["768x2048", "768x8192", "1024x4096", "2048x2048"],
                   help="HIDDENxTOKENS to time")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per shape, after one warmup")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]

    load = os.getloadavg()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()} {platform.processor() or ''}"
          f" {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, float32, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for hidden in sorted({h for h, _ in shapes}):
        worst = verify(hidden)
        print(f"# verified hidden {hidden}: input and weight grads of (a) and (b) agree in float64 at keep "
              f"{', '.join(map(str, (*KEEPS, 0.0)))} (max relative diff {worst:.1e})")

    saved = {keep: [step_flops_saved(keep, v) for v in GPT2_124M_VOCABS] for keep in KEEPS}
    bound = [step_flops_saved(0.0, v) for v in GPT2_124M_VOCABS]
    print(f"# step FLOPs saved: GPT-2 124M (12 layers, h 768, seq 1024), vocab {GPT2_124M_VOCABS[0]} / "
          f"{GPT2_124M_VOCABS[1]}; bound at keep 0: {bound[0]:.2f}% / {bound[1]:.2f}%")
    print()
    print("| hidden | tokens | keep | dense ms | kept-rows ms | ratio | step FLOPs saved % (V 32k / 50k) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for hidden, tokens in shapes:
        times = time_shape(hidden, tokens, args.repeats, args.seed)
        dense = statistics.median(times["dense"])
        for keep in KEEPS:
            kept = statistics.median(times[f"kept {keep}"])
            print(f"| {hidden} | {tokens} | {keep} | {dense:.1f} | {kept:.1f} | {kept / dense:.2f}x | "
                  f"{saved[keep][0]:.2f} / {saved[keep][1]:.2f} |", flush=True)
    load = os.getloadavg()
    print(f"\n# load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
