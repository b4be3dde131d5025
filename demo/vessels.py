"""Multi-site *vascular* phantom: a random vessel tree inside the brain phantom's anatomy.

``python -m demo.phantom --task vessels`` (this module's :func:`generate_vessel_phantom`).  Every subject
is the brain phantom's warped MNI template (:func:`demo.anatomy.sampling_coordinates`) with a vessel tree
grown inside its brain mask:

* **Tree.** A few roots at the base of the brain (arterial: two carotid-like and one basilar-like root
  going up) or at its back and top (venous: sinus-like roots).  Each branch is a 3-D polyline whose
  direction follows a smoothed random walk (tortuosity) and is pulled back inside near the brain surface;
  at its end it splits into two children whose radii follow Murray's law ``r^3 = r1^3 + r2^3`` with a
  random asymmetry, the thinner child turning more.  A branch stops at the brain boundary; branching stops
  below ``r_min`` (half a voxel by default: one-voxel-wide vessels).  Radii go from about 4 mm at the
  roots to ``r_min``.
* **Rasterisation** by the distance of each voxel centre to the densely sampled centrelines: vessel label
  where the distance is at most the local radius, plus every voxel a centreline passes through (so a vessel
  thinner than a voxel stays connected); a partial-volume fraction ``clip(0.5 + (r - d)/h, 0, 1)`` for the
  image; a radius map (mm) at every vessel voxel.
* **Sites** (the original's modalities):
  site 0 ``TOF-MRA-like`` (bright arteries on a dark, skull-stripped brain; Rician noise),
  site 1 ``CTA-like`` (Hounsfield units: bright vessels AND a bright skull shell around the brain,
  Gaussian noise, another window; not skull-stripped),
  site 2 ``venography-like`` (dark veins on a brighter brain, the venous tree; Rician noise, bias field).

Layout written under ``--out DIR`` (the original's preprocessing inputs: image, vessel mask, brain mask,
weight map)::

    DIR/site<k>/images/sub-<NNN>.nii.gz       float32 image
    DIR/site<k>/labels/sub-<NNN>.nii.gz       uint8 vessel mask (1 = vessel)
    DIR/site<k>/brain_masks/sub-<NNN>.nii.gz  uint8 brain mask (tissue, ventricles and the vessels in it)
    DIR/site<k>/weights/sub-<NNN>.nii.gz      uint8 weight map: a box around the brain (an ROI, as TopCow's)
    DIR/site<k>/radii/sub-<NNN>.nii.gz        float32 vessel radius in mm at vessel voxels, 0 elsewhere
    DIR/README.txt, DIR/sites.json            description, with the measured vessel fraction and radii

``MultiMedSeg.preprocess --labels .../labels --brain-masks .../brain_masks --weights .../weights
--num-classes 3`` turns them into the original's [background, brain, vessel] slices.  Subject ``i`` of site
``k`` draws from ``numpy.random.default_rng([seed, k, i, 1])``: deterministic, independent of the number
of subjects, and another stream than the brain phantom's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from demo.anatomy import (FWHM_TO_SIGMA, check_phantom_size, load_template, sampling_coordinates,
                          smooth_random_field, subject_id, write_phantom)
from robustmedseg.errors import InputError
from robustmedseg.io import atomic_path

FOLDERS = ("images", "labels", "brain_masks", "weights", "radii")
LABEL_NAMES = ("background", "vessel")
#: radius bins (in voxels) of the reported distribution: thin (one voxel wide), medium, large
RADIUS_BINS_VOXELS = (0.0, 0.75, 1.25, 10.0)


@dataclass(frozen=True)
class VesselSite:
    """Acquisition model of one vascular site (intensities on a [0, 1] scale, then ``scale``)."""

    index: int
    name: str
    description: str
    tree: str  # "arterial" or "venous"
    tissue_base: float  # intensity of the brain tissue ...
    tissue_t1: float  # ... plus this times the T1 template value (grey/white contrast)
    vessel: float  # intensity of a voxel filled with vessel
    outside: float  # intensity outside the brain (0: skull-stripped)
    bone: float  # intensity of the skull shell (CTA only, else 0)
    noise: float  # noise std
    rician: bool  # magnitude (Rician) noise, else Gaussian
    bias_strength: float  # std of the log bias field
    blur_fwhm_mm: float  # scanner point-spread function
    scale: float  # unit of the written image (x * scale + offset)
    offset: float
    projection: str  # "max" (bright vessels) or "min" (dark vessels): the projection that shows them


SITES: Tuple[VesselSite, ...] = (
    VesselSite(0, "TOF-MRA-like", "bright arteries on a dark skull-stripped brain, Rician noise (labeled source)",
               tree="arterial", tissue_base=0.12, tissue_t1=0.18, vessel=1.0, outside=0.0, bone=0.0,
               noise=0.025, rician=True, bias_strength=0.1, blur_fwhm_mm=0.0, scale=1000.0, offset=0.0,
               projection="max"),
    VesselSite(1, "CTA-like", "Hounsfield units: vessels 350 HU, bright skull shell, Gaussian noise, not "
               "skull-stripped", tree="arterial", tissue_base=0.025, tissue_t1=0.015, vessel=0.35, outside=0.0,
               bone=1.0, noise=0.012, rician=False, bias_strength=0.0, blur_fwhm_mm=1.0, scale=1000.0,
               offset=0.0, projection="max"),
    VesselSite(2, "venography-like", "dark veins (venous tree) on a brighter brain, Rician noise, bias field",
               tree="venous", tissue_base=0.45, tissue_t1=0.3, vessel=0.08, outside=0.0, bone=0.0, noise=0.04,
               rician=True, bias_strength=0.15, blur_fwhm_mm=0.0, scale=500.0, offset=0.0, projection="min"),
)


def site_by_index(index: int) -> VesselSite:
    for site in SITES:
        if site.index == index:
            return site
    raise InputError(f"unknown vessel site {index}; choose among {[s.index for s in SITES]}")


# ----------------------------------------------------------------------------------------- tree

@dataclass(frozen=True)
class TreeParams:
    """Shape of the vessel tree (lengths and radii in mm)."""

    root_radius_mm: float = 4.0
    min_radius_voxels: float = 0.5  # branching stops below this radius (in voxels of the output grid)
    length_per_radius: Tuple[float, float] = (9.0, 15.0)  # branch length / radius, uniform in this range
    min_length_mm: float = 20.0
    tortuosity: float = 0.12  # amplitude of the smoothed random walk of the direction (per half-voxel step)
    asymmetry: Tuple[float, float] = (0.55, 1.0)  # r2 / r1 of the two children
    max_segments: int = 400


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 1e-9 else np.array([0.0, 0.0, 1.0])


def _rotate_away(rng: np.random.Generator, d: np.ndarray, angle: float, axis: Optional[np.ndarray] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """``d`` turned by ``angle`` (radians) about ``axis`` (a random axis perpendicular to ``d`` if None)."""
    if axis is None:
        a = rng.standard_normal(3)
        axis = _unit(a - a.dot(d) * d)
    rotated = d * math.cos(angle) + np.cross(axis, d) * math.sin(angle) + axis * axis.dot(d) * (1 - math.cos(angle))
    return _unit(rotated), axis


def tree_roots(brain: np.ndarray, kind: str, spacing: float, p: TreeParams) -> List[Tuple[np.ndarray, np.ndarray, float]]:
    """``(point, direction, radius_mm)`` of the roots, placed relative to the brain's bounding box (voxel
    coordinates; axes x = left-right, y = posterior-anterior, z = inferior-superior)."""
    idx = np.nonzero(brain)
    lo = np.array([i.min() for i in idx], float)
    hi = np.array([i.max() for i in idx], float)
    w = hi - lo
    c = (lo + hi) / 2
    r0 = p.root_radius_mm
    if kind == "arterial":  # two carotid-like roots and a basilar-like root entering from below
        spec = [((c[0] - 0.1 * w[0], c[1] + 0.08 * w[1], lo[2] + 0.22 * w[2]), (-0.3, 0.2, 1.0), r0),
                ((c[0] + 0.1 * w[0], c[1] + 0.08 * w[1], lo[2] + 0.22 * w[2]), (0.3, 0.2, 1.0), r0),
                ((c[0], c[1] - 0.12 * w[1], lo[2] + 0.15 * w[2]), (0.0, -0.3, 1.0), 0.8 * r0)]
    elif kind == "venous":  # sinus-like roots: along the top midline, and the two lateral ones at the back
        spec = [((c[0], lo[1] + 0.15 * w[1], hi[2] - 0.12 * w[2]), (0.0, 1.0, 0.1), r0),
                ((c[0] - 0.25 * w[0], lo[1] + 0.12 * w[1], lo[2] + 0.35 * w[2]), (-0.2, 1.0, 0.3), 0.8 * r0),
                ((c[0] + 0.25 * w[0], lo[1] + 0.12 * w[1], lo[2] + 0.35 * w[2]), (0.2, 1.0, 0.3), 0.8 * r0)]
    else:
        raise ValueError(f"unknown tree kind {kind!r}")
    inside = np.argwhere(brain).astype(float)
    roots = []
    for point, direction, radius in spec:
        q = inside[np.argmin(((inside - np.asarray(point)) ** 2).sum(axis=1))]  # nearest brain voxel
        roots.append((q, _unit(np.asarray(direction, float)), float(radius)))
    return roots


def grow_tree(rng: np.random.Generator, brain: np.ndarray, kind: str, spacing: float,
              p: TreeParams = TreeParams()) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Centrelines of a random tree: a list of ``(points (n, 3) in voxels, radii (n,) in voxels)``."""
    depth = ndi.distance_transform_edt(brain)  # voxels from the outside
    inward = np.stack(np.gradient(ndi.gaussian_filter(depth, 1.5)))  # points into the brain
    allowed = ndi.binary_dilation(brain, iterations=1)
    shape = np.asarray(brain.shape)
    r_min = p.min_radius_voxels
    step = 0.5  # voxels
    stack = [(q, d, r / spacing, 0) for q, d, r in tree_roots(brain, kind, spacing, p)]
    segments: List[Tuple[np.ndarray, np.ndarray]] = []
    while stack and len(segments) < p.max_segments:
        q, d, r, gen = stack.pop(0)
        length = max(rng.uniform(*p.length_per_radius) * r * spacing, p.min_length_mm) / spacing
        n = max(int(math.ceil(length / step)), 2)
        noise = ndi.gaussian_filter1d(rng.standard_normal((n, 3)), sigma=3.0, axis=0)
        noise *= p.tortuosity / max(float(noise.std()), 1e-6)
        pts, q = [q.copy()], q.copy()
        for i in range(n):
            v = np.clip(np.round(q).astype(int), 0, shape - 1)
            pull = inward[:, v[0], v[1], v[2]] * (1.5 if depth[tuple(v)] < 2.0 + r else 0.0)
            d = _unit(d + noise[i] + pull)
            q = q + step * d
            v = np.round(q).astype(int)
            if np.any(v < 0) or np.any(v >= shape) or not allowed[tuple(v)]:
                break
            pts.append(q.copy())
        if len(pts) < 3:
            continue
        pts_arr = np.asarray(pts)
        radii = r * np.linspace(1.0, 0.92, len(pts_arr))  # slight taper along the branch
        segments.append((pts_arr, radii))
        r_end = float(radii[-1])
        a = rng.uniform(*p.asymmetry)
        r1 = r_end / (1.0 + a ** 3) ** (1.0 / 3.0)
        r2 = a * r1
        if len(pts) - 1 < n:  # the branch left the brain: no children
            continue
        d1, axis = _rotate_away(rng, d, math.radians(rng.uniform(15, 35) * (1.2 - a)))
        d2, _ = _rotate_away(rng, d, -math.radians(rng.uniform(35, 70)), axis)
        for child_r, child_d in ((r1, d1), (r2, d2)):
            if child_r >= r_min:
                stack.append((q.copy(), child_d, child_r, gen + 1))
    return segments


