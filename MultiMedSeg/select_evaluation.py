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

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: import the repository, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from robustmedseg.cli import CliParser  # noqa: E402
from robustmedseg.errors import InputError, run_cli  # noqa: E402


def build_parser() -> CliParser:
    from MultiMedSeg.evaluation.settings import RULES  # no torch import before --help

    p = CliParser(prog="python -m MultiMedSeg.select_evaluation", command="MultiMedSeg.select_evaluation",
                  description=__doc__.split("\n\n")[0],
                  epilog="Example: python -m MultiMedSeg.select_evaluation --checkpoint_dir runs/adapt_site2 "
                         "--target_data prep/site2 --overwrite", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_dir", type=Path, required=True, help="training run (its folder or checkpoints/)")
    p.add_argument("--target_data", type=Path, default=None,
                   help="preprocessed target site: its val/ holds the validation volumes (default: the val_root of "
                        "the run's opt.json)")
    p.add_argument("--val_root", type=Path, default=None, help="folder of validation slices (overrides --target_data)")
    p.add_argument("--ensemble_selection", choices=RULES, default="validation",
                   help="validation (default): the (inter, intra) weights with the best validation mean Dice; "
                        "paper: the paper's 0.6,0.4 without searching")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_argument("--test_batch_size", type=int, default=8, help="slices per forward pass (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing evaluation.json")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)  # --help exits here, before torch is imported
    if opts.test_batch_size < 1:
        raise InputError("--test_batch_size must be >= 1")
    from MultiMedSeg.evaluation.selection import select_for_run

    select_for_run(opts)
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-select-evaluation``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
