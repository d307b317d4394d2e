"""DeepSpeed ZeRO 1-3 checkpoints (written under --deepspeed) as whole per-shard states, for `reader.py`.

DeepSpeed keeps, per model-parallel rank (= pp_rank * TP + tp_rank, `distributed/deepspeed_engine.py`), the
parameter names and shapes in its model-states file(s) and the fp32 master weights and AdamW moments as
flat data-parallel partitions in one optimizer file per data-parallel rank. DeepSpeed's own
`zero_to_fp32` consolidates the master weights of one such set; it is called here per model-parallel rank,
and again with the moments' flat partitions in place of the weights', which share their layout.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import io
import os

from megatron_eslm.checkpoint.full_state import MOMENTS
from megatron_eslm.checkpoint.reader import load_file
from megatron_eslm.errors import UserError


@contextlib.contextmanager
def _quiet():
    """Without zero_to_fp32's prints and progress bars."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _files(directory: str, mp_rank: int, kind: str) -> list[str]:
    from deepspeed.utils.zero_to_fp32 import natural_keys

    files = sorted(glob.glob(os.path.join(directory, f"*mp_rank_{mp_rank:02d}_{kind}_states.pt")), key=natural_keys)
    if not files:
        raise UserError(f"{directory}: no DeepSpeed {kind} states of model-parallel rank {mp_rank}")
    return files


def _moment_groups(optim_state: dict, stage: int, key: str) -> list:
    """One data-parallel rank's flat partitions of moment `key`, shaped like its fp32 master partitions."""
    if stage == 3:
        return [group[key] for group in optim_state["optimizer_state_dict"]["state"].values()]
    return [group[key] for group in optim_state["base_optimizer_state"]["state"].values()]


def read_deepspeed_shards(directory: str, optimizer: bool = True) -> dict[tuple[int, int], dict]:
    """Per (tp_rank, pp_rank): {"model": {name: fp32 tensor}, "moments": {name: {exp_avg, exp_avg_sq}} | None,
    "optimizer_step": int | None, "client": our saved state (iteration, config, layout, ...)}."""
    from deepspeed.utils import zero_to_fp32 as z

    first = load_file(_files(directory, 0, "model")[0])
    tp, pp = first["layout"]["tensor_model_parallel_size"], first["layout"]["pipeline_model_parallel_size"]
    shards = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            mp_rank = pp_rank * tp + tp_rank
            model_files, optim_files = _files(directory, mp_rank, "model"), _files(directory, mp_rank, "optim")
            with _quiet():  # zero_to_fp32 prints its progress
                model_states = z.parse_model_states(model_files)
                # DeepSpeed after 0.19.0 also returns the groups' alignment paddings, which its ZeRO 1-2
                # merge then takes (the moments are laid out as the weights)
                stage, world, fp32_groups, *paddings = z.parse_optim_states(optim_files, directory)
            if stage <= 2:
                merge = functools.partial(z._get_fp32_state_dict_from_zero2_checkpoint,
                                          **({"param_alignment_paddings": paddings[0]} if paddings else {}))
            else:
                merge = z._get_fp32_state_dict_from_zero3_checkpoint
            with _quiet():
                weights = z.to_torch_tensor(merge(world, fp32_groups, model_states, False))
            moments, step = None, None
            if optimizer:
                states = [load_file(f)["optimizer_state_dict"] for f in optim_files]
                with _quiet():
                    merged = {key: z.to_torch_tensor(merge(world, [_moment_groups(s, stage, key) for s in states],
                                                           model_states, False))
                              for key in MOMENTS}
                moments = {name: {key: merged[key][name] for key in MOMENTS} for name in weights}
                inner = states[0]["optimizer_state_dict"] if stage == 3 else states[0]["base_optimizer_state"]
                step = int(next(iter(inner["state"].values()))["step"])
            client = load_file(model_files[0])
            shards[tp_rank, pp_rank] = {"model": dict(weights), "moments": moments, "optimizer_step": step,
                                        "client": client}
    return shards
