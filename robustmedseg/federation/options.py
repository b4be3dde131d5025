"""The options of the phase-1 researcher commands, one typed frozen dataclass each; their flags are
generated from the fields (:class:`robustmedseg.cli.DataclassParser`).

* :class:`ExportOptions` -- ``save_global_model.py`` (:mod:`.export`);
* :class:`ResearcherOptions` -- ``train.py``'s researcher-side flags (schedule, federation, outputs); the
  factory's own flags are the fields of :class:`robustmedseg.factory.config.FactoryConfig`.

No torch, no Fed-BioMed: ``--help`` and usage errors stay fast.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

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


@dataclass(frozen=True)
class ResearcherOptions:
    """``train.py``'s researcher-side options (its --help): the schedule, the federation, the outputs."""

    # schedule (may change on --resume)
    rounds: int = 350
    num_updates_per_round: int = 2000
    batch: int = 16
    lr: float = 0.002
    max_nodes: int = 2  # --max_nodes_per_round
    aggregation: str = "uniform"
    secagg: bool = False
    secagg_clip: Optional[float] = None
    # federation and outputs
    tags: str = "#im2im"
    researcher_dir: Optional[Path] = None
    create_researcher_dir: bool = False
    workdir: Path = Path("factory_run")
    keep_breakpoints: int = 3
    tensorboard: Optional[Path] = None
    fidelity_evaluator: Optional[Path] = None
    fidelity_every: int = 1
    fidelity_n: int = 64
    min_nodes: int = 1
    wait_nodes: float = 120.0
    resume: Optional[str] = None  # "LATEST" (the flag alone) or a breakpoint folder
    use_gpu: bool = False
    verbose: bool = False

    @property
    def tag_list(self) -> List[str]:
        """The dataset tags of ``--tags`` (comma separated, empty parts dropped)."""
        return [t for t in self.tags.split(",") if t]

    @property
    def root(self) -> Path:
        """The researcher component folder (:func:`researcher_root`)."""
        return researcher_root(self.researcher_dir)

    @property
    def resume_breakpoint(self) -> Optional[Path]:
        """The breakpoint folder given to ``--resume`` (None: the latest one, or no resume)."""
        return None if self.resume in (None, "LATEST") else Path(self.resume)
