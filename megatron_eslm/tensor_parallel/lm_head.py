"""Vocab-parallel selective LM head: each tensor-parallel rank holds a slice of the vocabulary (its shard
of the tied word embedding) and never the logits of the others.

Forward: per-row partials over this shard (max, sum-exp, target logit, sum of exp * shifted logit), one
MAX all-reduce of the maxima and one SUM all-reduce of the three rescaled sums give loss, lse and entropy
over the whole vocabulary. All-reduce results are the same bits on every rank, so every TP rank scores,
selects and drops the same rows. Backward: each rank recomputes its shard's logits for the kept rows only;
their hidden-state gradients are partial sums over the shards, summed by one all-reduce of the kept rows,
[K, H] instead of [N, H]. Dense training runs the same two passes over every row, the ignored ones with a
zero gradient (the single fused pass needs the global lse before any softmax gradient, which only exists
after the all-reduce). As in `model.lm_head`: no host sync but a selection's ``kept.nonzero()``, the weight cast saved for (and cached across) the
backward, and with ``accumulate_into_grad`` the shard's weight gradient added in place into its ``.grad``.

With one tensor-parallel rank `model.lm_head.selective_lm_head_loss` runs instead, unchanged.
"""
from __future__ import annotations

from types import ModuleType

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_eslm import parallel_state
from megatron_eslm.distributed import collectives
from megatron_eslm.kernels.lm_head_partials import Partials, combine_partials, rescale_partials
from megatron_eslm.model.lm_head import (LMHeadOutput, Selection, Selector, TokenScores, WeightGrad, cast_weight,
                                         kernels_for, needs_grad, row_backward, save_for_row_backward,
                                         select_and_reduce)


def _tp_all_reduce(tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    return collectives.all_reduce(tensor, parallel_state.tensor_model_parallel_group(), collectives.TP_ALL_REDUCE,
                                  op)


def vocab_parallel_scores(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_start: int, ignore_index: int,
                          kernels: ModuleType) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse, entropy) over the whole vocabulary from this rank's shard ``weight`` (rows vocab_start..)."""
    partials = kernels.lm_head_partials(hidden, weight, labels, vocab_start, ignore_index)
    global_max = _tp_all_reduce(partials.row_max.clone(), dist.ReduceOp.MAX)
    rescaled = rescale_partials(partials, global_max)
    sums = _tp_all_reduce(torch.stack([rescaled.sumexp, rescaled.target, rescaled.sum_shifted]))
    return combine_partials(Partials(global_max, *sums), labels != ignore_index)


class _VocabParallelSelectiveLMHead(torch.autograd.Function):
    """Loss = sum(kept losses) / normalizer over the whole vocabulary; returns (loss, scores, selection)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, select: Selector | None, ignore_index: int,
                kernels: ModuleType, needs_grad: bool, normalizer: Tensor | float | None, vocab_start: int,
                accumulate_into_grad: bool) -> tuple[Tensor, TokenScores, Selection]:
        valid = labels != ignore_index
        compute_weight = cast_weight(weight, hidden.dtype)
        token_loss, lse, entropy = vocab_parallel_scores(hidden, compute_weight, labels, vocab_start, ignore_index,
                                                         kernels)
        dense_normalizer = valid.sum() if normalizer is None else normalizer
        loss, scores, selection, inv_normalizer = select_and_reduce(token_loss, entropy, valid, select,
                                                                    dense_normalizer)
        if needs_grad:
            local = labels - vocab_start
            local_labels = torch.where(valid & (local >= 0) & (local < weight.shape[0]), local, -1)
            save_for_row_backward(ctx, hidden, compute_weight, local_labels, selection, lse, inv_normalizer,
                                  kernels, WeightGrad(weight, hidden, accumulate_into_grad), dense=select is None)
        return loss, scores, selection

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = row_backward(ctx, grad_loss, reduce_rows=_tp_all_reduce)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def vocab_parallel_lm_head_loss(hidden: Tensor, weight: Tensor, labels: Tensor, select: Selector | None,
                                vocab_start: int, ignore_index: int = -100, impl: str = "torch",
                                normalizer: Tensor | float | None = None,
                                accumulate_into_grad: bool = False) -> LMHeadOutput:
    """`selective_lm_head_loss` with ``weight`` = this tensor-parallel rank's vocabulary rows vocab_start..;
    ``hidden`` and ``labels`` are the same on every TP rank, and so are the returned loss and scores."""
    loss, scores, selection = _VocabParallelSelectiveLMHead.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), select, ignore_index, kernels_for(impl),
        needs_grad(hidden, weight), normalizer, vocab_start, accumulate_into_grad)
    return LMHeadOutput(loss=loss, scores=scores, selection=selection)
