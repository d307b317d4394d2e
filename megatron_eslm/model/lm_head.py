"""Selective LM head: score every token, let a policy choose, backpropagate through the chosen ones only.

The forward never keeps [tokens x vocab] logits for the backward: it saves the hidden states, the weight,
the per-row log-sum-exp and the kept row indices, and the backward recomputes logits for kept rows only.
Dense training (no policy) computes scores and gradients in one fused pass instead, with either kernel module.

No host syncs but one: the normalizer and its inverse stay 0-dim device tensors, the selection's validity
is asserted on the device, and the only host read is ``kept.nonzero()``, which sizes the kept-row
backward (inherent: the row count sets the kernels' shapes). Dense training needs none: the fused pass,
or pass 2 over every row with the ignored rows' gradients zeroed through their lse (`save_for_row_backward`).

Memory across gradient accumulation (``accumulate_into_grad``, Megatron's gradient-accumulation fusion):
the backward adds the weight gradient in place into ``weight.grad`` and hands autograd None for it, so a
micro-batch allocates no [V, H] weight gradient of its own. That bypasses autograd's gradient
accumulation of the weight, and with it any hook an engine put there (DeepSpeed ZeRO's reduction hooks):
the switch is off by default, and the trainer turns it on for its own data parallelism only. The fused
dense pass computes the weight gradient in the forward, before the incoming gradient that scales it is
known: that one [V, H] buffer (score dtype) lives until the backward, where it is scaled in place and
becomes, or is added to, ``.grad`` (no second copy); deferring it would cost a logits recompute (the
vocab-parallel head's dense step, which does not fuse, does just that). The weight cast to the hidden dtype
(bf16 under autocast) is saved from forward to backward, and within ``weight_cast_cache`` reused across
the micro-batches of a step.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator

import torch
from torch import Tensor

from megatron_eslm import host_syncs
from megatron_eslm.errors import UserError
from megatron_eslm.kernels import lm_head_torch, lm_head_triton
from megatron_eslm.kernels.lm_head_torch import score_dtype

# Modules implementing lm_head_scores / lm_head_backward_rows / lm_head_partials, by name, and
# lm_head_fused_dense, dense training's single pass (scores and both gradients, no logits recompute).
# Importing lm_head_triton is cheap: triton itself is imported on the first kernel launch.
IMPLEMENTATIONS: dict[str, ModuleType] = {"torch": lm_head_torch, "triton": lm_head_triton}


@dataclass
class TokenScores:
    """What a selection policy sees: detached, flattened, float32 (float64 for float64 models)."""

    loss: Tensor  # [N] per-token cross-entropy, 0 where ignored
    entropy: Tensor  # [N] entropy of the predicted distribution
    valid: Tensor  # [N] bool, label != ignore_index


@dataclass
class Selection:
    """What a selection policy returns. Counts and thresholds are 0-dim device tensors (numbers also
    work), so that choosing never waits for the device."""

    kept: Tensor  # [N] bool, a subset of valid
    normalizer: Tensor | float  # loss = sum(kept losses) / normalizer (e.g. the kept count, global over ranks)
    threshold: Tensor | float | None = None
    # What the threshold call reported (distributed_threshold.ThresholdResult), for the step's metrics:
    rank_error_bound: Tensor | int | None = None  # threshold = exact rule's at a rank in [k - this, k]
    bytes_sent: int = 0  # payload this rank handed to the threshold collectives
    nonfinite: Tensor | int = 0  # valid tokens of the group whose score was NaN or +-inf (excluded)
    rows: Tensor | None = None  # kept.nonzero(), set by the head when it runs its row backward (reused by eslm-kd)
    # Importance weights (eslm-is): the kept tokens in `upweighted` count `upweight` times in the loss
    upweighted: Tensor | None = None  # [N] bool, a subset of kept
    upweight: float = 1.0


Selector = Callable[[TokenScores], Selection]


@dataclass
class LMHeadOutput:
    loss: Tensor  # scalar, differentiable w.r.t. hidden and weight
    scores: TokenScores
    selection: Selection


# (data_ptr, shape, device, dtype) -> (weakref to the weight, its version, the cast copy); inside
# weight_cast_cache() only. The weakref tells a weight from a later one at the same address.
_cast_cache: dict[tuple, tuple[weakref.ref, int, Tensor]] | None = None


@contextlib.contextmanager
def weight_cast_cache() -> Iterator[None]:
    """Inside, the head casts each weight to the hidden dtype once and reuses the copy: enter it around a
    step's micro-batches, where the weights do not change, and leave it before the optimizer step.

    A scope rather than a global cache keyed on ``weight._version``: fused optimizers
    (``torch.optim.AdamW(fused=True)``) and writes through ``.data`` change a parameter without bumping
    its version, so such a cache could serve a stale copy. Inside the scope the version is still checked.
    """
    global _cast_cache
    outer, _cast_cache = _cast_cache, {}
    try:
        yield
    finally:
        _cast_cache = outer


def cast_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``weight.to(dtype)``, made once per ``weight_cast_cache`` scope."""
    if weight.dtype == dtype or _cast_cache is None:
        return weight.to(dtype)
    key = (weight.data_ptr(), weight.shape, weight.device, dtype)
    entry = _cast_cache.get(key)
    if entry is None or entry[0]() is not weight or entry[1] != weight._version:
        entry = _cast_cache[key] = (weakref.ref(weight), weight._version, weight.detach().to(dtype))
    return entry[2]


