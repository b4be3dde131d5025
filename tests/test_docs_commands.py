"""Every command line documented in README.md and docs/*.md parses with its script's own parser.

The ```bash blocks are read the way bash reads them (a line continues only when it ENDS with a
backslash; ``#`` starts a comment; ``&&``, ``;`` and ``|`` separate commands). Each ``python X.py`` /
``python -m module`` command is handed to that script's ``main(argv)`` with
``argparse.ArgumentParser.parse_args`` intercepted: the real parser runs (unknown flags, bad values,
missing required flags fail exactly as they would for a user) and the script stops right after
parsing, so nothing is run. ``train.py --resume`` commands also go through the check that refuses
architecture flags on resume.
"""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path
from typing import List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OPERATORS = {"&&", "||", ";", "|", "&"}


def bash_blocks(path: Path) -> List[Tuple[int, str]]:
    """(first line number, text) of every ```bash / ```sh / ```shell block."""
    out = []
    for m in re.finditer(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", path.read_text(), re.S | re.M):
        out.append((path.read_text()[:m.start()].count("\n") + 2, m.group(1)))
    return out


def shell_commands(block: str) -> List[List[str]]:
    """Simple commands of a block as token lists (bash continuation, comment and operator rules).

    ``for VAR in A B ...; do ... done`` loops are unrolled with their first value (``$VAR`` and
    ``${VAR}`` substituted); the ``do``/``done`` keywords are dropped.
    """
    logical, current = [], ""
    for line in block.splitlines():
        if line.endswith("\\"):
            current += line[:-1]
            continue
        logical.append(current + line)
        current = ""
    if current:
        logical.append(current)
    commands: List[List[str]] = []
    loop_vars: dict = {}
    for line in logical:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: List[str] = []
        for token in list(lexer) + [";"]:
            if token not in OPERATORS:
                words.append(token)
                continue
            if words and words[0] == "for" and len(words) >= 4 and words[2] == "in":
                loop_vars[words[1]] = words[3]
            elif words and words[0] == "done":
                loop_vars.clear()
            else:
                if words and words[0] == "do":
                    words = words[1:]
                for var, value in loop_vars.items():
                    words = [w.replace("${" + var + "}", value).replace("$" + var, value) for w in words]
                if words:
                    commands.append(words)
            words = []
    return commands


def python_invocation(words: List[str]) -> Tuple[str, List[str]] | None:
    """(module name, argv) of a ``python script.py ...`` or ``python -m module ...`` command."""
    if not words or not re.fullmatch(r"(\S*/)?python(3(\.\d+)?)?", words[0]):
        return None
    if len(words) > 2 and words[1] == "-m":
        return words[2], words[3:]
    if len(words) > 1 and words[1].endswith(".py"):
        return words[1][:-3].replace("/", "."), words[2:]
    raise AssertionError(f"unrecognised python command: {' '.join(words)}")


def console_invocation(words: List[str]) -> Tuple[str, List[str]] | None:
    """(module name, argv) of an ``rms-...`` console-script command (``[project.scripts]`` of pyproject.toml)."""
    if not words or not words[0].startswith("rms-"):
        return None
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    if words[0] not in scripts:
        raise AssertionError(f"unknown console script: {words[0]}")
    return scripts[words[0]].split(":")[0], words[1:]


def documented_commands():
    cases = []
    for path in DOCS:
        for line_no, block in bash_blocks(path):
            for words in shell_commands(block):
                cases.append(pytest.param(words, id=f"{path.name}:{line_no}:{' '.join(words[:3])}"))
    from demo.stages import paper_commands  # what `make demo DEMO_ARGS=--full` prints for users to copy

    for i, words in enumerate(shell_commands(paper_commands())):
        cases.append(pytest.param(words, id=f"demo-full:{i}:{' '.join(words[:3])}"))
    return cases


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        super().__init__("parsed")
        self.namespace = namespace


def parse_only(module_name: str, argv: List[str], monkeypatch) -> argparse.Namespace:
    """Run ``module.main(argv)`` up to (and including) its first ``parse_args``."""
    real = argparse.ArgumentParser.parse_args

    def intercept(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    module = importlib.import_module(module_name)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", intercept)
    try:
        module.main(list(argv))
    except _Parsed as done:
        return done.namespace
    except SystemExit as exc:
        if exc.code in (0, None):  # --help
            return argparse.Namespace()
        raise AssertionError(f"{module_name} {' '.join(argv)}: the parser refused it (exit {exc.code})") from None
    raise AssertionError(f"{module_name}.main returned without parsing its arguments")


def test_documented_commands_were_found():
    found = [c.values[0] for c in documented_commands()]
    pythons = [w for w in found if python_invocation(w)]
    scripts = {python_invocation(w)[0] for w in pythons}
    assert {"train", "save_global_model", "prepare_data", "generate_volumes", "MultiMedSeg.pretrain",
            "MultiMedSeg.train", "MultiMedSeg.inference", "MultiMedSeg.preprocess"} <= scripts


def test_bash_rules_of_the_extractor():
    cmds = shell_commands("python a.py --x 1 \\\n    --y '#tag'  # comment\nmake demo && python -m m --z\n"
                          "python b.py \\   # not a continuation\n  --w 2\n"
                          "for k in 1 2; do\n  python c.py --site site$k --n ${k}\ndone\npython d.py $k\n")
    assert cmds == [["python", "a.py", "--x", "1", "--y", "#tag"], ["make", "demo"], ["python", "-m", "m", "--z"],
                    ["python", "b.py", " "], ["--w", "2"], ["python", "c.py", "--site", "site1", "--n", "1"],
                    ["python", "d.py", "$k"]]


@pytest.mark.parametrize("words", documented_commands())
def test_documented_command_parses(words, monkeypatch, capsys):
    assert not words[0].startswith("-"), (
        f"'{' '.join(words)}' is a command of its own for bash: the previous line does not end with a backslash")
    inv = python_invocation(words) or console_invocation(words)
    if inv is None:
        return  # make, fedbiomed, ...: not ours to parse
    module_name, argv = inv
    ns = parse_only(module_name, argv, monkeypatch)
    if module_name == "train" and getattr(ns, "resume", None):
        import train

        monkeypatch.undo()
        explicit = vars(train.build_parser(suppress=True).parse_args(argv))
        train._resume_updates(explicit)  # refuses architecture flags on --resume (InputError)
