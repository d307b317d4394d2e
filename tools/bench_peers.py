#!/usr/bin/env python
"""Our training step against its peers, in one run on one device: the same model shape, batch, sequence
and precision, as a table of tokens/s, TFLOP/s and MFU with each row's ratio to ours.

The rows (a training step is forward + backward + optimizer step for everyone):

  ours                       the trainer's dense step (`training/step.py`, tools/bench_train_step.py's dense
                             row): fused LM head (Triton on CUDA), no selection
  ours, --compile            the same with the model's --compile, once ModelConfig has that field
  transformers X             GPT2LMHeadModel or LlamaForCausalLM (whichever holds the shape,
                             `checkpoint/hf.py`), SDPA attention, its logits upcast to float32 for the loss
                             as its own `labels=` path does
  transformers X, compiled   the same module (model and loss) under torch.compile
  megatron-core GPTModel     its local layer spec (no Transformer Engine), one rank; CUDA only (its attention
                             and rotary embedding allocate on the current CUDA device)

Everyone gets the same random token batches, dropout 0, bf16 autocast on CUDA (float32 weights) and float32
on the CPU, and the same optimizer step: our `optimizer_step` (clip to norm 1, AdamW with Megatron's
weight-decay groups, fused on CUDA, foreach on the CPU). Every row's TFLOP/s counts OUR model FLOPs for the
shape (`training/flops.py`, the dense count: 3x the forward's matmuls, a 4hV head backward), so the MFU and
ratio columns compare time alone. The params column shows that the peers hold the same model.

    python tools/bench_peers.py --tiny --threads 1           # CPU: about a minute, most of it compiling a peer
    python tools/bench_peers.py --preset gpt2-124m           # a GPU
    python tools/bench_peers.py --preset llama-1b --steps 5

transformers is needed for its rows (the `test` extra); megatron-core's row says so when it does not import.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import (PRESETS, Variant, add_shape_flags, autocast_factory, build_model,  # noqa: E402
                              fill_shape, median_seconds, model_config, random_batches, time_variant)

from megatron_eslm.checkpoint.hf import GPT2, architecture, hf_config  # noqa: E402
from megatron_eslm.config import ModelConfig, OptimizerConfig  # noqa: E402
from megatron_eslm.errors import UserError, exit_on_user_error  # noqa: E402
from megatron_eslm.model.gpt import padded_vocab_size  # noqa: E402
from megatron_eslm.model.lm_head import resolve_impl  # noqa: E402
from megatron_eslm.training.flops import micro_batch_flops  # noqa: E402
from megatron_eslm.training.optimizer import build_optimizer  # noqa: E402
from megatron_eslm.training.step import optimizer_step  # noqa: E402
from megatron_eslm.training.throughput import mfu, peak_tflops  # noqa: E402

# --tiny's sizes (a preset's model options stay): every row in seconds on a 2-core CPU.
TINY = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256, "seq_length": 64,
        "vocab_size": 512, "micro_batch_size": 4}
TINY_QUERY_GROUPS = 2  # under a preset with grouped-query attention (llama-1b's 8 do not divide 4 heads)


@dataclasses.dataclass
class Result:
    """A row: the median step time, or why the row did not run."""
    name: str
    seconds: float | None = None
    params: int | None = None
    note: str = ""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a model and micro-batch of tools/bench_train_step.py")
    p.add_argument("--tiny", action="store_true",
                   help="sizes for a CPU run of about a minute: " + ", ".join(
                       f"{k.replace('_', '-')} {v}" for k, v in TINY.items())
                   + f" (with a preset's grouped-query attention, {TINY_QUERY_GROUPS} query groups); size "
                     "flags given win")
    add_shape_flags(p)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (median), after --warmup")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps per row first (the compiled rows compile in the first)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend for the compiled rows (default inductor; aot_eager or eager "
                        "only trace, for a machine without a C compiler or a quick check)")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's dense peak TFLOP/s for the MFU column (default: training/throughput.py's "
                        "table of GPUs; none on a CPU)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch's CPU threads (default all cores; on a busy CPU 1 gives steadier times)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.tiny:
        tiny = {**TINY, "num_query_groups": TINY_QUERY_GROUPS if PRESETS.get(args.preset, {}).get(
            "group_query_attention") else None}
        for name, value in tiny.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    if args.warmup < 1:
        raise UserError(f"--warmup must be at least 1 (the compiled rows compile in it), got {args.warmup}")
    return fill_shape(args)


class CausalLMLoss(nn.Module):
    """A transformers causal LM and its mean token loss as one module, so torch.compile covers the loss as
    it would the model's own `labels=` path (logits upcast to float32, then cross entropy)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=tokens, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


