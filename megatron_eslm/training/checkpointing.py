"""Resumable checkpoints in Megatron's layout, one file per model shard, written atomically.

    <save>/latest_checkpointed_iteration.txt
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt        no pipeline parallelism (00: the TP rank)
    <save>/iter_0000100/mp_rank_01_002/model_optim_rng.pt    TP rank 1 of pipeline stage 2

Data-parallel replica 0 of each shard writes it, together with every replica's RNG states (they differ
by data and random selection), so a resumed run continues bit for bit on the same layout. All ranks
write into `iter_XXXXXXX.tmp`; once all are through, rank 0 renames it into place and only then replaces
the tracker file, so an interrupted save never damages the last good checkpoint.

Each phase ends in `launch.shared_outcome`, not in a barrier of the default group: the ranks wait for the
writers (rank 0 alone, for the directory and the rename) on the host, in a gloo group bounded by
--distributed-timeout-minutes rather than in an NCCL barrier under NCCL's watchdog, and a failure on any
rank (a full disk, a permission) is raised on every rank instead of leaving the others hanging.

Under --deepspeed the same directory holds DeepSpeed's own files instead (`mp_rank_XX_model_states.pt`
with our state as client state, `zero_pp_rank_D_mp_rank_XX_optim_states.pt` per ZeRO partition), and
DeepSpeed's `latest` file names it too, so DeepSpeed's tools (zero_to_fp32.py) read it.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from megatron_eslm import parallel_state
from megatron_eslm.distributed import launch
from megatron_eslm.errors import UserError
from megatron_eslm.tensor_parallel.random import get_rng_tracker

TRACKER = "latest_checkpointed_iteration.txt"
DEEPSPEED_TRACKER = "latest"  # DeepSpeed's: the tag (directory name) of the newest checkpoint
FILENAME = "model_optim_rng.pt"
Writer = Callable[[str, dict], None]
Reader = Callable[[str], dict]


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def shard_dir() -> str:
    """This rank's shard directory name: mp_rank_{tp:02d}, with _{pp:03d} under pipeline parallelism."""
    layout = parallel_state.layout()
    if layout.pp == 1:
        return f"mp_rank_{layout.tp_rank:02d}"
    return f"mp_rank_{layout.tp_rank:02d}_{layout.pp_rank:03d}"


def checkpoint_file(root: str, iteration: int) -> str:
    return os.path.join(iteration_dir(root, iteration), shard_dir(), FILENAME)


def _layout_sizes() -> dict[str, int]:
    layout = parallel_state.layout()
    return {"tensor_model_parallel_size": layout.tp, "pipeline_model_parallel_size": layout.pp,
            "data_parallel_size": layout.dp}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_rank_zero() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _replica_rng_states() -> list[dict]:
    """Every data-parallel replica's RNG state, in replica order."""
    state = rng_state()
    if parallel_state.data_parallel_size() == 1:
        return [state]
    states: list[dict] = [{} for _ in range(parallel_state.data_parallel_size())]
    dist.all_gather_object(states, state, group=parallel_state.data_parallel_group())
    return states


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _write_shard(directory: str, state: dict) -> None:
    """Our format: data-parallel replica 0 of each shard writes it."""
    if parallel_state.data_parallel_rank() == 0:
        os.makedirs(os.path.join(directory, shard_dir()))
        torch.save(state, os.path.join(directory, shard_dir(), FILENAME))


def save_checkpoint(root: str, iteration: int, state: dict, write: Writer = _write_shard,
                    deepspeed_tag: bool = False) -> str:
    """Write this rank's `state` (plus RNG states) for `iteration`, collectively; returns the final directory.
    `write(directory, state)` writes the files (DeepSpeed's engine writes its own format); with
    `deepspeed_tag` the directory's name also goes to DeepSpeed's `latest` file, for its tools."""
    final = iteration_dir(root, iteration)
    tmp = f"{final}.tmp"
    with launch.shared_outcome():
        if _is_rank_zero():
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
    rng = _replica_rng_states()  # a collective of its own: outside the phases that may fail on one rank
    with launch.shared_outcome():
        write(tmp, {**state, "iteration": iteration, "rng": rng, "layout": _layout_sizes()})
    with launch.shared_outcome():
        if _is_rank_zero():
            publish(root, tmp, final, iteration, deepspeed_tag)
    return final


def publish(root: str, tmp: str, final: str, iteration: int, deepspeed_tag: bool = False) -> None:
    """Rank 0 (or the offline writer): move the complete `tmp` into place, then point the tracker(s) at it."""
    if os.path.exists(final):  # re-saving an iteration: keep the old copy until the new one is in place
        old = f"{final}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _write_text_atomic(os.path.join(root, TRACKER), f"{iteration}\n")
    if deepspeed_tag:
        _write_text_atomic(os.path.join(root, DEEPSPEED_TRACKER), os.path.basename(final))


def latest_iteration(root: str) -> int | None:
    """The tracked iteration, or None when `root` holds no checkpoint yet."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        return None
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise UserError(f"{tracker}: expected an iteration number, found '{text[:40]}'")
    return int(text)


def _read_shard(directory: str) -> dict:
    path = os.path.join(directory, shard_dir(), FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a torn or foreign file: name it instead of a pickle traceback
        raise UserError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from None


def load_checkpoint(root: str, read: Reader = _read_shard, load_rng: bool = True) -> dict | None:
    """This rank's state of the latest checkpoint under `root`, or None if there is none. `read(directory)`
    reads it (DeepSpeed's engine reads its own format), raising FileNotFoundError(path) when this rank's
    file is not there. The tensor and pipeline sizes must be the ones it was saved with
    (`tools/reshape_checkpoint.py` changes them). The RNG states are restored with `load_rng` (then the
    data-parallel size must match too: one state per replica); a checkpoint without them (written by the
    offline tools) leaves the RNG as seeded, like a fresh run."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    try:
        state = read(iteration_dir(root, iteration))
    except FileNotFoundError as err:  # the reader names the file this rank's shard should be in
        raise UserError(f"{err}: missing, although {os.path.join(root, TRACKER)} names iteration {iteration} "
                        "(saved with another parallel layout?)") from None
    saved, current = state["layout"], _layout_sizes()
    restore_rng = load_rng and "rng" in state
    sizes = [key for key in current if key != "data_parallel_size" or restore_rng]
    differing = [key for key in sizes if saved[key] != current[key]]
    if differing:
        shown = ", ".join(f"{key}={saved[key]}" for key in sizes)
        hint = " (or --no-load-rng for another data-parallel size)" if differing == ["data_parallel_size"] else ""
        raise UserError(f"--load {root}: saved with {shown}; resume with the same layout{hint}, or reshape it "
                        "with tools/reshape_checkpoint.py")
    if restore_rng:
        set_rng_state(state["rng"][parallel_state.data_parallel_rank()])
    return state
