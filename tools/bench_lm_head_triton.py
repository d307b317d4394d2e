"""GPU benchmark of the LM head, forward+backward: full-logits baselines vs our torch and Triton heads.

For each (tokens, hidden, vocab) shape it measures the median time (triton.testing.do_bench) and the peak
memory above the inputs (torch.cuda.max_memory_allocated) of:

* eager PyTorch: ``F.cross_entropy(F.linear(h, w).float(), y)`` with full logits, and its torch.compile;
* the published fused linear + cross-entropy losses, each when its package imports: Liger-Kernel's
  LigerFusedLinearCrossEntropyLoss (``liger_kernel``) and Apple's Cut Cross-Entropy (``cut_cross_entropy``,
  arXiv 2411.09009) with impl ``cce`` (its default: the backward skips softmax entries below a threshold)
  and ``cce_exact`` (nothing skipped, float32 gradient sums; in the PyPI release 25.1.1, which has no
  ``cce_exact``, the row ``cce filter_eps=None``: nothing skipped). A machine without network installs them from wheels downloaded beforehand
  (docs/benchmarks.md; tools/device_check.sh installs ``wheels/*.whl``);
* our selective head (``selective_lm_head_loss``) with impl "torch" and "triton", keeping the top-loss
  fraction 1.0 (dense training: the fused single pass), 0.5, 0.3 and 0.1 of the tokens.

It also measures the bf16 (``--dtype``) matmul TFLOP/s of the shape's logits GEMM, the GEMM TFLOP/s each
variant achieves, and, per head, the time and TFLOP/s of pass 1 (scores, one GEMM over all rows) and pass 2
(backward over the kept rows: logits recompute + two gradient GEMMs). Prints markdown tables.

    python tools/bench_lm_head_triton.py            # --quick: two shapes
    python tools/bench_lm_head_triton.py --full     # tokens 8k-64k x hidden 768-4096 x vocab 32k-128k
    python tools/bench_lm_head_triton.py --shape 16384 2048 65536
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from bench_lm_head import top_fraction  # sibling script: the same top-loss selector as the CPU benchmark
from megatron_eslm.kernels import lm_head_torch, lm_head_triton
from megatron_eslm.model.lm_head import IMPLEMENTATIONS, selective_lm_head_loss

KEEP_FRACTIONS = (1.0, 0.5, 0.3, 0.1)
QUICK_SHAPES = [(8192, 2048, 32768), (32768, 4096, 131072)]
FULL_SHAPES = list(itertools.product((8192, 16384, 32768, 65536), (768, 2048, 4096), (32768, 65536, 131072)))
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HEADS = {"torch": lm_head_torch, "triton": lm_head_triton}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the two QUICK_SHAPES (default)")
    which.add_argument("--full", action="store_true", help="every tokens x hidden x vocab combination")
    which.add_argument("--shape", nargs=3, type=int, action="append", metavar=("TOKENS", "HIDDEN", "VOCAB"),
                       help="benchmark this shape (repeatable)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per variant")
    return parser.parse_args(argv)


@dataclass
class Result:
    time_ms: float | None  # None: out of memory
    peak_gib: float | None
    gemm_flops: float  # GEMM FLOPs the variant executes per step


def logits_flops(rows: int, hidden: int, vocab: int) -> float:
    return 2.0 * rows * hidden * vocab


def measure(step: Callable[[], object], leaves: list[torch.Tensor], rep_ms: int) -> tuple[float, float]:
    """(median ms, peak GiB above what was allocated before) of ``step``; gradients are cleared each run."""
    import triton.testing

    step()  # compile / autotune first: tuning clones buffers that a training step never holds
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30
    time_ms = triton.testing.do_bench(step, rep=rep_ms, grad_to_none=leaves, return_mode="median")
    return time_ms, peak


def guarded(step: Callable[[], object], leaves: list[torch.Tensor], rep_ms: int, flops: float) -> Result:
    """measure() that reports an out-of-memory variant instead of aborting the whole benchmark."""
    try:
        return Result(*measure(step, leaves, rep_ms), flops)
    except torch.cuda.OutOfMemoryError:
        return Result(None, None, flops)
    finally:
        for leaf in leaves:
            leaf.grad = None
        torch.cuda.empty_cache()


def baselines(hidden, weight, labels, compile_: bool) -> dict[str, Callable[[], None]]:
    """Full-logits forward+backward steps that do not depend on a keep fraction."""

    def eager(h, w, y):
        return F.cross_entropy(F.linear(h, w).float(), y)

    steps = {"eager": lambda: eager(hidden, weight, labels).backward()}
    if compile_:
        compiled = torch.compile(eager, dynamic=False)
        steps["torch.compile"] = lambda: compiled(hidden, weight, labels).backward()
    return {**steps, **published_fused(hidden, weight, labels)}


def published_fused(hidden, weight, labels) -> dict[str, Callable[[], None]]:
    """Liger-Kernel's and Cut Cross-Entropy's fused linear + cross-entropy steps (mean loss), for each
    package that imports."""
    steps = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        pass
    else:
        liger = LigerFusedLinearCrossEntropyLoss()
        steps["liger fused CE"] = lambda: liger(weight, hidden, labels).backward()
    try:
        from cut_cross_entropy import LinearCrossEntropyImpl, linear_cross_entropy
    except ImportError:
        return steps
    variants = {"cce": dict(impl="cce")}
    if hasattr(LinearCrossEntropyImpl, "CCE_EXACT"):  # its GitHub source; the PyPI release 25.1.1 lacks it
        variants["cce_exact"] = dict(impl="cce_exact")
    else:  # 25.1.1's exact gradient: no filtering (its float32 accumulation options came later)
        variants["cce filter_eps=None"] = dict(impl="cce", filter_eps=None)
    for name, options in variants.items():
        steps[name] = lambda options=options: linear_cross_entropy(hidden, weight, labels, **options).backward()
    return steps


def kept_count(labels: torch.Tensor, keep: float) -> int:
    return round(keep * labels.numel())


def head_step(hidden, weight, labels, impl: str, keep: float) -> Callable[[], None]:
    select = None if keep == 1.0 else top_fraction(keep)
    return lambda: selective_lm_head_loss(hidden, weight, labels, select, impl=impl).loss.backward()


def head_flops(rows: int, kept: int, hidden: int, vocab: int) -> float:
    """Scores over all rows + 3 GEMMs over kept rows; the dense path (every row kept) fuses the recompute
    away."""
    if kept == rows:
        return 3 * logits_flops(rows, hidden, vocab)
    return logits_flops(rows, hidden, vocab) + 3 * logits_flops(kept, hidden, vocab)


def phase_times(impl: str, hidden, weight, labels, keep: float, rep_ms: int) -> tuple[float, float]:
    """(pass 1 ms, pass 2 ms) of a head's kernels called directly."""
    import triton.testing

    module = HEADS[impl]
    loss, lse, _ = module.lm_head_scores(hidden, weight, labels)
    rows = loss.topk(kept_count(labels, keep)).indices.sort().values
    first = triton.testing.do_bench(lambda: module.lm_head_scores(hidden, weight, labels), rep=rep_ms,
                                    return_mode="median")
    second = triton.testing.do_bench(lambda: module.lm_head_backward_rows(hidden, weight, labels, rows, lse, 1.0),
                                     rep=rep_ms, return_mode="median")
    return first, second


