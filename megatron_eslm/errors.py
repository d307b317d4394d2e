"""User-facing errors: bad input must end in one clear line, never a traceback."""
from __future__ import annotations

import functools
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
