"""Selection policies: given every token's detached scores, choose the tokens that get a loss.

A policy is a callable `TokenScores -> Selection` (the interface of the selective LM head) plus the
hooks of `Policy`, which the training step calls around it. Dense training has no policy at all (`None`),
which lets the LM head fuse its backward into the forward. The family (docs/selection.md; `build.py`
makes one from the flags):

  eslm      VaR threshold on the loss or entropy; the kept-token mean is the batch CVaR
  random    control: as many tokens as ESLM keeps, chosen uniformly
  ada-eslm  ESLM with alpha set each micro-batch by a rule (`ada.py`)
  eslm-kd   ESLM plus distillation from a teacher checkpoint on the kept tokens (`kd.py`)
  rho1      VaR threshold on the excess loss over a reference checkpoint (`rho1.py`)
  lfr       Learn-Focus-Review: whole samples dropped by their perplexity in focus phases (`lfr.py`)
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_eslm.eslm.distributed_threshold import global_var_threshold
from megatron_eslm.model.lm_head import LMHeadOutput, Selection, TokenScores


def token_score(scores: TokenScores, kind: str) -> Tensor:
    return scores.loss if kind == "loss" else scores.entropy


class Policy:
    """A selector plus the hooks the training step calls around it; the defaults do nothing, so a
    stateless selector only implements `__call__`."""

    def __call__(self, scores: TokenScores) -> Selection:
        raise NotImplementedError

    def start_step(self, iteration: int) -> None:
        """Before the micro-batches of optimizer step `iteration` (1-based): schedules and phases."""

    def prepare(self, tokens: Tensor, labels: Tensor, index: Tensor | None) -> None:
        """Before the micro-batch's forward, on the model's device: reference/teacher passes, sample ids."""

    def objective(self, model: torch.nn.Module, hidden: Tensor, out: LMHeadOutput) -> Tensor:
        """The micro-batch loss to backpropagate; by default the selective LM head's kept-token mean."""
        return out.loss

    def extra_flops(self) -> float:
        """FLOPs this policy ran for the last micro-batch beyond the student's own pass."""
        return 0.0

    def state_dict(self) -> dict:
        """What a checkpoint must hold for an exact resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ESLMPolicy(Policy):
    """Keep tokens whose score is at or above the alpha-quantile (VaR) of the batch; the loss is the mean
    over kept tokens, which for the loss score is the batch CVaR at level alpha. The threshold and the
    kept count are taken over `group` (the selection group; None: this process alone)."""

    def __init__(self, alpha: float, score: str, threshold_mode: str = "sketch-exact",
                 sketch_size: int = 2048, group=None):
        self.alpha = alpha
        self.score = score
        self.threshold_mode = threshold_mode
        self.sketch_size = sketch_size
        self.group = group

    def __call__(self, scores: TokenScores) -> Selection:
        return self.select(token_score(scores, self.score), scores.valid)

    def select(self, score: Tensor, valid: Tensor) -> Selection:
        """The VaR rule on any per-token score (the other policies reuse it on theirs)."""
        result = global_var_threshold(score, valid, self.alpha, self.threshold_mode, self.sketch_size,
                                      self.group)
        return Selection(kept=result.kept_local, normalizer=float(result.kept_global),
                         threshold=None if result.threshold is None else float(result.threshold))


class RandomPolicy(Policy):
    """Control: keep a uniformly random subset of valid tokens, as many as ESLM would keep on this batch.
    Draws from torch's global RNG, so a checkpoint's RNG state makes it resume exactly."""

    def __init__(self, eslm: ESLMPolicy):
        self.eslm = eslm

    def __call__(self, scores: TokenScores) -> Selection:
        eslm = self.eslm(scores)  # with data parallelism: this rank's kept tokens, the group's count
        count = int(eslm.kept.sum())
        valid_rows = scores.valid.nonzero().squeeze(1)
        chosen = valid_rows[torch.randperm(valid_rows.numel(), device=valid_rows.device)[:count]]
        kept = torch.zeros_like(scores.valid)
        kept[chosen] = True
        return Selection(kept=kept, normalizer=eslm.normalizer, threshold=None)
