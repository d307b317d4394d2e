"""Read any checkpoint of ours into whole tensors: every TP x PP (x virtual pipeline) layout of our format, and DeepSpeed ZeRO
1-3 directories (`deepspeed_reader.py`). Used by export, reshape, averaging and generation."""
from __future__ import annotations

import glob
import os

import torch
from torch import Tensor

from megatron_eslm.checkpoint import integrity
from megatron_eslm.checkpoint.full_state import MOMENTS, FullCheckpoint, config_from_dict
from megatron_eslm.checkpoint.shards import TIED_COPY, shard_spec
from megatron_eslm.errors import UserError
from megatron_eslm.training.checkpointing import (FILENAME, TRACKER, iteration_dir, latest_iteration,
                                                  saved_virtual_size, shard_dir_name)


def shard_path(directory: str, tp_rank: int, pp_rank: int, pp: int) -> str:
    """Our file of one shard."""
    return os.path.join(directory, shard_dir_name(tp_rank, pp_rank, pp), FILENAME)


def load_file(path: str) -> dict:
    """A checkpoint file (memory-mapped: the tools read each tensor once), or one line naming it."""
    if not os.path.exists(path):
        raise UserError(f"{path}: missing checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # a torn or foreign file
        raise UserError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from None


def checkpoint_dir(root: str, iteration: int | None) -> tuple[str, int]:
    """The directory of `iteration` (default: the tracked one) under `root`."""
    if not os.path.isdir(root):
        raise UserError(f"--load {root}: no such directory")
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise UserError(f"--load {root}: no checkpoint ({TRACKER} missing)")
    directory = iteration_dir(root, iteration)
    if not os.path.isdir(directory):
        raise UserError(f"--load {root}: no checkpoint of iteration {iteration} ({directory} missing)")
    return directory, iteration


def read_checkpoint(root: str, iteration: int | None = None, optimizer: bool = True) -> FullCheckpoint:
    """The whole model (and with `optimizer`, AdamW's moments) of a checkpoint of any layout."""
    directory, iteration = checkpoint_dir(root, iteration)
    integrity.verify(directory)  # every file against the manifest, when the directory has one
    if glob.glob(os.path.join(directory, "*mp_rank_*_model_states.pt")):
        from megatron_eslm.checkpoint.deepspeed_reader import read_deepspeed_shards
        shards = read_deepspeed_shards(directory, optimizer)
    else:
        shards = _read_our_shards(directory, optimizer)
    return merge_shards(shards, iteration)


def _read_our_shards(directory: str, optimizer: bool) -> dict[tuple[int, int], dict]:
    pipelined = not os.path.isdir(os.path.join(directory, "mp_rank_00"))  # then its first file is mp_rank_00_000
    first = load_file(shard_path(directory, 0, 0, 2 if pipelined else 1))
    tp, pp = first["layout"]["tensor_model_parallel_size"], first["layout"]["pipeline_model_parallel_size"]
    vp = saved_virtual_size(first["layout"])
    model_cfg = config_from_dict(first["config"]).model
    shards = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            state = load_file(shard_path(directory, tp_rank, pp_rank, pp))
            moments, step = None, None
            if optimizer and "optimizer" in state:
                order = shard_spec(model_cfg, tp, pp, tp_rank, pp_rank, vp).optimizer_order
                saved = state["optimizer"]["state"]
                moments = {order[index]: {key: saved[index][key] for key in MOMENTS} for index in saved}
                step = int(next(iter(saved.values()))["step"]) if saved else 0
            shards[tp_rank, pp_rank] = {"model": state["model"], "moments": moments, "optimizer_step": step,
                                        "client": state}
    return shards


def merge_shards(shards: dict[tuple[int, int], dict], iteration: int) -> FullCheckpoint:
    """Whole tensors from per-(tp_rank, pp_rank) shard states (`model`, `moments`, `optimizer_step`,
    `client`: the trainer's other saved fields)."""
    client = shards[0, 0]["client"]
    config = config_from_dict(client["config"])
    tp, pp = client["layout"]["tensor_model_parallel_size"], client["layout"]["pipeline_model_parallel_size"]
    vp = saved_virtual_size(client["layout"])
    with_moments = all(shard["moments"] is not None for shard in shards.values())
    model: dict[str, Tensor] = {}
    moments: dict[str, dict[str, Tensor]] = {}
    for pp_rank in range(pp):
        specs = [shard_spec(config.model, tp, pp, tp_rank, pp_rank, vp) for tp_rank in range(tp)]
        for name in specs[0].names:
            if specs[0].has_tied_copy and name == TIED_COPY:
                continue  # the last stage's copy of the first stage's embedding
            dim = specs[0].partition_dims.get(name)
            canonical = specs[0].canonical(name)
            model[canonical] = _merge([shards[r, pp_rank]["model"][name] for r in range(tp)], dim)
            if with_moments and name in shards[0, pp_rank]["moments"]:
                moments[canonical] = {key: _merge([shards[r, pp_rank]["moments"][name][key] for r in range(tp)], dim)
                                      for key in MOMENTS}
    vocab_size = client.get("vocab_size")
    if vocab_size is None:  # saved before checkpoints recorded it: ask the run's tokenizer
        from megatron_eslm.tokenizer import build_tokenizer
        data = config.data
        vocab_size = build_tokenizer(data.tokenizer_type, data.tokenizer_model, data.vocab_size).vocab_size
    return FullCheckpoint(config=config, iteration=iteration, vocab_size=vocab_size, model=model,
                          moments=moments if with_moments else None,
                          optimizer_step=shards[0, 0]["optimizer_step"] if with_moments else None,
                          consumed_samples=client.get("consumed_samples", 0),
                          scheduler=client.get("scheduler", {}), policy=client.get("policy", {}))


def _merge(pieces: list[Tensor], dim: int | None) -> Tensor:
    """A replicated tensor (TP rank 0's copy) or the concatenation of the shards along `dim`, in fp32."""
    whole = pieces[0] if dim is None else torch.cat(pieces, dim)
    return whole.detach().float().clone()
