"""Which part of every sequence a context-parallel rank holds: chunks r and 2C-1-r of 2C equal chunks
(Megatron's load-balanced split). Everything here is a no-op at C = 1."""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_eslm import parallel_state

SEQUENCE_KEYS = ("tokens", "labels")  # the batch entries with a sequence dimension (dim 1)


def chunk_ids(cp: int, cp_rank: int) -> tuple[int, int]:
    """The two global chunks a rank holds, in the order its local sequence holds them."""
    return cp_rank, 2 * cp - 1 - cp_rank


def shard_sequence(x: Tensor, cp: int, cp_rank: int) -> Tensor:
    """[b, s, ...] -> [b, s / C, ...]: chunks r and 2C-1-r, concatenated (two slices: no index tensor)."""
    length = x.shape[1] // (2 * cp)
    return torch.cat([x[:, chunk * length:(chunk + 1) * length] for chunk in chunk_ids(cp, cp_rank)], dim=1)


def shard_batch(batch: dict) -> dict:
    """This rank's share of a batch of whole sequences (per-sample entries, e.g. the sample index, as they
    are); the batch itself when C = 1. A pinned batch (the CUDA data loader's) gives pinned shards, so that
    their copy to the device stays asynchronous (from pageable memory it would make the host wait)."""
    cp = parallel_state.context_parallel_size()
    if cp == 1:
        return batch
    rank = parallel_state.context_parallel_rank()

    def shard(value: Tensor) -> Tensor:
        out = shard_sequence(value, cp, rank)
        return out.pin_memory() if value.is_pinned() else out

    return {key: shard(value) if key in SEQUENCE_KEYS else value for key, value in batch.items()}


def positions(local_length: int, device: torch.device) -> Tensor:
    """The global positions [local_length] of this rank's tokens (int64): 0..s-1 at C = 1."""
    cp = parallel_state.context_parallel_size()
    every = torch.arange(local_length * cp, device=device)
    return every if cp == 1 else shard_sequence(every.unsqueeze(0), cp, parallel_state.context_parallel_rank())[0]
