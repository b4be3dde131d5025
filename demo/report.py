"""``OUT/REPORT.md`` of a demo run, with its figures (PNG files next to it, relative links).

``python -m demo.report --out demo_output [--target 2]`` reads what the pipeline stages wrote:

* ``phantom_montage.png`` (stage phantom), ``final_global_model.pt`` (stage federated),
* ``synthetic_site0/montage/*.png`` (stage generate),
* ``inference/{source_only,adapted_real,adapted_synthetic}/metrics.csv`` and predictions (stage inference),
* ``predict/scans/*.nrrd`` and ``predict/segmentations/`` (stage predict: new scans in another orientation),
* ``.stages/*.json`` (wall time per stage),

and writes ``generator_grid.png`` (domains x z-bins from the global generator), ``synthetic_montage.png``,
``segmentation_overlay.png``, ``predict_overlay.png`` and ``REPORT.md`` (figures, Dice/HD95 tables, timings).
"""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from robustmedseg.errors import CliParser, InputError, run_cli
from robustmedseg.io import atomic_path, write_text_atomic

SITE_NAMES = {0: "site 0: T1, scanner A (source)", 1: "site 1: T1, scanner B", 2: "site 2: PET-like"}
CLASSES = (("1", "GM"), ("2", "WM"))
#: (inference folder, branch scored, row label)
METHODS = (("source_only", "intra", "source only (pretrained on site 0, no adaptation)"),
           ("adapted_real", "pred", "adapted with the real source data"),
           ("adapted_synthetic", "pred", "adapted with the synthetic source volumes only"))
SHORT = {"source_only": "source only", "adapted_real": "adapted (real source)",
         "adapted_synthetic": "adapted (synthetic source)"}
STAGE_ORDER = ("phantom", "preprocess", "prepare_data", "federated", "pretrain", "generate", "adapt",
               "inference", "predict", "report")


# ----------------------------------------------------------------------------------------- metrics

def read_metrics(csv_path: Path, branch: str) -> Dict[str, Dict[str, float]]:
    """Mean Dice / HD95 / HD over volumes per class for one prediction branch of a metrics.csv."""
    if not csv_path.is_file():
        raise InputError("metrics file not found (did the inference stage run?)", csv_path)
    sums: Dict[str, Dict[str, List[float]]] = {}
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["prediction"] != branch:
                continue
            per = sums.setdefault(row["class"], {"dice": [], "hd95": [], "hd": []})
            for key in per:
                per[key].append(float(row[key]))
    if not sums:
        raise InputError(f"no rows for prediction '{branch}'", csv_path)
    return {cls: {k: float(np.mean(v)) for k, v in vals.items()} for cls, vals in sums.items()}


def count_volumes(csv_path: Path) -> int:
    with open(csv_path, newline="") as fh:
        return len({row["volume"] for row in csv.DictReader(fh)})


def _fmt(x: float, digits: int = 3) -> str:
    return "inf" if math.isinf(x) else ("nan" if math.isnan(x) else f"{x:.{digits}f}")


