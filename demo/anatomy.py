"""Anatomy shared by the demo phantoms: the MNI ICBM152 2009a template shipped by nilearn, the random
subject deformation, smooth random fields and the NIfTI writer (:mod:`demo.phantom`, the brain phantom, and
:mod:`demo.vessels`, the vascular phantom)."""
from __future__ import annotations

import functools
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Sequence, Tuple

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from robustmedseg.errors import InputError
from robustmedseg.io import atomic_dir

TEMPLATE_NAME = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass
class Template:
    """Template volumes on the 1 mm grid, low-pass filtered for the output spacing."""

    t1: np.ndarray  # [0, 1]
    gm: np.ndarray  # probability [0, 1]
    wm: np.ndarray  # probability [0, 1]
    affine: np.ndarray  # 4x4, 1 mm voxels


def template_dir() -> Path:
    """Folder of nilearn's bundled data files (found without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the nilearn package is not installed; it ships the MNI template the phantom needs")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def template_paths() -> Dict[str, Path]:
    """Paths of the T1, GM and WM template files; :class:`InputError` when one is missing."""
    paths = {kind: template_dir() / TEMPLATE_NAME.format(kind) for kind in ("t1", "gm", "wm")}
    for path in paths.values():
        if not path.is_file():
            raise InputError("MNI ICBM152 template file missing from the nilearn installation", path)
    return paths


@functools.lru_cache(maxsize=1)  # ~100 MB; the phantom generators clear it when done
def load_template(spacing: float) -> Template:
    """Load the template, scaled to [0, 1] and anti-alias filtered for ``spacing`` mm output."""
    paths = template_paths()
    vols = {}
    affine = None
    for kind, path in paths.items():
        img = nib.load(str(path))
        vol = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        sigma = 0.42 * math.sqrt(max(spacing**2 - 1.0, 0.0))  # Gaussian approximating the coarser voxel
        if sigma > 0:
            vol = ndi.gaussian_filter(vol, sigma)
        vols[kind] = vol
        affine = img.affine if affine is None else affine
    return Template(t1=vols["t1"], gm=vols["gm"], wm=vols["wm"], affine=np.asarray(affine, dtype=np.float64))


def output_grid(template_shape: Sequence[int], template_affine: np.ndarray, spacing: float
                ) -> Tuple[Tuple[int, int, int], np.ndarray, np.ndarray]:
    """Output shape, affine, and the map ``output voxel -> template voxel`` (4x4).

    Output voxel ``o`` covers template voxels ``o*s .. o*s + s - 1`` (s = spacing in template
    voxels); its centre is ``o*s + (s - 1)/2``.  The template orientation is kept.
    """
    shape = tuple(int(math.ceil(n / spacing)) for n in template_shape)
    to_template = np.diag([spacing, spacing, spacing, 1.0])
    to_template[:3, 3] = (spacing - 1.0) / 2.0
    return shape, template_affine @ to_template, to_template  # type: ignore[return-value]


def _upsampling_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D cubic-spline upsampling (the columns are upsampled unit vectors)."""
    eye = np.eye(n_in)
    return np.stack([ndi.zoom(e, n_out / n_in, order=3, mode="nearest", grid_mode=True)[:n_out] for e in eye],
                    axis=1)


def smooth_random_field(rng: np.random.Generator, shape: Sequence[int], control_spacing: float,
                        n_components: int = 1) -> np.ndarray:
    """Random field with unit-ish amplitude, smooth at the scale of ``control_spacing`` voxels.

    A coarse grid of standard normal values is upsampled with a separable cubic spline to
    ``shape``.  Returns an array of shape ``(n_components, *shape)``, float32.
    """
    coarse_shape = [max(2, int(math.ceil(n / control_spacing)) + 1) for n in shape]
    mats = [_upsampling_matrix(n, m) for n, m in zip(shape, coarse_shape)]
    out = np.empty((n_components, *shape), dtype=np.float32)
    for c in range(n_components):
        field = rng.standard_normal(coarse_shape)
        for axis, mat in enumerate(mats):  # contract one axis at a time; the new axis goes last
            field = np.tensordot(field, mat, axes=([0], [1]))
        out[c] = field
    return out


def sampling_coordinates(rng: np.random.Generator, template: Template, spacing: float,
                         amplitude_mm: float = 3.0, scale_std: float = 0.03
                         ) -> Tuple[np.ndarray, np.ndarray]:
    """Template-voxel coordinates of every output voxel for one random subject, and the output affine.

    The subject is the template scaled by ``1 + scale_std * N(0, 1)`` per axis about the
    centre, plus a smooth displacement of about ``amplitude_mm`` (40 mm control grid).
    """
    shape, affine, to_template = output_grid(template.t1.shape, template.affine, spacing)
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = (to_template[:3, :3] @ grid + to_template[:3, 3:4]).astype(np.float32)
    centre = (np.asarray(template.t1.shape, dtype=np.float32)[:, None] - 1) / 2
    scale = (1.0 + scale_std * rng.standard_normal(3)).astype(np.float32)[:, None]
    coords = centre + (coords - centre) * scale
    mm_per_voxel = np.sqrt((template.affine[:3, :3] ** 2).sum(axis=0)).astype(np.float32)
    disp = smooth_random_field(rng, shape, control_spacing=40.0 / spacing, n_components=3)
    coords += (amplitude_mm / mm_per_voxel)[:, None] * disp.reshape(3, -1)
    return coords.reshape(3, *shape), affine


def nifti(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """NIfTI image with the affine in both qform (code 1, scanner) and sform (code 2, aligned), mm units."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    img.header.set_xyzt_units("mm", "sec")
    img.set_data_dtype(array.dtype)
    return img


def subject_id(subject: int) -> str:
    return f"sub-{subject:03d}"


def check_phantom_size(n_subjects: int, spacing: float) -> None:
    """:class:`InputError` for a phantom of no subject or finer than the template (1 mm)."""
    if n_subjects < 1:
        raise InputError(f"--n-subjects must be >= 1, got {n_subjects}")
    if not spacing >= 1.0:
        raise InputError(f"--spacing must be >= 1 mm (the template resolution), got {spacing}")


def write_phantom(out: Path, sites: Sequence[Any], n_subjects: int, folders: Sequence[str],
                  subject: Callable[[Any, int], Tuple[Sequence[np.ndarray], np.ndarray]],
                  info: Callable[[], Dict[str, Any]], readme: Callable[[Dict[str, Any]], str],
                  overwrite: bool = False) -> None:
    """Write a phantom folder atomically: ``site<k>/<folder>/sub-XXX.nii.gz`` for every site (``.index``),
    subject and folder, with ``subject(site, i) -> (arrays in folder order, affine)``; then ``sites.json``
    (``info()``, called after every subject was made) and ``README.txt`` (``readme(info)``)."""
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            for site in sites:
                for folder in folders:
                    (tmp / f"site{site.index}" / folder).mkdir(parents=True)
                for i in range(n_subjects):
                    arrays, affine = subject(site, i)
                    name = f"{subject_id(i)}.nii.gz"
                    for folder, arr in zip(folders, arrays):
                        nib.save(nifti(arr, affine), str(tmp / f"site{site.index}" / folder / name))
            content = info()
            (tmp / "sites.json").write_text(json.dumps(content, indent=2) + "\n")
            (tmp / "README.txt").write_text(readme(content))
    finally:
        load_template.cache_clear()
