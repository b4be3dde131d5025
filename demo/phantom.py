"""Multi-site brain phantom from real anatomy (the MNI ICBM152 2009a template shipped by nilearn).

Every subject is the 1 mm template (T1 image and grey/white-matter probability maps,
197 x 233 x 189 voxels, skull-stripped) deformed by a random smooth displacement field
and a small random scaling, then resampled onto a coarser grid (default 2 mm, i.e.
99 x 117 x 95 voxels).  The image and the label are sampled through the *same*
coordinates, so they always match.

Labels (uint8): 0 background/CSF, 1 grey matter, 2 white matter.  With ``p_gm`` and
``p_wm`` the warped, resampled tissue probabilities, a voxel is tissue when
``p_gm + p_wm >= 0.5`` (i.e. when the background probability ``1 - p_gm - p_wm`` is at
most one half) and then takes the larger of the two classes (GM on ties).

Sites (the contrasts differ on purpose; phase 1 learns them, phase 2 adapts across them):

* site 0 ``T1, scanner A`` -- T1 intensities, mild multiplicative bias field, mild
  Gaussian noise.  The labeled source site.
* site 1 ``T1, scanner B`` -- gamma 0.6 intensity transfer, stronger bias field, blur,
  lower SNR, other intensity unit.  A target site.
* site 2 ``PET-like`` -- activity 1.0 in GM, 0.3 in WM, 0.1 in CSF inside the brain,
  heavy Gaussian smoothing (8 mm FWHM) and Poisson counting noise.  Another modality.

Layout written under ``--out DIR``::

    DIR/README.txt                      human description (sites, labels, seed, spacing)
    DIR/sites.json                      the same, machine readable
    DIR/site<k>/images/sub-<NNN>.nii.gz float32 image
    DIR/site<k>/labels/sub-<NNN>.nii.gz uint8 label, same shape and affine as the image

``--task vessels`` writes the vascular phantom instead (:mod:`demo.vessels`: a vessel tree in the same
anatomy, TOF-MRA-like, CTA-like and venography-like sites, with brain masks, weight maps and radius maps);
the brain phantom above is unchanged by it.

Determinism: subject ``i`` of site ``k`` draws from ``numpy.random.default_rng([seed, k, i])``,
so a subject does not depend on how many subjects or which sites are generated.  The
output folder is written atomically (it appears complete or not at all).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from demo.anatomy import (FWHM_TO_SIGMA, check_phantom_size, load_template, sampling_coordinates,
                          smooth_random_field, subject_id, write_phantom)
from robustmedseg.cli import CliParser
from robustmedseg.errors import InputError, run_cli
from robustmedseg.io import atomic_path

LABEL_NAMES = ("background/CSF", "grey matter", "white matter")


@dataclass(frozen=True)
class Site:
    """Acquisition model of one simulated site."""

    index: int
    name: str
    modality: str
    description: str
    bias_strength: float  # std of the log bias field
    noise: float  # Gaussian noise std relative to the WM intensity (0 for PET)
    blur_fwhm_mm: float  # extra Gaussian blur (scanner point-spread function)
    gamma: float  # intensity transfer x -> x**gamma on the [0, 1] T1 scale
    scale: float  # intensity unit of the written image
    pet_counts: float  # expected Poisson counts at activity 1 (PET only)


SITES: Tuple[Site, ...] = (
    Site(0, "T1, scanner A", "T1", "T1 contrast, mild bias field, mild Gaussian noise (labeled source)",
         bias_strength=0.05, noise=0.02, blur_fwhm_mm=0.0, gamma=1.0, scale=1000.0, pet_counts=0.0),
    Site(1, "T1, scanner B", "T1", "gamma 0.6 intensity transfer, strong bias field, blur, lower SNR (target)",
         bias_strength=0.2, noise=0.06, blur_fwhm_mm=3.0, gamma=0.6, scale=3000.0, pet_counts=0.0),
    Site(2, "PET-like", "PET", "GM 1.0 / WM 0.3 / CSF 0.1 activity, 8 mm FWHM smoothing, Poisson noise",
         bias_strength=0.0, noise=0.0, blur_fwhm_mm=8.0, gamma=1.0, scale=100.0, pet_counts=40.0),
)

def tissue_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """0 where ``gm + wm < 0.5``, else 1 (GM) if ``gm >= wm`` and 2 (WM) otherwise."""
    label = np.where(gm >= wm, 1, 2).astype(np.uint8)
    label[(gm + wm) < 0.5] = 0
    return label


def apply_site(site: Site, t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, spacing: float,
               rng: np.random.Generator) -> np.ndarray:
    """Simulate the acquisition of ``site`` from warped template volumes (float32 image)."""
    if site.modality == "PET":
        csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * (t1 > 0.01)  # inside the skull-stripped template
        activity = 1.0 * gm + 0.3 * wm + 0.1 * csf
        activity = ndi.gaussian_filter(activity, site.blur_fwhm_mm * FWHM_TO_SIGMA / spacing)
        counts = rng.poisson(np.clip(activity, 0.0, None) * site.pet_counts)
        image = counts / site.pet_counts
    else:
        image = np.clip(t1, 0.0, 1.0) ** site.gamma
        if site.blur_fwhm_mm > 0:
            image = ndi.gaussian_filter(image, site.blur_fwhm_mm * FWHM_TO_SIGMA / spacing)
        if site.bias_strength > 0:
            log_bias = smooth_random_field(rng, image.shape, control_spacing=80.0 / spacing)[0]
            image = image * np.exp(site.bias_strength * log_bias)
        image = np.abs(image + site.noise * rng.standard_normal(image.shape))  # magnitude image
    return (image * site.scale).astype(np.float32)


def make_subject(site: Site, seed: int, subject: int, spacing: float = 2.0
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom subject: ``(image float32, label uint8, affine)``, deterministic for the arguments."""
    rng = np.random.default_rng([int(seed), int(site.index), int(subject)])
    template = load_template(float(spacing))
    coords, affine = sampling_coordinates(rng, template, spacing)
    warped = [ndi.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0, prefilter=False)
              for vol in (template.t1, template.gm, template.wm)]
    t1, gm, wm = warped
    label = tissue_labels(gm, wm)
    image = apply_site(site, t1, gm, wm, spacing, rng)
    return image, label, affine


