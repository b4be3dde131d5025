"""Generate synthetic labelled source volumes with the data factory (docs/method.md#generation,
docs/differences.md#d9-40 fixed).

Per volume: one z shared by all z-bins, the bin latents interpolated with s = --slices_in_one_z
points per gap, i.e. N = (n_zbins - 1) * s + 1 slices (exactly from the first to the last bin, no
duplicated or skipped slice), synthesised in batches and segmented by the ensemble of the best
phase-2 checkpoints (each read once).  The output folder is in the phase-2 slice format
(fakeVolume<i>_slice<NNN>.npz) and can be given to MultiMedSeg/train.py as the source folder.

    python generate_volumes.py --ckpt_dir runs/pretrain_src --label 0 --n_volumes 50 \\
        --slices_in_one_z 10 --n_segmentation_labels 3 --out_dir fake_src

Library: MultiMedSeg/generation.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from robustmedseg.cli import CliParser
from robustmedseg.errors import run_cli


def build_parser() -> CliParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--checkpoint_dir", "--ckpt_dir", dest="ckpt_dir", type=Path, required=True,
                   help="phase-2 experiment folder of the SOURCE run (pretrain.py --exp_dir) or its checkpoints/ "
                        "sub-folder; both are accepted. The best checkpoints are read from checkpoints/best.json")
    g.add_argument("--generator", type=Path, default=None,
                   help="optional phase-1 final_global_model.pt whose g_ema synthesises the images. Default: the "
                        "decoder stored in the best phase-2 checkpoint (the g_ema copy the segmentation heads were "
                        "trained with, as the reference). Segmentation always uses each checkpoint's own decoder")
    g.add_argument("--clip_mean", type=Path, default=None,
                   help="optional clip_mean.npy (float (1, clip_dim)) used as the CLIP conditioning of every slice")
    g = p.add_argument_group("what to generate")
    g.add_argument("--label", type=int, required=True, help="phase-1 domain id to generate")
    g.add_argument("--n_volumes", type=int, required=True, help="number of volumes")
    g.add_argument("--slices_in_one_z", type=int, required=True,
                   help="s: slices per gap between consecutive z-bins; a volume has (n_zbins - 1) * s + 1 slices")
    g.add_argument("--label_nc", "--n_segmentation_labels", "--num_classes", dest="n_segmentation_labels", type=int,
                   metavar="L", required=True,
                   help="number of classes incl. background; must equal the checkpoints' label_nc")
    g.add_argument("--n_zbins", "--z_depth", dest="z_depth", type=int, default=None, metavar="N",
                   help="number of z-bins; default and only accepted value: the generator's n_zbins (29 in the paper)")
    g.add_argument("--n_domains", type=int, default=None,
                   help="number of phase-1 domains; default and only accepted value: the generator's n_domains")
    g.add_argument("--noise", choices=("slice", "volume", "fixed"), default="slice",
                   help="synthesis noise: 'slice' fresh seeded noise per slice (default, as the original), "
                        "'volume' one seeded noise set per volume shared by its slices, 'fixed' the generator's "
                        "stored noise buffers")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed; volume i depends only on (seed, i) (default 0)")
    g = p.add_argument_group("segmentation")
    g.add_argument("--ensemble_size", type=int, default=None,
                   help="use the k best checkpoints (default: all listed in best.json)")
    g.add_argument("--head", choices=("auto", "source", "target"), default="auto",
                   help="classifier head: 'auto' (default) the head of the checkpoint domain equal to --label "
                        "(source = one-hot [1,0], target = [0,1]); name one to force it")
    g.add_argument("--keep-largest-component", "--keep_largest_component", dest="keep_largest_component",
                   action="store_true",
                   help="per slice and per foreground label keep ONLY the largest 2-D connected component "
                        "(8-connected; components tied for the largest are all kept), as the reference's "
                        "--remove_largest_components did despite its name")
    g.add_argument("--remove_largest_components", dest="keep_largest_component", action="store_true",
                   help=argparse.SUPPRESS)  # the reference's misleading name, kept as an alias
    g = p.add_argument_group("output and execution")
    g.add_argument("--out_dir", type=Path, required=True,
                   help="output folder (written atomically); refused if it exists unless --overwrite")
    g.add_argument("--nifti", action=argparse.BooleanOptionalAction, default=True,
                   help="also write nifti/fakeVolume<i>.nii.gz (float32) and _label.nii.gz (uint8), identity "
                        "affine = spacing 1 (default on)")
    g.add_argument("--montage", action=argparse.BooleanOptionalAction, default=True,
                   help="also write montage/fakeVolume<i>.png: a few slices with the label overlay (default on)")
    g.add_argument("--batch_size", type=int, default=4, help="slices per synthesis/segmentation batch (default 4)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda (default auto)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out_dir")
    g.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # --help exits here, before torch is imported
    from MultiMedSeg.generation import GenerationConfig, generate

    settings = vars(args).copy()
    quiet = settings.pop("quiet")
    cfg = GenerationConfig(**settings)
    generate(cfg, log=(lambda *a: None) if quiet else print, progress=not quiet)
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-generate``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
