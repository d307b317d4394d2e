"""Megatron's tensor-parallel mappings: autograd functions pairing each forward collective with the one
its backward needs, over the tensor-parallel group.

  copy_to_tensor_model_parallel_region          identity     | all-reduce
  reduce_from_tensor_model_parallel_region      all-reduce   | identity
  scatter_to_tensor_model_parallel_region       split last   | all-gather last
  gather_from_tensor_model_parallel_region      all-gather last | split last
  scatter_to_sequence_parallel_region           split seq    | all-gather seq
  gather_from_sequence_parallel_region          all-gather seq | reduce-scatter seq (or split, when the
                                                               gradient is already complete on every rank)
  reduce_scatter_to_sequence_parallel_region    reduce-scatter seq | all-gather seq

Activations are [batch, seq, hidden], so the sequence dimension is 1. With one tensor-parallel rank every
mapping is the identity and no autograd node is added. Under --compile the collectives run eagerly between
the compiled regions (`compiled_regions.py`); with one rank the identity adds no graph break.

What the layout costs. The collectives work on one contiguous buffer with the ranks' pieces along its
first dimension ([T, *piece]). Megatron's [seq, batch, hidden] puts the sequence there, so its sequence
gathers and reduce-scatters need no copy at all. Ours, with the sequence on dim 1, each need one full copy
of the activation when the micro-batch has more than one sample (with one sample the rearrangement is a
view):
  gather along dim d       all_gather_into_tensor into [T, *x.shape], then one copy to put the T pieces
                           in place along d (movedim + reshape); the same for the last dimension
  reduce-scatter along 1   one copy of the input to [T, b, s/T, h] (contiguous), then
                           reduce_scatter_tensor straight into this rank's [b, s/T, h]
  split along d            one copy of this rank's 1/T (chunk + contiguous)
Under NCCL that is one copy fewer per gather and per reduce-scatter than the list collectives, which
NCCL runs through a flat buffer of its own (and the list gather also needed a cat).
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_eslm import parallel_state
from megatron_eslm.compiled_regions import outside_compiled_regions
from megatron_eslm.distributed import collectives

SEQUENCE_DIM = 1


def _split(x: Tensor, dim: int) -> Tensor:
    """This rank's chunk of `x` along `dim`."""
    size, rank = parallel_state.tensor_model_parallel_size(), parallel_state.tensor_model_parallel_rank()
    return x.chunk(size, dim)[rank].contiguous()


def _gather(x: Tensor, dim: int) -> Tensor:
    """The ranks' `x` concatenated along `dim`: one copy after the collective (none when every dimension
    before `dim` has size 1)."""
    dim %= x.dim()
    group = parallel_state.tensor_model_parallel_group()
    stacked = collectives.all_gather_into_tensor(x, group, collectives.TP_ALL_GATHER)  # [T, *x.shape]
    return stacked.movedim(0, dim).flatten(dim, dim + 1)


def _all_reduce(x: Tensor) -> Tensor:
    return collectives.all_reduce(x, parallel_state.tensor_model_parallel_group(), collectives.TP_ALL_REDUCE)


def _reduce_scatter(x: Tensor, dim: int) -> Tensor:
    """The sum over the ranks of `x`, this rank's 1/T along `dim`: one copy to bring the T pieces to the
    front (none when every dimension before `dim` has size 1)."""
    dim %= x.dim()
    pieces = x.unflatten(dim, (parallel_state.tensor_model_parallel_size(), -1)).movedim(dim, 0)
    return collectives.reduce_scatter_tensor(pieces, parallel_state.tensor_model_parallel_group(),
                                             collectives.TP_REDUCE_SCATTER)


class _CopyToTensorModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _all_reduce(grad.contiguous())


class _ReduceFromTensorModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _all_reduce(x.contiguous())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _ScatterToTensorModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _split(x, -1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _gather(grad, -1)


class _GatherFromTensorModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _gather(x, -1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _split(grad, -1)


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _split(x, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _gather(grad, SEQUENCE_DIM)


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, output_grad_is_partial: bool) -> Tensor:
        ctx.output_grad_is_partial = output_grad_is_partial
        return _gather(x, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        if ctx.output_grad_is_partial:
            return _reduce_scatter(grad, SEQUENCE_DIM), None
        return _split(grad, SEQUENCE_DIM), None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _reduce_scatter(x, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _gather(grad, SEQUENCE_DIM)


def _parallel() -> bool:
    return parallel_state.tensor_model_parallel_size() > 1


@outside_compiled_regions
def _apply(function: type[torch.autograd.Function], *args) -> Tensor:
    """`function` between compiled regions (--compile): its collectives run as they do eagerly."""
    return function.apply(*args)


def copy_to_tensor_model_parallel_region(x: Tensor) -> Tensor:
    """Input of a column-parallel layer: each rank's gradient is partial, so the backward sums them."""
    return _apply(_CopyToTensorModelParallelRegion, x) if _parallel() else x


def reduce_from_tensor_model_parallel_region(x: Tensor) -> Tensor:
    """Output of a row-parallel layer: each rank holds a partial sum."""
    return _apply(_ReduceFromTensorModelParallelRegion, x) if _parallel() else x


def scatter_to_tensor_model_parallel_region(x: Tensor) -> Tensor:
    """This rank's slice of the last dimension."""
    return _apply(_ScatterToTensorModelParallelRegion, x) if _parallel() else x


def gather_from_tensor_model_parallel_region(x: Tensor) -> Tensor:
    """Concatenate the ranks' slices of the last dimension (e.g. vocab-parallel logits)."""
    return _apply(_GatherFromTensorModelParallelRegion, x) if _parallel() else x


def scatter_to_sequence_parallel_region(x: Tensor) -> Tensor:
    """Enter a sequence-parallel region: keep this rank's share of the sequence."""
    return _apply(_ScatterToSequenceParallelRegion, x) if _parallel() else x


def gather_from_sequence_parallel_region(x: Tensor, output_grad_is_partial: bool = True) -> Tensor:
    """Leave a sequence-parallel region: the whole sequence on every rank. `output_grad_is_partial`: the
    consumer is tensor-parallel, so each rank's gradient is a partial sum (reduce-scatter it); False when
    the consumer already returns the complete gradient on every rank (then the backward just splits)."""
    return _apply(_GatherFromSequenceParallelRegion, x, output_grad_is_partial) if _parallel() else x


def reduce_scatter_to_sequence_parallel_region(x: Tensor) -> Tensor:
    """Output of a row-parallel layer under sequence parallelism: sum the partials, keep this rank's share."""
    return _apply(_ReduceScatterToSequenceParallelRegion, x) if _parallel() else x
