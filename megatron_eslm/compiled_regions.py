"""Regional compilation (--compile): one torch.compile per transformer layer, with static shapes
(`dynamic=False`), as torchtitan's --compile. The layers of a stage share their code, so the compiled
graphs of the first layer serve the others: the compile time is about one layer's, whatever the depth.

Where a region ends. dynamo traces the layer's forward and breaks the graph at every function marked
`outside_compiled_regions`, which then runs eagerly, exactly as without --compile:
  the tensor- and sequence-parallel collectives (`tensor_parallel/mappings.py`): autograd Functions
      pairing each collective with its backward's by hand, counted by `distributed/collectives.py`, so
      the same collectives run in the same order as eager, and the regions between them hold the norms,
      the GEMMs, the bias, residual and activation element-wise work;
  the attention core (`model/transformer.py: CoreAttention`): one fused kernel already (SDPA's flash or
      memory-efficient attention), and it holds what dynamo does not trace: the context-parallel exchange,
      attention dropout from the tensor-parallel RNG stream, selective recompute's checkpoint;
  dropout with p > 0 (`tensor_parallel/layers.py: Dropout`): eager, its masks come from the generators
      the run seeds and checkpoints, in eager's order (inductor draws its own masks, the same on every
      tensor-parallel rank), so a compiled run equals an eager one and recompute replays them.
So with one tensor-parallel rank and no dropout (the Llama recipes) a layer is two regions, before and
after the attention core. The embeddings, the final norm, the LM head and every selection policy stay
eager (the kept-token counts vary there, which would recompile a static graph every step), and so do the
pipeline's sends and receives, between the layers. Full recompute checkpoints whole layers from outside,
so the compiled layers run, and are replayed, inside the checkpointed region.

The marked functions run through a cell that `compile_layers` points at `torch.compiler.disable(fn)`: the
import of torch._dynamo (seconds) is paid by runs that compile, not by every import of the model.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch
from torch import nn

F = TypeVar("F", bound=Callable[..., Any])
BACKEND = "inductor"  # GPU: Triton kernels; CPU: C++ (OpenMP) kernels

_cells: list[list[Callable[..., Any]]] = []  # [the function, what its callers run]


def outside_compiled_regions(fn: F) -> F:
    """`fn` runs eagerly between compiled regions: torch.compile breaks the graph at its call (once
    `compile_layers` has run; until then it is `fn`, one Python call deeper)."""
    cell = [fn, fn]
    _cells.append(cell)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return cell[1](*args, **kwargs)
    return call  # type: ignore[return-value]


def compile_layers(layers: nn.ModuleList) -> None:
    """Compile each layer in place (`nn.Module.compile`: the module, its parameters and the state dict's
    names stay as they are); the compilation itself happens at each region's first call."""
    for cell in _cells:
        cell[1] = torch.compiler.disable(cell[0])
    for layer in layers:
        layer.compile(backend=BACKEND, dynamic=False)


class CompileClock:
    """The graphs torch.compile has built, and the seconds it spent building them (dynamo's tracing and
    the backend's code generation, forward and backward: torch._dynamo's own timers), since this clock
    was made. Process-wide counts: a second model of the same shapes in the process reuses the graphs."""

    def __init__(self) -> None:
        self.start_graphs, self.start_seconds = self._now()

    @staticmethod
    def _now() -> tuple[int, float]:
        from torch._dynamo.utils import calculate_time_spent, counters

        return counters["stats"]["unique_graphs"], calculate_time_spent()["total_wall_time"]

    def since_start(self) -> tuple[int, float]:
        graphs, seconds = self._now()
        return graphs - self.start_graphs, seconds - self.start_seconds

    def line(self) -> str:
        graphs, seconds = self.since_start()
        return (f"--compile: {graphs} graphs compiled in {seconds:.1f} s during the first iteration (once; "
                "evaluation's no-grad graphs compile at the first evaluation)")