def rasterise(segments: Sequence[Tuple[np.ndarray, np.ndarray]], shape: Sequence[int]
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(partial-volume fraction float32, vessel mask bool, radius map in voxels float32, centreline mask bool)``.

    Distances are to the centrelines resampled every 0.25 voxel; a voxel is vessel when its centre lies
    within the local radius, or a centreline passes through it."""
    shape = tuple(int(s) for s in shape)
    frac = np.zeros(int(np.prod(shape)), np.float32)
    label = np.zeros(int(np.prod(shape)), bool)
    radius = np.zeros(int(np.prod(shape)), np.float32)
    centre = np.zeros(int(np.prod(shape)), bool)
    if not segments:
        z = lambda a: a.reshape(shape)  # noqa: E731
        return z(frac), z(label), z(radius), z(centre)
    dense_p, dense_r = [], []
    for pts, radii in segments:  # resample at 0.25 voxel
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        s = np.concatenate([[0.0], np.cumsum(seg)])
        t = np.linspace(0.0, s[-1], max(int(math.ceil(s[-1] / 0.25)) + 1, 2))
        dense_p.append(np.stack([np.interp(t, s, pts[:, k]) for k in range(3)], axis=1))
        dense_r.append(np.interp(t, s, radii))
    P, R = np.concatenate(dense_p), np.concatenate(dense_r)
    reach = int(math.ceil(R.max() + 1.0))
    off = np.stack(np.meshgrid(*[np.arange(-reach, reach + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    dims = np.asarray(shape)
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    base = np.round(P).astype(int)
    chunk = max(1, 2_000_000 // len(off))
    for i in range(0, len(P), chunk):
        vox = base[i:i + chunk, None, :] + off[None]  # (m, k, 3)
        d = np.linalg.norm(vox - P[i:i + chunk, None, :], axis=2)
        r = R[i:i + chunk, None]
        ok = np.all((vox >= 0) & (vox < dims), axis=2) & (d <= r + 0.5)
        flat = (vox[ok] * strides).sum(axis=1)
        f = np.clip(0.5 + r - d, 0.0, 1.0)[ok].astype(np.float32)
        np.maximum.at(frac, flat, f)
        inside = (d <= r)[ok]
        label[flat[inside]] = True
        rr = np.broadcast_to(r, d.shape)[ok].astype(np.float32)
        np.maximum.at(radius, flat[inside], rr[inside])
    ctr = np.clip(base, 0, dims - 1)
    cflat = (ctr * strides).sum(axis=1)
    centre[cflat] = True
    label[cflat] = True
    np.maximum.at(radius, cflat, R.astype(np.float32))
    np.maximum.at(frac, cflat, np.clip(0.5 + R, 0.0, 1.0).astype(np.float32))
    return frac.reshape(shape), label.reshape(shape), radius.reshape(shape), centre.reshape(shape)


# ----------------------------------------------------------------------------------------- subjects

@dataclass
class VesselSubject:
    image: np.ndarray  # float32
    vessel: np.ndarray  # uint8 0/1
    brain: np.ndarray  # uint8 0/1
    weight: np.ndarray  # uint8 0/1
    radius_mm: np.ndarray  # float32
    affine: np.ndarray
    centreline: np.ndarray  # bool: voxels the centrelines pass through (for the statistics)


def brain_mask(gm: np.ndarray, wm: np.ndarray, t1: np.ndarray) -> np.ndarray:
    """Tissue (``p_gm + p_wm >= 0.5``) with the ventricles and sulci filled: closed, holes filled."""
    tissue = (gm + wm) >= 0.5
    closed = ndi.binary_closing(tissue, iterations=2, border_value=0)
    return ndi.binary_fill_holes(closed | tissue)


def weight_box(brain: np.ndarray, margin: int = 2) -> np.ndarray:
    """1 inside the brain's bounding box widened by ``margin`` voxels, 0 elsewhere (an ROI box)."""
    out = np.zeros(brain.shape, np.uint8)
    idx = np.nonzero(brain)
    sl = tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in idx)
    out[sl] = 1
    return out