class WeightGrad:
    """Where a head's backward puts the weight gradient: added in place into ``weight.grad`` when asked
    (``accumulate_into_grad``) and possible (a leaf in the dtype the kernels accumulate in), with None
    returned to autograd; otherwise returned to autograd as usual."""

    def __init__(self, weight: Tensor, hidden: Tensor, accumulate_into_grad: bool):
        self.in_place = (accumulate_into_grad and weight.requires_grad and weight.is_leaf
                         and weight.dtype == score_dtype(hidden.dtype))
        self.weight = weight if self.in_place else None
        self.dtype = weight.dtype

    def accumulator(self) -> Tensor | None:
        """``weight.grad`` (zeros in the weight's dtype when None: once per optimizer step) to add into."""
        if not self.in_place:
            return None
        if self.weight.grad is None:
            self.weight.grad = torch.zeros_like(self.weight, memory_format=torch.contiguous_format)
        return self.weight.grad

    def result(self, grad_weight: Tensor) -> Tensor | None:
        """What backward returns for a weight gradient the kernels computed (into ``accumulator()``)."""
        return None if self.in_place else grad_weight.to(self.dtype)

    def add_scaled(self, grad_weight: Tensor, scale: Tensor) -> Tensor | None:
        """Add ``grad_weight * scale``, a buffer of the caller's that becomes ``.grad`` if there is none;
        returns what backward returns."""
        if not self.in_place:
            return grad_weight.mul_(scale).to(self.dtype)
        if self.weight.grad is None:
            self.weight.grad = grad_weight.mul_(scale)
        else:
            self.weight.grad.addcmul_(grad_weight, scale)
        return None


def _check_selection(selection: Selection, scores: TokenScores) -> None:
    """A policy bug (wrong shape, keeping ignored tokens) must fail loudly, not train on garbage. The
    content check is asserted on the device (no host read): on CPU it raises here, on CUDA the step
    fails at its next synchronisation."""
    kept = selection.kept
    if kept.dtype != torch.bool or kept.shape != scores.valid.shape:
        raise ValueError(f"Selection.kept must be a bool tensor of shape {tuple(scores.valid.shape)}, "
                         f"got {kept.dtype} {tuple(kept.shape)}")
    torch._assert_async((kept & ~scores.valid).any().logical_not(),
                        "Selection.kept contains tokens whose label is ignore_index")
    if selection.upweighted is not None:
        torch._assert_async((selection.upweighted & ~kept).any().logical_not(),
                            "Selection.upweighted contains tokens that are not kept")


def _inverse(normalizer: Tensor | float, dtype: torch.dtype) -> Tensor | float:
    """1 / normalizer, 0 when nothing is kept (normalizer 0): a zero loss and zero gradients, not NaN. A
    tensor stays on its device (float64 reciprocal, rounded to ``dtype``); a number stays a number."""
    if not isinstance(normalizer, Tensor):
        return 1.0 / normalizer if normalizer else 0.0
    count = normalizer.to(torch.float64)
    return torch.where(count > 0, count.reciprocal(), 0.0).to(dtype)


