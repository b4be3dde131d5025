"""Shared entry point of ``MultiMedSeg/pretrain.py`` and ``MultiMedSeg/train.py``."""
from __future__ import annotations

from typing import Optional, Sequence

_DONE = {"pretrain": "pretraining", "train": "adaptation"}


def run_training(argv: Optional[Sequence[str]], mode: str) -> int:
    """Parse the options of ``mode`` ('pretrain' or 'train'), train, print the best checkpoint."""
    from MultiMedSeg.options import parse_training_options

    opts = parse_training_options(argv, mode)  # --help exits here, before torch is imported
    from MultiMedSeg.training.coach import Coach

    summary = Coach(opts).train()
    best = summary["best"][0] if summary["best"] else None
    where = f"{best['file']} (score {best['score']:.4f})" if best else "none"
    print(f"{_DONE[mode]} done at step {summary['step']}; best checkpoint: {where} in {opts.exp_dir / 'checkpoints'}")
    return 0
