"""REPORT.md and summary.json of the vessel demo (``python -m demo.run --preset vessels``):
``python -m demo.vessel_report --out DIR [--target 2]``, the report stage of the vessel preset (the vascular
phantom: ``data/sites.json`` task ``vessels``).

Thin structures are judged in projections, as in the original's figures: the report shows axial maximum
(bright vessels) or minimum (dark veins, inside the brain) intensity projections of the three sites
(``phantom_montage.png``), of the generator's samples per site (``generator_mip.png``: every z-bin of one
noise vector stacked into a volume) and of the five models' vessel labels on a test volume
(``segmentation_mip.png``).  Next to Dice and HD95 of the vessel class (``inference/<row>/metrics.csv``,
scored inside the brain: ``--consider_only_vessels_within_brain``) it measures on the restored test volumes
the centreline Dice (clDice) and the detection rate of thin vessels (ground-truth centreline voxels of radius
at most 0.75 voxel, read from the phantom's radius map) -- :mod:`MultiMedSeg.evaluation.metrics`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from demo.report import (METHODS, SHORT, _clean, _fmt, _inference_weights, _nifti, _pm, _save_fig, _size,
                         factory_summary, factory_table, fidelity_rounds, generator_grid, grid_zbins, load_generator,
                         read_timings, timing_table)
from MultiMedSeg.evaluation.metrics import gap_closed, mean_sd, read_metrics_csv, vessel_scores
from robustmedseg.cli import CliParser
from robustmedseg.errors import InputError, run_cli
from robustmedseg.io import write_text_atomic

SITE_NAMES = {0: "site 0: TOF-MRA-like (source)", 1: "site 1: CTA-like", 2: "site 2: venography-like"}
VESSEL = "2"  # class of the vessels in [background, brain, vessel]
BRAIN = "1"
#: thin vessels: radius <= this many voxels (one voxel wide), the first radius bin of demo.vessels
SMALL_RADIUS_VOXELS = 0.75
METRICS = ("dice", "cldice", "small_detection", "hd95")


def phantom_info(out: Path) -> Dict[str, Any]:
    path = out / "data" / "sites.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_vessel_run(out: Path) -> bool:
    return phantom_info(out).get("task") == "vessels"


# ----------------------------------------------------------------------------------------- metrics

def volume_vessel_metrics(out: Path, target: int, name: str, branch: str, vid: str, spacing_mm: float
                          ) -> Dict[str, float]:
    """clDice, thin-vessel detection and Dice of one prediction, inside the ground-truth brain."""
    folder = out / "data" / f"site{target}"
    gt = _nifti(folder / "labels" / f"{vid}.nii.gz") > 0
    brain = _nifti(folder / "brain_masks" / f"{vid}.nii.gz") > 0
    radius = _nifti(folder / "radii" / f"{vid}.nii.gz").astype(float)
    pred = _nifti(out / "inference" / name / f"{vid}_{branch}.nii.gz") == int(VESSEL)
    return vessel_scores(pred, gt, SMALL_RADIUS_VOXELS * spacing_mm, radius_map=radius, region=brain | gt)


def collect_vessel_results(out: Path, target: int) -> Dict[str, Any]:
    """Per row: vessel Dice and HD95 (metrics.csv), brain Dice, clDice and thin-vessel detection (mean ± sd
    over the test volumes), and the per-volume values; plus the adapted runs' branches (vessel Dice)."""
    spacing = float(phantom_info(out).get("spacing_mm", 1.0))
    rows: Dict[str, Any] = {}
    for name, branch, _ in METHODS:
        csv = read_metrics_csv(out / "inference" / name / "metrics.csv", branch)
        vols = sorted(csv)
        extra = {vid: volume_vessel_metrics(out, target, name, branch, vid, spacing) for vid in vols}
        rows[name] = {
            "volumes": vols,
            "dice": mean_sd([csv[v][VESSEL]["dice"] for v in vols]),
            "hd95": mean_sd([csv[v][VESSEL]["hd95"] for v in vols]),
            "dice_brain": mean_sd([csv[v][BRAIN]["dice"] for v in vols]),
            "cldice": mean_sd([extra[v]["cldice"] for v in vols]),
            "small_detection": mean_sd([extra[v]["small_detection"] for v in vols
                                        if not math.isnan(extra[v]["small_detection"])]),
            "small_n": int(sum(extra[v]["small_n"] for v in vols)),
            "per_volume": {v: {"dice": csv[v][VESSEL]["dice"], "hd95": csv[v][VESSEL]["hd95"], **extra[v]}
                           for v in vols},
        }
    branches = {}
    for name in ("adapted_real", "adapted_synthetic"):
        branches[name] = {}
        for b in ("intra", "inter", "pred"):
            csv = read_metrics_csv(out / "inference" / name / "metrics.csv", b)
            branches[name][b] = mean_sd([csv[v][VESSEL]["dice"] for v in sorted(csv)])
    return {"rows": rows, "branches": branches, "small_radius_mm": SMALL_RADIUS_VOXELS * spacing}