def describe(seed: int, spacing: float, n_subjects: int, sites: Sequence[Site]) -> dict:
    """The ``sites.json`` content."""
    return {
        "generator": "demo.phantom",
        "template": "MNI ICBM152 2009a symmetric (nilearn bundled copy), 1 mm",
        "seed": seed,
        "spacing_mm": spacing,
        "n_subjects": n_subjects,
        "labels": {str(i): name for i, name in enumerate(LABEL_NAMES)},
        "label_rule": "tissue where p_gm + p_wm >= 0.5; GM if p_gm >= p_wm else WM",
        "layout": "site<k>/images/sub-<NNN>.nii.gz and site<k>/labels/sub-<NNN>.nii.gz",
        "sites": [asdict(s) for s in sites],
    }


def readme_text(info: dict) -> str:
    lines = [
        "Demo phantom generated by `python -m demo.phantom` (RobustMedSeg).",
        f"Template: {info['template']}. Seed {info['seed']}, spacing {info['spacing_mm']} mm, "
        f"{info['n_subjects']} subjects per site.",
        "Each subject: random smooth deformation (~3 mm) and scaling (~3%) of the template.",
        f"Layout: {info['layout']} (image float32; label uint8, same shape and affine).",
        "Labels: " + ", ".join(f"{k} = {v}" for k, v in info["labels"].items()) + f" ({info['label_rule']}).",
        "Sites:",
    ]
    lines += [f"  site{s['index']}: {s['name']} -- {s['description']}" for s in info["sites"]]
    return "\n".join(lines) + "\n"


def generate_phantom(out: Path, seed: int = 0, n_subjects: int = 10, spacing: float = 2.0,
                     sites: Sequence[int] = (0, 1, 2), overwrite: bool = False,
                     montage: Optional[Path] = None) -> Path:
    """Write the phantom under ``out`` (atomically) and optionally a montage PNG; return ``out``."""
    out = Path(out)
    check_phantom_size(n_subjects, spacing)
    chosen = [site_by_index(i) for i in sites]

    def subject(site: Site, i: int) -> Tuple[Tuple[np.ndarray, np.ndarray], np.ndarray]:
        image, label, affine = make_subject(site, seed, i, spacing)
        return (image, label), affine

    write_phantom(out, chosen, n_subjects, ("images", "labels"), subject,
                  lambda: describe(seed, spacing, n_subjects, chosen), readme_text, overwrite=overwrite)
    if montage is not None:
        write_montage(out, montage, [s.index for s in chosen])
    return out


