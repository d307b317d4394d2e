"""The ``--data-path`` syntax: one dataset prefix, or weight/prefix pairs whose weights are normalised.

Weights are parsed as exact fractions of their decimal strings ("0.3" is 3/10), which the blending order
relies on (``blended_dataset.py``).
"""
from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

from megatron_eslm.errors import UserError


def parse_blend(values: Sequence[str], flag: str) -> list[tuple[Fraction, str]]:
    """``PREFIX`` or ``W1 PREFIX1 W2 PREFIX2 ...`` as ``(normalised weight, prefix)`` pairs."""
    if len(values) == 1:
        return [(Fraction(1), values[0])]
    if len(values) == 0 or len(values) % 2:
        raise UserError(f"{flag}: give one dataset prefix or weight/prefix pairs, got {len(values)} values")
    pairs = []
    for weight, prefix in zip(values[::2], values[1::2]):
        try:
            value = Fraction(weight)
        except (ValueError, ZeroDivisionError):
            raise UserError(f"{flag}: weight {weight!r} of {prefix} is not a finite number") from None
        if value < 0:
            raise UserError(f"{flag}: weight {weight} of {prefix} is negative")
        pairs.append((value, prefix))
    total = sum(weight for weight, _ in pairs)
    if total == 0:
        raise UserError(f"{flag}: all weights are zero")
    return [(weight / total, prefix) for weight, prefix in pairs]
