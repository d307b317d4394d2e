"""Concatenate indexed datasets: documents and tokens unchanged, in the order given (megatron-core's merge)."""
from __future__ import annotations

import os
from collections.abc import Sequence

from megatron_eslm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, get_bin_path, get_idx_path
from megatron_eslm.errors import UserError


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> None:
    """Write ``output_prefix.bin/.idx`` holding the datasets at ``prefixes`` one after another.

    All inputs must share one token dtype. The output appears under its name only when complete.
    """
    if not prefixes:
        raise UserError("--input: no dataset prefixes to merge")
    if os.path.abspath(output_prefix) in {os.path.abspath(prefix) for prefix in prefixes}:
        raise UserError(f"--output-prefix {output_prefix} is also an --input")
    dtype = IndexedDataset(prefixes[0]).dtype
    with IndexedDatasetBuilder(get_bin_path(output_prefix), dtype) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(get_idx_path(output_prefix))
