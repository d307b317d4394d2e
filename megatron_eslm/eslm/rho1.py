"""Rho-1 selective language modeling: train on the tokens with the largest excess loss over a frozen
reference model, score_i = loss_i(student) - loss_i(reference). The top 1 - alpha fraction is kept with
the same VaR threshold (tie rule, selection group, threshold modes) as ESLM."""
from __future__ import annotations

from torch import Tensor

from megatron_eslm.eslm.frozen_model import FrozenPass, frozen_pass
from megatron_eslm.eslm.policies import ESLMPolicy, Policy
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.model.lm_head import Selection, TokenScores


class Rho1Policy(Policy):
    def __init__(self, eslm: ESLMPolicy, reference: GPTModel):
        self.eslm = eslm
        self.reference = reference
        self._reference: FrozenPass | None = None

    def start_step(self, iteration: int) -> None:
        self.eslm.start_step(iteration)

    def prepare(self, tokens: Tensor, labels: Tensor, index: Tensor | None) -> None:
        self._reference = frozen_pass(self.reference, tokens, labels)

    def __call__(self, scores: TokenScores) -> Selection:
        excess = scores.loss - self._reference.scores.loss.to(scores.loss.dtype)
        return self.eslm.select(excess, scores.valid)

    def extra_flops(self) -> float:
        return self._reference.flops

    def state_dict(self) -> dict:
        return self.eslm.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.eslm.load_state_dict(state)
