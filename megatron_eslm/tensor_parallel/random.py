"""Reproducible dropout under tensor parallelism (Megatron's model-parallel RNG fork, for any device).

Two streams per rank:
  default         torch's own generator, seeded with seed + 100 * pipeline rank: the same on every
                  tensor-parallel rank, for dropout on activations every TP rank holds in full (embedding
                  and hidden dropout outside sequence-parallel regions), so the replicas stay identical.
  model-parallel  seeded with seed + 2718 + tensor-parallel rank and swapped in by `fork()`, for dropout
                  on activations each TP rank holds a different part of (attention heads, sequence
                  shards): each rank draws its own mask, the same one on every run.
Both states go into checkpoints, so a resumed run draws the same masks.

`checkpoint(function, *args)` is activation recompute that replays both streams (Megatron keeps its
`checkpoint` here too, beside the tracker whose states it must replay): the recomputed forward draws
the very dropout masks of the first one.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.utils.checkpoint
from torch import Tensor

from megatron_eslm import parallel_state

MODEL_PARALLEL_RNG = "model-parallel-rng"
MODEL_PARALLEL_SEED_OFFSET = 2718
PIPELINE_SEED_STRIDE = 100


def _get_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(state: Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named generator states that `fork(name)` swaps into the device's default generator for a region."""

    def __init__(self) -> None:
        self.states: dict[str, Tensor] = {}
        self.device = torch.device("cpu")

    def reset(self, device: torch.device) -> None:
        self.states, self.device = {}, device

    def add(self, name: str, seed: int) -> None:
        saved = _get_state(self.device)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states[name] = _get_state(self.device)
        _set_state(saved, self.device)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        if name not in self.states:
            raise RuntimeError(f"RNG stream {name!r} is not seeded: call set_random_seeds() before dropout")
        saved = _get_state(self.device)
        _set_state(self.states[name], self.device)
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device)
            _set_state(saved, self.device)

    def get_states(self) -> dict[str, Tensor]:
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: dict[str, Tensor]) -> None:
        self.states = {name: state.clone() for name, state in states.items()}

    def snapshot(self) -> dict[str, Tensor]:
        """The streams' states now. `fork` replaces a stream's state tensor rather than writing into it, so
        a shallow copy of the dict is a snapshot: no tensor is copied."""
        return dict(self.states)


class Replay:
    """A context that runs its region from a tracker `snapshot`, then puts back the states it found.
    Reusable (unlike a generator context manager): a graph kept with retain_graph recomputes again."""

    def __init__(self, tracker: RNGStatesTracker, states: dict[str, Tensor]):
        self.tracker, self.states = tracker, states
        self.live: dict[str, Tensor] = {}

    def __enter__(self) -> None:
        self.live, self.tracker.states = self.tracker.states, dict(self.states)

    def __exit__(self, *exc: object) -> None:
        self.tracker.states = self.live


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def _replay_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """torch.utils.checkpoint's `context_fn`, called as the forward starts: nothing around the forward,
    the tracker's streams as they were then around the recompute."""
    return contextlib.nullcontext(), Replay(_TRACKER, _TRACKER.snapshot())


def checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` keeping only its inputs for the backward, which runs it again first. The
    recompute draws the first forward's dropout masks: torch restores the default CPU and device
    generators (`preserve_rng_state`) and this restores the tracker's streams; it also runs under the
    forward's autocast state. Non-reentrant (the saved-tensor hooks), so it nests in any autograd graph,
    leaves `backward(inputs=...)` alone, and DeepSpeed ZeRO-3's module hooks gather the parameters again
    for the recompute. torch stops the recompute once the last tensor the backward reads is back
    (`training/flops.py` counts what that skips). Without gradients (evaluation, frozen models) it is
    `function(*args)`."""
    if not torch.is_grad_enabled():
        return function(*args)
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True,
                                             context_fn=_replay_contexts)


def set_random_seeds(seed: int, device: torch.device) -> None:
    """Seed python, numpy and torch (per pipeline stage) and the tracker's model-parallel stream."""
    default_seed = seed + PIPELINE_SEED_STRIDE * parallel_state.pipeline_model_parallel_rank()
    random.seed(default_seed)
    np.random.seed(default_seed)
    torch.manual_seed(default_seed)
    _TRACKER.reset(device)
    _TRACKER.add(MODEL_PARALLEL_RNG,
                 seed + MODEL_PARALLEL_SEED_OFFSET + parallel_state.tensor_model_parallel_rank())