#: run folder of each row and the site of its validation volumes
RUNS = {"source_only": ("runs/pretrain_site0", 0), "target_only": ("runs/target_only_site{t}", None),
        "adapted_real": ("runs/adapt_real_site{t}", None), "adapted_synthetic": ("runs/adapt_synth_site{t}", None),
        "target_supervised": ("runs/target_supervised_site{t}", None)}


def validation_figures(out: Path, target: int) -> Dict[str, Dict[str, Any]]:
    """Per row, what its run measured on its validation volumes (the only figures any choice may use):
    the vessel Dice of its best checkpoint (``checkpoints/best.json``; the intra branch of a pretraining
    run, the ensemble of an adapted one) and, for an adapted run, the vessel Dice of the ensemble weights it
    chose (``checkpoints/evaluation.json``)."""
    out_rows: Dict[str, Dict[str, Any]] = {}
    for name, (folder, site) in RUNS.items():
        ckpt = out / folder.format(t=target) / "checkpoints"
        row: Dict[str, Any] = {"site": target if site is None else site}
        best = json.loads((ckpt / "best.json").read_text()) if (ckpt / "best.json").is_file() else []
        if best:
            top = max(best, key=lambda e: e["score"])
            m = top["metrics"]
            row["best_step"] = top["step"]
            row["best_vessel_dice"] = m.get(f"dice_{VESSEL}", m.get(f"intra_dice_{VESSEL}"))
        ev = json.loads((ckpt / "evaluation.json").read_text()) if (ckpt / "evaluation.json").is_file() else {}
        w = ev.get("ensemble_weights")
        for c in ev.get("candidates", []):
            if w and c["inter"] == w["inter"] and c["intra"] == w["intra"]:
                row["chosen_weights_vessel_dice"] = c["dice"].get(VESSEL)
        out_rows[name] = row
    return out_rows


