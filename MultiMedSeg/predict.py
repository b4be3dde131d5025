"""Segment new scans with a trained run: raw images in, labels on their own grid out.

    python MultiMedSeg/predict.py -i new_scans/ -o segmentations/ --checkpoint_dir runs/adapt_site2

``-i`` takes image files and folders: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha,
.mhd) and DICOM series folders, in any orientation.  Each scan is preprocessed with the run's plan
(``checkpoints/plan.json``, written by pretraining and adaptation), segmented by the ensemble of the
run's best checkpoints, and written as ``OUT/<id>.nii.gz`` with exactly the scan's shape, spacing,
origin and direction (``--output_format input``: in the scan's own format).  Every scan is read
completely before any work; ``--keep_going`` segments the good scans of a batch, lists the others in
``predict.json`` and exits with status 3.  Also runnable as
``python -m MultiMedSeg.predict`` and ``rms-predict``; the library is :mod:`MultiMedSeg.segment_scans`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: import the repository, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from robustmedseg.errors import run_cli  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    from MultiMedSeg.options import parse_predict_options

    opts = parse_predict_options(argv)  # --help exits here, before torch is imported
    from MultiMedSeg.segment_scans import run_prediction

    summary = run_prediction(opts, log=(lambda *a, **k: None) if opts.quiet else print)
    failed = summary.get("failed") or []
    if failed:  # --keep_going: the good scans are written; one line for the batch, exit status 3
        total = len(failed) + len(summary["scans"])
        print(f"error: {opts.output}: {len(failed)} of {total} scan(s) not segmented (listed under 'failed' in "
              f"predict.json): {'; '.join(f['error'] for f in failed)}", file=sys.stderr)
        return 3
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-predict``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
