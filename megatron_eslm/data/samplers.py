"""Batch sampler that resumes mid-run: a restarted job continues with exactly the samples it would have seen.

Megatron's MegatronPretrainingSampler semantics: the sample indices from ``consumed_samples`` on are cut
into global micro-steps of ``micro_batch_size * data_parallel_size`` consecutive indices, and data-parallel
rank r takes slice r of each. Indices never wrap around; an incomplete final global micro-step is dropped.
"""
from __future__ import annotations

from collections.abc import Iterator

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
