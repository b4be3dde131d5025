"""How much of the thin vessels survives the halving of the masks (issue 24).

The original computes its training losses on masks resized from 512 to 256 px (``transform_img``:
``resize_segmentation(order=1)``, here :func:`MultiMedSeg.data.resample.resize_onehot`); the vessel demo keeps
the loss at the full slice size.  This measures, on the vascular phantom's axial slices, what a halving would
cost: the vessel pixels and the thin-vessel centreline pixels (radius <= 0.75 voxel) still covered after
resizing the one-hot [background, brain, vessel] mask to half size and back (nearest), with the project's
per-class rule and with an argmax winner (batchgenerators >= 0.25)::

    python -m bench.bench_vessel_downsampling --phantom demo_vessels/data --site 0
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import nibabel as nib
import numpy as np

from MultiMedSeg.data.resample import resize_onehot
from MultiMedSeg.evaluation.metrics import skeleton
from robustmedseg.cli import CliParser
from robustmedseg.errors import InputError, run_cli


def halve_and_back(onehot: np.ndarray, rule: str) -> np.ndarray:
    """(H, W, C) bool mask -> vessel (channel 2) at half size -> back to (H, W) by nearest."""
    h, w, _ = onehot.shape
    small = resize_onehot(onehot, (h // 2, w // 2))
    if rule == "argmax":
        small = np.eye(onehot.shape[2], dtype=bool)[np.argmax(small, axis=2)]
    vessel = small[..., 2]
    return np.repeat(np.repeat(vessel, 2, axis=0), 2, axis=1)[:h, :w]


def measure(phantom: Path, site: int, thin_voxels: float = 0.75) -> Dict[str, Dict[str, float]]:
    folder = phantom / f"site{site}"
    if not (folder / "labels").is_dir():
        raise InputError("no vascular phantom site here (python -m demo.phantom --task vessels)", folder)
    counts = {rule: {"vessel": 0, "vessel_kept": 0, "thin": 0, "thin_kept": 0} for rule in ("per-class", "argmax")}
    spacing = json.loads((phantom / "sites.json").read_text())["spacing_mm"]
    for path in sorted((folder / "labels").glob("*.nii.gz")):
        vessel = np.asarray(nib.load(str(path)).dataobj) > 0
        brain = np.asarray(nib.load(str(folder / "brain_masks" / path.name)).dataobj) > 0
        radius = np.asarray(nib.load(str(folder / "radii" / path.name)).dataobj)
        thin3d = skeleton(vessel) & (radius > 0) & (radius <= thin_voxels * spacing)
        for z in range(vessel.shape[2]):
            v = vessel[..., z]
            if not v.any():
                continue
            onehot = np.stack([~brain[..., z] & ~v, brain[..., z] & ~v, v], axis=-1)
            for rule, c in counts.items():
                back = halve_and_back(onehot, rule)
                c["vessel"] += int(v.sum())
                c["vessel_kept"] += int((back & v).sum())
                c["thin"] += int(thin3d[..., z].sum())
                c["thin_kept"] += int((back & thin3d[..., z]).sum())
    return {rule: {"vessel_pixels_kept": c["vessel_kept"] / max(c["vessel"], 1),
                   "thin_centreline_kept": c["thin_kept"] / max(c["thin"], 1), "vessel_pixels": c["vessel"],
                   "thin_centreline_pixels": c["thin"]} for rule, c in counts.items()}


def build_parser() -> CliParser:
    p = CliParser(prog="python -m bench.bench_vessel_downsampling", description=__doc__.split("\n\n")[0])
    p.add_argument("--phantom", type=Path, required=True, help="a vascular phantom folder (demo.phantom --task vessels)")
    p.add_argument("--site", type=int, default=0, help="site (default 0)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    print(json.dumps(measure(args.phantom, args.site), indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
