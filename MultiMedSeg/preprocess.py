"""Preprocess NIfTI volumes into normalised 2-D slice files for phases 1 and 2.

Replaces the reference's per-dataset notebooks.  Example (demo phantom, target site)::

    python -m MultiMedSeg.preprocess --images demo_data/site1/images --labels demo_data/site1/labels \\
        --out prep/site1 --size 128 --num-classes 3 --labeled-train 2 --discard-outside-labels

With brain masks (``--brain-masks``), every volume keeps only its brain slices and the masks get the
original's [background, brain, labels...] layout.  Output: OUT/train (or OUT/train/labeled +
OUT/train/unlabeled with --labeled-train), OUT/val, OUT/test holding ``<volume>_slice<NNN>.npz``
files, and OUT/metadata.json.  The library is :mod:`MultiMedSeg.data`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: import the repository, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from MultiMedSeg.data.volumes_to_slices import PreprocessConfig, preprocess  # noqa: E402
from robustmedseg.data.slices import convert_legacy_folder  # noqa: E402
from robustmedseg.cli import CliParser  # noqa: E402
from robustmedseg.errors import InputError, run_cli  # noqa: E402

EPILOG = """\
output layout:
  OUT/train/<volume>_slice<NNN>.npz          (no --labeled-train)
  OUT/train/labeled/..., OUT/train/unlabeled/...  (with --labeled-train N: phase-2 target sites)
  OUT/val/..., OUT/test/...                  (always labeled when labels exist)
  OUT/metadata.json                          (everything needed to map predictions back)
slice file: np.savez archive (no pickle) with data float32 (S,S,1) in [-1,1] (padding -1),
  mask bool (S,S,C) one-hot (absent for unlabeled volumes), weight bool (S,S,1) (absent if all ones).
