"""The blocks' normalisations: LayerNorm (GPT-2) and RMSNorm (Llama), chosen by --normalization.

Both take and return the activation dtype under autocast (--bf16) with fp32 statistics, so the residual
stream, the saved activations and the pipeline messages stay bf16 (CUDA's autocast would run layer_norm
in fp32 and return fp32). Under sequence parallelism their weights are marked by the caller
(`mark_sequence_parallel`): each rank normalises its own rows, and the weight gradients are partial sums.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_eslm.config import ModelConfig
from megatron_eslm.tensor_parallel.layers import activation_dtype


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that takes and returns the activation dtype under autocast: input and weights go to
    the kernel in the autocast dtype with autocast off; it still accumulates the statistics in fp32, and
    saves its bf16 input and weights and one mean and rstd per row (fp32 on CUDA; the CPU kernel stores
    them in bf16). Without autocast: nn.LayerNorm."""

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype),
                                self.eps)


class _RMSNormFunction(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in at least fp32 and returned in x's dtype. Saves
    x (the activation dtype), the weight and one fp32 rstd per row; PyTorch's composite rms_norm would
    save fp32 copies of the whole input."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(acc)
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd * weight.to(acc)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        grad = grad.to(rstd.dtype)
        grad_weight = (grad * normed).flatten(0, -2).sum(0).to(weight.dtype)
        grad_normed = grad * weight.to(rstd.dtype)
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(nn.RMSNorm):
    """Llama's RMSNorm (weight only), fp32 statistics, in and out in the activation dtype."""

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        x = x.to(activation_dtype(x))
        with torch.autocast(device, enabled=False):
            return _RMSNormFunction.apply(x, self.weight, self.eps)


def build_norm(cfg: ModelConfig) -> nn.Module:
    """The --normalization of one block input or the final hidden, with --norm-epsilon."""
    norm = RMSNorm if cfg.normalization == "RMSNorm" else LayerNorm
    return norm(cfg.hidden_size, eps=cfg.norm_epsilon)
