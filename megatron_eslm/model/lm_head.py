"""Selective LM head: score every token, let a policy choose, backpropagate through the chosen ones only.

The forward never keeps [tokens x vocab] logits for the backward: it saves the hidden states, the weight,
the per-row log-sum-exp and the kept row indices, and the backward recomputes logits for kept rows only.
Dense training (no policy) computes scores and gradients in one fused pass instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch
from torch import Tensor

from megatron_eslm.errors import UserError
from megatron_eslm.kernels import lm_head_torch, lm_head_triton

# Modules implementing lm_head_scores / lm_head_backward_rows / lm_head_fused_dense, by name.
# (Importing lm_head_triton is cheap: triton itself is imported on the first kernel launch.)
IMPLEMENTATIONS: dict[str, ModuleType] = {"torch": lm_head_torch, "triton": lm_head_triton}


@dataclass
class TokenScores:
    """What a selection policy sees: detached, flattened, float32 (float64 for float64 models)."""

    loss: Tensor  # [N] per-token cross-entropy, 0 where ignored
    entropy: Tensor  # [N] entropy of the predicted distribution
    valid: Tensor  # [N] bool, label != ignore_index


@dataclass
class Selection:
    """What a selection policy returns."""

    kept: Tensor  # [N] bool, a subset of valid
    normalizer: float  # loss = sum(kept losses) / normalizer (e.g. the kept count, global over ranks)
    threshold: float | None = None
    # What the threshold call reported (distributed_threshold.ThresholdResult), for the step's metrics:
    rank_error_bound: int | None = None  # threshold = exact rule's at a rank in [k - this, k]; None: none
    bytes_sent: int = 0  # payload this rank handed to the threshold collectives
    nonfinite: int = 0  # valid tokens of the group whose score was NaN or +-inf (excluded)


Selector = Callable[[TokenScores], Selection]


@dataclass
class LMHeadOutput:
    loss: Tensor  # scalar, differentiable w.r.t. hidden and weight
    scores: TokenScores
    selection: Selection


def _check_selection(selection: Selection, scores: TokenScores) -> None:
    """A policy bug (wrong shape, keeping ignored tokens) must fail loudly, not train on garbage."""
    kept = selection.kept
    if kept.dtype != torch.bool or kept.shape != scores.valid.shape:
        raise ValueError(f"Selection.kept must be a bool tensor of shape {tuple(scores.valid.shape)}, "
                         f"got {kept.dtype} {tuple(kept.shape)}")
    if bool((kept & ~scores.valid).any()):
        raise ValueError("Selection.kept contains tokens whose label is ignore_index")


def select_and_reduce(token_loss: Tensor, entropy: Tensor, valid: Tensor, select: Selector | None,
                      dense_normalizer: float) -> tuple[Tensor, TokenScores, Selection, float]:
    """Scores -> the policy's selection (every valid token without one) -> loss = sum(kept losses) /
    normalizer; also returns 1 / normalizer, the backward's scale."""
    scores = TokenScores(loss=token_loss, entropy=entropy, valid=valid)
    selection = Selection(kept=valid, normalizer=dense_normalizer) if select is None else select(scores)
    _check_selection(selection, scores)
    inv_normalizer = _inverse(selection.normalizer)
    return token_loss[selection.kept].sum() * inv_normalizer, scores, selection, inv_normalizer


class _SelectiveLMHead(torch.autograd.Function):
    """Loss = sum(kept losses) / normalizer; returns (loss, scores, selection)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, select: Selector | None,
                ignore_index: int, kernels: ModuleType, needs_grad: bool, normalizer: float | None
                ) -> tuple[Tensor, TokenScores, Selection]:
        valid = labels != ignore_index
        dense_normalizer = float(valid.sum()) if normalizer is None else normalizer
        dense_grads = None
        if select is None and needs_grad:
            *stats, grad_hidden, grad_weight = kernels.lm_head_fused_dense(
                hidden, weight, labels, _inverse(dense_normalizer), ignore_index)
            dense_grads = (grad_hidden, grad_weight)
        else:
            stats = kernels.lm_head_scores(hidden, weight, labels, ignore_index)
        token_loss, lse, entropy = stats
        loss, scores, selection, inv_normalizer = select_and_reduce(token_loss, entropy, valid, select,
                                                                    dense_normalizer)

        ctx.dense_grads, ctx.kernels, ctx.weight_dtype = dense_grads, kernels, weight.dtype
        if needs_grad and dense_grads is None:
            ctx.save_for_backward(hidden, weight, labels, selection.kept.nonzero().squeeze(1), lse)
            ctx.inv_normalizer = inv_normalizer
        return loss, scores, selection

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused) -> tuple[Tensor | None, ...]:
        if ctx.dense_grads is not None:
            grad_hidden, grad_weight = (grad * grad_loss for grad in ctx.dense_grads)
        else:
            hidden, weight, labels, rows, lse = ctx.saved_tensors
            grad_rows, grad_weight = ctx.kernels.lm_head_backward_rows(
                hidden, weight, labels, rows, lse, grad_loss * ctx.inv_normalizer)
            grad_hidden = hidden.new_zeros(hidden.shape).index_copy_(0, rows, grad_rows)
        return grad_hidden, grad_weight.to(ctx.weight_dtype), None, None, None, None, None, None


def _inverse(normalizer: float) -> float:
    """1 / normalizer, with nothing kept (normalizer 0) giving a zero loss and zero gradients, not NaN."""
    return 1.0 / normalizer if normalizer else 0.0


def kernels_for(impl: str) -> ModuleType:
    if impl not in IMPLEMENTATIONS:
        raise UserError(f"unknown LM head implementation {impl!r}; choose from {sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[impl]


def needs_grad(hidden: Tensor, weight: Tensor) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)


def selective_lm_head_loss(hidden: Tensor, weight: Tensor, labels: Tensor, select: Selector | None,
                           ignore_index: int = -100, impl: str = "torch",
                           normalizer: float | None = None) -> LMHeadOutput:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` over the tokens ``select`` keeps.

    ``select=None`` trains densely on every valid token, dividing by ``normalizer`` (default: the valid
    count here; data parallelism passes the count over the selection group). Without autograd (eval,
    torch.no_grad) only the scoring pass runs.
    """
    loss, scores, selection = _SelectiveLMHead.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), select, ignore_index,
        kernels_for(impl), needs_grad(hidden, weight), normalizer)
    return LMHeadOutput(loss=loss, scores=scores, selection=selection)


def resolve_impl(choice: str, device: torch.device) -> str:
    """`--lm-head-impl`: auto picks the Triton kernels on CUDA when triton is installed, else PyTorch."""
    if choice == "auto":
        return "triton" if device.type == "cuda" and lm_head_triton.is_available() else "torch"
    if choice == "triton" and not lm_head_triton.is_available():
        raise UserError("--lm-head-impl triton needs triton and a CUDA device (or TRITON_INTERPRET=1)")
    return choice
