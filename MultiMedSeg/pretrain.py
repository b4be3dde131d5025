"""Phase 2a: pretrain the pSp segmenter on labeled source slices (intra branch only, docs/method.md#coach).

    python MultiMedSeg/pretrain.py --exp_dir runs/pretrain --source_data prep/site0 \\
        --stylegan_weights final_global_model.pt --src_label 0 --label_nc 3 \\
        --batch_size 8 --start_from_latent_avg --max_steps 15000

Also runnable as ``python -m MultiMedSeg.pretrain``.  ``--help`` lists every option; the
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

    return run_training(argv, "pretrain")


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-pretrain``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
