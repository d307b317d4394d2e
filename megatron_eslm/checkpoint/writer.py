"""Write a whole model into our checkpoint format at any TP x PP (x virtual pipeline) layout (reshape, import,
averaging), or cut one rank's state from it (`shard_state`: the trainer's resume with another number of
model chunks, `regroup.py`)."""
from __future__ import annotations

import dataclasses
import os
import shutil

import torch
from torch import Tensor

from megatron_eslm import parallel_state
from megatron_eslm.checkpoint import integrity
from megatron_eslm.checkpoint.full_state import MOMENTS, VOCAB_ROWS, FullCheckpoint
from megatron_eslm.checkpoint.shards import miniature, shard_spec
from megatron_eslm.config import Config
from megatron_eslm.config.parallel import virtual_pipeline_size
from megatron_eslm.config.validation import validate_model_split
from megatron_eslm.model.gpt import GPTModel, padded_vocab_size
from megatron_eslm.parallel_state import Layout
from megatron_eslm.training.checkpointing import FILENAME, VIRTUAL_SIZE, iteration_dir, publish, shard_dir
from megatron_eslm.training.optimizer import build_optimizer


def write_checkpoint(full: FullCheckpoint, root: str, tensor_model_parallel_size: int = 1,
                     pipeline_model_parallel_size: int = 1, optimizer: bool = True,
                     num_layers_per_virtual_pipeline_stage: int | None = None) -> str:
    """Shard `full` for TP x PP (with model chunks of `num_layers_per_virtual_pipeline_stage` layers: the
    interleaved schedule's) and write it under `root` (a temporary directory renamed into place, then the
    tracker), with AdamW's state when `optimizer` and `full.moments`. No RNG states and no data-parallel
    size: any data-parallel size loads it, its RNG seeded from --seed like a fresh run. The vocabulary
    rows are padded (zeros) or cut to the new layout's padded size; only padding rows are ever cut, and a
    layout with the same padded size keeps them bit for bit. Returns the iteration's directory."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    cfg = dataclasses.replace(full.config, parallel=dataclasses.replace(
        full.config.parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        num_layers_per_virtual_pipeline_stage=num_layers_per_virtual_pipeline_stage))
    # layers, heads, groups and MLP: one line naming the flag
    validate_model_split(cfg.model, tp, pp, num_layers_per_virtual_pipeline_stage)
    final = iteration_dir(root, full.iteration)
    tmp = f"{final}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    entries: dict[str, dict] = {}  # the manifest's (`checkpoint/integrity.py`)
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            state = shard_state(full, cfg, tp_rank, pp_rank, optimizer)
            with parallel_state.offline_layout(Layout(tp=tp, pp=pp, tp_rank=tp_rank, pp_rank=pp_rank)):
                path = os.path.join(tmp, shard_dir())
            os.makedirs(path)
            entries[os.path.join(os.path.basename(path), FILENAME)] = integrity.save_file(
                state, os.path.join(path, FILENAME))
    integrity.write_manifest(tmp, entries)
    publish(root, tmp, final, full.iteration)
    return final


def shard_state(full: FullCheckpoint, cfg: Config, tp_rank: int, pp_rank: int, optimizer: bool = True) -> dict:
    """What the file of shard (tp_rank, pp_rank) of `cfg`'s layout holds: its model state (and with
    `optimizer` and `full.moments`, AdamW's) cut from `full`, and the run's other fields (no RNG states)."""
    p = cfg.parallel
    tp, pp, vp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, \
        virtual_pipeline_size(p, cfg.model.num_layers)
    rows = padded_vocab_size(full.vocab_size, cfg.model.make_vocab_size_divisible_by * tp)
    spec = shard_spec(cfg.model, tp, pp, tp_rank, pp_rank, vp)

    def shard(tensors: dict[str, Tensor], name: str) -> Tensor:
        canonical = spec.canonical(name)  # the tied copy too: it is the one word embedding
        whole = vocab_rows(tensors[canonical], rows) if canonical in VOCAB_ROWS else tensors[canonical]
        dim = spec.partition_dims.get(name)
        return (whole if dim is None else whole.chunk(tp, dim)[tp_rank]).clone()

    state = {"model": {name: shard(full.model, name) for name in spec.names},
             "iteration": full.iteration, "consumed_samples": full.consumed_samples,
             "scheduler": full.scheduler, "policy": full.policy, "config": cfg.to_dict(),
             "vocab_size": full.vocab_size,
             "layout": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                        "data_parallel_size": None, VIRTUAL_SIZE: vp}}
    if optimizer and full.moments is not None:
        moments = {key: {name: value[key] for name, value in full.moments.items()} for key in MOMENTS}
        step = torch.tensor(float(full.optimizer_step or 0))
        state["optimizer"] = {
            "state": {index: {"step": step.clone(), **{key: shard(moments[key], name) for key in MOMENTS}}
                      for index, name in enumerate(spec.optimizer_order)},
            "param_groups": _param_groups(cfg, tp_rank, pp_rank, vp)}
    return state


def vocab_rows(weight: Tensor, rows: int) -> Tensor:
    """`weight` with `rows` vocabulary rows: zero rows appended, or padding rows dropped."""
    if weight.shape[0] >= rows:
        return weight[:rows]
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def _param_groups(cfg: Config, tp_rank: int, pp_rank: int, vp: int) -> list[dict]:
    """AdamW's saved param_groups of the shard (hyperparameters and indices), from an optimizer over its
    miniature, so that `load_optimizer_state` finds what torch saves."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    with parallel_state.offline_layout(Layout(tp=tp, pp=pp, tp_rank=tp_rank, pp_rank=pp_rank, vp=vp)):
        model = GPTModel(miniature(cfg.model, tp), vocab_size=tp)
    return build_optimizer(model, cfg.optimizer).state_dict()["param_groups"]
