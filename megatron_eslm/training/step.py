"""One training step, top to bottom (the trainer adds data, logging, evaluation and checkpoints):

  for each of this rank's micro-batches (1F1B across stages when pipelined, `pipeline_parallel/schedules`):
      hidden = model(tokens)                      # transformer forward, all tokens; on the last stage the
                                                  # model's forward goes on with the head below
      policy.prepare(tokens, labels, index)       # the policy's own passes (teacher, reference), sample ids
      out = model.loss(hidden, labels, policy)    # LM-head pass 1 over all tokens -> per-token scores;
                                                  # policy -> kept tokens (VaR threshold over the
                                                  # selection group); loss = sum of kept losses / the
                                                  # kept count over the selection group
      loss = policy.objective(model, hidden, out) # out.loss, plus distillation for eslm-kd
      (loss / num_micro_batches).backward()       # LM-head backward over kept rows only, then the
                                                  # (dense) transformer backward
  sum gradients over data-parallel replicas (and tied / sequence-parallel copies), clip the global
  gradient norm, set the learning rate, optimizer step.
  (--deepspeed: DeepSpeed's engine runs the backward, the data-parallel reduction, the clipping and the
  step; `distributed/deepspeed_engine.py`.)

One ESLM threshold covers one micro-batch index across the selection group: the same micro-batch of
every data-parallel replica, i.e. the micro-batch one process would see with DP times the micro-batch
size. A micro-batch's backward cannot wait for the scores of micro-batches that have not run yet (nor can
a pipeline's). Each rank divides its kept losses by the group's kept count, so the replicas' losses add
up to the one-process micro-batch loss and the gradients are summed, not averaged; dense training
divides by the group's valid-token count for the same reason. See docs/parallelism.md.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch

from megatron_eslm import parallel_state
from megatron_eslm.config import ModelConfig
from megatron_eslm.distributed import collectives
from megatron_eslm.distributed.grads import clip_grad_norm
from megatron_eslm.eslm.policies import Policy
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.model.lm_head import LMHeadOutput
from megatron_eslm.pipeline_parallel.p2p_communication import TensorSpec
from megatron_eslm.pipeline_parallel.schedules import Backward, autograd_backward, get_forward_backward_func
from megatron_eslm.training.flops import StepFlops, micro_batch_flops

IGNORE_INDEX = -100


@dataclass
class StepStats:
    """Sums over the micro-batches of one optimizer step (this rank's until `reduce_step_stats`)."""
    loss_sum: float = 0.0
    valid: int = 0
    kept_loss_sum: float = 0.0
    kept: int = 0
    tokens: int = 0
    threshold_sum: float = 0.0
    thresholds: int = 0  # micro-batches with a threshold
    # Summed over the micro-batches; each micro-batch's value is the same on every rank of the selection
    # group (the threshold calls report group totals, and every rank hands the collectives equal shapes):
    threshold_bound: int = 0  # rank-error bounds B of the thresholds, in tokens (0 for the exact modes)
    threshold_bytes: int = 0  # payload one rank handed to the threshold collectives
    nonfinite: int = 0  # valid tokens of the group whose score was NaN or +-inf (left out of the quantile)
    policy_flops: float = 0.0  # the policy's own passes (teacher, reference): executed, not dense
    selective: bool = True
    lr: float = 0.0
    grad_norm: float = 0.0

    def add(self, num_tokens: int, out: LMHeadOutput) -> None:
        scores, selection = out.scores, out.selection
        self.loss_sum += float(scores.loss.sum())
        self.valid += int(scores.valid.sum())
        self.kept_loss_sum += float(scores.loss[selection.kept].sum())
        self.kept += int(selection.kept.sum())
        self.tokens += num_tokens
        if selection.threshold is not None:
            self.threshold_sum += selection.threshold
            self.thresholds += 1
        if selection.rank_error_bound is not None:
            self.threshold_bound += selection.rank_error_bound
        self.threshold_bytes += selection.bytes_sent
        self.nonfinite += selection.nonfinite

    @property
    def threshold(self) -> float | None:
        """Mean threshold over the step's micro-batches, None without ESLM."""
        return self.threshold_sum / self.thresholds if self.thresholds else None

    def flops(self, cfg: ModelConfig, vocab_size: int) -> StepFlops:
        # The FLOPs of a micro-batch are linear in its token counts, so the step's totals give the sum.
        total = micro_batch_flops(cfg, vocab_size, self.tokens, self.valid, self.kept, self.selective)
        total.executed += self.policy_flops
        return total


SUMMED = ("loss_sum", "valid", "kept_loss_sum", "kept", "tokens", "threshold_sum", "thresholds", "policy_flops",
           "threshold_bound", "threshold_bytes", "nonfinite")
_SHARED = ("threshold_bound", "threshold_bytes", "nonfinite")  # equal on every rank of the group: not added up


def reduce_step_stats(stats: StepStats) -> StepStats:
    """The step's sums over the whole global batch, on every rank: summed over the selection group on
    the last stage (which alone scores tokens), then sent to the other stages, so every rank logs what
    one process would. Thresholds are the same on every replica; their mean is unchanged by the sum.
    The `_SHARED` sums, equal on every rank of the group, are divided back by the group's size (exact:
    integers below 2^53)."""
    values = torch.tensor([float(getattr(stats, name)) for name in SUMMED], dtype=torch.float64,
                          device=_device())
    group = parallel_state.selection_group()
    if parallel_state.is_pipeline_last_stage() and group is not None:
        collectives.all_reduce(values, group, collectives.METRICS)
        shared = torch.tensor([name in _SHARED for name in SUMMED], device=values.device)
        values = torch.where(shared, values / torch.distributed.get_world_size(group), values)
    if parallel_state.pipeline_model_parallel_size() > 1:
        collectives.broadcast(values, parallel_state.pipeline_last_rank(),
                              parallel_state.pipeline_model_parallel_group(), collectives.METRICS)
    for name, value in zip(SUMMED, values.tolist()):
        setattr(stats, name, type(getattr(stats, name))(value))
    return stats


def _device() -> torch.device:
    """Where collectives of small host values live: NCCL needs CUDA tensors, gloo takes CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.is_initialized() and \
        torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def dense_normalizer(labels: torch.Tensor) -> float | None:
    """Dense training's loss divisor under data parallelism: the valid tokens of the micro-batch over the
    selection group (None: this rank's tokens are the whole micro-batch, or no gradient is taken)."""
    group = parallel_state.selection_group()
    if group is None or not torch.is_grad_enabled():
        return None
    count = (labels != IGNORE_INDEX).sum().to(torch.float64)
    return float(collectives.all_reduce(count, group, collectives.DENSE_NORMALIZER))


def forward_backward(model: GPTModel, policy: Policy | None, batches: Iterator[dict], num_micro_batches: int,
                     device: torch.device, lm_head_impl: str = "torch",
                     autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                     forward_only: bool = False, grad_scale: float = 1.0,
                     backward: Backward = autograd_backward, forward: Callable | None = None) -> StepStats:
    """Accumulate the gradients of this rank's micro-batches (`forward_only`: just score them);
    `policy=None` is dense training. `autocast` wraps the forward only (bf16); backward runs outside it,
    as PyTorch recommends. Each micro-batch loss is multiplied by grad_scale / num_micro_batches and
    handed to `backward`; `forward` runs the model (default: `model` itself). DeepSpeed's engine supplies
    both (`distributed/deepspeed_engine.py`). Returns this rank's sums (nonzero on the last pipeline
    stage only)."""
    stats = StepStats(selective=policy is not None)
    if num_micro_batches == 0:  # e.g. a validation split smaller than one micro-batch per replica
        return stats
    first = next(batches)
    batches = itertools.chain([first], batches)
    micro_batch, seq_length = first["tokens"].shape
    if model.sequence_parallel:
        seq_length //= parallel_state.tensor_model_parallel_size()
    param_dtype = next(model.parameters()).dtype
    spec = TensorSpec((micro_batch, seq_length, model.cfg.hidden_size), param_dtype, device)
    forward = forward or model

    def forward_step(input_tensor: torch.Tensor | None) -> torch.Tensor:
        batch = next(batches)
        tokens = batch["tokens"].to(device, non_blocking=True)

        def head(hidden: torch.Tensor) -> tuple[torch.Tensor, LMHeadOutput]:
            labels = batch["labels"].to(device, non_blocking=True)
            if policy is not None:
                policy.prepare(tokens, labels, batch.get("index"))  # reference/teacher pass, sample ids
            normalizer = dense_normalizer(labels) if policy is None else None
            out = model.loss(hidden, labels, policy, impl=lm_head_impl, normalizer=normalizer)
            return (out.loss if policy is None else policy.objective(model, hidden, out)), out

        with autocast():
            if not parallel_state.is_pipeline_last_stage():
                return forward(tokens, input_tensor)
            loss, out = forward(tokens, input_tensor, head=head)
        stats.add(tokens.numel(), out)
        if policy is not None:
            stats.policy_flops += policy.extra_flops()
        return loss * grad_scale / num_micro_batches

    get_forward_backward_func()(forward_step, num_micro_batches, forward_only, spec, backward)
    return stats


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float, clip_grad: float) -> float:
    """Clip (clip_grad 0: only measure) the global gradient norm, set the rate, step; returns the norm."""
    grad_norm = clip_grad_norm([p for p in model.parameters() if p.grad is not None], clip_grad)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return grad_norm
