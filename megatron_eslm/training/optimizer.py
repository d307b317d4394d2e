"""AdamW with Megatron's weight-decay groups: biases and norm parameters (all 1-D tensors) are not decayed.

`--optimizer-impl` picks torch's AdamW kernels; all compute the same update (they agree to float32
round-off, tests/test_optimizer_impl.py):
  fused    one multi-tensor kernel per dtype and device, step counts kept on the device (no host read);
           CUDA and, in torch >= 2.4, CPU
  foreach  multi-tensor (`torch._foreach_*`) ops, step counts on the host
  loop     one parameter at a time: the reference
  auto     fused on CUDA, foreach elsewhere. On CPU, fused is faster too (0.65x foreach's optimizer
           time in docs/benchmarks.md's CPU step table), but its round-off differs between ZeRO's flat partitions and our per-parameter tensors (the
           tiny Llama of tests/test_deepspeed.py then keeps one token more at the third step's ESLM
           threshold, and that test compares kept counts exactly); foreach computes what loop does, bit
           for bit.
apex's FusedAdam is not offered: the PyPI `apex` is an unrelated package, NVIDIA's must be built from
source against the local CUDA, and torch's fused AdamW is the same single-kernel update.
Under --deepspeed the engine wraps this optimizer (ZeRO steps it on its fp32 partitions), kernels included.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_eslm.config import OptimizerConfig
from megatron_eslm.errors import UserError

IMPL_KEYS = ("fused", "foreach")  # the param-group entries that choose the kernels


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # ZeRO-3 partitions parameters into flat 1-D shards at construction: its `ds_shape` is the shape
            (no_decay if len(getattr(param, "ds_shape", param.shape)) < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def impl_flags(impl: str, device: torch.device) -> dict[str, bool]:
    """AdamW's `fused`/`foreach` arguments for --optimizer-impl `impl` on `device`."""
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    return {"fused": impl == "fused", "foreach": impl == "foreach"}


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW on the model's parameters, with the kernels of --optimizer-impl for the device they live on."""
    device = next(model.parameters()).device
    try:
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                 betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                 **impl_flags(cfg.optimizer_impl, device))
    except RuntimeError as err:  # fused on a device torch has no fused kernel for
        raise UserError(f"--optimizer-impl {cfg.optimizer_impl} on {device.type}: "
                        f"{str(err).strip().splitlines()[0]}") from None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state, keeping this run's kernels: torch would take the saved groups'
    `fused`/`foreach` (a checkpoint from a CPU run would turn off the fused kernel on a GPU), and it places
    the step counts where the loaded kernels want them (on the device for fused)."""
    groups = [{**saved, **{key: current[key] for key in IMPL_KEYS}}
              for saved, current in zip(state["param_groups"], optimizer.param_groups, strict=True)]
    optimizer.load_state_dict({**state, "param_groups": groups})
