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

from MultiMedSeg.data.volumes_to_slices import MISSING_LABELS, PreprocessConfig, preprocess  # noqa: E402
from robustmedseg.data.slices import convert_legacy_folder  # noqa: E402
from robustmedseg.cli import DataclassParser  # noqa: E402
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


def build_parser() -> DataclassParser:
    """The flags are the fields of :class:`~MultiMedSeg.data.volumes_to_slices.PreprocessConfig` (type and
    default), written with dashes; ``--convert-legacy`` and ``--quiet`` are not preprocessing options."""
    p = DataclassParser(
        PreprocessConfig, prog="python -m MultiMedSeg.preprocess", command="MultiMedSeg.preprocess",
        description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("inputs and output")
    p.add("images", flags=("--images",), group=io, shown_required=True,
          help="folder of .nii/.nii.gz images (searched recursively, sorted)")
    p.add("labels", group=io,
          help="folder of integer label volumes (0 = background); a missing label file means an unlabeled volume")
    p.add("weights", group=io, help="folder of weight volumes (> 0 where losses/metrics count), matched like labels")
    p.add("brain_masks", flags=("--brain-masks",), group=io,
          help="folder of brain masks (> 0 inside the brain), matched like labels; a volume with a non-empty brain "
               "mask keeps only the slices from its first to its last brain slice (labeled or not), and the brain "
               "becomes mask class 1 (see --no-brain-class)")
    p.add("label_rule", flags=("--label-rule",), group=io,
          help="file name of an image's label/weight/brain-mask file, a format string with {name} (image "
               "basename), {id} (basename without .nii.gz/.nii) and {ext}; looked up in the same subfolder of "
               "--labels/--weights/--brain-masks, then at its top (default '{name}')")
    p.add("path_rule", flags=("--path-rule",), group=io,
          help="regular expression the image basename must match from its start (default: all)")
    p.add("out", group=io, shown_required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add("overwrite", group=io, help="replace an existing --out once the new one is complete")

    split = p.add_argument_group("split")
    p.add("val_frac", flags=("--val-frac",), group=split,
          help="validation fraction: floor(N*f) volumes, at least 1 if f > 0, drawn from the labeled volumes with "
               "random.Random(seed) (default 0.15)")
    p.add("test_frac", flags=("--test-frac",), group=split,
          help="test fraction, drawn like validation with seed+1 from the rest (default 0.15)")
    p.add("seed", group=split, help="seed of the split and of --labeled-train (default 0)")
    p.add("annotation_required", flags=("--annotation-required",), group=split,
          help="leave out the volumes without a label file (split, slices and statistics use the annotated "
               "volumes only); default: unlabeled volumes go to training, without masks")
    p.add("missing_labels", flags=("--missing-labels",), group=split, choices=MISSING_LABELS,
          help="a training volume without a label file: 'none' (default) its slices carry no mask; 'empty' all-zero "
               "labels (no foreground class; with brain masks [background, brain]), as the original's IXI/HQSWI "
               "notebooks (docs/differences.md#unannotated-volumes). Validation and test volumes are annotated ones")
    p.add("labeled_train", flags=("--labeled-train",), group=split, metavar="N",
          help="write N seeded labeled training volumes to OUT/train/labeled and the other training volumes to "
               "OUT/train/unlabeled (phase-2 target sites)")

    geo = p.add_argument_group("geometry")
    p.add("size", group=geo, help="slice side in pixels, any size (default 512)")
    p.add("target_spacing", flags=("--target-spacing",), group=geo, metavar=("SX", "SY", "SZ"),
          help="resampling voxel size in mm; default: median train+val spacing, enlarged on axes where a volume "
               "would exceed --size")
    p.add("crop", group=geo, action=argparse.BooleanOptionalAction,
          help="heuristic bounding-box crop of each volume, widened to keep every labeled voxel (default on; "
               "--no-crop keeps the full volume)")
    p.add("ignore_z", flags=("--ignore-z",), group=geo, help="do not resample the slice (3rd) axis")
    p.add("orientation", group=geo, metavar="CODE",
          help="reorient every volume to these nibabel axis codes before anything else (axis permutations and "
               "reversals only, undone when mapping back); slices are planes of the 3rd axis: S/I axial, A/P "
               "coronal, R/L sagittal (default RAS: axial slices). 'stored' keeps the array order as stored (the "
               "original code's behaviour)")
    p.add("flip_axis", flags=("--flip-axis",), group=geo, choices=(0, 1, 2),
          help="reverse this axis of every volume after reorientation (undone when mapping back)")
    p.add("discard_extracerebral", flags=("--keep-extracerebral-slices",), group=geo, action="store_false",
          help="keep every slice of volumes with a brain mask (default: only the slices from the first to the "
               "last brain slice, inclusive, as the original)")
    p.add("discard_outside_labels", flags=("--discard-outside-labels",), group=geo,
          help="for labeled volumes WITHOUT a brain mask: keep only the slices from the first to the last "
               "labeled slice (inclusive)")

    inten = p.add_argument_group("intensities and labels")
    p.add("standardize", flags=("--no-standardize",), group=inten, action="store_false",
          help="skip the per-volume (x - mean) / std standardisation")
    p.add("percentiles", group=inten, metavar=("LOW", "HIGH"),
          help="intensity window from the train+val histogram, mapped to [-1, 1] (default 0.1 99.9)")
    p.add("num_classes", "--num-classes", "--n-segmentation-labels", flags=("--label-nc",), group=inten, metavar="L",
          help="mask channels including background (and the brain class with --brain-masks); default: largest "
               "label value + 1 (+ 1 for the brain class)")
    p.add("brain_class", flags=("--no-brain-class",), group=inten, action="store_false",
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
    """The preprocessing options of the parsed flags (the parser's dataclass, built once)."""
    if args.images is None or args.out is None:
        raise InputError("--images and --out are required (unless --convert-legacy)")
    return build_parser().build(args)


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
