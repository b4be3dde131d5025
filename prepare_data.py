#!/usr/bin/env python
"""Client-side phase-1 data preparation: a folder of slice files -> an LMDB dataset folder.

Reads every ``<volume>_slice<NNN>.npz`` slice directly in PATH (or below it with --recursive;
ordered by volume, then slice number, as phase 2 orders them; index i = position), writes OUT/ with the images at every ``--size``, ``labels.npy`` (domain label), ``zaxes.npy``
(z-bin from the slice's rank in its volume), ``meta.json`` and ``clip_mean.npy`` (mean unit
CLIP image embedding).  Register OUT itself as the node's Fed-BioMed dataset.
Layout and rules: robustmedseg/data/lmdb_store.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence

from model import N_ZBINS
from robustmedseg.data.lmdb_store import RESAMPLE_METHODS, PrepareOptions, prepare_lmdb
from robustmedseg.errors import CliParser, run_cli


def _sizes(text: str) -> List[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got '{text}'")
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one size")
    return sizes


def build_parser() -> CliParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="folder of <volume>_slice<NNN>.npz slice files (MultiMedSeg/preprocess.py)")
    p.add_argument("--out", type=Path, required=True, help="output LMDB folder (refused if it exists, see --overwrite)")
    p.add_argument("--size", type=_sizes, default=[512],
                   help="comma list of image sizes to store, e.g. 256,512 (default 512); every size is "
                        "written. A size different from the slices' size needs --resample")
    p.add_argument("--resample", choices=RESAMPLE_METHODS, default=None,
                   help="resampling kernel for sizes different from the slices' size (OpenCV INTER_AREA/"
                        "LINEAR/CUBIC/LANCZOS4; 'area' is best for downsizing, 'bicubic'/'lanczos' for "
                        "upsizing; result clipped to [-1, 1]). Default: none, such a size is an error")
    p.add_argument("--label", type=int, required=True, help="domain label k of this client, 0 <= k < --n-domains")
    p.add_argument("--n-domains", type=int, default=3, help="number of domains in the federation (default 3)")
    p.add_argument("--n-zbins", type=int, default=N_ZBINS, help=f"number of z-bins (default {N_ZBINS})")
    p.add_argument("--clip-model", default="ViT-L-14",
                   help="open_clip model for clip_mean.npy (default ViT-L-14); 'none' skips CLIP")
    p.add_argument("--clip-pretrained", default="openai",
                   help="open_clip weights tag available offline (default openai) or a local weights file")
    p.add_argument("--clip-quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="force QuickGELU on/off in the CLIP model (default: on for OpenAI weights, i.e. the "
                        "'openai' tag or a local file; as open_clip's table says for other tags)")
    p.add_argument("--clip-batch", type=int, default=32, help="CLIP encoding batch size (default 32)")
    p.add_argument("--device", default="auto", help="CLIP device: auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=0,
                   help="processes loading/resizing slices (default 0: load in the main process)")
    p.add_argument("--recursive", action="store_true",
                   help="also take slices in subfolders of PATH (e.g. train/ with labeled/ and unlabeled/)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (the old folder is replaced only on success)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    clip_model = None if args.clip_model.lower() == "none" else args.clip_model
    opts = PrepareOptions(
        source=args.path, out=args.out, label=args.label, sizes=tuple(args.size), n_domains=args.n_domains,
        n_zbins=args.n_zbins, resample=args.resample, clip_model=clip_model,
        clip_pretrained=args.clip_pretrained, clip_quick_gelu=args.clip_quick_gelu, clip_batch=args.clip_batch,
        device=args.device, workers=args.workers, recursive=args.recursive,
        overwrite=args.overwrite, progress=not args.quiet)
    meta = prepare_lmdb(opts)
    clip = meta["clip"]
    print(f"wrote {meta['length']} slices at sizes {meta['sizes']} (label {meta['label']}) to {args.out}"
          + (f"; clip_mean.npy (1, {clip['embed_dim']})" if clip else "; no CLIP mean"))
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-prepare-data``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
