"""Run by tests/test_deepspeed.py on the session's 2 gloo ranks (tests/rank_pool.py, with DeepSpeed's CPU
accelerator): every job of the equivalence table in one call, `run_jobs(jobs, out_dir)`.

jobs: [[name, kind, argv], ...], kind "train" (records and final validation loss), "bf16" (a train
job that also keeps this rank's parameters and layout, and records what DeepSpeed trains with: its
optimizer, the parameters' dtypes and, after every backward, the dtypes of the tensors in which the step's
gradients accumulate), "resume" (the straight and the resumed records of `test_parallel_training.resume`)
"init" (a ZeRO-3 trainer's parameters before any step, gathered, and the same model built without
DeepSpeed, each with the names its optimizer decays), "params" (a train job that also returns the
run's parameters after its steps, gathered) or "failed save" (`failed_save`: what each rank raises when
rank 1's checkpoint writes fail). A job whose argv has `--save` leaves its checkpoint there for
the checkpoint tools' tests: one run serves both, as a DeepSpeed job costs seconds of CPU a rank.
Each rank returns its results by job name.
"""
from __future__ import annotations

import contextlib
import gc

import deepspeed
import torch
import torch.distributed as dist

from megatron_eslm.config import parse_args
from megatron_eslm.distributed.deepspeed_engine import DeepSpeedEngine
from megatron_eslm.training.optimizer import param_groups
from megatron_eslm.training.trainer import Trainer, build_model
from test_parallel_training import resume, train


def accumulators(optimizer) -> list[torch.Tensor]:
    """Where DeepSpeed sums a step's gradients over its micro-batches: BF16_Optimizer's flat buffers
    (stage 1 under bf16), ZeRO-3's partition buffer, ZeRO-2's partition sums (`all_grad_tensors` between
    backwards, handed to `averaged_gradients` by the step's last one)."""
    if hasattr(optimizer, "fp32_groups_gradients_flat"):
        return list(optimizer.fp32_groups_gradients_flat)
    if hasattr(optimizer, "grad_partitions_flat_buffer"):
        return [optimizer.grad_partitions_flat_buffer]
    sums = [*optimizer.all_grad_tensors.values(), *optimizer.averaged_gradients.values()]
    return [grad for grads in sums if grads is not None for grad in grads]


def train_bf16(argv: list[str]) -> dict:
    """`train`, watching the engine: the accumulators' dtypes after every backward."""
    seen = {"accumulators": set()}
    backward = DeepSpeedEngine.backward

    def watched(engine: DeepSpeedEngine, output, output_grad) -> None:
        backward(engine, output, output_grad)
        optimizer = engine.engine.optimizer
        seen["optimizer"] = type(optimizer).__name__
        seen["param_dtypes"] = {str(p.dtype) for p in engine.model.parameters()}
        seen["accumulators"] |= {str(t.dtype) for t in accumulators(optimizer)}

    DeepSpeedEngine.backward = watched
    try:
        result = train(argv, torch.float32)
    finally:
        DeepSpeedEngine.backward = backward
    return {**result, **seen}


def decayed(model: torch.nn.Module) -> set[str]:
    """The names of the parameters our AdamW groups decay."""
    names = {id(param): name for name, param in model.named_parameters()}
    return {names[id(param)] for group in param_groups(model, 0.1) if group["weight_decay"]
            for param in group["params"]}


def built(argv: list[str]) -> dict:
    """What a ZeRO-3 trainer starts from (its model built inside zero.Init), gathered from the partitions,
    and the same model built without DeepSpeed."""
    trainer = Trainer(parse_args(argv), log=lambda *a: None)
    plain = build_model(trainer.cfg, trainer.vocab_size, torch.device("cpu"), None)
    result = {"decayed": decayed(trainer.model), "plain_decayed": decayed(plain),
              "plain": {name: param.detach() for name, param in plain.named_parameters()},
              "built": gathered(trainer.model)}
    trainer.close()
    return result


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole parameters, gathered from ZeRO-3's partitions one at a time: DeepSpeed 0.19 gathers
    several at once with one async all-gather each and waits for the last only
    (`_allgather_params_coalesced`), which orders them on a CUDA stream but not on gloo, whose threads run
    them concurrently: now and then a parameter was read before its gather ended."""
    params = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            params[name] = param.detach().clone()
    return params


def train_gathered(argv: list[str]) -> dict:
    """`train`'s records and validation loss, and the parameters after the run, gathered."""
    trainer = Trainer(parse_args(argv), log=lambda *a: None)
    result = {"records": trainer.train(), "val_loss": trainer.evaluate()["val_loss"],
              "params": gathered(trainer.model)}
    trainer.close()
    return result


def failed_save(argv: list[str]) -> str:
    """Train with rank 1's DeepSpeed file writes failing (a full disk): what each rank raises, which must come
    from the outcome exchange after DeepSpeed's own collectives, not a hang in them."""
    from unittest import mock

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    def full_disk(self, state_dict, path):
        raise OSError(28, "No space left on device", path)

    failing = mock.patch.object(TorchCheckpointEngine, "save", full_disk)
    with failing if dist.get_rank() == 1 else contextlib.nullcontext():
        try:
            train(argv, torch.float32)
        except Exception as err:  # noqa: BLE001 -- the outcome is the result
            return f"{type(err).__name__}: {err}"
    return "no error"


def run_jobs(jobs: list[list], out_dir: str) -> dict:
    results = {}
    for name, kind, argv in jobs:
        # DeepSpeed collects garbage at each engine start and ZeRO step (`see_memory_usage`, `defragment`):
        # with what the earlier jobs left frozen, a collection scans this job's objects only.
        gc.collect()
        gc.freeze()
        if kind == "train":
            result = train(argv, torch.float32)
            results[name] = {"records": result["records"], "val_loss": result["val_loss"]}
        elif kind == "bf16":
            results[name] = train_bf16(argv)
        elif kind == "init":
            results[name] = built(argv)
        elif kind == "params":
            results[name] = train_gathered(argv)
        elif kind == "failed save":
            results[name] = failed_save([*argv, "--save", f"{out_dir}/{name}"])
        else:
            results[name] = resume(argv, f"{out_dir}/{name}-ckpt")
    return results
