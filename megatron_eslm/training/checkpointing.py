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

Before the rename every rank's files are fsynced and listed with their CRC-32 in the directory's
`manifest.json` (`checkpoint/integrity.py`); `--load` checks them (each rank a share of the files) and
names a damaged or missing file in one line, or with --ckpt-fallback goes back to the newest older
checkpoint that checks out. --async-save (`training/async_save.py`) writes the files in the background
with the same phases around it.

Under --deepspeed the same directory holds DeepSpeed's own files instead (`mp_rank_XX_model_states.pt`
with our state as client state, `zero_pp_rank_D_mp_rank_XX_optim_states.pt` per ZeRO partition), and
DeepSpeed's `latest` file names it too, so DeepSpeed's tools (zero_to_fp32.py) read it.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from megatron_eslm import parallel_state
from megatron_eslm.checkpoint import integrity
from megatron_eslm.distributed import launch, watchdog
from megatron_eslm.errors import UserError
from megatron_eslm.tensor_parallel.random import get_rng_tracker

TRACKER = "latest_checkpointed_iteration.txt"
DEEPSPEED_TRACKER = "latest"  # DeepSpeed's: the tag (directory name) of the newest checkpoint
FILENAME = "model_optim_rng.pt"
# write(directory, state) -> the manifest entries of the files it wrote (relative paths), or None when it
# cannot tell (DeepSpeed's engine): then every rank checksums a share of the directory's files
Writer = Callable[[str, dict], "dict[str, dict] | None"]
Reader = Callable[[str], dict]
Log = Callable[[str], None]


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def shard_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    """A shard's directory name: mp_rank_{tp:02d}, with _{pp:03d} under pipeline parallelism."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def shard_dir() -> str:
    """This rank's shard directory name."""
    layout = parallel_state.layout()
    return shard_dir_name(layout.tp_rank, layout.pp_rank, layout.pp)


def checkpoint_file(root: str, iteration: int) -> str:
    return os.path.join(iteration_dir(root, iteration), shard_dir(), FILENAME)


VIRTUAL_SIZE = "virtual_pipeline_model_parallel_size"  # model chunks per pipeline rank; absent in older files: 1


def _layout_sizes() -> dict[str, int]:
    layout = parallel_state.layout()
    return {"tensor_model_parallel_size": layout.tp, "pipeline_model_parallel_size": layout.pp,
            "data_parallel_size": layout.dp, VIRTUAL_SIZE: layout.vp}


def saved_virtual_size(layout: dict) -> int:
    """The model chunks per pipeline rank a checkpoint's layout record names."""
    return layout.get(VIRTUAL_SIZE) or 1


def rng_state() -> dict:
    """This rank's generators. CUDA's is this rank's device's only: a resume may pair ranks with devices
    anew (another count per node), and a rank draws from its own device alone."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_device_rng_state(state["cuda"]))


def _device_rng_state(saved: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The CUDA generator state for this rank's device. Older checkpoints hold a list, every visible
    device's (`get_rng_state_all`), of which a rank used the one at its device's index: that entry, or the
    first when this node has more devices than the saving one had."""
    if isinstance(saved, torch.Tensor):
        return saved
    device = torch.cuda.current_device()
    return saved[device] if device < len(saved) else saved[0]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_rank_zero() -> bool:
    return not _distributed() or dist.get_rank() == 0


def replica_rng_states() -> list[dict]:
    """Every data-parallel replica's RNG state, in replica order (context-parallel ranks draw alike: their
    streams are seeded alike and nothing random runs per sequence shard, since CP refuses dropout, so a
    checkpoint does not depend on CP)."""
    state = rng_state()
    if parallel_state.data_parallel_size() == 1:
        return [state]
    states: list[dict] = [{} for _ in range(parallel_state.data_parallel_size())]
    dist.all_gather_object(states, state, group=parallel_state.data_parallel_group())
    return states


def _write_text_atomic(path: str, text: str) -> None:
    tmp = launch.temp_path(path)
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    integrity.fsync_path(os.path.dirname(path) or ".")


def write_shard(directory: str, state: dict) -> dict[str, dict]:
    """Our format: replica 0 of each shard (data and context rank 0) writes it (fsynced); returns its manifest
    entry."""
    if parallel_state.data_context_parallel_rank() != 0:
        return {}
    os.makedirs(os.path.join(directory, shard_dir()))
    name = os.path.join(shard_dir(), FILENAME)
    return {name: integrity.save_file(state, os.path.join(directory, name))}


def save_checkpoint(root: str, iteration: int, state: dict, write: Writer = write_shard,
                    deepspeed_tag: bool = False) -> str:
    """Write this rank's `state` (plus RNG states) for `iteration`, collectively; returns the final directory.
    `write(directory, state)` writes the files (DeepSpeed's engine writes its own format); with
    `deepspeed_tag` the directory's name also goes to DeepSpeed's `latest` file, for its tools."""
    tmp, full_state = begin_save(root, iteration, state)
    with launch.shared_outcome():
        entries = write(tmp, full_state)
    return finish_save(root, tmp, iteration, entries, deepspeed_tag)