#: in-plane field of view of the vascular phantom (mm): the brain (180 mm front to back) and a few mm around it,
#: 64 voxels at 3 mm, so that 64 px slices hold a whole slice without resampling (thin vessels would blur)
FOV_MM = 192.0


def fov_window(template, spacing: float, shape: Sequence[int]) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """``((x0, y0), (nx, ny))``: the in-plane window of the output grid, :data:`FOV_MM` wide, centred on the
    template's brain (``p_gm + p_wm >= 0.5``); the whole grid on an axis narrower than that."""
    brain = (template.gm + template.wm) >= 0.5
    starts, sizes = [], []
    for axis in (0, 1):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.nonzero(brain.any(axis=other))[0]
        centre = ((idx.min() + idx.max()) / 2 - (spacing - 1) / 2) / spacing  # output voxel coordinate
        n = min(int(round(FOV_MM / spacing)), int(shape[axis]))
        starts.append(int(np.clip(round(centre - n / 2), 0, int(shape[axis]) - n)))
        sizes.append(n)
    return (starts[0], starts[1]), (sizes[0], sizes[1])


def make_vessel_subject(site: VesselSite, seed: int, subject: int, spacing: float = 3.0,
                        tree: TreeParams = TreeParams()) -> VesselSubject:
    """One vascular phantom subject, deterministic for the arguments."""
    rng = np.random.default_rng([int(seed), int(site.index), int(subject), 1])
    template = load_template(float(spacing))
    coords, affine = sampling_coordinates(rng, template, spacing)
    (x0, y0), n = fov_window(template, spacing, coords.shape[1:3])
    coords = coords[:, x0:x0 + n[0], y0:y0 + n[1], :]
    shift = np.eye(4)
    shift[:2, 3] = (x0, y0)
    affine = affine @ shift
    t1, gm, wm = [ndi.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0, prefilter=False)
                  for vol in (template.t1, template.gm, template.wm)]
    brain = brain_mask(gm, wm, t1)
    segments = grow_tree(rng, brain, site.tree, spacing, tree)
    frac, vessel, radius, centre = rasterise(segments, brain.shape)
    brain = brain | (vessel & ndi.binary_dilation(brain, iterations=2))
    vessel &= brain  # the vessels of the brain (experts label inside the brain only)
    tissue = (site.tissue_base + site.tissue_t1 * np.clip(t1, 0, 1)) * brain
    image = tissue * (1 - frac) + site.vessel * frac * brain + site.outside * (~brain)
    if site.bone > 0:  # a skull shell 1.5-5 mm outside the brain
        dist = ndi.distance_transform_edt(~brain) * spacing
        shell = (dist > 1.5) & (dist <= 5.0)
        image = np.where(shell, site.bone, image)
    if site.blur_fwhm_mm > 0:
        image = ndi.gaussian_filter(image, site.blur_fwhm_mm * FWHM_TO_SIGMA / spacing)
    if site.bias_strength > 0:
        image = image * np.exp(site.bias_strength * smooth_random_field(rng, image.shape, 80.0 / spacing)[0])
    noise = rng.standard_normal((2,) + image.shape) * site.noise
    image = np.hypot(image + noise[0], noise[1]) if site.rician else image + noise[0]
    image = (image * site.scale + site.offset).astype(np.float32)
    return VesselSubject(image=image, vessel=vessel.astype(np.uint8), brain=brain.astype(np.uint8),
                         weight=weight_box(brain), radius_mm=(radius * spacing * vessel).astype(np.float32),
                         affine=affine, centreline=centre & vessel)


