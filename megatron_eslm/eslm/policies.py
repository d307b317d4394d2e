"""Selection policies: given every token's detached scores, choose the tokens that get a loss.

A policy is a callable `TokenScores -> Selection` (the interface of the selective LM head). Dense
training has no policy at all (`None`), which lets the LM head fuse its backward into the forward.
"""
from __future__ import annotations

import torch

from megatron_eslm.config import SelectionConfig
from megatron_eslm.eslm.distributed_threshold import global_var_threshold
from megatron_eslm.model.lm_head import Selection, TokenScores


def token_score(scores: TokenScores, kind: str) -> torch.Tensor:
    return scores.loss if kind == "loss" else scores.entropy


class ESLMPolicy:
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
        result = global_var_threshold(token_score(scores, self.score), scores.valid, self.alpha,
                                      self.threshold_mode, self.sketch_size, self.group)
        return Selection(kept=result.kept_local, normalizer=float(result.kept_global),
                         threshold=None if result.threshold is None else float(result.threshold))


class RandomPolicy:
    """Control: keep a uniformly random subset of valid tokens, as many as ESLM would keep on this batch.
    Draws from torch's global RNG, so a checkpoint's RNG state makes it resume exactly."""

    def __init__(self, eslm: ESLMPolicy):
        self.eslm = eslm

    def __call__(self, scores: TokenScores) -> Selection:
        count = int(self.eslm(scores).normalizer)
        valid_rows = scores.valid.nonzero().squeeze(1)
        chosen = valid_rows[torch.randperm(valid_rows.numel(), device=valid_rows.device)[:count]]
        kept = torch.zeros_like(scores.valid)
        kept[chosen] = True
        return Selection(kept=kept, normalizer=float(count), threshold=None)


def build_policy(cfg: SelectionConfig) -> ESLMPolicy | RandomPolicy | None:
    if cfg.selection == "none":
        return None
    eslm = ESLMPolicy(cfg.eslm_alpha, cfg.eslm_score, cfg.eslm_threshold, cfg.eslm_sketch_size)
    return eslm if cfg.selection == "eslm" else RandomPolicy(eslm)
