"""Sequence-granular selection (--eslm-granularity sequence): whole sequences of the global batch are kept or
dropped BEFORE the training forward, so a dropped sequence costs no forward and no backward of training.

The global batch is the candidates. ESLM scores each candidate by the mean of its valid tokens' loss (or
entropy, --eslm-score) from a forward without autograd: the student's own (every pipeline stage runs it,
the last one scores) or a smaller frozen proxy's (--eslm-scorer proxy, loaded like Rho-1's reference).
The VaR rule is then taken exactly over the G scores of the selection group: they are all-gathered (G
numbers), and the K = G - floor(alpha G) highest are kept, ties broken by position in the global batch
(lower first), so K is known on the host and every shape is static. The random control keeps K sequences
drawn by a key keyed by (seed, iteration): no scoring pass, the same draw on every rank and layout.

The kept indices are the same on every rank of the group (a function of the gathered scores, or of the
key), so the kept sequences are cut into micro-batches as the plain sampler cuts a global batch
(`training/step.py`, `select_sequences`).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from megatron_eslm.distributed import collectives
from megatron_eslm.eslm.frozen_model import frozen_pass
from megatron_eslm.eslm.policies import Policy, token_score
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.model.lm_head import TokenScores


class SequencePolicy(Policy):
    """Keeps `keep` of the global batch's sequences: by score (`score` loss or entropy, from the student or
    `proxy`) or, with `random_seed`, uniformly at random. `group`: the selection group the scores are
    gathered over (None: this process)."""

    selects_sequences = True

    def __init__(self, keep: int, score: str, group=None, proxy: GPTModel | None = None,
                 random_seed: int | None = None):
        self.keep = keep
        self.score = score
        self.group = group
        self.proxy = proxy
        self.random_seed = random_seed
        self.iteration = 0

    @property
    def student_scores(self) -> bool:
        """Whether the student's own no-autograd forward scores the candidates (the default scorer)."""
        return self.proxy is None and self.random_seed is None

    def start_step(self, iteration: int) -> None:
        self.iteration = iteration

    def sequence_scores(self, scores: TokenScores, batch_size: int) -> Tensor:
        """Each sequence's mean token score over its valid tokens, float64; -inf (ranked last) without a
        valid token or with a non-finite mean."""
        valid = scores.valid.view(batch_size, -1)
        values = token_score(scores, self.score).detach().view_as(valid).double()
        mean = torch.where(valid, values, 0.0).sum(1) / valid.sum(1)
        return torch.where(torch.isfinite(mean), mean, -torch.inf)

    def proxy_scores(self, tokens: Tensor, labels: Tensor) -> tuple[Tensor, float]:
        """The proxy's per-sequence scores of one micro-batch, and its forward FLOPs."""
        scored = frozen_pass(self.proxy, tokens, labels)
        return self.sequence_scores(scored.scores, tokens.shape[0]), scored.flops

    def kept(self, local: Tensor | None, candidates: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """The kept candidates' positions in the global batch, ascending ([keep] int64), and the VaR threshold
        (None for the random control). `local`: this rank's per-sequence scores, [micro-batches, mbs] (rank r's
        micro-batch j holds positions j * mbs * R + r * mbs + [0, mbs) of the group's R ranks), all-gathered
        here over the group."""
        if self.random_seed is not None:
            key = np.random.SeedSequence([self.random_seed, self.iteration]).generate_state(1)[0]
            generator = torch.Generator(device=device).manual_seed(int(key))
            order = torch.rand(candidates, generator=generator, device=device, dtype=torch.float64).argsort()
            return order[:self.keep].sort().values, None
        if self.group is not None:
            local = collectives.all_gather_into_tensor(local, self.group, collectives.SEQUENCE_SELECTION).transpose(0, 1)
        scores = local.reshape(-1)
        ranked, order = torch.sort(scores, descending=True, stable=True)  # ties: the lower position first
        return order[:self.keep].sort().values, ranked[self.keep - 1]
