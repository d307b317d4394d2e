"""One training step, top to bottom (the trainer adds data, logging, evaluation and checkpoints):

  for each micro-batch of the global batch:
      policy.prepare(tokens, labels, index)       # the policy's own passes (teacher, reference), sample ids
      hidden = model(tokens)                      # transformer forward, all tokens
      out = model.loss(hidden, labels, policy)    # LM-head pass 1 over all tokens -> per-token scores;
                                                  # policy -> kept tokens (VaR threshold);
                                                  # loss = mean loss of the kept tokens
      loss = policy.objective(model, hidden, out) # out.loss, plus distillation for eslm-kd
      (loss / num_micro_batches).backward()       # LM-head backward over kept rows only, then the
                                                  # (dense) transformer backward
  clip the gradient norm, set the learning rate, optimizer step.

One ESLM threshold covers one micro-batch: a micro-batch's backward cannot wait for the scores of
micro-batches that have not run yet (nor can a pipeline's). Each micro-batch's loss is its kept-token
mean and micro-batches are averaged, like Megatron's dense loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import contextlib
from typing import Callable, ContextManager, Iterator

import torch

from megatron_eslm.config import ModelConfig
from megatron_eslm.eslm.policies import Policy
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.training.flops import StepFlops, micro_batch_flops


@dataclass
class StepStats:
    """Sums over the micro-batches of one optimizer step."""
    loss_sum: float = 0.0
    valid: int = 0
    kept_loss_sum: float = 0.0
    kept: int = 0
    thresholds: list[float] = field(default_factory=list)
    micro_batches: list[tuple[int, int, int]] = field(default_factory=list)  # (tokens, valid, kept)
    selective: bool = True
    policy_flops: float = 0.0  # the policy's own passes (teacher, reference): executed, not dense
    lr: float = 0.0
    grad_norm: float = 0.0

    def flops(self, cfg: ModelConfig, vocab_size: int) -> StepFlops:
        total = StepFlops()
        for tokens, valid, kept in self.micro_batches:
            total += micro_batch_flops(cfg, vocab_size, tokens, valid, kept, self.selective)
        total.executed += self.policy_flops
        return total


def forward_backward(model: GPTModel, policy: Policy | None, batches: Iterator[dict], num_micro_batches: int,
                     device: torch.device, lm_head_impl: str = "torch",
                     autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> StepStats:
    """Accumulate the gradients of one global batch; `policy=None` is dense training. `autocast` wraps
    the forward only (bf16); backward runs outside it, as PyTorch recommends."""
    stats = StepStats(selective=policy is not None)
    for _ in range(num_micro_batches):
        batch = next(batches)
        tokens = batch["tokens"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        with autocast():
            if policy is not None:
                policy.prepare(tokens, labels, batch.get("index"))  # reference/teacher pass, sample ids
            hidden = model(tokens)
            out = model.loss(hidden, labels, policy, impl=lm_head_impl)
            loss = out.loss if policy is None else policy.objective(model, hidden, out)
        (loss / num_micro_batches).backward()
        if policy is not None:
            stats.policy_flops += policy.extra_flops()
        scores, sel = out.scores, out.selection
        valid, kept = int(scores.valid.sum()), int(sel.kept.sum())
        stats.loss_sum += float(scores.loss.sum())
        stats.valid += valid
        stats.kept_loss_sum += float(scores.loss[sel.kept].sum())
        stats.kept += kept
        if sel.threshold is not None:
            stats.thresholds.append(sel.threshold)
        stats.micro_batches.append((tokens.numel(), valid, kept))
    return stats


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float, clip_grad: float) -> float:
    """Clip (clip_grad 0: only measure) the global gradient norm, set the rate, step; returns the norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else float("inf")))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return grad_norm