def tflops(flops: float, time_ms: float | None) -> str:
    return "-" if time_ms is None else f"{flops / time_ms / 1e9:.0f}"


def ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}x"


def bench_shape(shape: tuple[int, int, int], dtype: torch.dtype, args: argparse.Namespace) -> None:
    import triton.testing

    tokens, hidden_size, vocab = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device="cuda", dtype=dtype, generator=gen) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    leaves = [hidden, weight]
    full = logits_flops(tokens, hidden_size, vocab)
    matmul_ms = triton.testing.do_bench(lambda: hidden.detach() @ weight.detach().t(), rep=args.rep_ms,
                                        return_mode="median")
    results: list[tuple[str, str, Result]] = []
    for name, step in baselines(hidden, weight, labels, not args.no_compile).items():
        results.append((name, "all", guarded(step, leaves, args.rep_ms, 3 * full)))
    phases = []
    for impl, keep in itertools.product(HEADS, KEEP_FRACTIONS):
        kept = kept_count(labels, keep)
        step = head_step(hidden, weight, labels, impl, keep)
        results.append((f"ours {impl}", f"{keep:.1f}",
                        guarded(step, leaves, args.rep_ms, head_flops(tokens, kept, hidden_size, vocab))))
        phases.append((impl, keep, kept, phase_times(impl, hidden.detach(), weight.detach(), labels, keep,
                                                     args.rep_ms)))

    eager = results[0][2]
    print(f"\n### tokens={tokens} hidden={hidden_size} vocab={vocab} {dtype}: logits matmul "
          f"{matmul_ms:.2f} ms = {tflops(full, matmul_ms)} TFLOP/s\n")
    print("| variant | keep | ms | vs eager | peak GiB | vs eager | GEMM TFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, keep, r in results:
        ms = "OOM" if r.time_ms is None else f"{r.time_ms:.2f}"
        peak = "-" if r.peak_gib is None else f"{r.peak_gib:.2f}"
        print(f"| {name} | {keep} | {ms} | {ratio(r.time_ms, eager.time_ms)} | {peak} "
              f"| {ratio(r.peak_gib, eager.peak_gib)} | {tflops(r.gemm_flops, r.time_ms)} |")
    print("\n| head | keep | pass 1 ms | pass 1 TFLOP/s | pass 2 ms | pass 2 TFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for impl, keep, kept, (first, second) in phases:
        print(f"| {impl} | {keep:.1f} | {first:.2f} | {tflops(full, first)} | {second:.2f} "
              f"| {tflops(3 * logits_flops(kept, hidden_size, vocab), second)} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() or not lm_head_triton.is_available():
        print("bench_lm_head_triton needs a CUDA GPU and triton; nothing to benchmark here.")
        return 0
    IMPLEMENTATIONS.setdefault("triton", lm_head_triton)  # until lm_head.py registers it
    shapes = FULL_SHAPES if args.full else [tuple(s) for s in args.shape] if args.shape else QUICK_SHAPES
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for shape in shapes:
        bench_shape(shape, DTYPES[args.dtype], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
