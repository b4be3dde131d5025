"""Export the federated data factory: latest (or given) Fed-BioMed breakpoint -> final_global_model.pt.

The file holds ``g``, ``d`` and ``g_ema`` state dicts (model key names, docs/method.md#state-dict) and ``args``, the
constructor arguments of ``model.Generator`` / ``model.Discriminator``; it loads with
``torch.load(path, weights_only=True)``. Phase 2 uses ``g_ema``.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from robustmedseg.cli import DataclassParser
from robustmedseg.errors import InputError, run_cli
from robustmedseg.federation.options import ExportOptions


def build_parser() -> DataclassParser:
    """The flags are the fields of :class:`robustmedseg.federation.options.ExportOptions` (type, default)."""
    p = DataclassParser(ExportOptions, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add("researcher_dir", flags=("--researcher-dir",),
          help="researcher component whose latest breakpoint is exported "
               "(default: $FBM_RESEARCHER_COMPONENT_ROOT, else ./fbm-researcher)")
    p.add("breakpoint", help="export this breakpoint folder instead of the latest one")
    p.add("out", help="output file (default ./final_global_model.pt; written atomically)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    opts: ExportOptions = parser.build(parser.parse_args(argv))
    from robustmedseg.federation.export import build_export, experiments_dir, find_breakpoint, load_breakpoint_params
    from robustmedseg.io import check_apart, check_parents, save_torch_atomic

    if opts.out.is_dir():
        raise InputError("is a folder; --out takes the path of the file to write", opts.out)
    root = opts.root
    check_apart({"--out": opts.out}, {"--breakpoint": opts.breakpoint, "experiments folder": experiments_dir(root)})
    check_parents(opts.out)
    folder, state_file = find_breakpoint(root, opts.breakpoint)
    params, state = load_breakpoint_params(folder, state_file)
    export = build_export(params, state)
    save_torch_atomic(export, opts.out)
    meta = export["meta"]
    print(f"wrote {opts.out} from {folder} (experiment {meta['experiment_id']}, after round {meta['round']}; "
          f"size {export['args']['size']})")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-export``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
