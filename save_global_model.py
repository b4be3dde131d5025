"""Export the federated data factory: latest (or given) Fed-BioMed breakpoint -> final_global_model.pt.

The file holds ``g``, ``d`` and ``g_ema`` state dicts (model key names, docs/method.md#state-dict) and ``args``, the
constructor arguments of ``model.Generator`` / ``model.Discriminator``; it loads with
``torch.load(path, weights_only=True)``. Phase 2 uses ``g_ema``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

from robustmedseg.cli import CliParser
from robustmedseg.errors import InputError, run_cli


def build_parser() -> CliParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--researcher-dir", dest="researcher_dir", type=Path, default=None,
                   help="researcher component whose latest breakpoint is exported "
                        "(default: $FBM_RESEARCHER_COMPONENT_ROOT, else ./fbm-researcher)")
    p.add_argument("--breakpoint", type=Path, default=None,
                   help="export this breakpoint folder instead of the latest one")
    p.add_argument("--out", type=Path, default=Path("final_global_model.pt"),
                   help="output file (default ./final_global_model.pt; written atomically)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from robustmedseg.federation.export import build_export, experiments_dir, find_breakpoint, load_breakpoint_params
    from robustmedseg.io import check_apart, check_parents, save_torch_atomic

    if args.out.is_dir():
        raise InputError("is a folder; --out takes the path of the file to write", args.out)
    root = args.researcher_dir or Path(os.environ.get("FBM_RESEARCHER_COMPONENT_ROOT", "fbm-researcher"))
    check_apart({"--out": args.out}, {"--breakpoint": args.breakpoint, "experiments folder": experiments_dir(root)})
    check_parents(args.out)
    folder, state_file = find_breakpoint(root, args.breakpoint)
    params, state = load_breakpoint_params(folder, state_file)
    export = build_export(params, state)
    save_torch_atomic(export, args.out)
    meta = export["meta"]
    print(f"wrote {args.out} from {folder} (experiment {meta['experiment_id']}, after round {meta['round']}; "
          f"size {export['args']['size']})")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-export``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
