"""User-facing errors: bad input must end in one clear line, never a traceback.

Under a launcher (torchrun, deepspeed) every rank usually meets the same bad input: rank 0 alone prints
the line, the others exit with the same code in silence. The launcher then prints its own summary of the
failed ranks (torchrun: a ChildFailedError traceback); the `error:` line above it is the cause. An error
only one rank can meet (its own checkpoint shard, a peer it lost) is raised with `rank_local=True` and
printed by every rank that meets it, so it is not lost when that rank is not rank 0.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a value); the message names the culprit.
    `rank_local`: only this rank can meet it, so it is printed on this rank even when it is not rank 0."""

    def __init__(self, message: str, rank_local: bool = False):
        super().__init__(message)
        self.rank_local = rank_local


def exit_on_user_error(main: F) -> F:
    """Wrap a command-line entry point: a UserError exits with code 2, printing ``error: <message>`` on
    rank 0 (the launcher's RANK; 0 without one) or where it is `rank_local`."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            if err.rank_local or os.environ.get("RANK", "0") == "0":
                print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def read_json_object(path: str, flag: str) -> dict:
    """A JSON object a flag names (--config, --deepspeed_config), or one line saying what is wrong."""
    try:
        with open(path) as fh:
            values = json.load(fh)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot read ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{flag} {path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(values, dict):
        raise UserError(f"{flag} {path}: expected a JSON object")
    return values
