"""User-facing errors and the command-line policy every script follows.

Every problem caused by bad input (a missing file, a volume with the wrong shape, an
existing output folder...) is raised as :class:`InputError` with a message that names
the offending file and the problem in one line.  Scripts catch it in :func:`run_cli`
and print ``error: <message>`` instead of a traceback.

Every script parses its flags with :class:`CliParser`: each long flag is accepted with
``_`` or ``-`` between its words, and a usage error is one ``error:`` line (exit 2).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple


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


FLAG_NOTE = "Every flag may be written with '_' or '-' between its words (--n_domains = --n-domains)."


def _flag_key(option: str) -> str:
    return option[2:].replace("-", "_")


class CliParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the project's flag policy (used by every script).

    * Every long flag is accepted with ``_`` or ``-`` between its words: ``--n_domains`` and
      ``--n-domains`` are the same flag, whichever spelling it was declared with (``--help``
      lists the declared one, and unique prefixes work as in argparse).  Two flags of one
      parser may not differ only by these characters.
    * A concept has one canonical flag; other names are declared as aliases of the same
      argument (e.g. ``add_argument("--label_nc", "--num-classes", ...)``).
    * A usage error is one line ``error: <problem> (see <prog> --help)`` and exit status 2.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epilog = f"{self.epilog}\n\n{FLAG_NOTE}" if self.epilog else FLAG_NOTE

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def flag_spellings(self) -> Dict[str, Tuple[str, argparse.Action]]:
        """``{flag words joined by '_': (declared option string, action)}`` of every long flag."""
        table: Dict[str, Tuple[str, argparse.Action]] = {}
        for action in self._actions:
            for option in action.option_strings:
                if not option.startswith("--"):
                    continue
                known = table.setdefault(_flag_key(option), (option, action))
                if known[1] is not action:
                    raise ValueError(f"{self.prog}: flags {known[0]} and {option} differ only by '_' and '-'")
        return table

    def normalize_flags(self, args: Sequence[str]) -> List[str]:
        """``args`` with every flag written as declared (``--n-domains=3`` -> ``--n_domains=3``)."""
        table = self.flag_spellings()
        declared = {option for option, _ in table.values()}
        out: List[str] = []
        for i, token in enumerate(args):
            if token == "--":  # everything after is positional
                out.extend(args[i:])
                break
            if token.startswith("--") and len(token) > 2:
                name, eq, value = token.partition("=")
                if name not in declared:
                    key = _flag_key(name)
                    hit = table.get(key)
                    if hit is None and self.allow_abbrev:  # a prefix, whatever its spelling
                        found = {id(a): o for k, (o, a) in table.items() if k.startswith(key)}
                        options = sorted(found.values())
                        if len(options) > 1:
                            self.error(f"ambiguous option: {name} could match {', '.join(options)}")
                        hit = (options[0], None) if options else None
                    if hit is not None:
                        token = hit[0] + eq + value
            out.append(token)
        return out

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self.normalize_flags(args), namespace)
