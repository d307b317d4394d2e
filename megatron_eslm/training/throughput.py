"""Throughput of the training records: TFLOP/s per GPU from the FLOPs that executed, model FLOPs
utilisation (MFU) against the GPU's peak, and the peak memory a rank allocated.

MFU here divides the EXECUTED FLOPs (`training/flops.py`: what ESLM's selective head, the policy's own
passes and activation recompute actually ran, not the dense model's count) by the peak, so it measures how well the hardware is
used, not how much dense-equivalent work was done; `dense_flops / executed_flops` in the same record gives
the other view.
"""
from __future__ import annotations

import torch

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; the first entry whose name
# occurs in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """One device's peak TFLOP/s: `override` (--peak-tflops) if given, else the table's entry for a CUDA
    device's name; None when unknown (any CPU, an unlisted GPU)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in name.lower()), None)


def tflops_per_gpu(executed_flops: float, seconds: float, world_size: int) -> float:
    """An iteration's executed FLOPs (over the global batch, every rank's work) per second per GPU, in
    TFLOP/s."""
    return executed_flops / seconds / world_size / 1e12


def mfu(tflops: float, peak: float | None) -> float | None:
    """The fraction of the peak achieved; None without a known peak."""
    return None if peak is None else tflops / peak


def max_memory_allocated(device: torch.device) -> int | None:
    """The most bytes this rank's CUDA allocator held since the previous call (which resets the peak, so
    each log interval reports its own); None off CUDA."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak
