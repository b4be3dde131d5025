"""Phase 2c: adapt a pretrained pSp segmenter to a target domain (intra, inter and cycle branches,
docs/method.md#coach).

    python MultiMedSeg/train.py --exp_dir runs/adapt --source_data prep/site0 --target_data prep/site2 \\
        --checkpoint_dir runs/pretrain --src_label 0 --tgt_label 2 --label_nc 3 \\
        --start_from_latent_avg --one_target_slice --max_steps 20000

Also runnable as ``python -m MultiMedSeg.train``.  ``--help`` lists every option; the
library is :mod:`MultiMedSeg.training`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: import the repository, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from robustmedseg.errors import run_cli  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    from MultiMedSeg.training.command import run_training

    return run_training(argv, "train")


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-adapt``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
