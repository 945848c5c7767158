"""User-facing errors: one line that says what was wrong and how to fix it, never a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(ValueError):
    """An error caused by the user's input (flags, files, configuration); its message is the fix."""


def cli_entry(main: Callable) -> Callable:
    """Wrap a script's main(): a UserError (or another ValueError raised for bad input) is printed
    as one line `error: ...` on stderr with exit status 2; anything else propagates as a bug."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            message = " ".join(str(err).split())
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper
