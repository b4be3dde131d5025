"""The few labelled target slices of an adaptation run, as their own folder (for the target-only reference).

``MultiMedSeg/train.py --one_target_slice`` adapts with ONE labelled slice per labelled target
volume: the middle one of the slices that hold foreground inside their weight map.  The
*target-only* reference of the demo is trained on exactly these slices and nothing else (no source
data), with ``MultiMedSeg/pretrain.py``.  This command copies them into one folder::

    python -m demo.fewshot --labeled prep/site2/train/labeled --out prep/site2_fewshot

The selection is the one ``--one_target_slice`` makes (same functions), so both models see the
same labelled target pixels.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Optional, Sequence

from MultiMedSeg.data.images_dataset import flag_folder_slices, is_informative, middle_per_volume, read_slice
from robustmedseg.cli import CliParser
from robustmedseg.errors import InputError, run_cli
from robustmedseg.io import atomic_dir


def few_labelled_slices(labeled: Path, label_nc: Optional[int] = None) -> List[Path]:
    """The slices ``--one_target_slice`` keeps from the folder ``labeled``."""
    kept = [p for p in flag_folder_slices(labeled, "--labeled") if is_informative(read_slice(p, label_nc))]
    if not kept:
        raise InputError("no labelled slice with foreground inside its weight map", labeled)
    return middle_per_volume(kept)


def write_fewshot(labeled: Path, out: Path, label_nc: Optional[int] = None, overwrite: bool = False) -> List[Path]:
    """Copy the selected slices into ``out`` (written atomically); returns the copied paths."""
    chosen = few_labelled_slices(labeled, label_nc)
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            for path in chosen:
                shutil.copyfile(path, tmp / path.name)
    except FileExistsError:
        raise InputError("output folder already exists; pass --overwrite to replace it", out) from None
    return [out / p.name for p in chosen]


def build_parser() -> CliParser:
    p = CliParser(prog="python -m demo.fewshot",
                  description="Copy the labelled target slices that train.py --one_target_slice uses "
                              "(the middle informative slice of each labelled volume) into one folder.")
    p.add_argument("--labeled", type=Path, required=True, help="folder of labelled target slices (prep/siteK/train/labeled)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--label-nc", "--num-classes", "--n-segmentation-labels", dest="label_nc", type=int, default=None,
                   help="check the masks' channel count")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    paths = write_fewshot(args.labeled, args.out, args.label_nc, args.overwrite)
    print(f"wrote {len(paths)} labelled slice(s) to {args.out}: {', '.join(p.name for p in paths)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
