"""Ada-ESLM: ESLM whose alpha moves during training, within [--eslm-alpha-min, --eslm-alpha-max].

Rules (equations and rationale in docs/selection.md):
  grad-mass  after each micro-batch, alpha moves (momentum mu) toward the largest fraction of the valid
             tokens, lowest scores first and whole ties at a time, whose share of the logit-gradient mass
             sum(1 - p_y) is at most the budget eps: drop what barely contributes to the dense gradient,
             keep the rest; counted over the selection group by a fixed-size radix select
  linear     alpha(t) = min + (max - min) * t / T
  cosine     alpha(t) = min + (max - min) * (1 - cos(pi * t / T)) / 2
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_eslm.eslm.distributed_threshold import (Collectives, LocalCollectives, MassPrefix,
                                                      group_collectives, mass_prefix_over)
from megatron_eslm.eslm.policies import ESLMPolicy, Policy, token_score
from megatron_eslm.model.lm_head import Selection, TokenScores
from megatron_eslm.training.timers import get_timers


def gradient_mass(loss: Tensor) -> Tensor:
    """Each token's logit-gradient mass 1 - p_y = -expm1(-loss), in float64 (accurate for small losses):
    d loss_i / d logits_i = softmax - onehot has L1 norm 2 (1 - p_y), and p_y = exp(-loss_i)."""
    return -torch.expm1(-loss.detach().double())


def droppable_over(comm: Collectives, score: Tensor, loss: Tensor, valid: Tensor, budget: float) -> MassPrefix:
    """The grad-mass rule's d over the tokens of every rank of `comm`'s group (docs/selection.md): with
    m_i = 1 - p_y of each valid token, M their total, the valid tokens whose score is below the largest
    score t with sum of m_i over scores < t at most budget * M. Tokens tied at the boundary score are
    never split: all of a tie is dropped or none of it. Tokens with a non-finite score (or loss NaN) are
    left out of d, of M and of `total`; masses are summed exactly in fixed point (2^-32 units), so the
    count is the same for one process and for any split of its tokens over data-parallel ranks. A
    fixed-size radix select (`mass_prefix_over`): 4 histogram all-reduces of 4 KB per rank, whatever the
    number of tokens and of ranks."""
    return mass_prefix_over(comm, score, gradient_mass(loss), valid, budget)


def droppable_count(score: Tensor, loss: Tensor, valid: Tensor, budget: float) -> int:
    """How many valid tokens, taken from the lowest score up and whole ties at a time, carry at most
    `budget` of the batch's logit-gradient L1 mass: `droppable_over` on this process alone."""
    return int(droppable_over(LocalCollectives(), score, loss, valid, budget).count)


def group_droppable_count(score: Tensor, loss: Tensor, valid: Tensor, budget: float, group=None) -> tuple[int, int]:
    """`droppable_count` over the valid tokens of every rank of the selection group, equal to one
    process's count on their concatenation, and the group's count of the tokens the rule counts. Summing
    each rank's own count would not do: it is the largest prefix of each rank's tokens, not of the union,
    so it is smaller and depends on the data-parallel size."""
    result = droppable_over(group_collectives(group), score, loss, valid, budget)
    return int(result.count), int(result.total)


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

    def moved(self, alpha: float | Tensor, level: Tensor) -> Tensor:
        """grad-mass: the next alpha from the current one and the level measured on this micro-batch, as a
        0-dim float64 device tensor (the same IEEE operations as on Python floats), never read by the host."""
        return (self.momentum * alpha + (1.0 - self.momentum) * level).clamp(self.alpha_min, self.alpha_max)


class AdaESLMPolicy(Policy):
    """ESLM at the alpha the rule gives; alpha is checkpointed. The grad-mass level is pooled over the
    selection group (`droppable_over`), so every rank moves alpha alike, as one process would; alpha then
    lives on the device and the threshold reads it there (no host sync per micro-batch)."""

    def __init__(self, eslm: ESLMPolicy, rule: AlphaRule):
        self.eslm = eslm
        self.rule = rule
        eslm.alpha = rule.clip(eslm.alpha)  # grad-mass starts at --eslm-alpha; schedules set it per step

    @property
    def alpha(self) -> float | Tensor:
        return self.eslm.alpha

    def start_step(self, iteration: int) -> None:
        self.eslm.start_step(iteration)
        if self.rule.kind != "grad-mass":
            self.eslm.alpha = self.rule.scheduled(iteration)

    def __call__(self, scores: TokenScores) -> Selection:
        selection = self.eslm(scores)
        if self.rule.kind == "grad-mass":
            with get_timers().phase("threshold"):  # the selection's other radix select over the group
                mass = droppable_over(group_collectives(self.eslm.group), token_score(scores, self.eslm.score),
                                      scores.loss, scores.valid, self.rule.budget)
            level = mass.count.double() / mass.total.clamp(min=1).double()
            self.eslm.alpha = torch.where(mass.total > 0, self.rule.moved(self.eslm.alpha, level), self.eslm.alpha)
        return selection

    def state_dict(self) -> dict:
        return {"alpha": float(self.eslm.alpha), "eslm": self.eslm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.eslm.load_state_dict(state.get("eslm", {}))
        self.eslm.alpha = state["alpha"]
