"""User-facing errors: bad input must end in one clear line, never a traceback."""
from __future__ import annotations

import functools
import json
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a value); the message names the culprit."""


def exit_on_user_error(main: F) -> F:
    """Wrap a command-line entry point: a UserError prints ``error: <message>`` and exits with code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
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