def subject_statistics(s: VesselSubject, spacing: float) -> Dict[str, float]:
    """Vessel fraction (of the volume, of the brain) and the radii (mm) of the centreline voxels."""
    r = s.radius_mm[s.centreline]
    edges_mm = [b * spacing for b in RADIUS_BINS_VOXELS]
    hist = np.histogram(r, bins=edges_mm)[0]
    return {"vessel_fraction_volume": float(s.vessel.mean()),
            "vessel_fraction_brain": float(s.vessel.sum() / max(int(s.brain.sum()), 1)),
            "vessel_voxels": int(s.vessel.sum()), "centreline_voxels": int(r.size),
            "radius_mm_min": float(r.min()) if r.size else 0.0, "radius_mm_median": float(np.median(r)) if r.size else 0.0,
            "radius_mm_max": float(r.max()) if r.size else 0.0,
            "centreline_fraction_per_radius_bin": [float(h / max(r.size, 1)) for h in hist]}


def _aggregate(stats: List[Dict[str, float]]) -> Dict[str, object]:
    keys = ("vessel_fraction_volume", "vessel_fraction_brain", "radius_mm_min", "radius_mm_median", "radius_mm_max")
    out: Dict[str, object] = {k: {"mean": float(np.mean([s[k] for s in stats])),
                                  "min": float(np.min([s[k] for s in stats])),
                                  "max": float(np.max([s[k] for s in stats]))} for k in keys}
    bins = np.asarray([s["centreline_fraction_per_radius_bin"] for s in stats])
    out["centreline_fraction_per_radius_bin"] = [float(v) for v in bins.mean(axis=0)]
    return out