"""


def build_parser() -> CliParser:
    p = CliParser(
        prog="python -m MultiMedSeg.preprocess", command="MultiMedSeg.preprocess", description=__doc__.split("\n\n")[0],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("inputs and output")
    p.mark_required(io.add_argument("--images", type=Path, help="folder of .nii/.nii.gz images (searched recursively, sorted)"))
    io.add_argument("--labels", type=Path, default=None,
                    help="folder of integer label volumes (0 = background); a missing label file means an "
                         "unlabeled volume")
    io.add_argument("--weights", type=Path, default=None,
                    help="folder of weight volumes (> 0 where losses/metrics count), matched like labels")
    io.add_argument("--brain-masks", type=Path, default=None,
                    help="folder of brain masks (> 0 inside the brain), matched like labels; a volume with a "
                         "non-empty brain mask keeps only the slices from its first to its last brain slice "
                         "(labeled or not), and the brain becomes mask class 1 (see --no-brain-class)")
    io.add_argument("--label-rule", default="{name}",
                    help="file name of an image's label/weight/brain-mask file, a format string with {name} "
                         "(image basename), {id} (basename without .nii.gz/.nii) and {ext}; looked up in the "
                         "same subfolder of --labels/--weights/--brain-masks, then at its top (default '{name}')")
    io.add_argument("--path-rule", default="",
                    help="regular expression the image basename must match from its start (default: all)")
    p.mark_required(io.add_argument("--out", type=Path, help="output folder (refused if it exists, unless --overwrite)"))
    io.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")

    split = p.add_argument_group("split")
    split.add_argument("--val-frac", type=float, default=0.15,
                       help="validation fraction: floor(N*f) volumes, at least 1 if f > 0, drawn from the "
                            "labeled volumes with random.Random(seed) (default 0.15)")
    split.add_argument("--test-frac", type=float, default=0.15,
                       help="test fraction, drawn like validation with seed+1 from the rest (default 0.15)")
    split.add_argument("--seed", type=int, default=0, help="seed of the split and of --labeled-train (default 0)")
    split.add_argument("--annotation-required", action="store_true",
                       help="leave out the volumes without a label file (split, slices and statistics use the "
                            "annotated volumes only); default: unlabeled volumes go to training, without masks")
    split.add_argument("--labeled-train", type=int, default=None, metavar="N",
                       help="write N seeded labeled training volumes to OUT/train/labeled and the other "
                            "training volumes to OUT/train/unlabeled (phase-2 target sites)")

    geo = p.add_argument_group("geometry")
    geo.add_argument("--size", type=int, default=512, help="slice side in pixels, any size (default 512)")
    geo.add_argument("--target-spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                     help="resampling voxel size in mm; default: median train+val spacing, enlarged on axes "
                          "where a volume would exceed --size")
    geo.add_argument("--crop", action=argparse.BooleanOptionalAction, default=True,
                     help="heuristic bounding-box crop of each volume, widened to keep every labeled voxel "
                          "(default on; --no-crop keeps the full volume)")
    geo.add_argument("--ignore-z", action="store_true", help="do not resample the slice (3rd) axis")
    geo.add_argument("--orientation", default="RAS", metavar="CODE",
                     help="reorient every volume to these nibabel axis codes before anything else (axis "
                          "permutations and reversals only, undone when mapping back); slices are planes of the "
                          "3rd axis: S/I axial, A/P coronal, R/L sagittal (default RAS: axial slices). 'stored' "
                          "keeps the array order as stored (the original code's behaviour)")
    geo.add_argument("--flip-axis", type=int, choices=(0, 1, 2), default=None,
                     help="reverse this axis of every volume after reorientation (undone when mapping back)")
    geo.add_argument("--keep-extracerebral-slices", dest="discard_extracerebral", action="store_false",
                     help="keep every slice of volumes with a brain mask (default: only the slices from the "
                          "first to the last brain slice, inclusive, as the original)")
    geo.add_argument("--discard-outside-labels", action="store_true",
                     help="for labeled volumes WITHOUT a brain mask: keep only the slices from the first to the "
                          "last labeled slice (inclusive)")

    inten = p.add_argument_group("intensities and labels")
    inten.add_argument("--no-standardize", dest="standardize", action="store_false",
                       help="skip the per-volume (x - mean) / std standardisation")
    inten.add_argument("--percentiles", type=float, nargs=2, default=(0.1, 99.9), metavar=("LOW", "HIGH"),
                       help="intensity window from the train+val histogram, mapped to [-1, 1] (default 0.1 99.9)")
    inten.add_argument("--label-nc", "--num-classes", "--n-segmentation-labels", dest="num_classes", type=int,
                       default=None, metavar="L",
                       help="mask channels including background (and the brain class with --brain-masks); "
                            "default: largest label value + 1 (+ 1 for the brain class)")
    inten.add_argument("--no-brain-class", dest="brain_class", action="store_false",
                       help="with --brain-masks: use the brain masks only to select slices; default: the mask is "
                            "[background, brain, label 1, ...] (label k -> class k + 1), as the original's "
                            "[background, brain, vessel]")

    legacy = p.add_argument_group("legacy data")
    legacy.add_argument("--convert-legacy", nargs=2, type=Path, default=None, metavar=("SRC", "DST"),
                        help="instead of preprocessing: convert the reference's <vol>_slice<NNN>.npy dict "
                             "slices under SRC into .npz slices under DST. WARNING: this UNPICKLES the .npy "
                             "files; use it only on files you trust")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return p


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    if args.images is None or args.out is None:
        raise InputError("--images and --out are required (unless --convert-legacy)")
    return PreprocessConfig(
        images=args.images, out=args.out, labels=args.labels, weights=args.weights, brain_masks=args.brain_masks,
        label_rule=args.label_rule, annotation_required=args.annotation_required,
        discard_extracerebral=args.discard_extracerebral, brain_class=args.brain_class,
        path_rule=args.path_rule, size=args.size, val_frac=args.val_frac, test_frac=args.test_frac,
        seed=args.seed, labeled_train=args.labeled_train,
        target_spacing=tuple(args.target_spacing) if args.target_spacing else None, crop=args.crop,
        ignore_z=args.ignore_z, standardize=args.standardize, num_classes=args.num_classes,
        discard_outside_labels=args.discard_outside_labels, flip_axis=args.flip_axis,
        orientation=args.orientation,
        percentiles=tuple(args.percentiles), overwrite=args.overwrite)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda *a, **k: None) if args.quiet else print
    if args.convert_legacy is not None:
        count = convert_legacy_folder(args.convert_legacy[0], args.convert_legacy[1], overwrite=args.overwrite)
        log(f"converted {count} legacy slices into {args.convert_legacy[1]}")
        return 0
    meta = preprocess(config_from_args(args), log=log)
    n_slices = sum(len(v["slices"]) for v in meta["volumes"].values())
    log(f"wrote {n_slices} slices of {len(meta['volumes'])} volumes to {args.out}")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-preprocess``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
