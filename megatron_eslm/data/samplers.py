"""Batch sampler that resumes mid-run: a restarted job continues with exactly the samples it would have seen.

Megatron's MegatronPretrainingSampler semantics: the sample indices from ``consumed_samples`` on are cut
into global micro-steps of ``micro_batch_size * data_parallel_size`` consecutive indices, and data-parallel
rank r takes slice r of each. Indices never wrap around; an incomplete final global micro-step is dropped.
`SkippingBatchSampler` is LFR's: it revisits the blocks epoch after epoch and passes over skipped ones.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from megatron_eslm.errors import UserError


class ResumableBatchSampler:
    """Yields this rank's micro-batches (lists of sample indices) in order, starting at ``consumed_samples``."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
    ) -> None:
        if micro_batch_size < 1:
            raise UserError(f"--micro-batch-size must be positive, got {micro_batch_size}")
        if data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise UserError(f"data-parallel rank {data_parallel_rank} is outside a group of {data_parallel_size}")
        if not 0 <= consumed_samples <= total_samples:
            raise UserError(
                f"{consumed_samples} consumed samples (from the checkpoint) do not fit in {total_samples} total samples"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.global_micro_batch_size = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.global_micro_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        first = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        for step in range(len(self)):
            start = first + step * self.global_micro_batch_size
            yield list(range(start, start + self.micro_batch_size))


class SkippingBatchSampler:
    """LFR's sampler (--lfr-mode skip): epoch after epoch over the same `num_blocks` blocks (dataset indices,
    in order), each step's global batch takes the next `global_batch_size` blocks that step does not skip
    (`skipped(step)`: a bool per block, or None). The global batch is cut like `ResumableBatchSampler`'s:
    global micro-steps of ``micro_batch_size * data_parallel_size`` blocks, rank r taking slice r, so a
    step without skips is the same split. `position` (blocks passed, skipped ones included) is the state a
    resume restores; it is that of the last step handed out (the steps are assembled as they are read)."""

    def __init__(self, num_blocks: int, position: int, micro_batch_size: int, global_batch_size: int,
                 first_step: int, last_step: int, skipped: Callable[[int], np.ndarray | None],
                 data_parallel_rank: int = 0, data_parallel_size: int = 1) -> None:
        if num_blocks < global_batch_size:
            raise UserError(f"--lfr-mode skip: the training data holds {num_blocks} samples of --seq-length "
                            f"tokens, fewer than --global-batch-size {global_batch_size} (a block at most once a "
                            "step); use more data or --lfr-mode mask")
        self.num_blocks = num_blocks
        self.position = position
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.steps = range(first_step, last_step + 1)
        self.skipped = skipped
        self.data_parallel_rank = data_parallel_rank
        self.global_micro_batch_size = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return len(self.steps) * (self.global_batch_size // self.global_micro_batch_size)

    def step_blocks(self, step: int) -> list[int]:
        """The global batch of `step`, from `position` on; advances `position` past the blocks it passed."""
        skipped = self.skipped(step)
        blocks, passed = [], 0
        while len(blocks) < self.global_batch_size:
            if passed == self.num_blocks:
                raise UserError(f"--lfr-mode skip: step {step} skips every block")
            block = (self.position + passed) % self.num_blocks
            passed += 1
            if skipped is None or not skipped[block]:
                blocks.append(block)
        self.position += passed
        return blocks

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.steps:
            blocks = self.step_blocks(step)
            for start in range(self.data_parallel_rank * self.micro_batch_size, self.global_batch_size,
                                self.global_micro_batch_size):
                yield blocks[start:start + self.micro_batch_size]
