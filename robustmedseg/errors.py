"""User-facing errors and the command-line policy every script follows.

Every problem caused by bad input (a missing file, a volume with the wrong shape, an
existing output folder...) is raised as :class:`InputError` with a message that names
the offending file and the problem in one line.  Scripts run their ``main`` through
:func:`run_cli`, which prints ``error: <message>`` instead of a traceback and exits with
status 2.  :func:`run_cli` also turns every operating-system error (permission denied,
not a folder, is a folder, disk full...) into the same one line naming the path, and
treats SIGTERM and SIGHUP like Ctrl-C: the ``finally`` blocks run, so the temporary
outputs of :mod:`robustmedseg.io` are removed before the process ends.  :func:`warn` is
the one way to report a repaired input (``warning: <file>: <what was done>``).

The flags themselves are parsed by :mod:`robustmedseg.cli`.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Optional, Sequence

_WORKER_PREFIX = "Caught InputError in DataLoader worker"


class InputError(Exception):
    """Bad user input. ``str(err)`` is a single line naming the file and the problem."""

    def __init__(self, message: str, path: Optional[object] = None):
        message = str(message)
        if message.startswith(_WORKER_PREFIX):  # re-raised by a torch DataLoader worker: keep the original line
            lines = [line for line in message.splitlines() if line.strip()]
            message = lines[-1].split("InputError: ", 1)[-1] if lines else message
        message = " ".join(message.split())  # always one line
        if path is not None:
            message = f"{path}: {message}"
        super().__init__(message)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's :class:`KeyboardInterrupt` (``signum`` tells which)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def warn(message: str, path: Optional[object] = None) -> None:
    """Print ``warning: <path>: <message>`` (one line) on stderr: an input was repaired, or a result is partial."""
    message = " ".join(str(message).split())
    print(f"warning: {path}: {message}" if path is not None else f"warning: {message}", file=sys.stderr, flush=True)


def describe_os_error(err: OSError) -> str:
    """``<path>: <reason>`` of an operating-system error (``<reason>`` alone when it names no path)."""
    reason = err.strerror or " ".join(str(err).split()) or type(err).__name__
    if err.filename is not None and err.filename2 is not None:
        return f"{err.filename}: {reason} (with {err.filename2})"
    if err.filename is not None:
        return f"{err.filename}: {reason}"
    return reason


def _install_signal_handlers() -> None:
    """SIGTERM and SIGHUP raise :class:`Interrupted` in this process (a forked child keeps the default
    action).  After the first one they are ignored, so that the clean-up they start can finish."""
    owner = os.getpid()

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        if os.getpid() != owner:  # a forked worker (e.g. a DataLoader process): die as usual
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        for other in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(other, signal.SIG_IGN)
        raise Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread: leave the defaults
            return


def _out_of_memory(message: str) -> bool:
    """A torch allocation failure (CPU: a RuntimeError from the allocator; CUDA: OutOfMemoryError)."""
    return "can't allocate memory" in message or "out of memory" in message.lower()


def run_cli(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> None:
    """Run ``main(argv)`` as a command: the project's error and interruption policy.

    * :class:`InputError` and :class:`OSError` -> one line ``error: <file>: <problem>`` on stderr, exit 2
      (:class:`MemoryError` too: ``error: out of memory (...)``);
    * Ctrl-C, SIGTERM, SIGHUP -> ``interrupted (<signal>)``, exit 128 + signal number, after the
      ``finally`` blocks have removed the temporary outputs.
    """
    _install_signal_handlers()
    try:
        rc = main(argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    except OSError as err:
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        raise SystemExit(2)
    except (MemoryError, RuntimeError) as err:  # e.g. a size flag far too large for this machine
        detail = " ".join(str(err).split())
        if isinstance(err, RuntimeError) and not _out_of_memory(detail):
            raise
        detail = detail.split("DefaultCPUAllocator: ")[-1][:200]
        print(f"error: out of memory{f' ({detail})' if detail else ''}; check the size options", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt as err:
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        raise SystemExit(128 + int(signum))
    raise SystemExit(int(rc or 0))
