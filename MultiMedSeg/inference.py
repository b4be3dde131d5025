"""Phase 3: segment test volumes with the k best checkpoints and write NIfTI files (docs/method.md#inference).

    python MultiMedSeg/inference.py --checkpoint_dir runs/adapt --target_data prep/site2 \\
        --exp_dir runs/adapt_test --ensemble_size 5

Writes ``<id>_intra``, ``<id>_inter``, ``<id>_pred`` and ``<id>_trans`` ``.nii.gz`` on the
original grid, plus ``metrics.csv`` (Dice, HD95, HD per class) when ground truth exists.
Also runnable as ``python -m MultiMedSeg.inference``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: import the repository, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from robustmedseg.errors import run_cli  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    from MultiMedSeg.options import parse_inference_options

    opts = parse_inference_options(argv)  # --help exits here, before torch is imported
    from MultiMedSeg.evaluation.test_volumes import run_inference

    run_inference(opts)
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-infer``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