def select_and_reduce(token_loss: Tensor, entropy: Tensor, valid: Tensor, select: Selector | None,
                      dense_normalizer: Tensor | float) -> tuple[Tensor, TokenScores, Selection, Tensor | float]:
    """Scores -> the policy's selection (every valid token without one) -> loss = sum(kept losses) /
    normalizer; also returns 1 / normalizer, the backward's scale."""
    scores = TokenScores(loss=token_loss, entropy=entropy, valid=valid)
    selection = Selection(kept=valid, normalizer=dense_normalizer) if select is None else select(scores)
    _check_selection(selection, scores)
    inv_normalizer = _inverse(selection.normalizer, token_loss.dtype)
    kept_loss = torch.where(selection.kept, token_loss, 0.0)
    if selection.upweighted is not None:
        kept_loss = torch.where(selection.upweighted, kept_loss * selection.upweight, kept_loss)
    return kept_loss.sum() * inv_normalizer, scores, selection, inv_normalizer


def save_for_row_backward(ctx, hidden: Tensor, compute_weight: Tensor, labels: Tensor, selection: Selection,
                          lse: Tensor, inv_normalizer: Tensor | float, kernels: ModuleType, weight_grad: WeightGrad,
                          dense: bool) -> None:
    """Save what ``row_backward`` needs. Selective: the kept rows, by ``kept.nonzero()``, the head's one host
    sync (the count sizes pass 2), also handed to the policy as ``selection.rows``. Dense: every row, with
    the log-sum-exp of the ignored ones set to +inf, so that their softmax, and with no label in range their
    whole gradient, is 0: no sync, at the cost of recomputing the (few) ignored rows."""
    ctx.upweighted = None  # (rows of weight 1 first, then this many upweighted ones, their weight)
    if dense:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        lse = lse.masked_fill(~selection.kept, float("inf"))
    elif selection.upweighted is None:
        with host_syncs.inherent("the kept count sizes the LM head's row backward"):
            rows = selection.rows = selection.kept.nonzero().squeeze(1)
    else:  # two row groups, each one scalar scale: any kernel, two launches
        with host_syncs.inherent("the kept counts of the two weights size the LM head's row backward"):
            plain = (selection.kept & ~selection.upweighted).nonzero().squeeze(1)
            heavy = selection.upweighted.nonzero().squeeze(1)
        rows = selection.rows = torch.cat([plain, heavy])
        ctx.upweighted = (heavy.numel(), selection.upweight)
    ctx.save_for_backward(hidden, compute_weight, labels, rows, lse)
    ctx.kernels, ctx.inv_normalizer, ctx.weight_grad = kernels, inv_normalizer, weight_grad


def row_backward(ctx, grad_loss: Tensor, reduce_rows: Callable[[Tensor], Tensor] | None = None
                 ) -> tuple[Tensor, Tensor | None]:
    """(grad_hidden, what to return for the weight) from pass 2 over the kept rows; ``reduce_rows`` sums
    the kept rows' hidden gradients over vocabulary shards."""
    hidden, compute_weight, labels, rows, lse = ctx.saved_tensors
    scale = grad_loss * ctx.inv_normalizer
    if ctx.upweighted is None:
        grad_rows, grad_weight = ctx.kernels.lm_head_backward_rows(
            hidden, compute_weight, labels, rows, lse, scale, grad_weight_out=ctx.weight_grad.accumulator())
    else:
        heavy, upweight = ctx.upweighted
        split = rows.numel() - heavy
        grad_plain, grad_weight = ctx.kernels.lm_head_backward_rows(
            hidden, compute_weight, labels, rows[:split], lse, scale, grad_weight_out=ctx.weight_grad.accumulator())
        grad_heavy, grad_weight = ctx.kernels.lm_head_backward_rows(
            hidden, compute_weight, labels, rows[split:], lse, scale * upweight, grad_weight_out=grad_weight)
        grad_rows = torch.cat([grad_plain, grad_heavy])
    if reduce_rows is not None:
        grad_rows = reduce_rows(grad_rows)
    grad_hidden = hidden.new_zeros(hidden.shape).index_copy_(0, rows, grad_rows)
    return grad_hidden, ctx.weight_grad.result(grad_weight)


