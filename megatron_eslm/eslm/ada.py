"""Ada-ESLM: ESLM whose alpha moves during training, within [--eslm-alpha-min, --eslm-alpha-max].

Rules (equations and rationale in docs/selection.md):
  grad-mass  after each micro-batch, alpha moves (momentum mu) toward the largest fraction of the valid
             tokens, lowest scores first, whose share of the logit-gradient mass sum(1 - p_y) is at most
             the budget eps: drop what barely contributes to the dense gradient, keep the rest
  linear     alpha(t) = min + (max - min) * t / T
  cosine     alpha(t) = min + (max - min) * (1 - cos(pi * t / T)) / 2
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_eslm.eslm.distributed_threshold import group_collectives
from megatron_eslm.eslm.policies import ESLMPolicy, Policy, token_score
from megatron_eslm.model.lm_head import Selection, TokenScores


def droppable_count(score: Tensor, loss: Tensor, valid: Tensor, budget: float) -> int:
    """How many valid tokens, taken from the lowest score up, carry at most `budget` of the batch's
    logit-gradient L1 mass: d loss_i / d logits_i = softmax - onehot has L1 norm 2 (1 - p_y), and
    p_y = exp(-loss_i)."""
    order = score[valid].argsort()
    mass = -torch.expm1(-loss[valid][order].double())  # 1 - p_y, accurate for small losses
    if mass.numel() == 0:
        return 0
    cumulative = mass.cumsum(0)
    return int((cumulative <= budget * cumulative[-1]).sum())


@dataclass
class AlphaRule:
    kind: str  # one of config.ADA_ESLM_RULES
    alpha_min: float
    alpha_max: float
    budget: float  # grad-mass: eps, the share of gradient mass the dropped tokens may carry
    momentum: float  # grad-mass: mu, weight of the previous alpha
    train_iters: int  # schedules: T

    def clip(self, alpha: float) -> float:
        return min(max(alpha, self.alpha_min), self.alpha_max)

    def scheduled(self, iteration: int) -> float:
        """The linear or cosine schedule's alpha for 1-based step `iteration`."""
        x = min(iteration / self.train_iters, 1.0)
        ramp = x if self.kind == "linear" else (1.0 - math.cos(math.pi * x)) / 2.0
        return self.alpha_min + (self.alpha_max - self.alpha_min) * ramp

    def moved(self, alpha: float, level: float) -> float:
        """grad-mass: the next alpha from the current one and the level measured on this micro-batch."""
        return self.clip(self.momentum * alpha + (1.0 - self.momentum) * level)


class AdaESLMPolicy(Policy):
    """ESLM at the alpha the rule gives; alpha is checkpointed. The grad-mass level is pooled over the
    selection group (dropped counts and valid counts summed), so every rank moves alpha alike."""

    def __init__(self, eslm: ESLMPolicy, rule: AlphaRule):
        self.eslm = eslm
        self.rule = rule
        eslm.alpha = rule.clip(eslm.alpha)  # grad-mass starts at --eslm-alpha; schedules set it per step

    @property
    def alpha(self) -> float:
        return self.eslm.alpha

    def start_step(self, iteration: int) -> None:
        if self.rule.kind != "grad-mass":
            self.eslm.alpha = self.rule.scheduled(iteration)

    def __call__(self, scores: TokenScores) -> Selection:
        selection = self.eslm(scores)
        if self.rule.kind == "grad-mass":
            count = droppable_count(token_score(scores, self.eslm.score), scores.loss, scores.valid,
                                    self.rule.budget)
            dropped, valid = group_collectives(self.eslm.group).all_reduce(
                torch.tensor([count, int(scores.valid.sum())], device=scores.valid.device)).tolist()
            if valid:
                self.eslm.alpha = self.rule.moved(self.eslm.alpha, dropped / valid)
        return selection

    def state_dict(self) -> dict:
        return {"alpha": self.eslm.alpha}

    def load_state_dict(self, state: dict) -> None:
        self.eslm.alpha = state["alpha"]
