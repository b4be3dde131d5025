"""Save volumes in another axis order and file format, as a scanner or another tool might have.

    python -m demo.reorient --metadata prep/site2/metadata.json --split test --axcodes PIL \\
        --format nrrd --out new_scans

Each image of the split (paths from the preprocessing's ``metadata.json``) is rewritten with its axes
permuted and reversed to the nibabel axis codes ``--axcodes`` -- the voxels move, the affine follows,
so every voxel keeps its position in the world -- as NIfTI, NRRD or MetaImage (``<id>.<ext>``).  The
demo's ``predict`` stage segments these files to show that orientation and format do not matter.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence

import nibabel as nib
import numpy as np

from robustmedseg.cli import CliParser
from robustmedseg.errors import InputError, run_cli
from robustmedseg.io import atomic_dir

FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}


def reorient_image(img: nib.Nifti1Image, axcodes: str) -> nib.Nifti1Image:
    """``img`` with its array stored in the axis order ``axcodes`` (same world positions)."""
    from MultiMedSeg.data import orientation as orient

    return img.as_reoriented(orient.transform_for(img.affine, axcodes))


def save_as(img: nib.Nifti1Image, path: Path) -> Path:
    """Write ``img`` as NIfTI (``.nii[.gz]``) or through SimpleITK (``.nrrd``, ``.mha``)."""
    if path.name.endswith((".nii", ".nii.gz")):
        nib.save(img, str(path))
        return path
    import SimpleITK as sitk

    from MultiMedSeg.data.formats import ItkGeometry, nifti_to_itk

    image = nifti_to_itk(np.asarray(img.get_fdata(dtype=np.float32)), ItkGeometry.from_affine(img.affine))
    sitk.WriteImage(image, str(path), True)
    return path


def reorient_split(metadata: Path, split: str, axcodes: str, fmt: str, out: Path, overwrite: bool = False
                   ) -> List[Path]:
    from MultiMedSeg.data.restore import load_metadata

    meta = load_metadata(metadata)
    ids = meta["splits"].get(split)
    if not ids:
        raise InputError(f"no volume in split {split!r}", metadata)
    if out.exists() and not overwrite:
        raise InputError("output folder already exists (pass --overwrite to replace it)", out)
    written = []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for vid in ids:
            img = reorient_image(nib.load(meta["volumes"][vid]["image"]), axcodes)
            written.append(out / save_as(img, tmp / f"{vid}{FORMATS[fmt]}").name)
    return written


def build_parser() -> CliParser:
    p = CliParser(prog="python -m demo.reorient", description=__doc__.split("\n\n")[0],
                  formatter_class=argparse.RawDescriptionHelpFormatter,
                  epilog="Example: python -m demo.reorient --metadata prep/site2/metadata.json --split test "
                         "--axcodes PIL --format nrrd --out new_scans")
    p.add_argument("--metadata", type=Path, required=True, help="metadata.json of a preprocessed site (or its folder)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which volumes (default test)")
    p.add_argument("--axcodes", default="PIL", help="stored axis order, nibabel axis codes (default PIL: the slice "
                                                    "axis of the stored array is left-right, i.e. sagittal)")
    p.add_argument("--format", default="nrrd", choices=sorted(FORMATS), help="file format (default nrrd)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    written = reorient_split(args.metadata, args.split, args.axcodes, args.format, args.out, args.overwrite)
    print(f"wrote {len(written)} volume(s) stored as {args.axcodes.upper()} in {args.format} to {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
