#!/usr/bin/env python
"""Activation memory of one micro-batch under activation recompute: none, selective (the attention core
of every layer), full (uniform, 1 layer a group), measured on the real model and LM head, and the memory
estimator's numbers for the same config (megatron_eslm/training/memory.py).

Each variant runs one forward and backward of one micro-batch (`training/step.forward_backward`, the
trainer's step, ESLM alpha 0.5 on the loss: the head the estimator models; the LM head's kernels as the
trainer's --lm-head-impl auto picks them) from the same weights and tokens, on one process. The measurement:

  CPU   the bytes of the distinct storages autograd saves during the forward (saved-tensor hooks; the
        parameters left out): what the forward leaves for the backward. A checkpoint saves only its
        inputs there, so full recompute's one recomputed group in the backward is not in it: compare it
        with the estimator's end of the forward.
  CUDA  torch.cuda.max_memory_allocated over the forward and backward, minus what was allocated before
        (after a warm-up step, so `.grad` and the kernels' workspaces exist already): the saved tensors,
        the recomputed group and the backward's transient gradients. Compare it with the estimator's peak.

The estimator assumes a flash attention kernel. SDPA runs one on the GPU, and on the CPU only without
attention dropout: with --attention-dropout > 0 (the default, as the trainer's) the CPU runs the math
kernel, which saves the [b, heads, s, s] probabilities, their dropout mask and copies, so its none and
selective rows exceed the estimate; selective recompute drops exactly those.

    python tools/bench_memory.py                                  # 8-layer GPT, seconds on a CPU
    python tools/bench_memory.py --preset gpt2-124m --bf16        # a GPU: tools/bench_train_step.py's presets
    python tools/bench_memory.py --preset llama-1b --bf16 --json

One process only (no TP/PP layouts): the estimator's layouts are checked by tests/test_estimate_memory.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import (PRESETS, RECOMPUTE, RECOMPUTE_NAMES, add_shape_flags, autocast_factory,  # noqa: E402
                              build_model, fill_shape, median_seconds, model_config, random_batches)

from megatron_eslm.config import ModelConfig  # noqa: E402
from megatron_eslm.errors import exit_on_user_error  # noqa: E402
from megatron_eslm.eslm.policies import ESLMPolicy  # noqa: E402
from megatron_eslm.model.gpt import GPTModel  # noqa: E402
from megatron_eslm.model.lm_head import resolve_impl  # noqa: E402
from megatron_eslm.tensor_parallel.random import set_random_seeds  # noqa: E402
from megatron_eslm.training import memory  # noqa: E402
from megatron_eslm.training.step import forward_backward  # noqa: E402

# The size flags' values without --preset (bench_train_step.model_config's names; None: derived).
DEFAULTS = {"num_layers": 8, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": None,
            "ffn_hidden_size": None, "seq_length": 128, "vocab_size": 1024, "micro_batch_size": 2}
# variant -> its ModelConfig fields (none: the config as built)
VARIANTS = {"none": {}, **RECOMPUTE}
NAMES = {"none": "none", **RECOMPUTE_NAMES}


class SavedActivations:
    """While active, the distinct storages autograd saves for the backward, parameters left out, held
    (so no address is reused): their bytes are what a forward leaves for its backward."""

    def __init__(self, model: torch.nn.Module):
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, torch.UntypedStorage] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.parameters:
            self.storages[storage.data_ptr()] = storage
        return t

    def __enter__(self) -> SavedActivations:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(storage.nbytes() for storage in self.storages.values())


@dataclasses.dataclass
class Row:
    variant: str
    saved_activation_bytes: int  # measured: CPU saved-tensor bytes, CUDA peak minus before
    ratio_to_none: float
    estimated_end_of_forward: int  # memory.activations: saved + weight copies + the head's weight copy
    estimated_peak: int  # ... + one recompute in the backward
    step_ms: float  # median forward + backward of the micro-batch


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a model and micro-batch of tools/bench_train_step.py")
    add_shape_flags(p, DEFAULTS)
    defaults = ModelConfig()
    p.add_argument("--hidden-dropout", type=float, default=defaults.hidden_dropout)
    p.add_argument("--attention-dropout", type=float, default=defaults.attention_dropout,
                   help=f"default {defaults.attention_dropout}; on the CPU > 0 runs SDPA's math kernel, 0 its flash")
    p.add_argument("--bf16", action="store_true", help="the forward under bf16 autocast, as the trainer's --bf16")
    p.add_argument("--steps", type=int, default=3, help="timed forward+backward runs per variant (median)")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return fill_shape(p.parse_args(argv), DEFAULTS)


def run(model: GPTModel, batch: dict, device: torch.device, bf16: bool,
        saved: SavedActivations | None = None) -> None:
    """One micro-batch's forward and backward, the forward inside `saved` when given."""
    def forward(*args, **kwargs):
        with saved or contextlib.nullcontext():
            return model(*args, **kwargs)

    model.zero_grad(set_to_none=False)
    forward_backward(model, ESLMPolicy(0.5, "loss"), iter([batch]), 1, device, resolve_impl("auto", device),
                     autocast_factory(device, bf16), forward=forward)


