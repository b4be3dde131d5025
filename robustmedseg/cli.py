"""The command-line flags of every script: one parser class, flags generated from a typed dataclass.

* :class:`CliParser` -- ``argparse.ArgumentParser`` with the project's flag policy: each long flag is
  accepted with ``_`` or ``-`` between its words, a concept has one canonical flag (other names are
  aliases), a usage error is one ``error:`` line (exit 2), flags that must be given are shown without
  brackets in the usage, and the program name follows how the command was invoked (:func:`invoked_prog`:
  ``rms-predict``, ``python -m MultiMedSeg.predict`` or ``MultiMedSeg/predict.py``).
* :func:`add_field_flags` -- one flag per field of a typed dataclass, with the field's type and default:
  every command's options are a dataclass, its flags are generated from it.
* :func:`dataclass_from_dict` -- a stored dataclass (e.g. a run's ``opt.json``) read back with the same
  type (unknown keys of older files are reported to the caller, not silently kept).

The error and interruption policy of a command (:func:`robustmedseg.errors.run_cli`) lives with the
errors; this module only parses.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

FLAG_NOTE = "Every flag may be written with '_' or '-' between its words (--n_domains = --n-domains)."

T = TypeVar("T")


def _flag_key(option: str) -> str:
    return option[2:].replace("-", "_")


def _module_file(module: str) -> Optional[Path]:
    try:
        import importlib.util

        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).resolve() if spec is not None and spec.origin else None


def _console_script_of(name: str, module: str) -> bool:
    """Whether ``name`` is an installed console script running a function of ``module``."""
    try:
        from importlib.metadata import entry_points

        scripts = entry_points(group="console_scripts")
    except Exception:  # noqa: BLE001 - no metadata: not a console script we can recognise
        return False
    return any(e.name == name and e.value.split(":")[0].strip() == module for e in scripts)


def invoked_prog(command: str, fallback: str) -> str:
    """The program name of command module ``command`` as the user invoked it.

    ``python -m MultiMedSeg.predict`` -> ``python -m MultiMedSeg.predict``; the console script
    ``rms-predict`` -> ``rms-predict``; ``python MultiMedSeg/predict.py`` -> ``MultiMedSeg/predict.py``
    (the path as typed); any other process (a test, a library call) -> ``fallback``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and getattr(spec, "name", None) in (command, f"{command}.__main__"):
        return f"python -m {command}"
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if not argv0 or argv0 in ("-c", "-m"):
        return fallback
    main_file = getattr(main, "__file__", None)
    if spec is None and main_file and argv0.endswith(".py"):
        own = _module_file(command)
        if own is not None and Path(main_file).resolve() == own:
            return argv0
    name = os.path.basename(argv0)
    if not name.endswith(".py") and _console_script_of(name, command):
        return name
    return fallback


class CliParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the project's flag policy (used by every script).

    * Every long flag is accepted with ``_`` or ``-`` between its words: ``--n_domains`` and
      ``--n-domains`` are the same flag, whichever spelling it was declared with (``--help``
      lists the declared one, and unique prefixes work as in argparse).  Two flags of one
      parser may not differ only by these characters.
    * A concept has one canonical flag; other names are declared as aliases of the same
      argument (e.g. ``add_argument("--label_nc", "--num-classes", ...)``).
    * A usage error is one line ``error: <problem> (see <prog> --help)`` and exit status 2.
    * ``command`` (the module of the command, e.g. ``"MultiMedSeg.predict"``): ``prog`` is how it was
      invoked (:func:`invoked_prog`), the given ``prog`` otherwise.
    * :meth:`mark_required`: a flag that must be given although argparse does not enforce it (it may
      come from ``--config``; the command checks it) is shown without brackets in the usage.
    """

    def __init__(self, *args, command: Optional[str] = None, **kwargs):
        if command is not None:
            kwargs["prog"] = invoked_prog(command, kwargs.get("prog") or command)
        super().__init__(*args, **kwargs)
        self.epilog = f"{self.epilog}\n\n{FLAG_NOTE}" if self.epilog else FLAG_NOTE
        self._shown_required: List[argparse.Action] = []

    def mark_required(self, action: argparse.Action) -> argparse.Action:
        """Show ``action`` as required in the usage (no brackets); the command checks it is given."""
        self._shown_required.append(action)
        return action

    def _format_with_required(self, method: Callable[[], str]) -> str:
        saved = [(a, a.required) for a in self._shown_required]
        try:
            for action, _ in saved:
                action.required = True
            return method()
        finally:
            for action, required in saved:
                action.required = required

    def format_usage(self) -> str:
        return self._format_with_required(super().format_usage)

    def format_help(self) -> str:
        return self._format_with_required(super().format_help)

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


class BooleanFlag(argparse.BooleanOptionalAction):
    """``--name`` / ``--no_name`` (``--no-name`` too, by the flag policy): the negative form written in
    the same style as the flag (argparse's own action writes ``--no-`` before any name)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any):
        names = list(option_strings)
        super().__init__(names, dest, **kwargs)
        self.option_strings, self._negative = [], set()
        for option in names:
            self.option_strings.append(option)
            if option.startswith("--"):
                sep = "-" if "-" in option[2:] and "_" not in option[2:] else "_"
                self.option_strings.append(f"--no{sep}{option[2:]}")
                self._negative.add(self.option_strings[-1])

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ARG002 - argparse signature
        if option_string in self.option_strings:
            setattr(namespace, self.dest, option_string not in self._negative)


# --------------------------------------------------------------------------- flags from a dataclass
FieldFlags = Dict[str, Tuple[Tuple[str, ...], str]]  # field -> (other names, help)


def field_type(cls: type, name: str) -> Any:
    """The type of field ``name`` of dataclass ``cls`` (``Optional[X]`` -> ``X``)."""
    kind = typing.get_type_hints(cls)[name]
    if typing.get_origin(kind) is typing.Union:
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    return kind


def field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (None for a field without one)."""
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
            return None
    raise KeyError(name)


def add_field_flags(add: Callable[..., Any], cls: type, fields: FieldFlags, defaults: Any = None,
                    show_default: bool = True) -> None:
    """One flag ``--<field>`` per entry of ``fields`` (aliases, help), with the type and default of the
    field of dataclass ``cls`` (``defaults``: an instance whose values are the defaults; default ``cls()``).
    A ``bool`` field is a switch (``store_true``)."""
    defaults = cls() if defaults is None else defaults
    for name, (aliases, text) in fields.items():
        kind = field_type(cls, name)
        default = getattr(defaults, name)
        if kind is bool:
            add(f"--{name}", *aliases, dest=name, action="store_true", default=default, help=text)
        else:
            shown = "" if default is None or not show_default else f" (default {default})"
            add(f"--{name}", *aliases, dest=name, type=kind, default=default, help=text + shown)


class DataclassParser(CliParser):
    """A :class:`CliParser` whose flags are the fields of one options dataclass: :meth:`add` takes each
    flag's type and default from its field, :meth:`build` makes the options object of the parsed flags.

    A ``bool`` field is a switch (``store_true``; ``action="store_false"`` with a ``--no-...`` flag, or
    :class:`BooleanFlag`, for one that defaults to True), a ``Tuple[X, X]`` field takes that many values,
    a ``List[X]`` or ``Tuple[X, ...]`` field one or more (or one text read by ``list_converters[X]``, e.g.
    ``"1,2,3"``)."""

    list_converters: Dict[type, Callable[[str], Any]] = {}

    def __init__(self, options: type, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.options = options
        self._fields = {f.name for f in dataclasses.fields(options)}  # type: ignore[arg-type]

    def add(self, name: str, *aliases: str, flags: Sequence[str] = (), group: Any = None,
            shown_required: bool = False, positional: bool = False, **kwargs: Any) -> argparse.Action:
        """``--name`` (or ``flags``; destination: field ``name``) with ``aliases``, other names of the same
        concept; ``group``: an argument group of this parser; ``required=True``: argparse requires it;
        ``shown_required``: shown without brackets, checked by the command (the value may come from
        elsewhere, e.g. ``--config``); ``positional``: a positional argument (shown as ``metavar``);
        ``nargs="?"`` with ``const``: the flag alone gives ``const``.  A parser built with
        ``argument_default=argparse.SUPPRESS`` keeps only the flags given (no defaults)."""
        if name not in self._fields:
            raise ValueError(f"--{name} is not a field of {self.options.__name__}")
        if {"type", "default", "dest"} & set(kwargs) or kwargs.get("nargs", "?") != "?":
            raise ValueError(f"--{name}: the type and default come from {self.options.__name__}.{name}")
        kind = field_type(self.options, name)
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if kind is bool:
            kwargs.setdefault("action", "store_true")
        elif origin in (tuple, typing.Tuple) and (Ellipsis not in args or args[0] not in self.list_converters):
            kwargs.update(type=args[0], nargs=len(args) if Ellipsis not in args else "+")
        elif origin in (list, tuple, typing.Tuple):
            converter = self.list_converters.get(args[0])
            kwargs.update({"type": converter} if converter is not None else {"type": args[0], "nargs": "+"})
        elif kind is not str:
            kwargs["type"] = kind
        if self.argument_default is not argparse.SUPPRESS:  # SUPPRESS: a parser that sees which flags are given
            kwargs["default"] = field_default(self.options, name)
        target = group if group is not None else self
        if positional:
            action = target.add_argument(name, **kwargs)
        else:
            names = tuple(flags) or (f"--{name}",)
            action = target.add_argument(*names, *aliases, dest=name, **kwargs)
        if shown_required:
            self.mark_required(action)
        return action

    def build(self, namespace: argparse.Namespace, **resolved: Any) -> Any:
        """The options object of the parsed flags (``resolved``: values filled in while building)."""
        values = {name: getattr(namespace, name) for name in self._fields if hasattr(namespace, name)}
        options, _ = dataclass_from_dict(self.options, {**values, **resolved})
        return options


def dataclass_from_dict(cls: Type[T], values: Mapping[str, Any]) -> Tuple[T, List[str]]:
    """``cls(**values)`` with the keys ``cls`` has (paths made :class:`~pathlib.Path` again, lists of
    ``Tuple`` fields made tuples); returns the instance and the keys it does not have (sorted)."""
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: Dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            continue
        kind = hints[key]
        if typing.get_origin(kind) is typing.Union:
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        if value is not None and kind is Path:
            value = Path(value)
        elif value is not None and typing.get_origin(kind) in (tuple, typing.Tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs), sorted(set(values) - set(known))