class MegatronLoss(nn.Module):
    """megatron-core's GPTModel, which returns the per-token loss when given labels, and its mean; the
    position ids (read by learned positions) made once."""

    def __init__(self, model: nn.Module, micro_batch_size: int, seq_length: int, device: torch.device):
        super().__init__()
        self.model = model
        self.register_buffer("positions", torch.arange(seq_length, device=device).expand(micro_batch_size, -1))

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, self.positions, None, labels=labels).mean()


def transformers_model(cfg: ModelConfig, vocab_size: int, device: torch.device) -> nn.Module:
    """GPT2LMHeadModel or LlamaForCausalLM of our shape (`checkpoint/hf.py`'s config), in training mode."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    config = hf_config(cfg, vocab_size)
    with torch.device(device):
        model = (GPT2LMHeadModel if architecture(cfg) == GPT2 else LlamaForCausalLM)(config)
    return model.train()


@contextlib.contextmanager
def megatron_one_rank(device: torch.device) -> Iterator[None]:
    """megatron-core's model-parallel state (and its RNG tracker) on a process group of one rank, torn down
    after; the process group too when made here."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    made = not dist.is_initialized()
    if made:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    parallel_state.initialize_model_parallel()
    try:
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if made:
            dist.destroy_process_group()


def megatron_model(cfg: ModelConfig, vocab_size: int, device: torch.device) -> nn.Module:
    """megatron-core's GPTModel of our shape with its local (non-Transformer-Engine) layer spec, in training
    mode; within `megatron_one_rank`."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    activation = F.silu if cfg.swiglu else functools.partial(F.gelu, approximate="tanh")  # ours: gelu_new
    config = TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups, kv_channels=cfg.kv_channels, ffn_hidden_size=cfg.ffn_hidden_size,
        hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=cfg.norm_epsilon,
        normalization=cfg.normalization, gated_linear_unit=cfg.swiglu, activation_func=activation,
        add_bias_linear=not cfg.disable_bias_linear, init_method_std=cfg.init_method_std,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        use_cpu_initialization=device.type != "cuda")
    model = GPTModel(config, get_gpt_layer_local_spec(normalization=cfg.normalization), vocab_size=vocab_size,
                     max_sequence_length=cfg.max_position_embeddings,
                     share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
                     position_embedding_type=cfg.position_embedding_type, rotary_base=cfg.rotary_base)
    return model.to(device).train()


def time_peer(name: str, module: nn.Module, batches: list[dict], device: torch.device, bf16: bool,
              warmup: int, compile_backend: str | None = None) -> Result:
    """Training steps of a peer's loss module: our optimizer step, the timing of tools/bench_train_step.py."""
    optimizer = build_optimizer(module, OptimizerConfig())
    forward = torch.compile(module, backend=compile_backend) if compile_backend else module
    autocast = autocast_factory(device, bf16)
    steps = iter(batches)

    def step() -> None:
        batch = next(steps)
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = forward(batch["tokens"].to(device), batch["labels"].to(device))
        loss.backward()
        optimizer_step(module, optimizer, 1e-4, 1.0)

    seconds = median_seconds(step, device, len(batches) - warmup, warmup)
    return Result(name, seconds, sum(p.numel() for p in module.parameters()))


def plan(cfg: ModelConfig, device: torch.device) -> list[tuple[str, str]]:
    """The rows, in order: each name with why it cannot run here ("" where it runs)."""
    peer = "GPT2LMHeadModel" if architecture(cfg) == GPT2 else "LlamaForCausalLM"
    transformers = "" if importlib.util.find_spec("transformers") else "not importable (pip install transformers)"
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        megatron = "not importable (pip install megatron-core)"
    elif device.type != "cuda":
        megatron = "n/a on cpu: its attention and rotary embedding allocate on the current CUDA device"
    else:
        megatron = ""
    return [("ours", ""), ("ours, --compile", "" if hasattr(cfg, "compile") else "n/a (--compile not built)"),
            (f"transformers {peer}", transformers), (f"transformers {peer}, compiled", transformers),
            ("megatron-core GPTModel (local spec)", megatron)]