def describe(seed: int, spacing: float, n_subjects: int, sites: Sequence[VesselSite],
             stats: Dict[int, List[Dict[str, float]]], tree: TreeParams) -> dict:
    edges = [round(b * spacing, 3) for b in RADIUS_BINS_VOXELS]
    return {
        "generator": "demo.phantom --task vessels",
        "task": "vessels",
        "template": "MNI ICBM152 2009a symmetric (nilearn bundled copy), 1 mm",
        "seed": seed, "spacing_mm": spacing, "n_subjects": n_subjects,
        "labels": {str(i): name for i, name in enumerate(LABEL_NAMES)},
        "label_rule": "vessel where a voxel centre is within the local radius of a centreline, or a centreline "
                      "passes through the voxel; only inside the brain mask",
        "layout": "site<k>/{" + ",".join(FOLDERS) + "}/sub-<NNN>.nii.gz",
        "tree": asdict(tree),
        "radius_bins_mm": edges,
        "radius_bin_names": [f"thin (r <= {edges[1]} mm, one voxel wide)", f"medium ({edges[1]}-{edges[2]} mm)",
                             f"large (> {edges[2]} mm)"],
        "sites": [asdict(s) for s in sites],
        "statistics": {str(k): _aggregate(v) for k, v in stats.items()},
    }


