#!/usr/bin/env python
"""End-to-end training-step time: dense vs ESLM (and the random control), the optimizer implementations
and activation recompute, all measured in one run against its dense row.

Each variant runs the real step (`megatron_eslm.training.step`: forward, selective LM head, backward,
AdamW) on the same random token batches, from the same initial weights. The rows:

  dense                          the baseline: --optimizer-impl auto, no recompute
  eslm a=ALPHA MODE              ESLM, one row per --alphas x --thresholds (a=0.7 keeps 0.3 of the tokens)
  random a=ALPHA                 the control: as many tokens as ESLM keeps, chosen at random
  eslm sequence a=0.5            --eslm-granularity sequence at keep 0.5 (with any --alphas): the micro-batch is
                                 the candidates, scored by the student without autograd as two halves; the
                                 kept half trains as one micro-batch (`training/step.py`, select_sequences)
  random sequence a=0.5          its control: half the sequences drawn at random, nothing scored
  dense, optimizer IMPL          --optimizer-impls: AdamW fused / foreach / loop (`training/optimizer.py`)
  dense, recompute KIND          --recompute: selective (the attention core), full (uniform, 1 layer a chunk)
  dense, fp8 FORMAT              --fp8-format hybrid / e4m3: the blocks' linears in FP8 through torchao
                                 (`tensor_parallel/fp8.py`; needs --bf16, a GPU of capability 8.9+, torchao)
  dense, compiled / eslm a=ALPHA MODE, compiled
                                 --compile: the dense row and the first ESLM row with each layer compiled as
                                 the trainer's --compile does (`megatron_eslm/compiled_regions.py`); their 2
                                 warmup steps compile, the timed steps do not

Columns: the median step time and its ratio to dense; the optimizer step alone (clip + AdamW) and its
ratio; the executed FLOPs (`training/flops.py`: what ran, a recomputed forward included, so under
recompute the MFU column is the hardware FLOPs utilisation; dense FLOPs exclude it) against dense;
TFLOP/s per device = executed FLOPs / step time, and MFU against the device's dense bf16 peak
(`training/throughput.py`; --peak-tflops for a device it does not know, e.g. a CPU); the peak of
torch.cuda.max_memory_allocated over the variant (CUDA only; it includes the untouched copy of the
initial weights every variant starts from); and the host syncs of one step (`megatron_eslm/host_syncs.py`:
what would make the host wait for a GPU), counted in an extra, untimed step.

    python tools/bench_train_step.py --num-layers 4 --hidden-size 256 --vocab-size 8192 --seq-length 256

Presets set a recipe's model and micro-batch (flags given on the command line win), for a GPU run in
bf16 autocast as the trainer runs it, with the LM head the trainer would pick (auto: Triton on CUDA):

    # examples/gpt2_124m: 12 layers, hidden 768, 12 heads, seq 1024, SentencePiece vocabulary 32768, mb 16
    python tools/bench_train_step.py --preset gpt2-124m --bf16 --lm-head-impl auto
    python tools/bench_train_step.py --preset gpt2-124m --bf16 --lm-head-impl auto --vocab-size 50304  # GPT-2 BPE
    # examples/llama_1b: 16 layers, hidden 2048, 32 heads in 8 query groups, SwiGLU 8192, RoPE, RMSNorm,
    # untied head, no biases, seq 4096, vocabulary 32000, micro-batch 4 (tools/estimate_memory.py --world-size 1:
    # 42.3 GiB, fp32 weights, gradients and AdamW states and bf16 activations; here 4.1 GiB more for the
    # spare copy of the initial weights)
    python tools/bench_train_step.py --preset llama-1b --bf16 --lm-head-impl auto --alphas 0.7
    # FP8 against bf16 at the Llama-1B shape, dense rows only
    python tools/bench_train_step.py --preset llama-1b --bf16 --lm-head-impl auto --alphas --optimizer-impls \
        --recompute --fp8-format hybrid e4m3
    python tools/bench_train_step.py --preset gpt2-124m --bf16 --lm-head-impl auto --alphas 0.7 --compile \
        --optimizer-impls --recompute   # dense and ESLM, eager and compiled
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import statistics
import time
from typing import Callable

import torch

from megatron_eslm.compiled_regions import compile_layers
from megatron_eslm.config import ModelConfig, OptimizerConfig, finalize_model
from megatron_eslm.config.training import FP8_FORMATS
from megatron_eslm.errors import UserError, exit_on_user_error
from megatron_eslm.eslm.policies import ESLMPolicy, Policy, RandomPolicy
from megatron_eslm.eslm.sequence import SequencePolicy
from megatron_eslm.host_syncs import HostSyncCounter
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.model.lm_head import resolve_impl
from megatron_eslm.tensor_parallel.fp8 import convert_to_fp8
from megatron_eslm.training.recompute import recompute_name
from megatron_eslm.training.optimizer import build_optimizer
from megatron_eslm.training.step import (StepStats, forward_backward, optimizer_step, reduce_step_stats,
                                         select_sequences)
from megatron_eslm.training.throughput import max_memory_allocated, mfu, peak_tflops, tflops_per_gpu

# The size flags' values without --preset (None: derived from the others, as the trainer derives it).
DEFAULTS = {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "num_query_groups": None,
            "ffn_hidden_size": None, "seq_length": 256, "vocab_size": 8192, "micro_batch_size": 8}
# The Llama family's options (ModelConfig fields), as examples/llama_1b/pretrain.json sets them.
LLAMA = {"position_embedding_type": "rope", "normalization": "RMSNorm", "swiglu": True, "group_query_attention": True,
         "untie_embeddings_and_output_weights": True, "disable_bias_linear": True}
# A recipe's sizes (DEFAULTS' keys) and model options; tests/test_bench_tools.py checks them against the recipe.
PRESETS = {
    # examples/gpt2_124m; --vocab-size 50304 for GPT-2's BPE padded to a multiple of 128
    "gpt2-124m": {"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "seq_length": 1024,
                  "vocab_size": 32768, "micro_batch_size": 16},
    # examples/llama_1b, with its SentencePiece vocabulary of 32000
    "llama-1b": {"num_layers": 16, "hidden_size": 2048, "num_attention_heads": 32, "num_query_groups": 8,
                 "ffn_hidden_size": 8192, "seq_length": 4096, "vocab_size": 32000, "micro_batch_size": 4, **LLAMA},
}
OPTIMIZER_IMPLS = ("fused", "foreach", "loop")
# The recompute rows: their ModelConfig fields over the dense row's (which recomputes nothing).
RECOMPUTE = {"selective": {"recompute_granularity": "selective"},
             "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}}
RECOMPUTE_NAMES = {kind: recompute_name(ModelConfig(**options)) for kind, options in RECOMPUTE.items()}


@dataclasses.dataclass
class Variant:
    """One row: a selection policy (None: dense), ModelConfig fields over the base model's, an optimizer,
    an FP8 format (None: none), whether its layers are compiled (--compile)."""
    name: str
    policy: Policy | None = None
    model_options: dict = dataclasses.field(default_factory=dict)
    optimizer_impl: str = "auto"
    fp8_format: str | None = None
    compiled: bool = False


@dataclasses.dataclass
class Timing:
    step: float  # median seconds of a whole step
    optimizer: float  # median seconds of its optimizer step (clip + AdamW)
    kept: float  # mean kept fraction
    stats: StepStats  # the last timed step's, reduced
    syncs: int  # host syncs of one step
    peak_bytes: int | None  # CUDA only
    optimizer_kind: str  # what the optimizer ran as


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="model and micro-batch of a recipe: " + "; ".join(
                       f"{name}: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in values.items())
                       for name, values in PRESETS.items()))
    add_shape_flags(p)
    p.add_argument("--lm-head-impl", choices=["auto", "torch", "triton"], default="torch",
                   help="LM-head kernels, passed to forward_backward (default torch; auto: triton on CUDA "
                        "when triton is installed, else torch, as the trainer's --lm-head-impl)")
    p.add_argument("--bf16", action="store_true",
                   help="run the forward under bf16 autocast, as the trainer's --bf16 (weights stay fp32)")
    p.add_argument("--alphas", type=float, nargs="*", default=[0.5, 0.7],
                   help="ESLM alphas (a row per alpha and threshold mode, and a random row per alpha; "
                        "default 0.5 0.7; the flag alone: no selective rows)")
    p.add_argument("--thresholds", nargs="+", default=["sketch-exact"], choices=["sketch", "sketch-exact", "exact"],
                   help="ESLM threshold modes (one ESLM row per alpha and mode)")
    p.add_argument("--optimizer-impls", nargs="*", choices=OPTIMIZER_IMPLS, default=list(OPTIMIZER_IMPLS),
                   help="a dense row per AdamW implementation (default all; the flag alone: none)")
    p.add_argument("--recompute", nargs="*", choices=list(RECOMPUTE), default=list(RECOMPUTE),
                   help="a dense row per activation recompute: selective, full (uniform, 1 layer a chunk) "
                        "(default both; the flag alone: none)")
    p.add_argument("--fp8-format", nargs="*", choices=FP8_FORMATS, default=[],
                   help="a dense row per FP8 format, the blocks' linears in FP8 (needs --bf16; default none)")
    p.add_argument("--compile", action="store_true",
                   help="also the dense row and the first ESLM row with the layers compiled, as the trainer's "
                        "--compile (each compiles in its warmup steps)")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's dense peak TFLOP/s for the MFU column (default: the built-in table of "
                        "training/throughput.py, bf16 peaks of A100/H100/H200; no MFU on other devices)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warmup steps)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = fill_shape(p.parse_args(argv))
    if args.fp8_format and not args.bf16:
        raise UserError("--fp8-format needs --bf16, as the trainer's")
    return args


def add_shape_flags(p: argparse.ArgumentParser, defaults: dict = DEFAULTS) -> None:
    """The size flags (`defaults`' keys), each None unless given: `fill_shape` fills them."""
    for name, default in defaults.items():
        p.add_argument("--" + name.replace("_", "-"), type=int,
                       help=f"default {'derived, as the trainer does' if default is None else default}, "
                            "or the preset's")


def fill_shape(args: argparse.Namespace, defaults: dict = DEFAULTS) -> argparse.Namespace:
    """The shape flags not given: the preset's, else `defaults`; and --steps checked (tools/bench_memory.py
    passes its own defaults)."""
    preset = PRESETS.get(args.preset, {})
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, default))
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The bench's model: the size flags, the preset's options, no dropout (it only adds noise here)."""
    sizes = {name: getattr(args, name) for name in DEFAULTS if name not in ("vocab_size", "micro_batch_size")}
    options = {k: v for k, v in PRESETS.get(args.preset, {}).items() if k not in DEFAULTS}
    return finalize_model(ModelConfig(**sizes, **options, hidden_dropout=0.0, attention_dropout=0.0))


def build_model(cfg: ModelConfig, vocab_size: int, device: torch.device) -> GPTModel:
    """Drawn on the CPU from fixed seeds, made on `device` (as the trainer builds it): every build of the
    same shape has the same weights, whatever the recompute fields."""
    with torch.device(device):
        return GPTModel(cfg, vocab_size)


def random_batches(args: argparse.Namespace, count: int) -> list[dict]:
    """`count` micro-batches of random tokens (seeded: every run and every tool draws the same), on the CPU."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        seq = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length + 1), generator=g)
        batches.append({"tokens": seq[:, :-1], "labels": seq[:, 1:]})
    return batches


