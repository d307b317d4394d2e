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

The table's keys are the sample indices, which come from the data loader on the host; its values stay on
the device (0-dim views of each micro-batch's log-perplexities, with a flag for samples without a valid
token), so recording and thresholding read nothing back to the host.
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
        # sample index -> (log-perplexity, has valid tokens, step recorded); the first two 0-dim device tensors
        self.table: dict[int, tuple[Tensor, Tensor, int]] = {}
        self._index: list[int] = []

    def start_step(self, iteration: int) -> None:
        self.iteration = iteration
        oldest = iteration - self.phases.review  # keep the last R steps, this one included
        self.table = {i: entry for i, entry in self.table.items() if entry[2] > oldest}

    def prepare(self, tokens: Tensor, labels: Tensor, index: Tensor | None) -> None:
        if index is None:
            raise UserError("--selection lfr needs the dataset's sample indices (an 'index' field per sample)")
        self._index = index.tolist()  # a host tensor from the data loader: no device sync

    def __call__(self, scores: TokenScores) -> Selection:
        valid = scores.valid.view(len(self._index), -1)
        counts = valid.sum(1)
        log_ppl = (scores.loss.view_as(valid).sum(1) / counts.clamp(min=1)).float()
        for index, value, count in zip(self._index, log_ppl.unbind(), counts.unbind()):
            # a re-seen sample (an epoch shorter than the window) replaces its entry; one without a valid
            # token keeps the value it had (under this step's date)
            recorded, old = count > 0, self.table.get(index)
            if old is not None:
                value, recorded = torch.where(recorded, value, old[0]), recorded | old[1]
            self.table[index] = (value, recorded, self.iteration)
        threshold, bound, sent, nonfinite = None, None, 0, 0
        kept_samples = torch.ones_like(counts, dtype=torch.bool)
        if self.phases.phase(self.iteration) == "focus":
            # (`.to` moves only the entries a resumed checkpoint brought in on the CPU)
            values, recorded = (torch.stack([x.to(log_ppl.device) for x in column])
                                for column in list(zip(*self.table.values()))[:2])
            result = global_var_threshold(values, recorded, self.drop_fraction, self.threshold_mode,
                                          self.sketch_size, self.group)
            threshold, bound, sent, nonfinite = (result.threshold, result.rank_error_bound, result.bytes_sent,
                                                 result.nonfinite)
            kept_samples = log_ppl >= result.threshold  # +inf (no recorded sample in the group): none
        kept = (valid & kept_samples.unsqueeze(1)).flatten()
        normalizer = group_collectives(self.group).all_reduce(kept.sum())
        return Selection(kept=kept, normalizer=normalizer, threshold=threshold, rank_error_bound=bound,
                         bytes_sent=sent, nonfinite=nonfinite)

    def state_dict(self) -> dict:
        return {"iteration": self.iteration,
                "table": {i: (float(value), bool(recorded), step) for i, (value, recorded, step) in self.table.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self.table = {i: (torch.tensor(value), torch.tensor(recorded), step)
                      for i, (value, recorded, step) in state["table"].items()}
