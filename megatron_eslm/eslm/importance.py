"""eslm-is: importance-sampled ESLM, selection that cannot starve the easy tokens.

ESLM keeps the tokens at or above the VaR threshold t of the batch. eslm-is keeps those with weight 1 and,
of the others, each at random with probability p (--eslm-is-prob) and weight 1/p; the loss is divided by
the number n of finite valid tokens of the selection group (dense training's divisor):

    L_IS = (1/n) [ sum_{s_i >= t} L_i + (1/p) sum_{s_i < t} u_i L_i ],   u_i ~ Bernoulli(p)

so E[L_IS] = (1/n) sum_i L_i, the dense loss, and likewise its gradient: an unbiased estimate of the dense
gradient whose LM-head backward runs over the kept rows only, about (1 - alpha) + alpha p of them. p = 1
is dense training. The threshold, its modes and its score (--eslm-score) are ESLM's (`ESLMPolicy`).

The draws are keyed, not streamed: u_i compares a hash of (seed, iteration, the sample's dataset index,
the token's global position in its sequence) with p, computed on the device (splitmix64 in int64), so a
token draws the same whatever rank or micro-batch it lands on: data and context parallelism equal one
process, and a resumed run draws what the uninterrupted one would, with no generator state.
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_eslm.context_parallel.sharding import positions as sequence_positions
from megatron_eslm.errors import UserError
from megatron_eslm.eslm.distributed_threshold import group_collectives
from megatron_eslm.eslm.policies import ESLMPolicy, Policy, token_score
from megatron_eslm.keyed_random import mix, shift_right
from megatron_eslm.model.lm_head import Selection, TokenScores


def token_uniforms(seed: int, iteration: int, index: Tensor, positions: Tensor) -> Tensor:
    """[len(index) * len(positions)] float64 in [0, 1): one per (sample index, position), batch-major."""
    key = mix(mix(torch.full_like(index, seed)) ^ iteration)
    key = mix(key ^ index).unsqueeze(1)
    return shift_right(mix(key ^ positions.to(torch.int64).unsqueeze(0)), 11).double().mul_(2.0 ** -53).reshape(-1)


class ESLMISPolicy(Policy):
    def __init__(self, eslm: ESLMPolicy, prob: float, seed: int):
        self.eslm, self.prob, self.seed = eslm, prob, seed
        self.iteration = 0
        self._index: Tensor | None = None

    def start_step(self, iteration: int) -> None:
        self.eslm.start_step(iteration)
        self.iteration = iteration

    def prepare(self, tokens: Tensor, labels: Tensor, index: Tensor | None) -> None:
        if index is None:
            raise UserError("--selection eslm-is needs the dataset's sample indices (an 'index' field per sample)")
        self._index = index.to(tokens.device, dtype=torch.int64, non_blocking=True)

    def __call__(self, scores: TokenScores) -> Selection:
        above = self.eslm(scores)  # the VaR rule: its kept tokens have weight 1
        score = token_score(scores, self.eslm.score)
        finite = scores.valid & torch.isfinite(score)
        positions = sequence_positions(score.numel() // self._index.numel(), score.device)  # this rank's tokens'
        uniforms = token_uniforms(self.seed, self.iteration, self._index, positions)
        sampled = finite & ~above.kept & (uniforms < self.prob)
        count = group_collectives(self.eslm.group).all_reduce(finite.sum())  # n: dense training's divisor
        return Selection(kept=above.kept | sampled, normalizer=count, threshold=above.threshold,
                         rank_error_bound=above.rank_error_bound, bytes_sent=above.bytes_sent,
                         nonfinite=above.nonfinite, upweighted=sampled, upweight=1.0 / self.prob)

    def state_dict(self) -> dict:
        return self.eslm.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.eslm.load_state_dict(state)
