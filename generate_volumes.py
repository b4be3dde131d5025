"""Generate synthetic labelled source volumes with the data factory (docs/method.md#generation,
docs/differences.md#d9-40 fixed).

Per volume: one z shared by all z-bins, the bin latents interpolated with s = --slices_in_one_z
points per gap, i.e. N = (n_zbins - 1) * s + 1 slices (exactly from the first to the last bin, no
duplicated or skipped slice), synthesised in batches and segmented by the ensemble of the best
phase-2 checkpoints (each read once).  The output folder is in the phase-2 slice format
(fakeVolume<i>_slice<NNN>.npz) and can be given to MultiMedSeg/train.py as the source folder.

    python generate_volumes.py --checkpoint_dir runs/pretrain_src --label 0 --n_volumes 50 \\
        --slices_in_one_z 10 --label_nc 3 --out_dir fake_src

Library: MultiMedSeg/generation.py.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from robustmedseg.cli import DataclassParser
from robustmedseg.errors import run_cli


def build_parser() -> DataclassParser:
    """The flags are the fields of :class:`MultiMedSeg.options.GenerationConfig` (type, default; a field
    without a default is a required flag), under their canonical names (``--checkpoint_dir`` for the
    reference's ``--ckpt_dir``...); ``--quiet`` only silences the command."""
    from MultiMedSeg.options import FEATURE_SCALE_SOURCES, HEADS, NOISE_MODES, GenerationConfig  # no torch yet

    p = DataclassParser(GenerationConfig, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("inputs")
    p.add("ckpt_dir", "--ckpt_dir", flags=("--checkpoint_dir",), group=g, required=True,
          help="phase-2 experiment folder of the SOURCE run (pretrain.py --exp_dir) or its checkpoints/ sub-folder; "
               "both are accepted. The best checkpoints are read from checkpoints/best.json")
    p.add("generator", group=g,
          help="optional phase-1 final_global_model.pt whose g_ema synthesises the images. Default: the decoder "
               "stored in the best phase-2 checkpoint (the g_ema copy the segmentation heads were trained with, as "
               "the reference). Segmentation always uses each checkpoint's own decoder")
    p.add("clip_mean", group=g,
          help="optional clip_mean.npy (float (1, clip_dim)) used as the CLIP conditioning of every slice")
    g = p.add_argument_group("what to generate")
    p.add("label", group=g, required=True, help="phase-1 domain id to generate")
    p.add("n_volumes", group=g, required=True, help="number of volumes")
    p.add("slices_in_one_z", group=g, required=True,
          help="s: slices per gap between consecutive z-bins; a volume has (n_zbins - 1) * s + 1 slices")
    p.add("n_segmentation_labels", "--n_segmentation_labels", "--num_classes", flags=("--label_nc",), group=g,
          metavar="L", required=True, help="number of classes incl. background; must equal the checkpoints' label_nc")
    p.add("z_depth", "--z_depth", flags=("--n_zbins",), group=g, metavar="N",
          help="number of z-bins; default and only accepted value: the generator's n_zbins (29 in the paper)")
    p.add("n_domains", group=g,
          help="number of phase-1 domains; default and only accepted value: the generator's n_domains")
    p.add("noise", group=g, choices=NOISE_MODES,
          help="synthesis noise: 'slice' fresh seeded noise per slice (default, as the original), 'volume' one "
               "seeded noise set per volume shared by its slices, 'fixed' the generator's stored noise buffers")
    p.add("seed", group=g, help="random seed; volume i depends only on (seed, i) (default 0)")
    g = p.add_argument_group("segmentation")
    p.add("ensemble_size", group=g, help="use the k best checkpoints (default: all listed in best.json)")
    p.add("head", group=g, choices=HEADS,
          help="classifier head: 'auto' (default) the head of the checkpoint domain equal to --label (source = "
               "one-hot [1,0], target = [0,1]); name one to force it")
    p.add("feature_scale_from", group=g, choices=FEATURE_SCALE_SOURCES,
          help="feature scale min(1, rate*step) of the segmenting checkpoints: 'best' (default, as the original) "
               "the best checkpoint's for every member, 'each' every checkpoint its own (the scale it was validated "
               "with)")
    p.add("keep_largest_component", "--keep_largest_component", flags=("--keep-largest-component",), group=g,
          help="per slice and per foreground label keep ONLY the largest 2-D connected component (8-connected; "
               "components tied for the largest are all kept), as the reference's --remove_largest_components "
               "did despite its name")
    g.add_argument("--remove_largest_components", dest="keep_largest_component", action="store_true",
                   help=argparse.SUPPRESS)  # the reference's misleading name, kept as an alias
    g = p.add_argument_group("output and execution")
    p.add("out_dir", group=g, required=True,
          help="output folder (written atomically); refused if it exists unless --overwrite")
    p.add("nifti", group=g, action=argparse.BooleanOptionalAction,
          help="also write nifti/fakeVolume<i>.nii.gz (float32) and _label.nii.gz (uint8), identity affine = "
               "spacing 1 (default on)")
    p.add("montage", group=g, action=argparse.BooleanOptionalAction,
          help="also write montage/fakeVolume<i>.png: a few slices with the label overlay (default on)")
    p.add("batch_size", group=g, help="slices per synthesis/segmentation batch (default 4)")
    p.add("device", group=g, help="auto (cuda if available), cpu or cuda (default auto)")
    p.add("overwrite", group=g, help="replace an existing --out_dir")
    g.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # --help exits here, before torch is imported
    cfg = parser.build(args)
    from MultiMedSeg.generation import generate

    generate(cfg, log=(lambda *a: None) if args.quiet else print, progress=not args.quiet)
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-generate``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
