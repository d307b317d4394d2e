"""Resumable checkpoints in Megatron's layout, written atomically.

    <save>/latest_checkpointed_iteration.txt
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt

A checkpoint directory is first written as `iter_XXXXXXX.tmp-<pid>` and renamed when complete, and the
tracker file is replaced atomically after that, so an interrupted save never damages the last good one.
"""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

from megatron_eslm.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
FILENAME = "model_optim_rng.pt"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def checkpoint_file(root: str, iteration: int) -> str:
    return os.path.join(iteration_dir(root, iteration), "mp_rank_00", FILENAME)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def save_checkpoint(root: str, iteration: int, state: dict) -> str:
    """Write `state` (plus RNG states) for `iteration`; returns the final directory."""
    final = iteration_dir(root, iteration)
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "mp_rank_00"))
    torch.save({**state, "iteration": iteration, "rng": rng_state()}, os.path.join(tmp, "mp_rank_00", FILENAME))
    if os.path.exists(final):  # re-saving the same iteration: keep the old copy until the new one is in place
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _write_text_atomic(os.path.join(root, TRACKER), f"{iteration}\n")
    return final


def latest_iteration(root: str) -> int | None:
    """The tracked iteration, or None when `root` holds no checkpoint yet."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        return None
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise UserError(f"{tracker}: expected an iteration number, found '{text[:40]}'")
    return int(text)


def load_checkpoint(root: str) -> dict | None:
    """The latest checkpoint's state under `root` (RNG states are restored here), or None if there is none."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    path = checkpoint_file(root, iteration)
    if not os.path.exists(path):
        raise UserError(f"{path}: missing, although {os.path.join(root, TRACKER)} names iteration {iteration}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a torn or foreign file: name it instead of a pickle traceback
        raise UserError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from None
    set_rng_state(state["rng"])
    return state
