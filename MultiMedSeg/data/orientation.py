"""Canonical orientation of volumes: the one place where axis order and direction are decided.

A volume's voxel array is stored in whatever axis order the scanner or the conversion tool chose
(axial, sagittal or coronal acquisitions, flipped axes); its affine says where each axis points in
the world.  Preprocessing reorients every volume to one orientation named by three
nibabel axis codes (default ``RAS``: the array's axes then point to the patient's Right, Anterior
and Superior) before anything else, so that a slice -- a plane of the third axis -- is the same
anatomical plane for every volume:

* third letter ``S``/``I``: axial slices (default), ``A``/``P``: coronal, ``R``/``L``: sagittal.

Only axis permutations and reversals are applied (nibabel ``io_orientation``: each array axis is
matched to the world axis it is closest to), so no voxel is interpolated and the step is undone
exactly (:func:`undo`).  The value :data:`STORED` keeps the array order as stored, the original
code's behaviour.

A *transform* is nibabel's orientation array: ``transform[i] = (j, s)`` sends stored axis ``i``
to working axis ``j``, reversed when ``s == -1``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from nibabel import orientations as ornt

from robustmedseg.errors import InputError

STORED = "stored"
DEFAULT = "RAS"
_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})


def check_code(code: str) -> str:
    """Return ``code`` (upper case) if it is :data:`STORED` or three axis letters, one of each pair
    L/R, A/P, S/I; :class:`InputError` otherwise."""
    if code == STORED:
        return code
    letters = str(code).upper()
    if len(letters) == 3 and all(sum(c in pair for c in letters) == 1 for pair in _PAIRS):
        return letters
    raise InputError(f"--orientation must be '{STORED}' or three axis letters with one of each pair L/R, A/P, "
                     f"S/I (e.g. RAS, LPS), got {code!r}")


def identity() -> np.ndarray:
    return np.array([[0, 1], [1, 1], [2, 1]], dtype=int)


def transform_for(affine: np.ndarray, code: str, path: Optional[object] = None) -> np.ndarray:
    """The transform that brings an array with this ``affine`` to orientation ``code``
    (the identity for :data:`STORED`)."""
    code = check_code(code)
    if code == STORED:
        return identity()
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"the affine cannot be oriented (singular or not finite); pass --orientation {STORED} "
                         "to use the array order as stored", path)
    current = ornt.io_orientation(affine)
    return ornt.ornt_transform(current, ornt.axcodes2ornt(code)).astype(int)


def inverse(transform: Sequence[Sequence[int]]) -> np.ndarray:
    """The transform that undoes ``transform``."""
    t = np.asarray(transform, dtype=int)
    out = np.zeros_like(t)
    for axis, (target, sign) in enumerate(t):
        out[target] = (axis, sign)
    return out


def apply(array: np.ndarray, transform: Sequence[Sequence[int]]) -> np.ndarray:
    """Reorient the first three axes of ``array`` (extra trailing axes follow along)."""
    t = np.asarray(transform, dtype=int)
    if np.array_equal(t, identity()):
        return array
    return np.ascontiguousarray(ornt.apply_orientation(array, t))


def undo(array: np.ndarray, transform: Sequence[Sequence[int]]) -> np.ndarray:
    """Bring a working-orientation array back to the stored axis order."""
    return apply(array, inverse(transform))


def permute(values: Sequence, transform: Sequence[Sequence[int]]) -> list:
    """Per-axis values (shape, spacing) in stored order -> in working order."""
    out = [None] * 3
    for axis, (target, _) in enumerate(np.asarray(transform, dtype=int)):
        out[target] = values[axis]
    return out


def axcodes(affine: np.ndarray) -> str:
    """Axis codes of a stored array (e.g. ``LPS``); ``?`` for an axis the affine does not orient."""
    try:
        return "".join(c if c is not None else "?" for c in ornt.aff2axcodes(np.asarray(affine, dtype=np.float64)))
    except Exception:  # noqa: BLE001 - a degenerate affine has no codes
        return "???"


def describe(code: str, affine: np.ndarray, transform: np.ndarray, shape: Sequence[int],
             spacing: Sequence[float]) -> dict:
    """The ``orientation`` entry of a volume's metadata (see :mod:`MultiMedSeg.data.restore`)."""
    return {
        "code": check_code(code),
        "stored_axcodes": axcodes(affine),
        "transform": np.asarray(transform, dtype=int).tolist(),
        "shape": [int(n) for n in permute(list(shape), transform)],
        "spacing": [float(s) for s in permute(list(spacing), transform)],
    }


#: degrees between a scan's voxel axes and the nearest world axes beyond which predict warns
OBLIQUE_TOLERANCE_DEG = 5.0


def obliquity(affine: np.ndarray) -> float:
    """The largest angle, in degrees, between a voxel axis of ``affine`` (its direction cosines: the
    columns of the 3x3 part, normalised) and the world axis nearest to it; 0 for a canonical grid
    (any permutation or reversal of the axes), nan for a degenerate affine."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(linear, axis=0)
    if not np.all(np.isfinite(linear)) or np.any(norms < 1e-12):
        return float("nan")
    cosines = np.clip(np.abs(linear / norms).max(axis=0), 0.0, 1.0)
    return float(np.degrees(np.arccos(cosines)).max())


def oblique_warning(affine: np.ndarray, tolerance: float = OBLIQUE_TOLERANCE_DEG) -> Optional[str]:
    """A one-line warning when the scan's axes are more than ``tolerance`` degrees oblique to the nearest
    canonical axes: reorientation only permutes and reverses axes (no interpolation), so its slices
    are then tilted planes, not the anatomical planes the model was trained on."""
    angle = obliquity(affine)
    if not angle > tolerance:
        return None
    return (f"the scan's axes are oblique by {angle:.1f} degrees to the nearest canonical axes (more than "
            f"{tolerance:g}): its slices are tilted planes, not the anatomical planes the model was trained on; "
            "the segmentation may be poor (resample the scan onto a canonical grid first)")