def results(args: argparse.Namespace, cfg: ModelConfig, vocab_size: int, device: torch.device,
            bf16: bool) -> Iterator[Result]:
    """Every row of `plan`, measured one after the other (each model freed before the next is built)."""
    batches = random_batches(args, args.warmup + args.steps)

    def ours(name: str, options: dict) -> Result:
        model = build_model(cfg, vocab_size, device)
        timing = time_variant(model, Variant(name, model_options=options), batches, device,
                              resolve_impl("auto", device), bf16, args.warmup)
        return Result(name, timing.step, sum(p.numel() for p in model.parameters()))

    def transformers(name: str, compile_backend: str | None = None) -> Result:
        module = CausalLMLoss(transformers_model(cfg, vocab_size, device))
        return time_peer(name, module, batches, device, bf16, args.warmup, compile_backend)

    def megatron(name: str) -> Result:
        with megatron_one_rank(device):
            module = MegatronLoss(megatron_model(cfg, vocab_size, device), args.micro_batch_size, args.seq_length,
                                  device)
            return time_peer(name, module, batches, device, bf16, args.warmup)

    runs: list[Callable[[str], Result]] = [
        functools.partial(ours, options={}), functools.partial(ours, options={"compile": True}), transformers,
        functools.partial(transformers, compile_backend=args.compile_backend), megatron]
    for (name, why_not), run in zip(plan(cfg, device), runs, strict=True):
        yield Result(name, note=why_not) if why_not else run(name)
        gc.collect()  # the row's model and optimizer before the next row builds its own
        if device.type == "cuda":
            torch.cuda.empty_cache()


HEADER = ("| peer | params | tokens/s | TFLOP/s | MFU | tokens/s vs ours | note |\n"
          "|---|---:|---:|---:|---:|---:|---|")


def table_row(result: Result, ours: Result, tokens: int, flops: float, peak: float | None) -> str:
    """One markdown row: TFLOP/s from our model FLOPs for the shape; the ratio to our row's tokens/s."""
    if result.seconds is None:
        return f"| {result.name} | - | - | - | - | - | {result.note} |"
    achieved = flops / result.seconds / 1e12
    utilisation = mfu(achieved, peak)
    cells = [result.name, f"{result.params:,}", f"{tokens / result.seconds:.4g}", f"{achieved:.4g}",
             "-" if utilisation is None else f"{utilisation:.3g}", f"{ours.seconds / result.seconds:.2f}",
             result.note]
    return "| " + " | ".join(cells) + " |"


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    cfg = model_config(args)
    vocab_size = padded_vocab_size(args.vocab_size, cfg.make_vocab_size_divisible_by)
    tokens = args.micro_batch_size * args.seq_length
    flops = micro_batch_flops(cfg, vocab_size, tokens, tokens, 0, selective=False).dense
    peak = peak_tflops(device, args.peak_tflops)
    print(f"device {device}, threads {args.threads}, {architecture(cfg)} shape: layers {cfg.num_layers}, hidden "
          f"{cfg.hidden_size}, heads {cfg.num_attention_heads} ({cfg.num_query_groups} query groups), ffn "
          f"{cfg.ffn_hidden_size}, seq {cfg.seq_length}, vocab {vocab_size}, micro-batch {args.micro_batch_size}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, median of {args.steps} steps after {args.warmup}, compiled rows: "
          f"{args.compile_backend}, model FLOPs per step {flops:.4g}, MFU against "
          f"{'no known peak' if peak is None else f'{peak:g} TFLOP/s'}\n")
    print(HEADER, flush=True)
    ours = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' and megatron-core's notes on what is not installed
        for result in results(args, cfg, vocab_size, device, bf16):  # each row as soon as it is measured
            ours = ours or result
            print(table_row(result, ours, tokens, flops, peak), flush=True)


if __name__ == "__main__":
    main()
