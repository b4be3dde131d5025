"""Checkpoint files and the best-k index (docs/method.md#coach "Best-5 bookkeeping", docs/method.md#checkpoint, FIX
docs/differences.md#d9-26).

Layout under ``<exp_dir>/checkpoints``:

* ``best.json`` -- the k best checkpoints as a JSON list, best first, of
  ``{"file", "score", "step", "metrics"}`` (replaces ``timestamp.txt``, which the
  reference parsed with ``eval``);
* ``best_step<step>.pt`` -- model-only checkpoints named in ``best.json``; a checkpoint
  leaving the top k is deleted;
* ``plan.json`` -- the preprocessing plan of the run (:mod:`MultiMedSeg.data.preprocessing_plan`): how a new
  scan is turned into slices like the training data (``predict``);
* ``iteration_<step>.pt`` (every ``--save_interval`` and at ``--max_steps``) and
  ``last.pt`` (at every validation/save and at the end) -- model + optimiser states,
  the step and the best index, for ``--resume``.

Everything is written atomically and read with ``torch.load(weights_only=True)``
(:func:`robustmedseg.io.load_torch_file`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from robustmedseg.errors import InputError
from robustmedseg.io import save_torch_atomic, write_text_atomic

INDEX_NAME = "best.json"
LAST_NAME = "last.pt"
CHECKPOINT_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.pt")  # no folder part, not hidden


@dataclass
class BestEntry:
    file: str
    score: float
    step: int
    metrics: Dict[str, float] = field(default_factory=dict)


def _json_number(value: float) -> Any:
    """JSON has no inf/nan: write them as strings ("inf", "nan")."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


class BestIndex:
    """The k best checkpoints of one run, kept sorted best first."""

    def __init__(self, folder: Path, k: int, entries: Optional[List[BestEntry]] = None):
        self.folder = Path(folder)
        self.k = int(k)
        self.entries: List[BestEntry] = sorted(entries or [], key=lambda e: -e.score)

    @property
    def path(self) -> Path:
        return self.folder / INDEX_NAME

    def qualifies(self, score: float) -> bool:
        """A score enters when a slot is free or it beats the worst kept score."""
        if not math.isfinite(score) or score <= 0.0:
            return False
        return len(self.entries) < self.k or score > self.entries[-1].score

    def add(self, score: float, step: int, metrics: Mapping[str, float], payload: Mapping[str, Any]) -> Optional[str]:
        """Save ``payload`` as a best checkpoint if ``score`` qualifies; returns the file name or None."""
        if not self.qualifies(score):
            return None
        name = f"best_step{step:07d}.pt"
        save_torch_atomic(dict(payload), self.folder / name)
        self.entries = [e for e in self.entries if e.file != name]
        self.entries.append(BestEntry(name, float(score), int(step), dict(metrics)))
        self.entries.sort(key=lambda e: -e.score)
        for gone in self.entries[self.k:]:
            (self.folder / gone.file).unlink(missing_ok=True)
        self.entries = self.entries[: self.k]
        self.save()
        return name

    def to_list(self) -> List[Dict[str, Any]]:
        return [{"file": e.file, "score": e.score, "step": e.step,
                 "metrics": {k: _json_number(v) for k, v in e.metrics.items()}} for e in self.entries]

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.to_list(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, k: Optional[int] = None) -> "BestIndex":
        """Read ``best.json`` of ``folder``; :class:`InputError` when missing or malformed."""
        path = Path(folder) / INDEX_NAME
        if not path.is_file():
            raise InputError("best-checkpoint index not found (is this a training output folder?)", path)
        try:
            raw = json.loads(path.read_text())
            entries = [BestEntry(str(e["file"]), float(e["score"]), int(e["step"]),
                                 {str(k2): float(v) for k2, v in dict(e.get("metrics", {})).items()})
                       for e in raw]
        except (ValueError, TypeError, KeyError) as err:
            raise InputError(f"malformed best-checkpoint index ({err})", path) from None
        for e in entries:  # a plain file name in this folder: nothing else is ever read (or deleted)
            if not CHECKPOINT_NAME_RE.fullmatch(e.file):
                raise InputError(f"best-checkpoint index names {e.file!r}, not a checkpoint file of this folder "
                                 "(expected a plain name like best_step0001000.pt)", path)
        return cls(folder, k if k is not None else max(len(entries), 1), entries)

    def paths(self, n: Optional[int] = None) -> List[Path]:
        """Paths of the ``n`` best checkpoints (all when None), best first; each must exist."""
        chosen = self.entries if n is None else self.entries[:n]
        out = []
        for e in chosen:
            p = self.folder / e.file
            if not p.is_file():
                raise InputError(f"checkpoint listed in {INDEX_NAME} is missing", p)
            out.append(p)
        return out


def checkpoints_folder(path: Path) -> Path:
    """Accept an experiment folder or its ``checkpoints`` sub-folder."""
    path = Path(path)
    if (path / "checkpoints" / INDEX_NAME).is_file() or (path / "checkpoints" / LAST_NAME).is_file():
        return path / "checkpoints"
    return path


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """Atomic ``torch.save`` of a plain dict payload."""
    save_torch_atomic(dict(payload), path)


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")