def begin_save(root: str, iteration: int, state: dict) -> tuple[str, dict]:
    """The collective start of a save: a fresh temporary directory (rank 0; earlier saves' leftovers, e.g.
    of a run killed while writing, removed) and the RNG states of every replica. Returns the directory and
    the state to write."""
    tmp = f"{iteration_dir(root, iteration)}.tmp"
    with launch.shared_outcome():
        if _is_rank_zero():
            for leftover in glob_leftovers(root):
                shutil.rmtree(leftover, ignore_errors=True)
            os.makedirs(tmp)
    return tmp, full_state(iteration, state)  # a collective of its own: outside the phases that may fail


def full_state(iteration: int, state: dict) -> dict:
    """What this rank's checkpoint file holds: `state` with the iteration, every data-parallel replica's RNG
    states (gathered: collective over the data-parallel group) and the layout's sizes."""
    return {**state, "iteration": iteration, "rng": replica_rng_states(), "layout": _layout_sizes()}


def glob_leftovers(root: str) -> list[str]:
    """Temporary directories of saves that never finished (an emergency save's too, also once a survivor
    claimed it to publish: `snapshot_replicas.py`)."""
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, name) for name in os.listdir(root)
            if re.fullmatch(r"iter_\d{7}\.(tmp|old|emergency(\..+\.part)?)", name)]


def finish_save(root: str, tmp: str, iteration: int, entries: dict[str, dict] | None,
                deepspeed_tag: bool = False) -> str:
    """The collective end of a save, once this rank's files are written (`entries`: their manifest entries,
    None to checksum a share of the directory instead): the manifest, then the rename and the tracker(s)."""
    with launch.shared_outcome():
        if entries is None:
            names = integrity.files_under(tmp)
            entries = {}
            for name in names[launch.rank()::launch.world_size()]:  # DeepSpeed wrote them: fsync and checksum
                integrity.fsync_path(os.path.join(tmp, name))
                entries[name] = integrity.checksum_file(os.path.join(tmp, name))
                watchdog.alive()  # a read-back of ~100 GB takes minutes
    gathered = [entries]
    if _distributed() and launch.world_size() > 1:
        gathered = [None] * launch.world_size()
        dist.all_gather_object(gathered, entries, group=launch.host_group())
    final = iteration_dir(root, iteration)
    with launch.shared_outcome():
        if _is_rank_zero():
            integrity.write_manifest(tmp, {name: e for part in gathered for name, e in part.items()})
            publish(root, tmp, final, iteration, deepspeed_tag)
    return final


def publish(root: str, tmp: str, final: str, iteration: int, deepspeed_tag: bool = False) -> None:
    """Rank 0 (or the offline writer): move the complete `tmp` into place, then point the tracker(s) at it."""
    integrity.fsync_path(tmp)
    if os.path.exists(final):  # re-saving an iteration: keep the old copy until the new one is in place
        old = f"{final}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    integrity.fsync_path(root)
    write_tracker(root, iteration)
    if deepspeed_tag:
        _write_text_atomic(os.path.join(root, DEEPSPEED_TRACKER), os.path.basename(final))


def write_tracker(root: str, iteration: int) -> None:
    """Point `root`'s tracker at `iteration` (atomically: a temporary name, then a rename)."""
    _write_text_atomic(os.path.join(root, TRACKER), f"{iteration}\n")


