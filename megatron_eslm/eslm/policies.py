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
  eslm and random at --eslm-granularity sequence: whole sequences kept before the step (`sequence.py`)
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from megatron_eslm.config import THRESHOLD_SCOPES
from megatron_eslm.eslm.distributed_threshold import ThresholdResult, global_var_threshold
from megatron_eslm.eslm.sketch import MergedSketch, RunningSketch
from megatron_eslm.model.lm_head import LMHeadOutput, Selection, TokenScores


def token_score(scores: TokenScores, kind: str) -> Tensor:
    return scores.loss if kind == "loss" else scores.entropy


class Policy:
    """A selector plus the hooks the training step calls around it; the defaults do nothing, so a
    stateless selector only implements `__call__`. One that does not select tokens (`selects_tokens` False,
    LFR's skip mode) leaves the step dense and sees each micro-batch's scores through `record`."""

    selects_tokens = True
    selects_sequences = False  # chooses whole sequences before the step's training pass (`eslm/sequence.py`)

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


def selection_of(result: ThresholdResult) -> Selection:
    """A threshold call's kept tokens and count, with what it reports for the step's metrics (all device
    tensors; the threshold is +inf when the group had no finite score)."""
    return Selection(kept=result.kept_local, normalizer=result.kept_global, threshold=result.threshold,
                     rank_error_bound=result.rank_error_bound, bytes_sent=result.bytes_sent,
                     nonfinite=result.nonfinite)


class ESLMPolicy(Policy):
    """Keep tokens whose score is at or above the alpha-quantile (VaR) of the batch; the loss is the mean
    over kept tokens, which for the loss score is the batch CVaR at level alpha. The threshold and the
    kept count are taken over `group` (the selection group; None: this process alone).

    `scope` (--eslm-threshold-scope): "micro-batch" takes each micro-batch's threshold over that
    micro-batch's scores across the group. "previous-step" takes it, for every micro-batch of step t, from
    the merged sketch of ALL micro-batches of step t-1 over the group (step 1, or a step after one with no
    finite score, falls back to the micro-batch threshold of `threshold_mode`); the normaliser is still
    the micro-batch's exact kept count over the group. For that each call all-gathers its micro-batch's
    sketch (as the sketch modes do anyway) and merges the group's payloads into one running sketch of m
    blocks (`RunningSketch`), identical on every rank of the group: the state, two such sketches of
    4 (m + 2) bytes whatever the ranks and micro-batches, rotates at `start_step` and is checkpointed."""

    def __init__(self, alpha: float | Tensor, score: str, threshold_mode: str = "sketch-exact",
                 sketch_size: int = 2048, group=None, scope: str = "micro-batch"):
        if scope not in THRESHOLD_SCOPES:
            raise ValueError(f"unknown threshold scope {scope!r}; choose from {', '.join(THRESHOLD_SCOPES)}")
        self.alpha = alpha
        self.score = score
        self.threshold_mode = threshold_mode
        self.sketch_size = sketch_size
        self.group = group
        self.scope = scope
        self._step = 0  # the step whose micro-batches `_current` holds
        self._current: RunningSketch | None = None  # this step's micro-batches merged so far, over the group
        self._previous: RunningSketch | None = None  # the previous step's, all its micro-batches
        self._reference: MergedSketch | None = None  # `_previous` read out (lazily, once per step)

    def start_step(self, iteration: int) -> None:
        if self.scope == "previous-step" and iteration != self._step:
            self._previous, self._current, self._reference, self._step = self._current, None, None, iteration

    def __call__(self, scores: TokenScores) -> Selection:
        return self.select(token_score(scores, self.score), scores.valid)

    def select(self, score: Tensor, valid: Tensor) -> Selection:
        """The VaR rule on any per-token score (the other policies reuse it on theirs)."""
        if self.scope == "micro-batch":
            return selection_of(global_var_threshold(score, valid, self.alpha, self.threshold_mode,
                                                     self.sketch_size, self.group))
        result = global_var_threshold(score, valid, self.alpha, self.threshold_mode, self.sketch_size,
                                      self.group, reference=self.previous_sketch(score.device), keep_sketch=True)
        self._current = RunningSketch.absorb(self._current, result.sketch, self.sketch_size)
        return selection_of(result)

    def previous_sketch(self, device: torch.device | None = None) -> MergedSketch | None:
        """The previous step's sketch, merged over the group and all its micro-batches and compacted to m
        blocks after each (None: none yet). Its slack, the E of the bound in docs/threshold.md, is
        sigma = sum over the step's micro-batches t of E_t + floor((N_t - 1) / m), N_t the step's finite
        scores up to micro-batch t: the merges' slack plus the compactions'."""
        if self._previous is None:
            return None
        if self._reference is None:
            self._reference = self._previous.merged(self.sketch_size, device)
        return self._reference

    def state_dict(self) -> dict:
        if self.scope == "micro-batch":
            return {}
        return {"step": self._step, "current": None if self._current is None else self._current.state_dict(),
                "previous": None if self._previous is None else self._previous.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scope == "micro-batch" or "step" not in state:
            return  # saved with the micro-batch scope: the first resumed step has no previous sketch
        self._step = state["step"]
        self._current = RunningSketch.from_state(state["current"])
        self._previous = RunningSketch.from_state(state["previous"])
        self._reference = None


class RandomPolicy(Policy):
    """Control: keep a uniformly random subset of valid tokens, as many as ESLM would keep on this batch:
    every valid token draws a uniform key and the `count` smallest keys are kept (a random subset of that
    size, chosen on the device without reading the count). Each draw has its own generator, seeded by
    (seed, stream, iteration, micro-batch): `stream` is the data x context rank, so replicas (and sequence
    shards) drop different positions of their micro-batches (one shared stream would drop the same ones on
    every replica), and a resumed run draws exactly what the uninterrupted one would, with no generator
    state to checkpoint."""

    def __init__(self, eslm: ESLMPolicy, seed: int = 0, stream: int = 0):
        self.eslm = eslm
        self.seed = seed
        self.stream = stream
        self.iteration = 0
        self.draws = 0  # micro-batches drawn in this step

    def start_step(self, iteration: int) -> None:
        self.eslm.start_step(iteration)
        self.iteration, self.draws = iteration, 0

    def _generator(self, device: torch.device) -> torch.Generator:
        key = np.random.SeedSequence([self.seed, self.stream, self.iteration, self.draws]).generate_state(1)[0]
        self.draws += 1
        return torch.Generator(device=device).manual_seed(int(key))

    def __call__(self, scores: TokenScores) -> Selection:
        eslm = self.eslm(scores)  # with data parallelism: this rank's kept tokens, the group's count
        valid = scores.valid
        keys = torch.rand(valid.shape, generator=self._generator(valid.device), device=valid.device,
                          dtype=torch.float64)
        order = torch.where(valid, keys, 2.0).argsort()  # valid tokens first, in random order
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        kept = valid & (rank < eslm.kept.sum())
        return Selection(kept=kept, normalizer=eslm.normalizer, threshold=None, bytes_sent=eslm.bytes_sent,
                         nonfinite=eslm.nonfinite)

    def state_dict(self) -> dict:
        return self.eslm.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.eslm.load_state_dict(state)