def readme_text(info: dict) -> str:
    lines = [
        "Vascular demo phantom generated by `python -m demo.phantom --task vessels` (RobustMedSeg).",
        f"Template: {info['template']}. Seed {info['seed']}, spacing {info['spacing_mm']} mm, "
        f"{info['n_subjects']} subjects per site.",
        "Each subject: the brain phantom's random deformation of the template, with a random vessel tree "
        "(branching with Murray's law, tortuous centrelines) grown inside its brain mask.",
        f"Layout: {info['layout']}.",
        "Labels: 1 = vessel (uint8); brain_masks: 1 = brain; weights: 1 = region where losses and metrics count; "
        "radii: vessel radius in mm.",
        "Measured per site (mean over subjects; centreline voxels per radius bin " + ", ".join(
            info["radius_bin_names"]) + "):",
    ]
    for k, s in info["statistics"].items():
        bins = " / ".join(f"{v:.2f}" for v in s["centreline_fraction_per_radius_bin"])
        lines.append(f"  site{k}: vessel fraction {100 * s['vessel_fraction_volume']['mean']:.2f}% of the volume, "
                     f"{100 * s['vessel_fraction_brain']['mean']:.2f}% of the brain; radius "
                     f"{s['radius_mm_min']['mean']:.2f}-{s['radius_mm_max']['mean']:.2f} mm (median "
                     f"{s['radius_mm_median']['mean']:.2f}); centreline per radius bin {bins}")
    lines.append("Sites:")
    lines += [f"  site{s['index']}: {s['name']} -- {s['description']}" for s in info["sites"]]
    return "\n".join(lines) + "\n"