def validation_table(v: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["| run | validation volumes of | best checkpoint (step) | its vessel Dice | vessel Dice of the chosen "
             "`_pred` weights |", "|---|---|---|---|---|"]
    for name, _, _ in METHODS:
        r = v[name]
        lines.append(f"| {SHORT[name]} | site {r['site']} | {r.get('best_step', 'none')} | "
                     f"{_fmt(r['best_vessel_dice']) if r.get('best_vessel_dice') is not None else ''} | "
                     f"{_fmt(r['chosen_weights_vessel_dice']) if r.get('chosen_weights_vessel_dice') is not None else ''} |")
    return "\n".join(lines)


def vessel_table(results: Mapping[str, Any]) -> str:
    lines = ["| method | Dice vessel | clDice | thin-vessel detection | HD95 vessel (mm) | Dice brain |",
             "|---|---|---|---|---|---|"]
    for name, _, label in METHODS:
        r = results["rows"][name]
        lines.append(f"| {label} | {_pm(r['dice'])} | {_pm(r['cldice'])} | {_pm(r['small_detection'])} | "
                     f"{_pm(r['hd95'], 1)} | {_pm(r['dice_brain'])} |")
    return "\n".join(lines)


def vessel_targets(summary: Mapping[str, Any]) -> List[Tuple[str, str, bool]]:
    """The issue-24 targets of one run, as measured on the test volumes."""
    d, c, g = summary["dice_mean"], summary["cldice_mean"], summary["gap_closed"]
    gain_real = d["adapted_real"] - d["source_only"]
    gain_syn = d["adapted_synthetic"] - d["source_only"]
    beats = [(f"adapted_beats_{other}_{key}", f"adapted (real source) beats {other.replace('_', ' ')} on {label} "
                                                 f"({m['adapted_real']:.3f} vs {m[other]:.3f})",
              m["adapted_real"] > m[other])
             for key, label, m in (("dice", "vessel Dice", d), ("cldice", "clDice", c))
             for other in ("source_only", "target_only")]
    return beats + [
        ("gap_closed_real", f"gap closed on vessel Dice with the real source >= 0.5 ({_fmt(g['real'])})",
         g["real"] >= 0.5),
        ("synthetic_gain", f"synthetic-source gain >= 0.9 x real-source gain on vessel Dice ({gain_syn:+.3f} vs "
                           f"{gain_real:+.3f})", gain_real > 0 and gain_syn >= 0.9 * gain_real),
    ]


# ----------------------------------------------------------------------------------------- figures

def region_of(image: np.ndarray, background: float) -> np.ndarray:
    """The head in an image whose outside is ``background`` (the preprocessing pads with -1): voxels above
    it, holes filled slice by slice (so dark vessels inside stay in)."""
    from scipy import ndimage as ndi

    above = image > background
    return np.stack([ndi.binary_fill_holes(above[..., k]) for k in range(image.shape[-1])], axis=-1)


def _proj(volume: np.ndarray, kind: str, region: np.ndarray) -> np.ndarray:
    from demo.vessels import projection

    return projection(volume, kind, axis=2, region=region)


def generator_mip(out: Path, png: Path, seed: int = 0, n_z: int = 2) -> Path:
    """Per site (columns) and noise vector (rows): the generator's slices of every z-bin of the real slices,
    stacked bottom to top into a volume and projected (maximum; minimum inside the head for the dark veins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from demo.vessels import site_by_index

    g = load_generator(out / "final_global_model.pt")
    zbins = grid_zbins(out, g.n_zbins, g.n_zbins)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_z, g.style_dim, generator=gen)
    fig, axes = plt.subplots(n_z, g.n_domains, figsize=(2.4 * g.n_domains, 2.6 * n_z), squeeze=False)
    with torch.no_grad():
        for d in range(g.n_domains):
            kind = site_by_index(d).projection
            for k in range(n_z):
                img, _ = g([z[k:k + 1].expand(len(zbins), -1)], (g.condition(d, zbins), None), randomize_noise=False)
                vol = np.moveaxis(img[:, 0].clamp(-1, 1).numpy(), 0, -1)  # (H, W, z-bins)
                mip = _proj(vol, kind, region_of(vol, -0.9))
                ax = axes[k][d]
                lo, hi = np.percentile(mip, [1, 99.5])
                ax.imshow(mip.T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
                ax.set_xticks([])
                ax.set_yticks([])
                if k == 0:
                    ax.set_title(f"site {d} ({kind} projection)", fontsize=8)
                if d == 0:
                    ax.set_ylabel(f"noise #{k}", fontsize=8)
    fig.suptitle(f"generator samples: {len(zbins)} z-bins of one noise vector stacked and projected", fontsize=9)
    return _save_fig(fig, png)


def synthetic_mip(out: Path, png: Path) -> Path:
    """The first synthetic source volume (generate_volumes.py): maximum projection of the image and of the
    vessel labels the pretrained segmenter gave it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = out / "synthetic_site0" / "nifti"
    images = sorted(p for p in folder.glob("*.nii.gz") if "label" not in p.name and "mask" not in p.name)
    labels = sorted(p for p in folder.glob("*.nii.gz") if "label" in p.name or "mask" in p.name)
    fig, axes = plt.subplots(1, 2, figsize=(5.0, 2.8))
    if images:
        vol = _nifti(images[0]).astype(np.float32)
        axes[0].imshow(_proj(vol, "max", region_of(vol, -0.9)).T, cmap="gray", origin="lower")
        axes[0].set_title(f"{images[0].name}: image MIP", fontsize=7)
    if labels:
        lab = _nifti(labels[0])
        axes[1].imshow((lab == int(VESSEL)).max(axis=2).T, cmap="magma", origin="lower", vmin=0, vmax=1)
        axes[1].set_title("vessel label MIP (pretrained segmenter)", fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return _save_fig(fig, png)


def segmentation_mip(out: Path, target: int, png: Path, vid: str) -> Path:
    """A target test volume: the image projection (minimum inside the brain for dark veins), the ground-truth
    vessels and the five models' vessel labels, as maximum projections."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from demo.vessels import site_by_index

    folder = out / "data" / f"site{target}"
    image = _nifti(folder / "images" / f"{vid}.nii.gz").astype(np.float32)
    brain = _nifti(folder / "brain_masks" / f"{vid}.nii.gz") > 0
    gt = _nifti(folder / "labels" / f"{vid}.nii.gz") > 0
    kind = site_by_index(target).projection
    panels = [(f"image ({kind}IP in the brain)", _proj(image, kind, brain), "gray"),
              ("ground truth", gt.max(axis=2), "magma")]
    panels += [(SHORT[name], (_nifti(out / "inference" / name / f"{vid}_{branch}.nii.gz") == int(VESSEL)).max(axis=2),
                "magma") for name, branch, _ in METHODS]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.9 * len(panels), 2.6))
    for ax, (title, arr, cmap) in zip(axes, panels):
        if cmap == "gray":
            lo, hi = np.percentile(arr, [1, 99.5])
            ax.imshow(arr.T, cmap=cmap, origin="lower", vmin=lo, vmax=hi)
        else:
            ax.imshow(arr.T, cmap=cmap, origin="lower", vmin=0, vmax=1)
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"site {target} test volume {vid}: axial projections of the vessel labels", fontsize=9)
    return _save_fig(fig, png)


# ----------------------------------------------------------------------------------------- report

def phantom_table(info: Mapping[str, Any]) -> str:
    names = info.get("radius_bin_names", ["thin", "medium", "large"])
    lines = ["| site | vessel voxels (% of the volume) | (% of the brain) | radius min / median / max (mm) | "
             + " | ".join(f"centreline in {n}" for n in names) + " |", "|---" * (4 + len(names)) + "|"]
    sites = {s["index"]: s["name"] for s in info.get("sites", [])}
    for k, s in info.get("statistics", {}).items():
        bins = " | ".join(f"{100 * v:.0f}%" for v in s["centreline_fraction_per_radius_bin"])
        lines.append(f"| site {k} ({sites.get(int(k), '')}) | {100 * s['vessel_fraction_volume']['mean']:.2f} | "
                     f"{100 * s['vessel_fraction_brain']['mean']:.2f} | {s['radius_mm_min']['mean']:.1f} / "
                     f"{s['radius_mm_median']['mean']:.1f} / {s['radius_mm_max']['mean']:.1f} | {bins} |")
    return "\n".join(lines)


def build_vessel_summary(out: Path, target: int, results: Mapping[str, Any]) -> Dict[str, Any]:
    info = json.loads((out / "demo.json").read_text()) if (out / "demo.json").is_file() else {}
    rows = results["rows"]
    mean = {m: {name: rows[name][m]["mean"] for name, _, _ in METHODS} for m in ("dice", "cldice", "small_detection",
                                                                                "hd95", "dice_brain")}
    d, c = mean["dice"], mean["cldice"]
    timings = read_timings(out)
    summary: Dict[str, Any] = {
        "task": "vessels", "config": info.get("config"), "seed": info.get("seed", 0), "target": target,
        "test_volumes": rows["source_only"]["volumes"],
        "dice_mean": d, "cldice_mean": c, "small_detection_mean": mean["small_detection"],
        "hd95_mean": mean["hd95"], "dice_brain_mean": mean["dice_brain"],
        "vessel": {name: {m: rows[name][m] for m in ("dice", "cldice", "small_detection", "hd95", "dice_brain")}
                   for name, _, _ in METHODS},
        "per_volume": {name: rows[name]["per_volume"] for name, _, _ in METHODS},
        "small_radius_mm": results["small_radius_mm"],
        "small_centreline_voxels": rows["source_only"]["small_n"],
        "adapted_branches": {name: {b: v["mean"] for b, v in br.items()} for name, br in results["branches"].items()},
        "gap_closed": {"real": gap_closed(d["adapted_real"], d["source_only"], d["target_supervised"]),
                       "synthetic": gap_closed(d["adapted_synthetic"], d["source_only"], d["target_supervised"])},
        "gap_closed_cldice": {"real": gap_closed(c["adapted_real"], c["source_only"], c["target_supervised"]),
                              "synthetic": gap_closed(c["adapted_synthetic"], c["source_only"],
                                                      c["target_supervised"])},
        "validation": validation_figures(out, target),
        "phantom": phantom_info(out).get("statistics", {}),
        "factory": factory_summary(out),
        "stage_seconds": {k: float(v["seconds"]) for k, v in timings.items()},
        "stage_cpu_seconds": {k: float(v["cpu_seconds"]) for k, v in timings.items() if "cpu_seconds" in v},
    }
    summary["targets"] = {key: ok for key, _, ok in vessel_targets(summary)}
    return summary


def write_vessel_report(out: Path, target: int) -> Path:
    out = out.resolve()
    if not is_vessel_run(out):
        raise InputError("not a vessel demo folder (data/sites.json has no task 'vessels'; use python -m demo.report)",
                         out / "data" / "sites.json")
    info = json.loads((out / "demo.json").read_text()) if (out / "demo.json").is_file() else {}
    phantom = phantom_info(out)
    results = collect_vessel_results(out, target)
    summary = build_vessel_summary(out, target, results)
    vid = summary["test_volumes"][0]
    generator_grid(out, out / "generator_grid.png")
    generator_mip(out, out / "generator_mip.png")
    curve = fidelity_rounds(out, out / "fidelity_rounds.png")
    synthetic_mip(out, out / "synthetic_montage.png")
    segmentation_mip(out, target, out / "segmentation_mip.png", vid)
    d, g, gc = summary["dice_mean"], summary["gap_closed"], summary["gap_closed_cldice"]
    checks = "\n".join(f"- [{'x' if ok else ' '}] {text}" for _, text, ok in vessel_targets(summary))
    weights = _inference_weights(out)
    branch_rows = "\n".join(
        f"| {SHORT[name]} | {_pm(b['intra'])} | {_pm(b['inter'])} | {_pm(b['pred'])} |"
        for name, b in results["branches"].items())
    curve_text = "\n![fidelity per round](fidelity_rounds.png)\n" if curve else ""
    text = f"""# RobustMedSeg demo report: the vessel case

Settings: `{info.get('config', '?')}` ({_size(out)} px slices of the {phantom.get('spacing_mm', '?')} mm vascular
phantom, small generator and encoder, CPU), **seed {summary['seed']}** (one run: one seed), target site
**{target}** ({SITE_NAMES.get(target, '')}). The original's vessel settings: brain masks (class 1 of
[background, brain, vessel]; slices outside the brain discarded), weight maps, class weights favouring the
vessels with `--optimize_mode favoured`, vessels scored inside the brain (`--consider_only_vessels_within_brain`),
losses at the full slice resolution. Machine-readable results: `summary.json`.

## 1. Vascular phantom: the three sites

Axial projections of subject 0 of each site (maximum intensity for the bright vessels of the TOF-MRA-like and
CTA-like sites, minimum intensity inside the brain for the dark veins of the venography-like site; the CTA
skull is left out of its projection by the brain mask) and of its vessel labels
(`python -m demo.phantom --task vessels`, `data/sites.json`).

![phantom sites](phantom_montage.png)

Measured over the {phantom.get('n_subjects', '?')} subjects of each site (mean; centreline voxels per radius bin):

{phantom_table(phantom)}

## 2. Data factory (federated, 3 Fed-BioMed nodes)

Samples of the global generator, projected: for each site, the slices of every z-bin generated from one
noise vector, stacked bottom to top and projected like the real volumes above.

![generator projections](generator_mip.png)

Single slices (rows = site x noise, columns = z-bin):

![generator grid](generator_grid.png)

{factory_table(summary['factory'])}
{curve_text}
First synthetic source volume (`generate_volumes.py`) and the vessel labels of the pretrained segmenter:

![synthetic volume](synthetic_montage.png)

## 3. Segmentation of the target site

Test volume `{vid}` of site {target}: projections of the image, the ground-truth vessels and the vessel labels
of the five models (source only, target only, adapted with the real source, adapted with the synthetic source,
target supervised).

![segmentation projections](segmentation_mip.png)

Mean ± sd over the {len(summary['test_volumes'])} test volumes of site {target}, vessels scored inside the
ground-truth brain. Dice and HD95 from `inference/*/metrics.csv`; clDice (centreline Dice, 3-D skeletons of
scikit-image) and the thin-vessel detection rate (fraction of the ground-truth centreline voxels of radius
<= {results['small_radius_mm']:.2f} mm, i.e. one voxel wide, that the prediction covers;
{summary['small_centreline_voxels']} such voxels in the test volumes) from the restored predictions
(`MultiMedSeg.evaluation.metrics`). Source only, target only and target supervised are `pretrain.py` runs
(`_intra`); the adapted rows are `_pred` ({weights}).

{vessel_table(results)}

**Gap closed** on the vessel Dice = (adapted − source only) / (target supervised − source only):
**{_fmt(g['real'], 2)}** with the real source, **{_fmt(g['synthetic'], 2)}** with the synthetic source (gains
{d['adapted_real'] - d['source_only']:+.3f} and {d['adapted_synthetic'] - d['source_only']:+.3f}); on clDice
{_fmt(gc['real'], 2)} and {_fmt(gc['synthetic'], 2)}.

The adapted runs' own branches (vessel Dice):

| adapted run | intra | inter | ensemble `_pred` |
|---|---|---|---|
{branch_rows}

What each run measured on its validation volumes (the only figures used for any choice: the best
checkpoints and the `_pred` weights; no demo setting was tuned on them):

{validation_table(summary['validation'])}

Targets (issue 24; test volumes, one seed, reported as measured):

{checks}

## 4. Wall time per stage

{timing_table(read_timings(out))}
"""
    write_text_atomic(out / "summary.json", json.dumps(_clean(summary), indent=2) + "\n")
    write_text_atomic(out / "REPORT.md", text)
    return out / "REPORT.md"


def build_parser() -> CliParser:
    p = CliParser(prog="python -m demo.vessel_report", description="Write OUT/REPORT.md, OUT/summary.json and the "
                  "projection figures of a vessel demo run (python -m demo.run --preset vessels).")
    p.add_argument("--out", type=Path, required=True, help="the demo output folder")
    p.add_argument("--target", type=int, default=2, help="target site of the adaptation (default 2)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    path = write_vessel_report(args.out, args.target)
    print(f"wrote {path} and {path.with_name('summary.json')}")
    return 0


if __name__ == "__main__":
    run_cli(main)