def metrics_table(out: Path) -> Tuple[str, Dict[str, Dict[str, Dict[str, float]]]]:
    """Markdown table: per method, Dice and HD95 (mm) of GM, WM and their mean."""
    results = {name: read_metrics(out / "inference" / name / "metrics.csv", branch) for name, branch, _ in METHODS}
    head = ("| method | Dice GM | Dice WM | Dice mean | HD95 GM (mm) | HD95 WM (mm) | HD95 mean (mm) |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for name, _, label in METHODS:
        r = results[name]
        dice = [r[c]["dice"] for c, _ in CLASSES]
        hd = [r[c]["hd95"] for c, _ in CLASSES]
        lines.append(f"| {label} | {_fmt(dice[0])} | {_fmt(dice[1])} | {_fmt(float(np.mean(dice)))} | "
                     f"{_fmt(hd[0], 1)} | {_fmt(hd[1], 1)} | {_fmt(float(np.mean(hd)), 1)} |")
    return "\n".join(lines), results


# ----------------------------------------------------------------------------------------- figures

def _save_fig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def load_generator(path: Path):
    """``g_ema`` of a ``final_global_model.pt`` as a ``model.Generator`` in eval mode."""
    from robustmedseg.federation.export import load_factory_file

    if not path.is_file():
        raise InputError("global model not found (did the federated stage run?)", path)
    return load_factory_file(path)[0]


def generator_grid(out: Path, png: Path, n_cols: int = 8, n_z: int = 2, seed: int = 0) -> Path:
    """Rows = domain x noise sample, columns = evenly spaced z-bins, from the global ``g_ema``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    g = load_generator(out / "final_global_model.pt")
    zbins = np.unique(np.linspace(0, g.n_zbins - 1, n_cols).round().astype(int)).tolist()
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_z, g.style_dim, generator=gen)
    rows = []
    with torch.no_grad():
        for d in range(g.n_domains):
            clip = out / "lmdb" / f"site{d}" / "clip_mean.npy"
            e = torch.from_numpy(np.load(clip)).float() if clip.is_file() else None
            for k in range(n_z):
                zz = z[k:k + 1].expand(len(zbins), -1)
                c = g.condition(d, zbins)
                ee = None if e is None else e.expand(len(zbins), -1)
                img, _ = g([zz], (c, ee), randomize_noise=False)
                rows.append((d, k, img[:, 0].clamp(-1, 1).numpy()))
    fig, axes = plt.subplots(len(rows), len(zbins), figsize=(1.2 * len(zbins), 1.25 * len(rows)), squeeze=False)
    for r, (d, k, imgs) in enumerate(rows):
        for c, b in enumerate(zbins):
            ax = axes[r][c]
            ax.imshow(imgs[c].T, cmap="gray", vmin=-1, vmax=1, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"z-bin {b}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"domain {d}\nz #{k}", fontsize=8)
    fig.suptitle("global generator (g_ema of final_global_model.pt): domains x z-bins", fontsize=9)
    return _save_fig(fig, png)


def synthetic_montage(out: Path, png: Path) -> Path:
    """Copy the first montage written by generate_volumes.py next to the report."""
    montages = sorted((out / "synthetic_site0" / "montage").glob("*.png"))
    if not montages:
        raise InputError("no montage PNG (did the generate stage run?)", out / "synthetic_site0" / "montage")
    with atomic_path(png, suffix=".png") as tmp:
        shutil.copyfile(montages[0], tmp)
    return png


def _nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    if not path.is_file():
        raise InputError("file not found", path)
    return np.asarray(nib.load(str(path)).dataobj)


def _label_rgba(label: np.ndarray) -> np.ndarray:
    colours = {1: (0.95, 0.35, 0.2, 0.55), 2: (0.2, 0.55, 1.0, 0.55)}
    rgba = np.zeros(label.shape + (4,), np.float32)
    for value, colour in colours.items():
        rgba[label == value] = colour
    return rgba


def segmentation_overlay(out: Path, target: int, png: Path) -> Tuple[Path, str, int]:
    """Target test slice with the most tissue: image, ground truth and the three predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = json.loads((out / "inference" / "source_only" / "inference.json").read_text())
    vid = info["volumes"][0]
    image = _nifti(out / "data" / f"site{target}" / "images" / f"{vid}.nii.gz")
    gt = _nifti(out / "data" / f"site{target}" / "labels" / f"{vid}.nii.gz")
    preds = [(SHORT[name], _nifti(out / "inference" / name / f"{vid}_{branch}.nii.gz"))
             for name, branch, label in METHODS]
    z = int(np.argmax((gt > 0).sum(axis=(0, 1))))
    panels = [("image", None), ("ground truth", gt)] + preds
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.8))
    sl = image[:, :, z].T
    lo, hi = np.percentile(sl, [1, 99])
    for ax, (title, lab) in zip(axes, panels):
        ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        if lab is not None:
            ax.imshow(_label_rgba(np.asarray(lab)[:, :, z].T.astype(int)), origin="lower")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"site {target} test volume {vid}, axial slice {z} (red GM, blue WM)", fontsize=9)
    return _save_fig(fig, png), vid, z


# ----------------------------------------------------------------------------------------- new scans

def _read_itk(path: Path):
    """An NRRD/MetaImage file as a nibabel image (array x, y, z; RAS affine)."""
    import nibabel as nib
    import SimpleITK as sitk

    from MultiMedSeg.data.formats import ItkGeometry

    if not path.is_file():
        raise InputError("file not found (did the predict stage run?)", path)
    image = sitk.ReadImage(str(path))
    return nib.Nifti1Image(np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)), ItkGeometry.of(image).affine())


