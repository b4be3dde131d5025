"""The options of the phase-1 researcher commands, one typed frozen dataclass each; their flags are
generated from the fields (:class:`robustmedseg.cli.DataclassParser`).

* :class:`ExportOptions` -- ``save_global_model.py`` (:mod:`.export`).

No torch, no Fed-BioMed: ``--help`` and usage errors stay fast.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DEFAULT_RESEARCHER_DIR = "fbm-researcher"


def researcher_root(given: Optional[Path]) -> Path:
    """The researcher component folder: ``given``, else $FBM_RESEARCHER_COMPONENT_ROOT, else ./fbm-researcher."""
    return given or Path(os.environ.get("FBM_RESEARCHER_COMPONENT_ROOT", DEFAULT_RESEARCHER_DIR))


@dataclass(frozen=True)
class ExportOptions:
    """``save_global_model.py``: which breakpoint is exported, and where the factory file is written."""

    researcher_dir: Optional[Path] = None
    breakpoint: Optional[Path] = None
    out: Path = Path("final_global_model.pt")

    @property
    def root(self) -> Path:
        """The researcher component whose latest breakpoint is exported (:func:`researcher_root`)."""
        return researcher_root(self.researcher_dir)
