"""Choose (or choose again) the evaluation settings of a trained run: its checkpoints/evaluation.json.

    python -m MultiMedSeg.select_evaluation --checkpoint_dir runs/adapt_site2 [--target_data prep/site2]

Training writes ``checkpoints/evaluation.json`` at its end; this command writes it for a run trained
before the file existed, or again (``--overwrite``), e.g. on other validation volumes.  An adapted
run's ensemble of all its kept best checkpoints is scored on the validation volumes for a grid of
(inter, intra) weights and the best mean Dice is kept (``--ensemble_selection paper``: the paper's
0.6/0.4 without searching); a pretraining run records its intra branch.  ``inference.py`` and
``predict.py`` use the file when their ``--ensemble_size`` / ``--ensemble_weights`` are not given.
The library is :mod:`MultiMedSeg.evaluation.settings`.  Also ``rms-select-evaluation``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: import the repository, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from robustmedseg.cli import CliParser  # noqa: E402
from robustmedseg.errors import run_cli  # noqa: E402


def build_parser() -> CliParser:
    from MultiMedSeg.options import select_evaluation_parser

    return select_evaluation_parser()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from MultiMedSeg.options import load_run_options, parse_select_evaluation_options

    opts = parse_select_evaluation_options(argv)  # --help exits here, before torch is imported
    from MultiMedSeg import checkpoints as ck
    from MultiMedSeg.evaluation.selection import select_for_run

    select_for_run(opts, load_run_options(ck.checkpoints_folder(opts.checkpoint_dir).parent))
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-select-evaluation``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
