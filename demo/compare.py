"""Are two demo runs the same? ``python -m demo.compare RUN_A RUN_B`` (exit 0: identical, 1: they differ).

What must be identical for the same seed, code and ``--threads`` on CPU (docs/demo.md#reproducibility):

* every number of ``summary.json`` except the wall and CPU times (``stage_seconds``, ``stage_cpu_seconds``);
* every tensor of the factory file ``final_global_model.pt`` (``g``, ``d``, ``g_ema``) and its ``args``;
* every tensor of every phase-2 checkpoint (``runs/*/checkpoints/*.pt``), and each run's ``best.json``
  (which steps were kept) and ``evaluation.json`` (the evaluation settings chosen on validation);
* the labels written by ``inference.py`` and ``predict.py`` are covered by the summary's Dice and HD95.

Bookkeeping that names a run is not compared: the factory file's ``meta`` (Fed-BioMed experiment id, the
node-state run id), paths, dates and the TensorBoard event files.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch

from robustmedseg.cli import CliParser
from robustmedseg.errors import InputError, run_cli
from robustmedseg.io import load_torch_file

TIMING_KEYS = ("stage_seconds", "stage_cpu_seconds")


def _walk(a: Any, b: Any, where: str) -> Iterator[str]:
    """Differences between two nested values (tensors exactly, floats exactly, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            yield f"{where}: tensor vs {type(b).__name__ if isinstance(a, torch.Tensor) else type(a).__name__}"
        elif a.shape != b.shape or a.dtype != b.dtype:
            yield f"{where}: shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
        elif not torch.equal(a, b) and not (a.is_floating_point() and torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))
                                            and torch.equal(a.isnan(), b.isnan())):
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else float("nan")
            yield f"{where}: tensors differ (max |a - b| = {diff:.3g})"
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                yield f"{where}.{key}: only in {'the first' if key in a else 'the second'} run"
            else:
                yield from _walk(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            yield f"{where}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _walk(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    elif a != b:
        yield f"{where}: {a!r} vs {b!r}"


def _summary(run: Path) -> Any:
    path = run / "summary.json"
    if not path.is_file():
        raise InputError("no summary.json (not a finished demo run)", path)
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k not in TIMING_KEYS}


def _tensors(path: Path) -> Any:
    data = load_torch_file(path, "checkpoint", mapping=True)
    return {k: v for k, v in data.items() if k not in ("meta", "opts", "path", "exp_dir")}


def compare_runs(a: Path, b: Path) -> Tuple[List[str], int]:
    """(differences, number of files compared) between the demo folders ``a`` and ``b``."""
    diffs: List[str] = list(_walk(_summary(a), _summary(b), "summary.json"))
    n = 1
    files = sorted({p.relative_to(a) for p in a.glob("runs/*/checkpoints/*.pt")}
                   | {p.relative_to(b) for p in b.glob("runs/*/checkpoints/*.pt")})
    files += [Path("final_global_model.pt")]
    for rel in files:
        if not (a / rel).is_file() or not (b / rel).is_file():
            diffs.append(f"{rel}: only in {'the first' if (a / rel).is_file() else 'the second'} run")
            continue
        diffs.extend(_walk(_tensors(a / rel), _tensors(b / rel), str(rel)))
        n += 1
    for name in ("best.json", "evaluation.json"):
        for path in sorted(a.glob(f"runs/*/checkpoints/{name}")):
            rel = path.relative_to(a)
            if not (b / rel).is_file():
                diffs.append(f"{rel}: only in the first run")
                continue
            diffs.extend(_walk(_strip_paths(json.loads(path.read_text())),
                               _strip_paths(json.loads((b / rel).read_text())), str(rel)))
            n += 1
    return diffs, n


def _strip_paths(value: Any) -> Any:
    """JSON without the entries that hold file paths (they name the run's folder)."""
    if isinstance(value, dict):
        return {k: _strip_paths(v) for k, v in value.items() if k not in ("path", "checkpoint", "file", "exp_dir")}
    if isinstance(value, list):
        return [_strip_paths(v) for v in value]
    return value


def build_parser() -> CliParser:
    p = CliParser(prog="python -m demo.compare",
                  description="Compare two demo runs (summary numbers, factory file, every phase-2 checkpoint); "
                              "exit 0 if identical, 1 if not.")
    p.add_argument("first", type=Path, help="demo output folder")
    p.add_argument("second", type=Path, help="demo output folder")
    p.add_argument("--max-lines", type=int, default=20, help="differences printed at most (default 20)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    diffs, n = compare_runs(args.first, args.second)
    if not diffs:
        print(f"identical: summary.json numbers and {n - 1} checkpoint/factory/selection files")
        return 0
    for line in diffs[:args.max_lines]:
        print(line)
    print(f"{len(diffs)} difference(s) in {n} files compared")
    return 1


if __name__ == "__main__":
    run_cli(main)
