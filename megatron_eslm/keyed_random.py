"""Random numbers keyed by what they are for, not drawn from a stream: splitmix64's finaliser over int64
tensors, computed on the device. A draw that is a function of (seed, what it belongs to) is the same on
whichever rank, micro-batch or shard computes it, and a resumed run needs no generator state for it
(eslm-is's token draws: `eslm/importance.py`; dropout masks keyed by position: `model/keyed_dropout.py`)."""
from __future__ import annotations

from torch import Tensor


def _signed(value: int) -> int:
    """A 64-bit constant as torch's int64 holds it."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix(z: Tensor) -> Tensor:
    """splitmix64's finaliser: int64 arithmetic wraps modulo 2^64 as the uint64 original does."""
    z = z + _GOLDEN
    z = (z ^ shift_right(z, 30)) * _MIX1
    z = (z ^ shift_right(z, 27)) * _MIX2
    return z ^ shift_right(z, 31)


def below(hashed: Tensor, probability: float) -> Tensor:
    """True with `probability` for a uniformly spread hash: its top 53 bits as an integer below
    probability x 2^53 (no floating point, so alike in every dtype and on every device)."""
    return shift_right(hashed, 11) < round(probability * 2.0 ** 53)
