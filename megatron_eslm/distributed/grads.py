"""After a step's backward: turn every rank's gradients into the full-batch gradients of its parameters,
then measure (and clip) the norm of the whole model's gradient.

  data parallel      SUM over the replicas, in flat buckets of --ddp-bucket-size elements: the data x
                     context ranks (context-parallel ranks hold the same parameters and other tokens of
                     the same samples). Each rank's loss is already divided by the token count of the
                     whole selection group (the kept count for ESLM, the valid count for dense), so the
                     sum is the full-batch gradient; averaging would divide by their number a second time.
  sequence parallel  SUM over the TP ranks for replicated parameters applied to sequence shards (norms,
                     row-parallel biases): each rank saw only its share of the tokens.
  pipeline           SUM the tied word embedding's gradient over the first and last stage, which both use
                     it (input embedding, LM head), so their copies take the same update; an untied output
                     layer lives on the last stage alone and needs no sum.

With --overlap-grad-reduce the data-parallel sums are launched from the backward instead
(`grad_overlap.py`, same buckets) and only waited for here.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from megatron_eslm import parallel_state
from megatron_eslm.distributed import collectives


def split_into_buckets(grads: list[Tensor], bucket_elements: int) -> list[list[Tensor]]:
    """Consecutive grads (or parameters) of one dtype, at most bucket_elements per bucket (a larger one goes
    alone)."""
    buckets: list[list[Tensor]] = []
    size = 0
    for grad in grads:
        if not buckets or size + grad.numel() > bucket_elements or grad.dtype != buckets[-1][0].dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(grad)
        size += grad.numel()
    return buckets


def _all_reduce_flat(grads: list[Tensor], group, kind: str) -> None:
    """One SUM all-reduce over the concatenation of `grads`, written back in place."""
    flat = collectives.all_reduce(torch.cat([grad.reshape(-1) for grad in grads]), group, kind)
    for grad, synced in zip(grads, flat.split([grad.numel() for grad in grads])):
        grad.copy_(synced.view_as(grad))


def allreduce_data_parallel_grads(params: list[nn.Parameter], bucket_elements: int) -> None:
    """SUM every gradient over the data x context group, bucket by bucket (last layers first, as DDP)."""
    grads = [p.grad for p in reversed(params) if p.grad is not None]
    for bucket in split_into_buckets(grads, bucket_elements):
        _all_reduce_flat(bucket, parallel_state.data_context_parallel_group(), collectives.DP_ALL_REDUCE)


def finalize_model_grads(model: nn.Module, bucket_elements: int, data_parallel: bool = True) -> None:
    """The sums above; `data_parallel=False` leaves the data-parallel one to DeepSpeed's ZeRO, or to the
    overlapped reducer, which has summed every bucket before this runs (the other sums are linear: their
    order changes only the rounding)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if parallel_state.tensor_model_parallel_size() > 1:
        shared = [p.grad for p in params if getattr(p, "sequence_parallel", False)]
        if shared:
            _all_reduce_flat(shared, parallel_state.tensor_model_parallel_group(), collectives.TP_ALL_REDUCE)
    if parallel_state.embedding_group() is not None and model.tied:
        collectives.all_reduce(model.word_embeddings.weight.grad, parallel_state.embedding_group(),
                               collectives.EMBEDDING_ALL_REDUCE)
    if data_parallel and parallel_state.data_context_parallel_size() > 1:
        allreduce_data_parallel_grads(params, bucket_elements)


def _counted_once(param: nn.Parameter) -> bool:
    """Each weight enters the norm once: TP-replicated ones on TP rank 0, the tied embedding on the first
    stage only."""
    replicated = not getattr(param, "tensor_model_parallel", False)
    if replicated and parallel_state.tensor_model_parallel_rank() != 0:
        return False
    return not getattr(param, "tied_copy", False)


def _device_dtype_groups(grads: list[Tensor]) -> list[list[Tensor]]:
    """Gradients of one device and dtype, so that each group is one fused foreach kernel."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for grad in grads:
        groups.setdefault((grad.device, grad.dtype), []).append(grad)
    return list(groups.values())


def _norms(grads: list[Tensor]) -> list[Tensor]:
    """Per-tensor 2-norms of one group, accumulated and returned in at least fp32 (bf16 gradients are read
    as they are on CUDA; the CPU fallback converts them); fp32 and fp64 gradients are never copied."""
    acc = torch.promote_types(grads[0].dtype, torch.float32)
    return torch._foreach_norm(grads, 2) if acc == grads[0].dtype else torch._foreach_norm(grads, 2, dtype=acc)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """The gradient norm of the whole model (summed over every shard of it), and clip every gradient by
    max_norm / norm when that is below 1, as torch.nn.utils.clip_grad_norm_; max_norm 0 only measures.

    Free of host syncs and of gradient copies: fused per-tensor norms, their squares summed in float64 (a
    few scalars), one model-parallel all-reduce of that 0-dim tensor, and the clip coefficient
    min(max_norm / (norm + 1e-6), 1) kept on the device (multiplying by exactly 1.0 leaves a gradient
    bitwise unchanged). Returns the norm as a 0-dim float64 tensor on the gradients' device: callers read
    it (the one host sync) only at the log interval."""
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else None
    square = torch.zeros((), dtype=torch.float64, device=device)
    for group in _device_dtype_groups([p.grad for p in params if p.grad is not None and _counted_once(p)]):
        square += torch.stack(_norms(group)).to(device=device, dtype=torch.float64).square().sum()
    if parallel_state.model_parallel_size() > 1:
        collectives.all_reduce(square, parallel_state.model_parallel_group(), collectives.GRAD_NORM)
    norm = square.sqrt()
    if max_norm > 0:
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for group in _device_dtype_groups(grads):
            torch._foreach_mul_(group, coefficient.to(group[0].device))
    return norm
