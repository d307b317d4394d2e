"""Learn-Focus-Review as its paper runs it (--selection lfr --lfr-mode skip): learned blocks never reach
the model.

A block is one sample of the training dataset built as a single pass over the data (`data/builder.py`): a
fixed window of the token stream, the same text in every epoch, identified by its dataset index. Learn and
review steps are dense steps that record each trained block's log-perplexity (the mean loss of its valid
tokens) with the step; focus steps record nothing. At the first focus step of a phase every rank merges the
records into one global table (`flush`) and skips the blocks whose last recorded log-perplexity is below
the s-quantile (s = --lfr-drop-fraction) of the recorded blocks: the VaR rule of `threshold.py`, ties
kept, never-trained blocks kept. The table does not change within a focus phase, so the skip set is a
function of the table alone: every data-parallel rank derives the same one, and a run resumed in a focus
phase derives it again exactly. The sampler (`data/samplers.py`) fills each batch with the next blocks.

The step records device tensors only (per-sample loss sums and valid counts, beside the block ids the data
loader gave on the host): the host reads them when the table is merged, once per focus phase and at each
checkpoint, an inherent read (the skip decision is made on the host, before the data is loaded).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from megatron_eslm import host_syncs, parallel_state
from megatron_eslm.eslm.lfr import Phases
from megatron_eslm.eslm.policies import Policy
from megatron_eslm.eslm.threshold import var_index
from megatron_eslm.model.lm_head import TokenScores


class LFRSkipPolicy(Policy):
    """The block table and the skip decision; the step itself is dense (`selects_tokens` False)."""

    selects_tokens = False

    def __init__(self, phases: Phases, drop_fraction: float, num_blocks: int):
        self.phases = phases
        self.drop_fraction = drop_fraction
        self.iteration = 0
        self.log_ppl = np.zeros(num_blocks)  # last recorded log-perplexity of each block (global)
        self.stamp = np.zeros(num_blocks, dtype=np.int64)  # the step that recorded it; 0: never trained
        # this rank's records since the last merge: (step, block ids on the host, loss sums, valid counts)
        self._pending: list[tuple[int, Tensor, Tensor, Tensor]] = []
        self._skipped: np.ndarray | None = None
        self._skipped_phase = -1  # the first step of the focus phase `_skipped` belongs to

    def start_step(self, iteration: int) -> None:
        """At a focus phase's first step (or the first after a resume): merge the table, decide the skips.
        Every rank calls it before the step's data is loaded (the merge is collective)."""
        self.iteration = iteration
        if self.phases.phase(iteration) != "focus":
            return
        phase_start = iteration - (iteration - self.phases.learn - 1) % (self.phases.focus + self.phases.review)
        if self._skipped_phase != phase_start:
            self.flush()
            self._skipped, self._skipped_phase = self.skip_mask(), phase_start

    def skipped(self, step: int) -> np.ndarray | None:
        """The blocks step `step` passes over (a bool per block), None when it skips none."""
        if step != self.iteration:
            raise RuntimeError(f"the LFR sampler asked for step {step}'s skips at step {self.iteration}")
        return self._skipped if self.phases.phase(step) == "focus" else None

    def record(self, scores: TokenScores, batch: dict) -> None:
        """A trained micro-batch's per-block loss sums and valid counts (device tensors; learn and review)."""
        if self.phases.phase(self.iteration) == "focus":
            return
        index = batch["index"]
        valid = scores.valid.view(len(index), -1)
        losses = torch.where(valid, scores.loss.detach().view_as(valid), 0.0).double().sum(1)
        self._pending.append((self.iteration, index, losses, valid.sum(1)))

    def flush(self) -> None:
        """Merge every rank's pending records into the global table, the same on every rank: gathered over
        the selection group on the last pipeline stage (which alone scores tokens), applied in step order (a
        block's later record wins), then sent to the other stages."""
        records = np.zeros((4, 0))
        if self._pending:
            with host_syncs.inherent("LFR's skip decision is made on the host, from the recorded perplexities"):
                sums = torch.cat([losses for _, _, losses, _ in self._pending]).cpu().numpy()
                counts = torch.cat([count for _, _, _, count in self._pending]).cpu().numpy()
            steps = np.concatenate([np.full(len(ids), step) for step, ids, _, _ in self._pending])
            ids = torch.cat([ids for _, ids, _, _ in self._pending]).numpy()
            records = np.stack([steps, ids, sums, counts])
        self._pending = []
        if parallel_state.is_pipeline_last_stage():
            group = parallel_state.selection_group()
            if group is not None:
                gathered = [None] * torch.distributed.get_world_size(group)
                torch.distributed.all_gather_object(gathered, records, group=group)
                records = np.concatenate(gathered, axis=1)
            records = records[:, records[3] > 0]  # blocks without a valid token: nothing recorded
            steps, ids, sums, counts = records[:, np.argsort(records[0], kind="stable")]
            ids = ids.astype(np.int64)
            _, from_end = np.unique(ids[::-1], return_index=True)  # a block recorded twice: its latest record
            latest = len(ids) - 1 - from_end
            self.log_ppl[ids[latest]] = sums[latest] / counts[latest]
            self.stamp[ids[latest]] = steps[latest]
        if parallel_state.pipeline_model_parallel_size() > 1:
            table = [self.log_ppl, self.stamp]
            torch.distributed.broadcast_object_list(table, parallel_state.pipeline_last_rank(),
                                                    group=parallel_state.pipeline_model_parallel_group())
            self.log_ppl, self.stamp = table

    def skip_mask(self) -> np.ndarray:
        """Blocks recorded with a log-perplexity below the drop quantile of the recorded ones (ties kept)."""
        recorded = self.stamp > 0
        values = self.log_ppl[recorded]
        if values.size == 0:
            return recorded
        k = var_index(self.drop_fraction, values.size)
        return recorded & (self.log_ppl < np.partition(values, k)[k])

    def state_dict(self) -> dict:
        """The merged table (a collective: every rank saves together)."""
        self.flush()
        return {"iteration": self.iteration, "log_ppl": self.log_ppl.copy(), "stamp": self.stamp.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self.log_ppl, self.stamp = state["log_ppl"].copy(), state["stamp"].copy()
        self._pending, self._skipped, self._skipped_phase = [], None, -1