def generate_vessel_phantom(out: Path, seed: int = 0, n_subjects: int = 10, spacing: float = 3.0,
                            sites: Sequence[int] = (0, 1, 2), overwrite: bool = False,
                            montage: Optional[Path] = None, tree: TreeParams = TreeParams()) -> Path:
    """Write the vascular phantom under ``out`` (atomically), optionally a MIP montage PNG; return ``out``."""
    out = Path(out)
    check_phantom_size(n_subjects, spacing)
    chosen = [site_by_index(i) for i in sites]
    stats: Dict[int, List[Dict[str, float]]] = {}

    def subject(site: VesselSite, i: int) -> Tuple[Tuple[np.ndarray, ...], np.ndarray]:
        s = make_vessel_subject(site, seed, i, spacing, tree)
        stats.setdefault(site.index, []).append(subject_statistics(s, spacing))
        return (s.image, s.vessel, s.brain, s.weight, s.radius_mm), s.affine

    write_phantom(out, chosen, n_subjects, FOLDERS, subject,
                  lambda: describe(seed, spacing, n_subjects, chosen, stats, tree), readme_text, overwrite=overwrite)
    if montage is not None:
        write_mip_montage(out, montage, [s.index for s in chosen])
    return out


# ----------------------------------------------------------------------------------------- projections

def projection(volume: np.ndarray, kind: str, axis: int = 2, region: Optional[np.ndarray] = None) -> np.ndarray:
    """Maximum (``kind='max'``) or minimum (``'min'``) intensity projection along ``axis``; with ``region``,
    only its voxels count (a minimum projection of dark veins inside the brain, not of the air around it)."""
    v = np.asarray(volume, dtype=np.float32)
    if region is not None:
        fill = -np.inf if kind == "max" else np.inf
        v = np.where(region, v, fill)
    p = v.max(axis=axis) if kind == "max" else v.min(axis=axis)
    finite = np.isfinite(p)
    return np.where(finite, p, np.nanmin(p[finite]) if kind == "max" and finite.any()
                    else (np.nanmax(p[finite]) if finite.any() else 0.0))


def write_mip_montage(phantom_dir: Path, png: Path, sites: Sequence[int], subject: int = 0) -> None:
    """Per site: the axial intensity projection of the image (maximum for bright vessels, minimum inside
    the brain for dark veins) and the maximum projection of the vessel label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(sites), figsize=(2.8 * len(sites), 6.0), squeeze=False)
    name = f"{subject_id(subject)}.nii.gz"
    for col, index in enumerate(sites):
        site = site_by_index(index)
        folder = phantom_dir / f"site{index}"
        image = np.asarray(nib.load(str(folder / "images" / name)).dataobj)
        label = np.asarray(nib.load(str(folder / "labels" / name)).dataobj)
        brain = np.asarray(nib.load(str(folder / "brain_masks" / name)).dataobj) > 0
        mip = projection(image, site.projection, region=brain)  # inside the brain (no skull in a CTA MIP)
        lo, hi = np.percentile(mip, [1, 99.5])
        axes[0][col].imshow(mip.T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        axes[0][col].set_title(f"site{index}: {site.name}\n({site.projection}imum intensity projection in the brain)", fontsize=8)
        axes[1][col].imshow(label.max(axis=2).T, cmap="magma", origin="lower", vmin=0, vmax=1)
        axes[1][col].set_title("vessel label (MIP)", fontsize=8)
        for ax in (axes[0][col], axes[1][col]):
            ax.axis("off")
    fig.suptitle(f"Vascular phantom, {subject_id(subject)}: axial projections", fontsize=9)
    fig.tight_layout()
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
