"""Find this process's place the usual way and join the process group.

torchrun and `deepspeed --module megatron_eslm.pretrain` both export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT (deepspeed also passes --local_rank, which the parser accepts); the default
process group is joined through `env://`, with gloo on CPU and nccl on CUDA. A caller that already
initialised torch.distributed (the tests) keeps its group.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in the job, known before any collective (from the group, else the launcher's env)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_process_group(device: torch.device, single_process: bool = False) -> bool:
    """Join the default group when launched with several processes (or, with `single_process`, make a
    one-process group: DeepSpeed needs one even alone); True if this call created it."""
    if dist.is_initialized() or (world_size() == 1 and not single_process):
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size() == 1:  # no launcher needed: an in-memory store instead of MASTER_ADDR/PORT
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend, init_method="env://")
    return True
