"""Learn-Focus-Review (Prakriya et al. 2024) at the level of training samples.

Phases by 1-based step t: learn for t <= P (every sample), then cycles of F focus steps and R review
steps. Every sample's perplexity comes from the training forward itself (log-perplexity = mean token
loss over its valid tokens; no extra pass) and goes into a table keyed by the dataset's sample index. In a
focus step a sample is dropped, all of its tokens get no loss, when its log-perplexity is below the
s-quantile (s = --lfr-drop-fraction) of the table: the easiest fraction of the samples seen in the last
R steps, this one included (the perplexities that guide a focus phase are those of the review or learn
steps before it, as in the paper, and the window slides with the model so older, higher perplexities do
not inflate the drop rate). Review and learn steps train on everything. The quantile is the VaR rule of
`threshold.py` over the selection group's tables (ties kept); the table and the step survive resume.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_eslm.errors import UserError
from megatron_eslm.eslm.distributed_threshold import global_var_threshold, group_collectives
from megatron_eslm.eslm.policies import Policy
from megatron_eslm.model.lm_head import Selection, TokenScores


@dataclass
class Phases:
    learn: int  # P
    focus: int  # F
    review: int  # R, also the table's window in steps

    def phase(self, iteration: int) -> str:
        if iteration <= self.learn:
            return "learn"
        position = (iteration - self.learn - 1) % (self.focus + self.review)
        return "focus" if position < self.focus else "review"


class LFRPolicy(Policy):
    def __init__(self, phases: Phases, drop_fraction: float, threshold_mode: str = "exact",
                 sketch_size: int = 2048, group=None):
        self.phases = phases
        self.drop_fraction = drop_fraction
        self.threshold_mode = threshold_mode
        self.sketch_size = sketch_size
        self.group = group
        self.iteration = 0
        self.table: dict[int, tuple[float, int]] = {}  # sample index -> (log-perplexity, step recorded)
        self._index: list[int] = []

    def start_step(self, iteration: int) -> None:
        self.iteration = iteration
        oldest = iteration - self.phases.review  # keep the last R steps, this one included
        self.table = {i: entry for i, entry in self.table.items() if entry[1] > oldest}

    def prepare(self, tokens: Tensor, labels: Tensor, index: Tensor | None) -> None:
        if index is None:
            raise UserError("--selection lfr needs the dataset's sample indices (an 'index' field per sample)")
        self._index = index.tolist()

    def __call__(self, scores: TokenScores) -> Selection:
        valid = scores.valid.view(len(self._index), -1)
        counts = valid.sum(1)
        log_ppl = (scores.loss.view_as(valid).sum(1) / counts.clamp(min=1)).float()
        for index, value, count in zip(self._index, log_ppl.tolist(), counts.tolist()):
            if count:
                self.table[index] = (value, self.iteration)
        threshold, bound, sent, nonfinite = None, None, 0, 0
        kept_samples = torch.ones_like(counts, dtype=torch.bool)
        if self.phases.phase(self.iteration) == "focus":
            values = torch.tensor([value for value, _ in self.table.values()], dtype=torch.float32,
                                  device=log_ppl.device)
            result = global_var_threshold(values, torch.ones_like(values, dtype=torch.bool), self.drop_fraction,
                                          self.threshold_mode, self.sketch_size, self.group)
            sent, nonfinite = result.bytes_sent, result.nonfinite
            if result.threshold is not None:
                threshold, bound = float(result.threshold), result.rank_error_bound
                kept_samples = log_ppl >= result.threshold
        kept = (valid & kept_samples.unsqueeze(1)).flatten()
        normalizer = group_collectives(self.group).all_reduce(kept.sum())
        return Selection(kept=kept, normalizer=float(normalizer), threshold=threshold, rank_error_bound=bound,
                         bytes_sent=sent, nonfinite=nonfinite)

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "table": dict(self.table)}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self.table = dict(state["table"])