def _on_grid(img, reference) -> np.ndarray:
    """``img``'s array brought onto ``reference``'s voxel grid: the two differ by axis order and direction
    only (the same scan stored another way), so this is an exact reorientation."""
    from nibabel import orientations as ornt

    t = ornt.ornt_transform(ornt.io_orientation(img.affine), ornt.io_orientation(reference.affine))
    out = ornt.apply_orientation(np.asarray(img.dataobj), t)
    if out.shape != reference.shape or not np.allclose(img.affine @ ornt.inv_ornt_aff(t, img.shape),
                                                       reference.affine, atol=1e-3):
        raise InputError("the segmentation is not on the scan's grid", reference.get_filename())
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def predict_section(out: Path, target: int, png: Path) -> str:
    """Markdown for the predict stage: per new scan, its stored axes, Dice against the ground truth and
    against inference.py's ``_pred`` of the same volume, and ``predict_overlay.png``."""
    import nibabel as nib

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = json.loads((out / "predict" / "segmentations" / "predict.json").read_text())
    rows = ["| scan (NRRD) | stored axes | shape | Dice GM | Dice WM | agreement with inference.py `_pred` (mean Dice) |",
            "|---|---|---|---|---|---|"]
    shown = None
    for scan in summary["scans"]:
        vid = scan["id"]
        reference = nib.load(str(out / "data" / f"site{target}" / "images" / f"{vid}.nii.gz"))
        labels = _on_grid(_read_itk(out / "predict" / "segmentations" / scan["output"]), reference)
        gt = _nifti(out / "data" / f"site{target}" / "labels" / f"{vid}.nii.gz")
        ref_pred = _nifti(out / "inference" / "adapted_real" / f"{vid}_pred.nii.gz")
        dice = [_dice(labels == int(c), gt == int(c)) for c, _ in CLASSES]
        agree = float(np.nanmean([_dice(labels == int(c), ref_pred == int(c)) for c, _ in CLASSES]))
        rows.append(f"| `{scan['output']}` | {scan['stored_axcodes']} | {' x '.join(map(str, scan['shape']))} | "
                    f"{_fmt(dice[0])} | {_fmt(dice[1])} | {_fmt(agree)} |")
        if shown is None:
            shown = (scan, _read_itk(out / "predict" / "scans" / Path(scan["input"]).name),
                     _read_itk(out / "predict" / "segmentations" / scan["output"]), reference, labels)
    scan, stored, seg, reference, labels = shown
    image = np.asarray(stored.dataobj)
    k = image.shape[2] // 2
    axial = np.asarray(reference.dataobj)
    z = int(np.argmax((labels > 0).sum(axis=(0, 1))))
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.2))
    for ax, (title, img2d, lab2d) in zip(axes, [
            (f"stored array, slice {k} of its 3rd axis ({scan['stored_axcodes'][2]})", image[:, :, k],
             np.asarray(seg.dataobj)[:, :, k]),
            (f"mapped to the NIfTI scan, axial slice {z}", axial[:, :, z], labels[:, :, z])]):
        lo, hi = np.percentile(img2d, [1, 99])
        ax.imshow(img2d.T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        ax.imshow(_label_rgba(lab2d.T.astype(int)), origin="lower")
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"predict on {scan['output']} (NRRD, stored {scan['stored_axcodes']}; red GM, blue WM)",
                 fontsize=8)
    _save_fig(fig, png)
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------- report

def read_timings(out: Path) -> Dict[str, Dict[str, float]]:
    """Wall time (and load average) of every finished stage, from ``OUT/.stages/<stage>.json``."""
    rows = {}
    for name in STAGE_ORDER:
        path = out / ".stages" / f"{name}.json"
        if path.is_file():
            rows[name] = json.loads(path.read_text())
    return rows


def timing_table(timings: Dict[str, Dict[str, float]]) -> str:
    lines = ["| stage | wall time (s) | load average (1 min) at its end |", "|---|---|---|"]
    total = 0.0
    for name in STAGE_ORDER:
        if name in timings:
            t = timings[name]
            total += float(t["seconds"])
            load = t.get("load")
            lines.append(f"| {name} | {t['seconds']:.1f} | {'' if load is None else f'{load:.2f}'} |")
        elif name == "report":
            lines.append("| report | (this stage) | |")
    lines.append(f"| **total (without report)** | **{total:.1f}** | |")
    return "\n".join(lines)


