"""Tensor-parallel layers (Megatron's ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding) and
the dropout for activations that differ across tensor-parallel ranks.

Init: every rank draws the (master) weight from the layer's generator, block by block of rows, and keeps
only its shard (`initialization.py`), so the shards put together equal the one-process weight for the same
seed, whatever the tensor-parallel size, and no rank holds a whole weight it has only a shard of.
Parameters carry Megatron's attributes: `tensor_model_parallel` and `partition_dim` for shards,
`sequence_parallel` for replicated parameters used on sequence shards (their gradients are partial sums
over the tensor-parallel ranks).

Under autocast (--bf16, fp32 parameters) every output is in the autocast dtype: the GEMMs are cast by
autocast itself, while the embedding lookup and the bias added after the row-parallel reduction, which
autocast leaves alone, are cast here, so the residual stream stays bf16 as in Megatron.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_eslm import parallel_state
from megatron_eslm.tensor_parallel import mappings
from megatron_eslm.tensor_parallel.initialization import normal_chunk
from megatron_eslm.tensor_parallel.random import get_rng_tracker


def activation_dtype(x: Tensor) -> torch.dtype:
    """The dtype activations travel in: autocast's where it is on for x's device, else x's own. Ops that
    autocast leaves alone (lookups, additions with fp32 parameters, norms) would otherwise promote the
    activations, the tensors autograd saves and the pipeline messages to the parameters' fp32."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def to_activation_dtype(x: Tensor) -> Tensor:
    """x in `activation_dtype` (itself, not a copy, when it already is: fp32 runs are unchanged)."""
    return x.to(activation_dtype(x))


def master_normal(shape: tuple[int, ...], std: float, generator: torch.Generator) -> Tensor:
    """The whole weight, drawn on the CPU in the default dtype (the same numbers on every rank), made on
    the default device: for weights every tensor-parallel rank holds whole."""
    return normal_chunk(shape, std, generator, 0, 1, 0)


def shard_parameter(master: Tensor, partition_dim: int) -> nn.Parameter:
    """This tensor-parallel rank's contiguous chunk of `master` along `partition_dim`. For a normal
    weight, `normal_shard_parameter` gives the same numbers without the whole master."""
    size, rank = parallel_state.tensor_model_parallel_size(), parallel_state.tensor_model_parallel_rank()
    return _tensor_parallel(nn.Parameter(master.chunk(size, partition_dim)[rank].clone()), partition_dim)


def normal_shard_parameter(shape: tuple[int, ...], std: float, generator: torch.Generator,
                           partition_dim: int) -> nn.Parameter:
    """`shard_parameter(master_normal(shape, std, generator), partition_dim)`, bit for bit, holding one
    block of the master's rows at a time instead of the whole master."""
    size, rank = parallel_state.tensor_model_parallel_size(), parallel_state.tensor_model_parallel_rank()
    return _tensor_parallel(nn.Parameter(normal_chunk(shape, std, generator, partition_dim, size, rank)),
                            partition_dim)


def _tensor_parallel(param: nn.Parameter, partition_dim: int) -> nn.Parameter:
    """Megatron's attributes of a shard (DeepSpeed reads `tensor_model_parallel` too)."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    return param


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, fp8_matmul: Callable[[Tensor], Tensor] | None) -> Tensor:
    """x W^T (+ b), the matmul in FP8 where --fp8-format gave the layer one (`fp8.py`: x W^T only, the bias
    added here in the output's dtype, as F.linear under autocast would)."""
    if fp8_matmul is None:
        return F.linear(x, weight, bias)
    out = fp8_matmul(x)
    return out if bias is None else out + bias.to(out.dtype)


def mark_sequence_parallel(params) -> None:
    """Replicated parameters applied to sequence shards: their gradients get summed over TP ranks."""
    for param in params:
        param.sequence_parallel = True


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A's output features split over the TP ranks; the output stays split (it feeds
    attention heads or an MLP shard). The input is the full activation: replicated, or gathered from
    sequence shards under sequence parallelism. `bias=False`: no b (--disable-bias-linear)."""

    def __init__(self, in_features: int, out_features: int, init_std: float, generator: torch.Generator,
                 sequence_parallel: bool = False, bias: bool = True):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.weight = normal_shard_parameter((out_features, in_features), init_std, generator, 0)
        self.bias = shard_parameter(torch.zeros(out_features), 0) if bias else None
        self.fp8_matmul: Callable[[Tensor], Tensor] | None = None  # set by --fp8-format (`fp8.py`)

    def forward(self, x: Tensor) -> Tensor:
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x)
        else:
            x = mappings.copy_to_tensor_model_parallel_region(x)
        return linear(x, self.weight, self.bias, self.fp8_matmul)


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A's input features split over the TP ranks: the input is already split (a
    column-parallel output), the partial products are summed (reduce-scattered to sequence shards under
    sequence parallelism), then the replicated bias, if any, is added once."""

    def __init__(self, in_features: int, out_features: int, init_std: float, generator: torch.Generator,
                 sequence_parallel: bool = False, bias: bool = True):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.weight = normal_shard_parameter((out_features, in_features), init_std, generator, 1)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if sequence_parallel and bias:
            mark_sequence_parallel([self.bias])
        self.fp8_matmul: Callable[[Tensor], Tensor] | None = None  # set by --fp8-format (`fp8.py`)

    def forward(self, x: Tensor) -> Tensor:
        partial = linear(x, self.weight, None, self.fp8_matmul)
        if self.sequence_parallel:
            out = mappings.reduce_scatter_to_sequence_parallel_region(partial)
        else:
            out = mappings.reduce_from_tensor_model_parallel_region(partial)
        return out if self.bias is None else out + self.bias.to(out.dtype)  # an fp32 bias would promote bf16


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split over the TP ranks: each rank looks up the ids in its range,
    zeros elsewhere, and the sum over ranks is the full lookup. The same shard is the tied LM head's. The
    lookup is cast to the activation dtype before the sum (exact: one rank's row is nonzero)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float, generator: torch.Generator):
        super().__init__()
        self.weight = normal_shard_parameter((num_embeddings, embedding_dim), init_std, generator, 0)
        self.vocab_start = parallel_state.tensor_model_parallel_rank() * self.weight.shape[0]

    def forward(self, ids: Tensor) -> Tensor:
        if parallel_state.tensor_model_parallel_size() == 1:
            return to_activation_dtype(F.embedding(ids, self.weight))
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return mappings.reduce_from_tensor_model_parallel_region(to_activation_dtype(out))


class ShardedDropout(nn.Dropout):
    """Dropout on an activation each TP rank holds a different part of (a sequence shard): the mask comes
    from the model-parallel RNG stream, distinct per rank and reproducible."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        with get_rng_tracker().fork():
            return super().forward(x)