class _SelectiveLMHead(torch.autograd.Function):
    """Loss = sum(kept losses) / normalizer; returns (loss, scores, selection)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, select: Selector | None,
                ignore_index: int, kernels: ModuleType, needs_grad: bool, normalizer: Tensor | float | None,
                accumulate_into_grad: bool) -> tuple[Tensor, TokenScores, Selection]:
        valid = labels != ignore_index
        dense_normalizer = valid.sum() if normalizer is None else normalizer
        compute_weight = cast_weight(weight, hidden.dtype)
        weight_grad = WeightGrad(weight, hidden, accumulate_into_grad)
        fused_dense = getattr(kernels, "lm_head_fused_dense", None)
        ctx.dense_grads = None
        if select is None and needs_grad and fused_dense is not None:
            # grad_loss is unknown until backward: the gradients of loss itself wait for it there.
            *stats, grad_hidden, grad_weight = fused_dense(
                hidden, compute_weight, labels, _inverse(dense_normalizer, score_dtype(hidden.dtype)), ignore_index)
            ctx.dense_grads, ctx.weight_grad = (grad_hidden, grad_weight), weight_grad
        else:
            stats = kernels.lm_head_scores(hidden, compute_weight, labels, ignore_index)
        token_loss, lse, entropy = stats
        loss, scores, selection, inv_normalizer = select_and_reduce(token_loss, entropy, valid, select,
                                                                    dense_normalizer)
        if needs_grad and ctx.dense_grads is None:
            save_for_row_backward(ctx, hidden, compute_weight, labels, selection, lse, inv_normalizer, kernels,
                                  weight_grad, dense=select is None)
        return loss, scores, selection

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused) -> tuple[Tensor | None, ...]:
        if ctx.dense_grads is None:
            grad_hidden, grad_weight = row_backward(ctx, grad_loss)
        else:
            (grad_hidden, dense_grad_weight), ctx.dense_grads = ctx.dense_grads, None  # ctx outlives backward
            grad_hidden = grad_hidden.mul_(grad_loss)
            grad_weight = ctx.weight_grad.add_scaled(dense_grad_weight, grad_loss)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def kernels_for(impl: str) -> ModuleType:
    if impl not in IMPLEMENTATIONS:
        raise UserError(f"unknown LM head implementation {impl!r}; choose from {sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[impl]


def fuses_dense(impl: str, tensor_parallel_size: int) -> bool:
    """Whether dense training's head runs one fused pass (its backward inside the scoring pass): the
    kernels have one, and the vocabulary is not split (a vocab-parallel head needs the global lse first)."""
    return tensor_parallel_size == 1 and hasattr(kernels_for(impl), "lm_head_fused_dense")


def needs_grad(hidden: Tensor, weight: Tensor) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)


def selective_lm_head_loss(hidden: Tensor, weight: Tensor, labels: Tensor, select: Selector | None,
                           ignore_index: int = -100, impl: str = "torch", normalizer: Tensor | float | None = None,
                           accumulate_into_grad: bool = False) -> LMHeadOutput:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` over the tokens ``select`` keeps.

    ``select=None`` trains densely on every valid token, dividing by ``normalizer`` (default: the valid
    count here; data parallelism passes the count over the selection group, best as a 0-dim device
    tensor). Without autograd (eval, torch.no_grad) only the scoring pass runs. ``accumulate_into_grad``:
    add the weight gradient in place into ``weight.grad`` rather than return it to autograd (see the
    module docstring: never under an engine that hooks the weight's gradient accumulation).
    """
    loss, scores, selection = _SelectiveLMHead.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), select, ignore_index,
        kernels_for(impl), needs_grad(hidden, weight), normalizer, accumulate_into_grad)
    return LMHeadOutput(loss=loss, scores=scores, selection=selection)


def resolve_impl(choice: str, device: torch.device) -> str:
    """`--lm-head-impl`: auto picks the Triton kernels on CUDA when triton is installed, else PyTorch."""
    if choice == "auto":
        return "triton" if device.type == "cuda" and lm_head_triton.is_available() else "torch"
    if choice == "triton" and not lm_head_triton.is_available():
        raise UserError("--lm-head-impl triton needs triton and a CUDA device (or TRITON_INTERPRET=1)")
    return choice