def write_report(out: Path, target: int) -> Path:
    out = out.resolve()
    info = json.loads((out / "demo.json").read_text()) if (out / "demo.json").is_file() else {}
    table, _ = metrics_table(out)
    n_test = count_volumes(out / "inference" / "source_only" / "metrics.csv")
    generator_grid(out, out / "generator_grid.png")
    synthetic_montage(out, out / "synthetic_montage.png")
    _, vid, z = segmentation_overlay(out, target, out / "segmentation_overlay.png")
    new_scans = predict_section(out, target, out / "predict_overlay.png")
    factory_rounds = sorted((out / "runs" / "factory" / "samples").glob("round_*.png"))
    text = f"""# RobustMedSeg demo report

Settings: `{info.get('config', '?')}` (tiny CPU configuration: 32 px slices, small generator and encoder, few
rounds and steps), target site **{target}** ({SITE_NAMES.get(target, '')}), CLIP `{info.get('clip_model', 'none')}`.
These numbers show that the pipeline runs end to end; they are far from the paper's (512 px, 350+35 rounds,
15 000 + 20 000 steps on a GPU: `python -m demo.run --full` prints those commands).

## 1. Demo data: the three phantom sites

![phantom sites](phantom_montage.png)

## 2. Data factory (federated, 3 Fed-BioMed nodes)

Samples of the global generator (`final_global_model.pt`, `g_ema`): one row per domain and noise vector,
one column per z-bin (slice position).

![generator grid](generator_grid.png)
{f'{chr(10)}The researcher also wrote one grid per round from the aggregated model: `runs/factory/samples/` (last: `{factory_rounds[-1].name}`).{chr(10)}' if factory_rounds else ''}
## 3. Synthetic labelled source volume (`generate_volumes.py`)

Slices of the first synthetic volume with the labels given by the pretrained segmenter
(`synthetic_site0/`, NIfTI in `synthetic_site0/nifti/`).

![synthetic volume](synthetic_montage.png)

## 4. Segmentation of the target site

Test volume `{vid}` of site {target}, slice {z}: image, ground truth, and the predictions of the
three models (`inference/*/<id>_*.nii.gz` on the original grid).

![segmentation overlay](segmentation_overlay.png)

Mean over the {n_test} test volume(s) of site {target} (`inference/*/metrics.csv`; source-only = the
`_intra` prediction of the pretrained model, adapted = the `_pred` ensemble of inter and intra):

{table}

## 5. Segmenting new scans (`MultiMedSeg/predict.py`)

The site-{target} test volumes, stored again as NRRD with their axes permuted and reversed (`python -m
demo.reorient`, axis codes PIL: the stored slice axis is now left-right), segmented as new scans by the
adapted run: its preprocessing plan (`runs/adapt_real_site{target}/checkpoints/plan.json`) reorients each
scan to RAS, preprocesses it like the training data, and the labels are written back in NRRD on the
scan's own grid (`predict/segmentations/`). Left: the stored array with the labels written by `predict`;
right: the same labels on the original NIfTI scan.

![predict overlay](predict_overlay.png)

{new_scans}

Agreement with `inference.py` is not 1: the demo preprocessing keeps only the labeled slices of each
volume (`--discard-outside-labels`), so `inference.py` segments that slab, standardised over it, whereas a
new scan has no labels and every slice of it is segmented and standardised together.

## 6. Wall time per stage

{timing_table(read_timings(out))}

Logs of every stage (with the exact commands run): `logs/<stage>.log`.
"""
    write_text_atomic(out / "REPORT.md", text)
    return out / "REPORT.md"


def build_parser() -> CliParser:
    p = CliParser(prog="python -m demo.report", description="Write OUT/REPORT.md and its figures "
                                "from the outputs of a demo run (python -m demo.run).")
    p.add_argument("--out", type=Path, required=True, help="the demo output folder")
    p.add_argument("--target", type=int, default=2, help="target site of the adaptation (default 2)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    path = write_report(args.out, args.target)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
