"""The two checks most flags need, so every section words its one-line errors the same way."""
from __future__ import annotations

from typing import Sequence

from megatron_eslm.errors import UserError


def positive(value: int | float, flag: str) -> None:
    if value <= 0:
        raise UserError(f"{flag} must be positive, got {value}")


def one_of(value: str, choices: Sequence[str], flag: str) -> None:
    if value not in choices:
        raise UserError(f"{flag} must be one of {', '.join(choices)}, got '{value}'")
