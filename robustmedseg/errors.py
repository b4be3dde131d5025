"""User-facing errors.

Every problem caused by bad input (a missing file, a volume with the wrong shape, an
existing output folder...) is raised as :class:`InputError` with a message that names
the offending file and the problem in one line.  Scripts catch it in :func:`run_cli`
and print ``error: <message>`` instead of a traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence


class InputError(Exception):
    """Bad user input. ``str(err)`` is a single line naming the file and the problem."""

    def __init__(self, message: str, path: Optional[object] = None):
        message = " ".join(str(message).split())  # always one line
        if path is not None:
            message = f"{path}: {message}"
        super().__init__(message)


def run_cli(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> None:
    """Run ``main(argv)``; turn :class:`InputError` into one ``error:`` line and exit status 2."""
    try:
        rc = main(argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    raise SystemExit(int(rc or 0))