def latest_iteration(root: str) -> int | None:
    """The tracked iteration, or None when `root` holds no checkpoint yet."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        return None
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise UserError(f"{tracker}: expected an iteration number, found '{text[:40]}'")
    return int(text)


def run_checkpoints(root: str) -> list[str]:
    """The entries of `root` a run's saves write: the trackers (ours, DeepSpeed's `latest`) first, then the
    iteration directories, unfinished ones (.tmp, .old, .emergency) included. Nothing else in `root`."""
    if not os.path.isdir(root):
        return []
    names = os.listdir(root)
    trackers = [name for name in (TRACKER, DEEPSPEED_TRACKER) if name in names]
    return trackers + sorted(name for name in names if re.fullmatch(r"iter_\d{7}(\.(tmp|old|emergency))?", name))


def check_save_dir(save: str, load: str | None, overwrite: bool) -> list[str]:
    """A run's --save must not replace checkpoints it does not resume (issue 27): one that holds a run's
    checkpoints is refused in one line (UserError) unless it is the --load directory (a resume, or the first
    launch of `--load S --save S`) or `overwrite` (--overwrite-save). --save nested with --load (either way)
    is refused even then: its saves would land in, or around, the checkpoint being read. Returns the entries
    to remove before training ([] unless `overwrite` meets a checkpoint). Rank 0 alone reads the directory."""
    if load is not None:
        target, read = os.path.realpath(save), os.path.realpath(load)
        if target == read:
            return []
        if os.path.commonpath([target, read]) in (target, read):
            raise UserError(f"--save {save}: nested with --load {load}; save into --load itself (to resume) or "
                            f"into a directory of its own")
    entries = run_checkpoints(save)
    if not entries or overwrite:
        return entries
    if TRACKER in entries:
        try:
            found = f"iteration {latest_iteration(save)}"
        except UserError:
            found = f"an unreadable {TRACKER}"
    else:
        iterations = [name for name in entries if name.startswith("iter_")]
        found = iterations[-1] if iterations else f"DeepSpeed's '{DEEPSPEED_TRACKER}'"
    loaded = f", which loads --load {load}," if load is not None else ""
    raise UserError(f"--save {save} already holds checkpoints ({found}) that this run{loaded} would replace; "
                    f"resume them with --load {save}, choose another --save, or pass --overwrite-save to replace them")


def remove_run_checkpoints(root: str, entries: list[str]) -> None:
    """--overwrite-save: remove `entries` (`check_save_dir`'s) from `root`, trackers first, so that an
    interrupted removal never leaves a tracker naming a removed iteration."""
    for name in entries:
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    integrity.fsync_path(root)


def _read_shard(directory: str) -> dict:
    path = os.path.join(directory, shard_dir(), FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a torn or foreign file: name it instead of a pickle traceback
        raise UserError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})", rank_local=True) from None


def load_checkpoint(root: str, read: Reader = _read_shard, load_rng: bool = True, fallback: bool = False,
                    log: Log = print) -> dict | None:
    """This rank's state of the latest checkpoint under `root`, or None if there is none. Its files are first
    checked against its manifest (collectively, each rank a share); a damaged one is one line naming the
    file, or with `fallback` (--ckpt-fallback) the newest older checkpoint that checks out is loaded instead.
    `read(directory)` reads it (DeepSpeed's engine reads its own format), raising FileNotFoundError(path)
    when this rank's file is not there. The tensor and pipeline sizes must be the ones it was saved with
    (`tools/reshape_checkpoint.py` changes them); the model chunks per rank may differ (the caller regroups
the model and optimizer state: `checkpoint/regroup.py`). The RNG states are restored with `load_rng` (then the
    data-parallel size must match too: one state per replica); a checkpoint without them (written by the
    offline tools) leaves the RNG as seeded, like a fresh run."""
    candidates = _candidates(root, fallback)
    for position, iteration in enumerate(candidates):
        try:
            with launch.shared_outcome():  # every rank takes the same branch below
                verified = _verify_share(iteration_dir(root, iteration))
            break
        except UserError as err:
            if position + 1 == len(candidates):
                raise
            log(f"--ckpt-fallback: {err}; trying iteration {candidates[position + 1]}")
    else:
        return None
    if not verified:
        log(f"{iteration_dir(root, iteration)}: no {integrity.MANIFEST} (written by an older version or "
            "another tool): loaded without checking its files")
    try:
        state = read(iteration_dir(root, iteration))
    except FileNotFoundError as err:  # the reader names the file this rank's shard should be in
        raise UserError(f"{err}: missing, although {os.path.join(root, TRACKER)} names iteration {iteration} "
                        "(saved with another parallel layout?)", rank_local=True) from None
    saved, current = state["layout"], _layout_sizes()
    restore_rng = load_rng and "rng" in state
    # Another number of model chunks is regrouped by the caller (`checkpoint/regroup.py`)
    sizes = [key for key in current if (key != "data_parallel_size" or restore_rng) and key != VIRTUAL_SIZE]
    differing = [key for key in sizes if saved[key] != current[key]]
    if differing:
        shown = ", ".join(f"{key}={saved[key]}" for key in sizes)
        hint = " (or --no-load-rng for another data-parallel size)" if differing == ["data_parallel_size"] else ""
        raise UserError(f"--load {root}: saved with {shown}; resume with the same layout{hint}, or reshape it "
                        "with tools/reshape_checkpoint.py")
    if restore_rng:
        set_rng_state(state["rng"][parallel_state.data_parallel_rank()])
    return state


def _candidates(root: str, fallback: bool) -> list[int]:
    """The iterations `load_checkpoint` tries, in order: the tracked one, then (with `fallback`) the older
    published ones, newest first; with `fallback` a damaged tracker falls back to the newest published one."""
    try:
        tracked = latest_iteration(root)
    except UserError:
        if not fallback:
            raise
        tracked = -1  # damaged: every published iteration is a candidate
    if tracked is None:
        return []
    if not fallback:
        return [tracked]
    published = sorted((int(m[1]) for name in os.listdir(root) if (m := re.fullmatch(r"iter_(\d{7})", name))),
                       reverse=True)
    return ([tracked] if tracked >= 0 else []) + [i for i in published if tracked < 0 or i < tracked]


def _verify_share(directory: str) -> bool:
    """Check this rank's share of `directory`'s files against its manifest (False: it has none)."""
    if not os.path.isdir(directory):
        raise UserError(f"{directory}: missing, although the tracker names it")
    manifest = integrity.read_manifest(directory)
    if manifest is None:
        return False
    return integrity.verify(directory, sorted(manifest)[launch.rank()::launch.world_size()])
