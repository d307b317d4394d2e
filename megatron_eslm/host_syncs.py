"""Count the places where a training step would wait for a GPU, on any device (CPU included).

On a GPU the host queues kernels and runs ahead; anything that needs a device value on the host (a scalar
read, an output whose size depends on the data, a host tensor copied to the device) makes it wait until
every queued kernel has finished. On a CPU nothing waits, so the tests count the operations that *would*
wait instead, with a TorchDispatchMode:

  scalar read       aten._local_scalar_dense: `.item()`, `float(t)`, `int(t)`, `bool(t)`, `if t:`
  host read         Tensor.tolist / Tensor.numpy (they bypass the dispatcher, so they are wrapped)
  data-dependent    nonzero, masked_select, boolean-mask indexing, unique, bincount (its CUDA kernel
                    reads the largest value to size the output)
  host-to-device    aten.lift_fresh: a tensor made from Python numbers (`torch.tensor(...)`,
                    `torch.as_tensor(3.0)`), which on a GPU run is a host-to-device copy

The few syncs a selective step needs (the kept count that sizes the LM head's row backward; the width of
the sketch-exact window) run inside `inherent(reason)`: counted apart as INHERENT, and let through by
`torch.cuda.set_sync_debug_mode("error")`, so a GPU run in that mode fails on any other sync.

Not counted: scalar reads and scalar tensors made inside torch.optim. torch's Adam/AdamW keep their step
counts in host tensors unless `capturable` or `fused` (which read and copy nothing: the default on CUDA,
`training/optimizer.py`), so this bookkeeping stays on the host.

`torch.cuda.set_sync_debug_mode("error")` is the GPU's own check (tools/device_check.sh). The counter
keeps where each event came from, so a failing budget names the line.
"""
from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SCALAR_READ = "scalar read"
HOST_READ = "host read"
DATA_DEPENDENT = "data-dependent shape"
HOST_TO_DEVICE = "host-to-device"
INHERENT = "inherent"
_inherent_depth = 0  # > 0 inside `inherent`
_DATA_DEPENDENT_OPS = {aten.nonzero.default, aten.masked_select.default, aten.bincount.default,
                       aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}


def _is_bool_mask_index(func, args) -> bool:
    return func is aten.index.Tensor and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)


@contextlib.contextmanager
def inherent(reason: str) -> Iterator[None]:
    """Marks a host sync the step cannot do without (`reason` says why, for the reader): the counter files
    it under INHERENT and CUDA's sync debug mode lets it pass."""
    global _inherent_depth
    debug_mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_initialized() else 0
    if debug_mode:
        torch.cuda.set_sync_debug_mode(0)
    _inherent_depth += 1
    try:
        yield
    finally:
        _inherent_depth -= 1
        if debug_mode:
            torch.cuda.set_sync_debug_mode(debug_mode)


def _in_optimizer() -> bool:
    return any("/torch/optim/" in frame.filename for frame in traceback.extract_stack())


def _where(skip: str = __file__) -> str:
    """The innermost frame of this project outside torch and this module: the line to blame."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename != skip and "/torch/" not in frame.filename and "megatron_eslm" in frame.filename:
            return f"{frame.filename.rsplit('megatron_eslm', 1)[-1].lstrip('/')}:{frame.lineno}"
    return "?"


class HostSyncCounter(TorchDispatchMode):
    """`with HostSyncCounter() as syncs: ...`; then `syncs.total`, `syncs.by_kind`, `syncs.by_place`."""

    def __init__(self) -> None:
        super().__init__()
        self.by_kind: Counter[str] = Counter()
        self.by_place: Counter[str] = Counter()
        self._saved: dict[str, Any] = {}

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    @property
    def avoidable(self) -> int:
        """The syncs outside `inherent` blocks."""
        return self.total - self.by_kind[INHERENT]

    def record(self, kind: str) -> None:
        kind = INHERENT if _inherent_depth else kind
        self.by_kind[kind] += 1
        self.by_place[f"{kind} at {_where()}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten._local_scalar_dense.default:
            if not _in_optimizer():
                self.record(SCALAR_READ)
        elif func in _DATA_DEPENDENT_OPS or _is_bool_mask_index(func, args):
            self.record(DATA_DEPENDENT)
        elif func is aten.lift_fresh.default:
            if not _in_optimizer():
                self.record(HOST_TO_DEVICE)
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostSyncCounter:
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _original=original, **kwargs):
                self.record(HOST_READ)
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        super().__exit__(*exc)

    def report(self) -> str:
        return ", ".join(f"{count} x {place}" for place, count in self.by_place.most_common())
