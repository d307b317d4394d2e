"""--fp8-format: the matmuls of the transformer layers' column- and row-parallel linears in FP8, through
torchao's float8 training (dynamic per-tensor scales, computed on the device: no host read).

torchao converts `nn.Linear` modules (`convert_to_float8_training`); ours are not: ColumnParallelLinear and
RowParallelLinear hold their weight shard and call `F.linear` between the tensor-parallel collectives. So
each of our layers gets a private torchao `Float8Linear` made by that public conversion from an
`nn.Linear` sharing the layer's weight Parameter (no copy, not registered: the state dict, the optimizer's
parameters and the fp32 master weights stay as they are), and calls it for x W^T alone: the collectives
and the bias stay ours. Under tensor parallelism each rank scales its own shard (its weight, its part of
the input or of the gradient): a finer scale than one process's over the whole tensor, so FP8 runs are not
bit-equal across layouts (nor are they to bf16). The LM head and the embeddings (vocabulary-parallel
lookups and the kernels' head, not linears), the norms and attention stay bf16.

  hybrid  e4m3 for inputs and weights, e5m2 for output gradients (torchao's default recipe, Megatron's
          hybrid)
  e4m3    e4m3 for all three
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import Tensor, nn

from megatron_eslm.errors import UserError
from megatron_eslm.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada and Hopper on
ALIGNMENT = 16  # torch._scaled_mm: both weight dimensions divisible by 16


def _torchao_float8():
    try:
        return importlib.import_module("torchao.float8")
    except ImportError:
        raise UserError("--fp8-format needs torchao (pip install torchao): its float8 training runs the "
                        "FP8 matmuls") from None


def check_fp8_device(fp8_format: str, device: torch.device) -> None:
    """Refuse, in one line, a device without FP8 matmuls."""
    if device.type != "cuda":
        raise UserError(f"--fp8-format {fp8_format} needs a CUDA device (this run is on {device.type})")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise UserError(f"--fp8-format {fp8_format} needs a GPU of compute capability 8.9 or more (Ada, Hopper), "
                        f"this one is {capability[0]}.{capability[1]}")


def float8_config(fp8_format: str, float8):
    """torchao's Float8LinearConfig for a format (`float8`: the torchao.float8 module)."""
    if fp8_format == "hybrid":
        return float8.Float8LinearConfig()  # e4m3 input and weight, e5m2 gradient
    e4m3 = float8.CastConfig(target_dtype=torch.float8_e4m3fn)
    return float8.Float8LinearConfig(cast_config_grad_output=e4m3)


def float8_matmul(weight: nn.Parameter, config, float8) -> Callable[[Tensor], Tensor]:
    """x -> x W^T in FP8 by torchao's converted linear, sharing `weight` (its gradient lands there)."""
    with torch.device("meta"):  # the placeholder's own weight is replaced at once: allocate nothing
        holder = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    holder[0].weight = weight
    float8.convert_to_float8_training(holder, config=config)
    return holder[0].forward


def convert_to_fp8(model: nn.Module, fp8_format: str, device: torch.device) -> int:
    """Give every column- and row-parallel linear of `model` its FP8 matmul; returns how many."""
    check_fp8_device(fp8_format, device)
    float8 = _torchao_float8()
    config = float8_config(fp8_format, float8)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    for name, layer in layers:
        rows, cols = layer.weight.shape
        if rows % ALIGNMENT or cols % ALIGNMENT:
            raise UserError(f"--fp8-format: {name}'s weight is {rows} x {cols} on this rank; FP8 matmuls need both "
                            f"dimensions divisible by {ALIGNMENT}")
    for _, layer in layers:
        layer.fp8_matmul = float8_matmul(layer.weight, config, float8)
    return len(layers)