def autocast_factory(device: torch.device, bf16: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """The trainer's precision as forward_backward takes it: a fresh bf16 autocast context for each forward
    (the backward runs outside it), or none."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def variants(args: argparse.Namespace) -> list[Variant]:
    rows = [Variant("dense")]
    for alpha in args.alphas:
        for mode in args.thresholds:
            rows.append(Variant(f"eslm a={alpha} {mode}", ESLMPolicy(alpha, "loss", mode)))
        rows.append(Variant(f"random a={alpha}", RandomPolicy(ESLMPolicy(alpha, "loss", args.thresholds[0]))))
    if args.alphas:
        keep = args.micro_batch_size // 2
        rows += [Variant("eslm sequence a=0.5", SequencePolicy(keep, "loss")),
                 Variant("random sequence a=0.5", SequencePolicy(keep, "loss", random_seed=0))]
    rows += [Variant(f"dense, optimizer {impl}", optimizer_impl=impl) for impl in args.optimizer_impls]
    rows += [Variant(f"dense, recompute {RECOMPUTE_NAMES[kind]}", model_options=RECOMPUTE[kind])
             for kind in args.recompute]
    rows += [Variant(f"dense, fp8 {fp8_format}", fp8_format=fp8_format) for fp8_format in args.fp8_format]
    if args.compile:
        rows.append(Variant("dense, compiled", compiled=True))
        if args.alphas:
            alpha, mode = args.alphas[0], args.thresholds[0]
            rows.append(Variant(f"eslm a={alpha} {mode}, compiled", ESLMPolicy(alpha, "loss", mode), compiled=True))
    return rows


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """What --optimizer-impl auto ran as (`training/optimizer.py` sets AdamW's fused and foreach)."""
    return "fused" if optimizer.defaults["fused"] else "foreach" if optimizer.defaults["foreach"] else "loop"


class Clock:
    """Marks on the device's own timeline: CUDA events (no sync to take a mark) or the host clock on CPU,
    where the host runs the kernels itself."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> float | torch.cuda.Event:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        """Between two marks; on CUDA after a synchronize that covers `end`."""
        return start.elapsed_time(end) / 1000 if self.cuda else end - start


def median_seconds(run: Callable[[], object], device: torch.device, calls: int, warmup: int = 0) -> float:
    """The median wall time of `run()` over `calls` calls after `warmup` untimed ones, each between
    synchronizations of the device (whose kernels the host only queues)."""
    times = []
    for i in range(warmup + calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    return statistics.median(times)


def time_variant(base: GPTModel, variant: Variant, batches: list[dict], device: torch.device,
                 lm_head_impl: str = "torch", bf16: bool = False, warmup: int = 2) -> Timing:
    autocast = autocast_factory(device, bf16)

    def step(batch: dict) -> tuple[StepStats, object]:  # the stats, a Clock mark before the optimizer
        optimizer.zero_grad(set_to_none=True)
        policy, batches, stats = variant.policy, [batch], None
        if policy is not None and policy.selects_sequences:  # the candidates as two micro-batches
            halves = [{key: value[half::2] for key, value in batch.items()} for half in range(2)]
            batches, stats = select_sequences(model, policy, iter(halves), 2, device, lm_head_impl, autocast)
            policy = None
        stats = forward_backward(model, policy, iter(batches), len(batches), device, lm_head_impl=lm_head_impl,
                                 autocast=autocast, stats=stats)
        before = clock.mark()
        optimizer_step(model, optimizer, 1e-4, 1.0)
        return stats, before

    model = (build_model(dataclasses.replace(base.cfg, **variant.model_options), base.vocab_size, device)
             if variant.model_options else copy.deepcopy(base))
    if variant.fp8_format is not None:
        convert_to_fp8(model, variant.fp8_format, device)
    if variant.compiled:
        compile_layers(model.layers)
    optimizer = build_optimizer(model, OptimizerConfig(optimizer_impl=variant.optimizer_impl))
    clock, cuda = Clock(device), device.type == "cuda"
    max_memory_allocated(device)  # resets the peak: the next call gives this variant's
    times, optimizer_times, kept = [], [], []
    for i, batch in enumerate(batches):
        if cuda:
            torch.cuda.synchronize()
        tic = time.perf_counter()
        stats, before = step(batch)
        after = clock.mark()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - tic)
            optimizer_times.append(clock.seconds(before, after))
            stats = reduce_step_stats(stats)  # after the clock stops: the trainer reads once per log interval
            kept.append(stats.kept / (stats.valid + stats.dropped_valid))  # of the candidates' tokens
    peak = max_memory_allocated(device)
    with HostSyncCounter() as syncs:
        step(batches[-1])
    return Timing(statistics.median(times), statistics.median(optimizer_times), statistics.mean(kept), stats,
                  syncs.total, peak, optimizer_kind(optimizer))


def row(name: str, t: Timing, dense: Timing, cfg: ModelConfig, vocab_size: int, peak: float | None) -> str:
    """One markdown row; every ratio is to the dense row of the same run."""
    flops = t.stats.flops(cfg, vocab_size)
    achieved = tflops_per_gpu(flops.executed, t.step, 1)
    utilisation = mfu(achieved, peak)
    cells = [name, f"{t.kept:.3f}", f"{1000 * t.step:.1f}", f"{t.step / dense.step:.3f}",
             f"{1000 * t.optimizer:.1f}", f"{t.optimizer / dense.optimizer:.3f}",
             f"{flops.executed / flops.dense:.3f}", f"{achieved:.4g}",
             "-" if utilisation is None else f"{utilisation:.3g}",
             "-" if t.peak_bytes is None else f"{t.peak_bytes / 2 ** 30:.2f}", str(t.syncs)]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| variant | kept | step ms | time vs dense | optimizer ms | optimizer vs dense | "
          "executed FLOPs vs dense | TFLOP/s per device | MFU | peak GiB | host syncs per step |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lm_head_impl = resolve_impl(args.lm_head_impl, device)
    peak = peak_tflops(device, args.peak_tflops)
    cfg = model_config(args)
    model = build_model(cfg, args.vocab_size, device)
    batches = random_batches(args, args.steps + 2)
    llama = ", Llama (rope, RMSNorm, SwiGLU, untied head, no biases)" if cfg.swiglu else ""
    print(f"device {device}, threads {args.threads}, layers {cfg.num_layers}, hidden {cfg.hidden_size}, "
          f"heads {cfg.num_attention_heads} ({cfg.num_query_groups} query groups), ffn {cfg.ffn_hidden_size}{llama}, "
          f"seq {cfg.seq_length}, vocab {args.vocab_size}, micro-batch {args.micro_batch_size}, lm head "
          f"{lm_head_impl}, {'bf16 autocast' if args.bf16 else 'fp32'}, median of {args.steps} steps, MFU against "
          f"{'no known peak' if peak is None else f'{peak:g} TFLOP/s'}\n")
    print(HEADER, flush=True)
    dense = None
    for variant in variants(args):  # each row as soon as it is measured
        timing = time_variant(model, variant, batches, device, lm_head_impl, args.bf16)
        dense = dense or timing
        variant_cfg = dataclasses.replace(cfg, **variant.model_options)  # its recompute counts as executed
        print(row(variant.name, timing, dense, variant_cfg, args.vocab_size, peak), flush=True)
    print(f"\ndense: AdamW auto ran as {dense.optimizer_kind}, no recompute")


if __name__ == "__main__":
    main()
