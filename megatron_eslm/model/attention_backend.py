"""--attention-backend: which of PyTorch's scaled-dot-product-attention kernels runs the attention core.

SDPA picks a kernel per call from the backends enabled, in a priority order; `attention_backends` sets both
around the calls of one attention core (`torch.nn.attention.sdpa_kernel`), so the choice covers the plain
causal call, context parallelism's lower-right causal blocks and a selective recompute's replay alike.

  auto       on CUDA the fastest kernel the shape and dtype allow: cuDNN attention first on Hopper (sm90),
             where it is the fastest, flash first elsewhere, then memory-efficient, then math. Context
             parallelism's lower-right mask (`CausalBias`) has kernels in flash and memory-efficient only
             (PyTorch's dispatch tries those two before materialising the mask), which auto keeps enabled. Off
             CUDA, SDPA's own choice (the CPU flash kernel, math where it cannot run).
  flash      FlashAttention-2: 16-bit inputs, head dimension <= 256, grouped key/value heads natively
  cudnn      cuDNN's fused attention: 16-bit inputs; no kernel for the lower-right mask (refused with CP)
  efficient  memory-efficient attention (xFormers'): any float dtype, one key/value head per query head
  math       the composite reference: the scores materialised, any device and dtype

The first three are CUDA kernels: refused in one line on another device (`check_attention_device`); the
combinations they cannot run are refused by the config (`config/model.py`, `config/validation.py`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import ContextManager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_eslm.errors import UserError

CUDA_ONLY = ("flash", "cudnn", "efficient")
_EXPLICIT = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
_FLASH_FIRST = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                SDPBackend.MATH)
_CUDNN_FIRST = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH)


@functools.lru_cache(maxsize=None)
def backend_priority(name: str, device: torch.device) -> tuple[SDPBackend, ...] | None:
    """The SDPA backends `name` enables on `device`, highest priority first; None: SDPA's own choice.
    Cached: the device's capability is read once, not per layer and step."""
    if name != "auto":
        return (_EXPLICIT[name],)
    if device.type != "cuda":
        return None
    return _CUDNN_FIRST if torch.cuda.get_device_capability(device)[0] == 9 else _FLASH_FIRST


def attention_backends(name: str, device: torch.device) -> ContextManager:
    """The context to run one attention core's SDPA calls in (nothing to set for auto off CUDA)."""
    backends = backend_priority(name, device)
    return contextlib.nullcontext() if backends is None else sdpa_kernel(list(backends), set_priority=True)


def check_attention_device(name: str, device: torch.device) -> None:
    """Refuse, before the model is built, a CUDA kernel on another device (the config does not know it)."""
    if name in CUDA_ONLY and device.type != "cuda":
        raise UserError(f"--attention-backend {name} needs a CUDA device (this run is on {device.type}): "
                        "use auto or math")
