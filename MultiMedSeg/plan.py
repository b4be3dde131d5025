"""Write (or show) the preprocessing plan of a training run, for runs trained before plans existed.

    python -m MultiMedSeg.plan --checkpoint_dir runs/adapt_site2 [--metadata prep/site2/metadata.json]

Pretraining and adaptation write ``checkpoints/plan.json`` themselves, from the ``metadata.json`` of
the site they segment (the source site for ``pretrain.py``, the target site for ``train.py``).  This
command writes it afterwards: from the site the run's checkpoint says it was trained on (its saved
options), or from ``--metadata`` -- which must then be that site's unless ``--force`` (the data may
have moved).  The domain and the number of classes come from the run's best checkpoint.
``--show`` prints a run's plan.  Also ``rms-plan``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: import the repository, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from robustmedseg.cli import CliParser  # noqa: E402
from robustmedseg.errors import run_cli  # noqa: E402


def build_parser() -> CliParser:
    from MultiMedSeg.options import plan_parser

    return plan_parser()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from MultiMedSeg.options import parse_plan_options

    args = parse_plan_options(argv)
    from MultiMedSeg.data.preprocessing_plan import load_plan
    from MultiMedSeg import checkpoints as ck
    from MultiMedSeg.training.setup import write_run_plan

    if args.show:
        print(json.dumps(load_plan(ck.checkpoints_folder(args.checkpoint_dir)).to_dict(), indent=1))
        return 0
    path, plan = write_run_plan(args.checkpoint_dir, args.metadata, force=args.force, overwrite=args.overwrite)
    print(f"wrote {path} ({plan.domain['role']} domain {plan.domain['label']}, {plan.num_classes} classes, "
          f"{plan.size} px, orientation {plan.orientation})")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-plan``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
