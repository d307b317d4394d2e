"""Run by tests/test_estimate_memory.py on the session's 2 gloo ranks (tests/rank_pool.py, with DeepSpeed's
CPU accelerator): one training step per job, recording the bytes the DeepSpeed engine holds in the
estimator's categories.

`held_bytes(jobs)`, jobs [[name, argv], ...]: on each rank, name -> {category: bytes}, counting each storage once (a flat group's whole storage, padding included):
  parameters  after the step: the model's parameters (ZeRO-1/2: views of the flat bf16 groups) and ZeRO-3's
              partitions
  gradients   after the step's last backward: the parameters' `.grad` and where the step's gradients
              accumulate (`deepspeed_jobs.accumulators`)
  optimizer   after the step: the fp32 master partitions and the wrapped AdamW's state
  buffers     ZeRO-3's reduce bucket (held for the whole run)
"""
from __future__ import annotations

import torch

from deepspeed_jobs import accumulators
from helpers import storage_bytes
from megatron_eslm.config import parse_args
from megatron_eslm.distributed.deepspeed_engine import DeepSpeedEngine
from megatron_eslm.training.trainer import Trainer


def masters(optimizer) -> list[torch.Tensor]:
    """The fp32 master partitions DeepSpeed steps (ZeRO-3 empties the wrapped AdamW's groups between
    steps): BF16_Optimizer's (stage 1 under bf16), ZeRO-2's, ZeRO-3's."""
    for name in ("fp32_groups_flat_partition", "single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(optimizer, name):
            return list(getattr(optimizer, name))
    raise AssertionError(f"{type(optimizer).__name__}: no fp32 master partitions found")


def run(argv: list[str]) -> dict[str, int]:
    held: dict[str, int] = {}
    backward, step = DeepSpeedEngine.backward, DeepSpeedEngine.step

    def watched_backward(engine: DeepSpeedEngine, output, output_grad) -> None:
        backward(engine, output, output_grad)
        if engine._backwards == engine.num_micro_batches:
            grads = [p.grad for p in engine.model.parameters() if p.grad is not None]
            held["gradients"] = storage_bytes([*grads, *accumulators(engine.engine.optimizer)])

    def watched_step(engine: DeepSpeedEngine, lr: float):
        norm = step(engine, lr)
        params = list(engine.model.parameters())
        zero = engine.engine.optimizer
        held["parameters"] = storage_bytes([*params, *(p.ds_tensor for p in params if hasattr(p, "ds_tensor"))])
        held["optimizer"] = storage_bytes([*masters(zero), *(t for state in zero.optimizer.state.values()
                                                             for t in state.values() if isinstance(t, torch.Tensor))])
        held["buffers"] = storage_bytes(bucket.buffer for bucket in getattr(zero, "ipg_buckets", {}).values()
                                        if isinstance(bucket.buffer, torch.Tensor))
        return norm

    DeepSpeedEngine.backward, DeepSpeedEngine.step = watched_backward, watched_step
    try:
        trainer = Trainer(parse_args(argv), log=lambda *a: None)
        trainer.train()
        trainer.close()
    finally:
        DeepSpeedEngine.backward, DeepSpeedEngine.step = backward, step
    return held


def held_bytes(jobs: list[list]) -> dict[str, dict[str, int]]:
    return {name: run(argv) for name, argv in jobs}
