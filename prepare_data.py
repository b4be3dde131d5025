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
from typing import List, Optional, Sequence

from model import N_ZBINS
from robustmedseg.data.lmdb_store import RESAMPLE_METHODS, PrepareOptions, prepare_lmdb
from robustmedseg.cli import DataclassParser
from robustmedseg.errors import run_cli


def _sizes(text: str) -> List[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got '{text}'")
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one size")
    return sizes


class _Parser(DataclassParser):
    """Flags generated from :class:`PrepareOptions`; ``--size`` is one comma list (``256,512``)."""

    list_converters = {int: _sizes}


def build_parser() -> DataclassParser:
    """The flags are the fields of :class:`robustmedseg.data.lmdb_store.PrepareOptions` (type, default), written
    with dashes: ``path`` is ``source``, ``--size`` is ``sizes``, ``--quiet`` turns ``progress`` off."""
    p = _Parser(PrepareOptions, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add("source", positional=True, metavar="path",
          help="folder of <volume>_slice<NNN>.npz slice files (MultiMedSeg/preprocess.py)")
    p.add("out", required=True, help="output LMDB folder (refused if it exists, see --overwrite)")
    p.add("sizes", flags=("--size",), metavar="SIZE",
          help="comma list of image sizes to store, e.g. 256,512 (default 512); every size is "
               "written. A size different from the slices' size needs --resample")
    p.add("resample", choices=RESAMPLE_METHODS,
          help="resampling kernel for sizes different from the slices' size (OpenCV INTER_AREA/"
               "LINEAR/CUBIC/LANCZOS4; 'area' is best for downsizing, 'bicubic'/'lanczos' for "
               "upsizing; result clipped to [-1, 1]). Default: none, such a size is an error")
    p.add("label", required=True, help="domain label k of this client, 0 <= k < --n-domains")
    p.add("n_domains", flags=("--n-domains",), help="number of domains in the federation (default 3)")
    p.add("n_zbins", flags=("--n-zbins",), help=f"number of z-bins (default {N_ZBINS})")
    p.add("clip_model", flags=("--clip-model",),
          help="open_clip model for clip_mean.npy (default ViT-L-14); 'none' skips CLIP")
    p.add("clip_pretrained", flags=("--clip-pretrained",),
          help="open_clip weights tag available offline (default openai) or a local weights file")
    p.add("clip_quick_gelu", flags=("--clip-quick-gelu",), action=argparse.BooleanOptionalAction,
          help="force QuickGELU on/off in the CLIP model (default: on for OpenAI weights, i.e. the "
               "'openai' tag or a local file; as open_clip's table says for other tags)")
    p.add("clip_batch", flags=("--clip-batch",), help="CLIP encoding batch size (default 32)")
    p.add("device", help="CLIP device: auto (CUDA if available), cpu, cuda, cuda:N")
    p.add("workers", help="processes loading/resizing slices (default 0: load in the main process)")
    p.add("recursive", help="also take slices in subfolders of PATH (e.g. train/ with labeled/ and unlabeled/)")
    p.add("overwrite", help="replace an existing --out (the old folder is replaced only on success)")
    p.add("progress", flags=("--quiet",), action="store_false", help="no progress bar")
    return p


def options_from_args(parser: DataclassParser, args: argparse.Namespace) -> PrepareOptions:
    """The options of the parsed flags; ``--clip-model none`` is ``clip_model`` None (no CLIP)."""
    clip_model = None if args.clip_model.lower() == "none" else args.clip_model
    return parser.build(args, clip_model=clip_model)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    opts = options_from_args(parser, parser.parse_args(argv))
    meta = prepare_lmdb(opts)
    clip = meta["clip"]
    print(f"wrote {meta['length']} slices at sizes {meta['sizes']} (label {meta['label']}) to {opts.out}"
          + (f"; clip_mean.npy (1, {clip['embed_dim']})" if clip else "; no CLIP mean"))
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-prepare-data``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