def site_by_index(index: int) -> Site:
    for site in SITES:
        if site.index == index:
            return site
    raise InputError(f"unknown site {index}; choose among {[s.index for s in SITES]}")


def write_montage(phantom_dir: Path, png: Path, sites: Sequence[int], subject: int = 0) -> None:
    """One axial slice (plane of the 3rd axis, through the brain centre) per site, with label contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sites), figsize=(3.2 * len(sites), 3.6), squeeze=False)
    for ax, index in zip(axes[0], sites):
        name = f"{subject_id(subject)}.nii.gz"
        image = np.asarray(nib.load(str(phantom_dir / f"site{index}" / "images" / name)).dataobj)
        label = np.asarray(nib.load(str(phantom_dir / f"site{index}" / "labels" / name)).dataobj)
        z = int(np.round(np.mean(np.nonzero(label.any(axis=(0, 1)))[0])))
        ax.imshow(image[:, :, z].T, cmap="gray", origin="lower")
        ax.contour(label[:, :, z].T, levels=[0.5, 1.5], colors=["tab:orange", "tab:cyan"], linewidths=0.6,
                   origin="lower")
        ax.set_title(f"site{index}: {site_by_index(index).name}", fontsize=9)
        ax.axis("off")
    fig.suptitle("Demo phantom (contours: GM outer, WM inner)", fontsize=10)
    fig.tight_layout()
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def parse_sites(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated site numbers, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct site numbers, got {text!r}")
    return values


def build_parser() -> CliParser:
    site_help = "; ".join(f"{s.index}: {s.name} ({s.description})" for s in SITES)
    parser = CliParser(
        prog="python -m demo.phantom", command="demo.phantom",
        description="Generate the multi-site brain phantom (NIfTI images + GM/WM labels) from the MNI "
                    "template shipped by nilearn. Layout: OUT/site<k>/{images,labels}/sub-<NNN>.nii.gz, "
                    "plus OUT/README.txt and OUT/sites.json.")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed -> identical files (default 0)")
    parser.add_argument("--n-subjects", type=int, default=10, help="subjects per site (default 10)")
    parser.add_argument("--task", choices=("brain", "vessels"), default="brain",
                        help="'brain' (default): grey/white-matter labels; 'vessels': the vascular phantom "
                             "(demo/vessels.py: a vessel tree in the same anatomy, TOF-MRA-like, CTA-like and "
                             "venography-like sites, vessel labels, brain masks, weight maps and radius maps)")
    parser.add_argument("--spacing", type=float, default=None,
                        help="isotropic output voxel size in mm, >= 1 (default 2.0 -> 99x117x95 voxels for the "
                             "brain task, 3.0 for the vessel task)")
    parser.add_argument("--sites", type=parse_sites, default=[0, 1, 2],
                        help=f"comma-separated sites to generate (default 0,1,2). {site_help}")
    parser.add_argument("--montage", type=Path, default=None,
                        help="also write a PNG with one axial slice per site (image + label contours; vessel "
                             "task: axial intensity projections of each site and of its vessel labels)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.task == "vessels":
        from demo.vessels import generate_vessel_phantom

        args.spacing = 3.0 if args.spacing is None else args.spacing
        out = generate_vessel_phantom(args.out, seed=args.seed, n_subjects=args.n_subjects, spacing=args.spacing,
                                      sites=args.sites, overwrite=args.overwrite, montage=args.montage)
        print(f"wrote {out} (vessel task: {args.n_subjects} subjects x sites {args.sites} at {args.spacing} mm)")
        return 0
    args.spacing = 2.0 if args.spacing is None else args.spacing
    out = generate_phantom(args.out, seed=args.seed, n_subjects=args.n_subjects, spacing=args.spacing,
                           sites=args.sites, overwrite=args.overwrite, montage=args.montage)
    print(f"wrote {out} ({args.n_subjects} subjects x sites {args.sites} at {args.spacing} mm)")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-phantom``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
