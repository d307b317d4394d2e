"""Normal initialisation drawn in blocks of rows: a rank builds its shard of a weight without ever holding
the whole weight, and gets exactly the numbers of one draw of the whole weight.

Every weight is drawn from a CPU generator of its part of the model (`model/gpt.py: init_generator`), in
the default dtype: the numbers of `torch.empty(shape).normal_(0, std, generator=g)`, whatever the layout,
the device or the ZeRO stage. PyTorch's CPU kernel for a contiguous tensor of 16 or more elements takes one
uniform per element, in order, then turns each aligned group of 16 into 16 normals (Box-Muller, element i
with element i + 8); when the size is not a multiple of 16 it redraws the last 16 elements from 16 more
uniforms. So a draw splits, without changing a bit, at element offsets that are multiples of 16, into
pieces drawn one after another: each a multiple of 16 long but the last, which is at least 16 long
(`tests/test_model_memory.py` checks this on the installed PyTorch, in float32 and float64).

The generator has no jump-ahead: every rank still draws every number of its stage's weights (about 5 ns
each on one core, some 40 s for 8B parameters), keeping only its shard, one block of rows at a time.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# Elements per block of rows: 1 MiB in float32 (whole rows; the last block takes the remainder, up to twice
# as much). Small, so that glibc serves every block from the same few MB of heap, between the shards.
BLOCK_ELEMENTS = 1 << 18


def row_blocks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """[start, end) row ranges of a `shape` weight whose draws, one after another, give the numbers of one
    draw of the whole: each a multiple of 16 elements but the last, which takes the remainder."""
    rows, row_elements = shape[0], max(math.prod(shape[1:]), 1)
    align = 16 // math.gcd(16, row_elements)  # rows that make a multiple of 16 elements
    per_block = max(align, BLOCK_ELEMENTS // row_elements // align * align)
    bounds = [block * per_block for block in range(max(rows // per_block, 1))] + [rows]
    return list(zip(bounds[:-1], bounds[1:]))


def normal_chunk(shape: tuple[int, ...], std: float, generator: torch.Generator, partition_dim: int,
                 parts: int, index: int) -> Tensor:
    """`torch.empty(shape).normal_(0, std, generator=generator).chunk(parts, partition_dim)[index]`,
    holding one block of rows of the whole at a time. The chunk is made by `torch.empty`: on the default
    device (the training device while the model is built), or where DeepSpeed's zero.Init puts it; the
    blocks are drawn on the CPU in the default dtype with `torch.normal`, which zero.Init leaves alone."""
    shape = tuple(shape)
    if shape[partition_dim] % parts:
        raise ValueError(f"cannot split dimension {partition_dim} of a {shape} weight into {parts} equal shards")
    width = shape[partition_dim] // parts
    first = index * width
    out = torch.empty(shape[:partition_dim] + (width,) + shape[partition_dim + 1:])
    for start, end in row_blocks(shape):
        block = torch.normal(0.0, std, (end - start, *shape[1:]), generator=generator,
                             dtype=torch.get_default_dtype(), device="cpu")
        if partition_dim:
            out[start:end] = block.narrow(partition_dim, first, width)
        else:
            low, high = max(start, first), min(end, first + width)
            if low < high:
                out[low - first:high - first] = block[low - start:high - start]
    return out