def measure(model: GPTModel, batch: dict, device: torch.device, bf16: bool) -> int:
    """The variant's activation bytes (see the module's docstring), after one warm-up run."""
    run(model, batch, device, bf16)
    if device.type != "cuda":
        saved = SavedActivations(model)
        run(model, batch, device, bf16, saved)
        return saved.nbytes
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run(model, batch, device, bf16)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def bench(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    set_random_seeds(1, device)  # the dropout streams
    base = dataclasses.replace(model_config(args), hidden_dropout=args.hidden_dropout,
                               attention_dropout=args.attention_dropout)
    batch = random_batches(args, 1)[0]
    kernels = memory.CUDA if device.type == "cuda" else memory.CPU
    rows: list[Row] = []
    for variant, fields in VARIANTS.items():
        cfg = dataclasses.replace(base, **fields)
        model = build_model(cfg, args.vocab_size, device)
        nbytes = measure(model, batch, device, args.bf16)
        step = median_seconds(functools.partial(run, model, batch, device, args.bf16), device, args.steps)
        del model
        est = memory.activations(cfg, args.vocab_size, memory.Layout(), 0, args.micro_batch_size, 1, args.bf16,
                                 False, kernels)
        none = rows[0].saved_activation_bytes if rows else nbytes
        rows.append(Row(NAMES[variant], nbytes, nbytes / none, est.end_of_forward, est.total, 1000 * step))
    return rows


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2 ** 20:.2f}"


def table(rows: list[Row], device: torch.device) -> str:
    measured = "saved MiB (hooks)" if device.type != "cuda" else "peak MiB - before"
    lines = [f"| recompute | {measured} | vs none | estimate, end of forward MiB | estimate, peak MiB | "
             "fwd+bwd ms |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.variant} | {_mib(r.saved_activation_bytes)} | {r.ratio_to_none:.3f} | "
              f"{_mib(r.estimated_end_of_forward)} | {_mib(r.estimated_peak)} | {r.step_ms:.1f} |" for r in rows]
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    rows = bench(args)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return
    m = model_config(args)
    print(f"device {args.device}, layers {m.num_layers}, hidden {m.hidden_size}, heads {m.num_attention_heads} "
          f"({m.num_query_groups} query groups), ffn {m.ffn_hidden_size}{' SwiGLU' if m.swiglu else ''}, seq "
          f"{m.seq_length}, vocab {args.vocab_size}, micro-batch {args.micro_batch_size}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, dropout hidden {args.hidden_dropout} attention "
          f"{args.attention_dropout}; one micro-batch, ESLM a=0.5\n")
    print(table(rows, torch.device(args.device)))


if __name__ == "__main__":
    main()
