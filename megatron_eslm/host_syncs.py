"""Count the places where a training step would wait for a GPU, on any device (CPU included).

On a GPU the host queues kernels and runs ahead; anything that needs a device value on the host (a scalar
read, an output whose size depends on the data, a host tensor copied to the device) makes it wait until
every queued kernel has finished. On a CPU nothing waits, so the tests count the operations that *would*
wait instead, with a TorchDispatchMode:

  scalar read       aten._local_scalar_dense: `.item()`, `float(t)`, `int(t)`, `bool(t)`, `if t:`; and
                    aten.equal / aten.allclose: `torch.equal`, `torch.allclose` (a bool on the host)
  host read         Tensor.tolist / Tensor.numpy (they bypass the dispatcher, so they are wrapped)
  device-to-host    Tensor.cpu, and Tensor.to with the CPU named as a string (`.to("cpu")`,
                    `.to(device="cpu")`): wrapped, since on a CPU tensor they return it without
                    dispatching. A `torch.device` argument is not counted: the step's copies of host data
                    to its compute device pass one, and on a CPU run that device is the CPU too
  data-dependent    nonzero, masked_select, boolean-mask indexing, unique, bincount (its CUDA kernel
                    reads the largest value to size the output), repeat_interleave with tensor repeats
                    and no `output_size`
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
DEVICE_TO_HOST = "device-to-host"
DATA_DEPENDENT = "data-dependent shape"
HOST_TO_DEVICE = "host-to-device"
INHERENT = "inherent"
_inherent_depth = 0  # > 0 inside `inherent`
_SCALAR_READ_OPS = {aten._local_scalar_dense.default, aten.equal.default, aten.allclose.default}
_DATA_DEPENDENT_OPS = {aten.nonzero.default, aten.masked_select.default, aten.bincount.default,
                       aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}


def _has_data_dependent_shape(func, args, kwargs) -> bool:
    """Boolean-mask indexing, or repeat_interleave sizing its output from the repeats' sum."""
    if func is aten.index.Tensor:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    return func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None


def _always(*args, **kwargs) -> bool:
    return True


def _names_cpu(*args, **kwargs) -> bool:
    """Whether a `Tensor.to` call names the CPU as a string: `.to("cpu")`, `.to("cpu", dtype)`,
    `.to(device="cpu")`."""
    device = kwargs.get("device", args[0] if args else None)
    return isinstance(device, str) and torch.device(device).type == "cpu"


# Tensor methods that bypass the dispatcher: name -> (kind, whether a call with these arguments counts)
_WRAPPED = {"tolist": (HOST_READ, _always), "numpy": (HOST_READ, _always), "cpu": (DEVICE_TO_HOST, _always),
            "to": (DEVICE_TO_HOST, _names_cpu)}


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
        kwargs = kwargs or {}
        if func in _SCALAR_READ_OPS:
            if not _in_optimizer():
                self.record(SCALAR_READ)
        elif func in _DATA_DEPENDENT_OPS or _has_data_dependent_shape(func, args, kwargs):
            self.record(DATA_DEPENDENT)
        elif func is aten.lift_fresh.default:
            if not _in_optimizer():
                self.record(HOST_TO_DEVICE)
        return func(*args, **kwargs)

    def __enter__(self) -> HostSyncCounter:
        for name, (kind, counts) in _WRAPPED.items():
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _original=original, _kind=kind, _counts=counts, **kwargs):
                if _counts(*args, **kwargs):
                    self.record(_kind)
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        super().__exit__(*exc)

    def report(self) -> str:
        return ", ".join(f"{count} x {place}" for place, count in self.by_place.most_common())
