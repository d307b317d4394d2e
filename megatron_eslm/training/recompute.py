"""Activation recompute (Megatron-LM's --recompute-granularity / --recompute-method / --recompute-num-layers):
keep less of the forward for the backward, and run that part of the forward again when the backward needs it.

  full, uniform   this stage's layers in consecutive groups of N (the last group may be shorter); each
                  group keeps only its input and is run again, whole, by its backward
  full, block     the first N layers of this stage each keep only their input; the others keep everything
  selective       every layer's attention core (QK^T, softmax, attention dropout, AV: `CoreAttention`)
                  keeps only q, k and v: the saved tensors that grow with the square of the sequence

It wraps the model from outside: the blocks know nothing of it. `GPTModel` applies the config to its
layers (`configure`, so every builder of a model gets it) and runs them through `forward_layers`; the
embedding, the final norm and the LM head with its scoring pass lie outside every recomputed region and
run once. The layers stay where they were, so the state dict is the same with or without recompute.
The recomputed forward replays the first one's dropout masks (`tensor_parallel.random.checkpoint`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron_eslm.config import ModelConfig
from megatron_eslm.model.rotary import RotaryTables
from megatron_eslm.tensor_parallel.random import checkpoint


@dataclass(frozen=True)
class LayerGroup:
    """Consecutive layers of a stage (indices into its `layers`), recomputed as one region or not at all."""
    layers: range
    recomputed: bool


class Recomputed(nn.Module):
    """A module that keeps only its inputs for the backward. The wrapped module must have no parameters or
    buffers, so that the state dict does not change (selective recompute wraps `CoreAttention`)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        assert not module.state_dict(), "a recomputed module must hold no state"
        self.module = module

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.module, *args)


def layer_groups(cfg: ModelConfig, num_layers: int) -> tuple[LayerGroup, ...]:
    """How a stage of `num_layers` layers runs under `cfg`'s recompute settings (validated)."""
    if cfg.recompute_granularity != "full":
        return (LayerGroup(range(num_layers), False),)
    n = cfg.recompute_num_layers
    if cfg.recompute_method == "uniform":
        return tuple(LayerGroup(range(start, min(start + n, num_layers)), True) for start in range(0, num_layers, n))
    kept = (LayerGroup(range(n, num_layers), False),) if n < num_layers else ()
    return (*(LayerGroup(range(i, i + 1), True) for i in range(n)), *kept)


def recompute_name(m: ModelConfig) -> str:
    """The recompute config in a few words, e.g. 'full uniform 1', 'selective', 'none'."""
    if m.recompute_granularity == "full":
        return f"full {m.recompute_method} {m.recompute_num_layers}"
    return m.recompute_granularity or "none"


def configure(layers: nn.ModuleList, cfg: ModelConfig, chunks: int = 1) -> tuple[LayerGroup, ...]:
    """Apply `cfg`'s recompute to a stage's transformer layers: selective wraps each layer's attention core;
    returns the groups `forward_layers` runs each of its `chunks` model chunks in (interleaved pipeline:
    the groups are a chunk's, as Megatron applies --recompute-num-layers to each model chunk)."""
    if cfg.recompute_granularity == "selective":
        for layer in layers:
            layer.self_attention.core_attention = Recomputed(layer.self_attention.core_attention)
    return layer_groups(cfg, len(layers) // chunks)


def _run(layers: list[nn.Module], x: torch.Tensor, rotary: RotaryTables | None) -> torch.Tensor:
    for layer in layers:
        x = layer(x, rotary)
    return x


def forward_layers(layers: nn.ModuleList, groups: tuple[LayerGroup, ...], x: torch.Tensor,
                   rotary: RotaryTables | None) -> torch.Tensor:
    """The stage's layers over `x`, each group recomputed or not."""
    for group in groups:
        members = [layers[i] for i in group.layers]
        x = checkpoint(_run, members, x, rotary) if group.recomputed else _run(members, x, rotary)
    return x
