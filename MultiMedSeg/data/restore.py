"""Map slice-space arrays back onto the original NIfTI grid (docs/method.md#inference steps 6-7, with the
docs/differences.md#d9-39 fixes).

``OUT/metadata.json`` written by ``MultiMedSeg/preprocess.py`` (format ``multimedseg-slices``,
version 1)::

    {
      "format": "multimedseg-slices", "version": 1,
      "size": 512,                      # slice side H == W
      "num_classes": 3 | null,          # mask channels incl. background (null: no labels at all)
      "target_spacing": [sx, sy, sz],   # mm, common resampling target (working axes)
      "orientation": "RAS" | "stored",  # working orientation of every volume (absent: stored)
      "intensity": {"min": MIN, "max": MAX, "percentiles": [0.1, 99.9], "standardized": true},
      "layout": {"train": ["train"] | ["train/labeled", "train/unlabeled"], "val": ["val"], "test": ["test"]},
      "splits": {"train": [ids], "val": [ids], "test": [ids]},
      "labeled_train": [ids] | null,    # volumes in train/labeled (--labeled-train)
      "options": {...},                 # every preprocessing option
      "volumes": {
        "<id>": {
          "id": "<id>", "split": "train|val|test", "subset": "labeled|unlabeled" | null,
          "image": "/abs/path.nii.gz", "label": path | null, "weight": path | null,
          "shape": [X, Y, Z],            # original voxel grid (array order as stored)
          "spacing": [sx, sy, sz],       # original zooms (mm, stored order)
          "affine": 4x4 list,            # original affine (also in header)
          "header": {"affine", "qform", "qform_code", "sform", "sform_code", "zooms",
                     "dtype", "xyzt_units": [spatial, temporal]},
          "orientation": {               # absent in files written before orientation support: as stored
            "code": "RAS" | "stored",    # working orientation (--orientation)
            "stored_axcodes": "LPS",     # nibabel axis codes of the stored array
            "transform": [[j, s] x 3],   # stored axis i -> working axis j, reversed if s == -1
            "shape": [X, Y, Z],          # working grid (the stored shape permuted)
            "spacing": [sx, sy, sz]},    # mm along the working axes
          "flip_axis": null | 0 | 1 | 2, # working axis reversed after reorientation
          # everything below is in the working orientation (after reorientation and flip)
          "crop": [[x0, x1], [y0, y1], [z0, z1]],   # [start, stop) per axis
          "shape_after_crop": [X, Y, Z],
          "target_spacing": [sx, sy, sz],           # this volume's (own z with --ignore-z)
          "shape_after_resampling": [X', Y', Z'],
          "depth_before_split": Z',
          "z_split": [first, stop],      # kept slices [first, stop) of the resampled (Z, X, Y) volume
          "z_split_by": "labels" | "brain" | "none",  # what selected them
          "foreground_z": [f0, f1] | null,  # slices of the resampled volume holding its foreground (Otsu,
                                         # largest component; MultiMedSeg.data.field_of_view); absent before
          "shape_before_padding": [Z, X', Y'],     # Z = stop - first = number of slices
          "inplane_window": [[src, dst, n], [src, dst, n]],  # rows, cols: slice[dst:dst+n] = vol[src:src+n]
          "mean", "std": before standardisation, "min", "max": after,
          "slices": ["test/<id>_slice000.npz", ...],  # relative to OUT, index order
          "fingerprint": {"slice": "test/<id>_slice012.npz", "sha256": "<16 hex>"}  # the middle slice's
                                         # data_digest; checked by check_slices_match
        }, ...
      }
    }

Undoing the preprocessing (:func:`restore_volume`): in-plane un-pad / un-crop to
``shape_before_padding`` (centre-cropped borders come back as the fill value), undo the
z-split, transpose (Z, X, Y) -> (X, Y, Z), resample to ``shape_after_crop`` (labels class by
class with linear interpolation thresholded at 0.5, images with a cubic spline), paste at
``crop`` into a volume of the working shape filled with 0 (labels) or -1 (images), undo the flip,
then the reorientation (:mod:`MultiMedSeg.data.orientation`): the result has the stored ``shape``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import nibabel as nib
import numpy as np

from robustmedseg.data.slices import data_digest, load_slice
from robustmedseg.errors import InputError, warn
from robustmedseg.io import atomic_path

from . import orientation as orient
from .volumes_to_slices import METADATA_FORMAT, METADATA_NAME, METADATA_VERSION
from .resample import resize_image, resize_labels, resize_linear

PathLike = Union[str, os.PathLike]
VOLUME_KEYS = ("id", "shape", "affine", "header", "crop", "shape_after_crop", "shape_before_padding",
               "z_split", "depth_before_split", "inplane_window")


def load_metadata(path: PathLike) -> dict:
    """Read ``metadata.json`` (or ``<folder>/metadata.json``) and check its format and keys."""
    path = Path(path)
    if path.is_dir():
        path = path / METADATA_NAME
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError("metadata file does not exist", path) from None
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read metadata JSON: {err}", path) from None
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise InputError(f"not a {METADATA_FORMAT} metadata file", path)
    if meta.get("version") != METADATA_VERSION:
        raise InputError(f"unsupported metadata version {meta.get('version')!r} (expected {METADATA_VERSION})", path)
    for vid, vol in meta.get("volumes", {}).items():
        missing = [k for k in VOLUME_KEYS if k not in vol]
        if missing:
            raise InputError(f"volume {vid!r} lacks metadata keys {missing}", path)
    return meta


def _unfit_slices(slices: np.ndarray, meta: dict, fill) -> np.ndarray:
    """(Z, size, size) -> (Z, X', Y') inverting the in-plane pad / centre-crop."""
    depth, rows, cols = meta["shape_before_padding"]
    (rs, rd, rn), (cs, cd, cn) = meta["inplane_window"]
    out = np.full((depth, rows, cols), fill, dtype=slices.dtype)
    out[:, rs:rs + rn, cs:cs + cn] = slices[:, rd:rd + rn, cd:cd + cn]
    return out


def restore_volume(slices: np.ndarray, volume_meta: dict, kind: str = "label", fill: Optional[float] = None
                   ) -> np.ndarray:
    """Map a slice-space volume back to the original grid of the volume described by ``volume_meta``.

    ``slices``: (Z, size, size), Z = number of slices of the volume (``shape_before_padding[0]``),
    an integer label map (``kind='label'``), an image (``kind='image'``, e.g. in [-1, 1]) or one
    class's probabilities (``kind='probability'``, resampled linearly).
    Returns an array of the original ``shape`` (X, Y, Z) in the stored axis order: labels keep the
    integer dtype (0 outside the crop/kept slices), images and probabilities are float32 (-1,
    respectively ``fill``, default 0, outside).
    """
    if kind not in ("label", "image", "probability"):
        raise ValueError(f"kind must be 'label', 'image' or 'probability', got {kind!r}")
    slices = np.asarray(slices)
    depth = volume_meta["shape_before_padding"][0]
    if slices.ndim != 3 or slices.shape[0] != depth:
        raise InputError(f"volume {volume_meta['id']!r}: expected ({depth}, H, W) slices, got {slices.shape}")
    if kind == "label":
        if not np.issubdtype(slices.dtype, np.integer) and slices.dtype != np.bool_:
            raise ValueError(f"label slices must be integers, got {slices.dtype}")
        slices = slices.astype(np.uint8 if slices.max(initial=0) < 256 else np.int16)
        fill = 0
    else:
        slices = slices.astype(np.float32)
        fill = -1.0 if kind == "image" else float(fill or 0.0)
    vol = _unfit_slices(slices, volume_meta, fill)
    first, stop = volume_meta["z_split"]
    full = np.full((volume_meta["depth_before_split"], *vol.shape[1:]), fill, dtype=vol.dtype)
    full[first:stop] = vol
    xyz = np.ascontiguousarray(np.transpose(full, (1, 2, 0)))
    cropped_shape = tuple(volume_meta["shape_after_crop"])
    resize = {"label": resize_labels, "image": resize_image, "probability": resize_linear}[kind]
    xyz = resize(xyz, cropped_shape)
    orientation = volume_meta.get("orientation") or {}
    out = np.full(tuple(orientation.get("shape", volume_meta["shape"])), fill, dtype=xyz.dtype)
    out[tuple(slice(a, b) for a, b in volume_meta["crop"])] = xyz
    if volume_meta.get("flip_axis") is not None:
        out = np.ascontiguousarray(np.flip(out, axis=volume_meta["flip_axis"]))
    if orientation:
        out = orient.undo(out, orientation["transform"])
    return out


def _output_dtype(array: np.ndarray) -> np.dtype:
    """uint8/int16 for labels and masks, float32 for anything floating (no quantisation, FIX
    docs/differences.md#d9-39)."""
    if array.dtype == np.bool_:
        return np.dtype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        return np.dtype(np.float32)
    if array.size and array.min() >= 0 and array.max() < 256:
        return np.dtype(np.uint8)
    return np.dtype(np.int16) if array.size == 0 or np.abs(array).max() < 2**15 else np.dtype(np.int32)


def write_nifti_like(array: np.ndarray, volume_meta: dict, path: PathLike) -> Path:
    """Write ``array`` (original grid, optionally with a 4th axis of channels, e.g. class
    probabilities) as NIfTI with the original affine, q/sform codes, zooms and units, atomically.
    Data type: uint8/int16 for labels, float32 for floats."""
    array = np.asarray(array)
    shape = tuple(volume_meta["shape"])
    if array.shape[:3] != shape or array.ndim > 4:
        raise ValueError(f"array shape {array.shape} differs from the original shape {shape}")
    dtype = _output_dtype(array)
    header_meta = volume_meta["header"]
    affine = np.asarray(volume_meta["affine"], dtype=np.float64)
    img = nib.Nifti1Image(array.astype(dtype), affine)
    if header_meta.get("qform") is not None:
        img.set_qform(np.asarray(header_meta["qform"]), code=int(header_meta["qform_code"]))
    else:
        img.set_qform(affine, code=0)
    if header_meta.get("sform") is not None:
        img.set_sform(np.asarray(header_meta["sform"]), code=int(header_meta["sform_code"]))
    else:
        img.set_sform(affine, code=0)
    zooms = header_meta.get("zooms")
    if zooms:
        img.header.set_zooms(tuple(zooms[:3]) + (1.0,) * (array.ndim - 3))
    spatial, temporal = header_meta.get("xyzt_units", ["unknown", "unknown"])
    img.header.set_xyzt_units(spatial, temporal)
    img.set_data_dtype(dtype)
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix or ".nii.gz"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, str(tmp))
    return path


def volume_meta(meta: dict, vid: str, source: Optional[PathLike] = None) -> dict:
    """The metadata entry of volume ``vid``; :class:`InputError` when unknown."""
    try:
        return meta["volumes"][vid]
    except KeyError:
        raise InputError(f"volume {vid!r} is not in the metadata", source) from None


def restored_shape(volume_meta: dict) -> tuple:
    """The stored-order shape :func:`restore_volume` gives for this metadata entry (no work done): the
    working grid of the orientation record brought back to the stored axis order."""
    orientation = volume_meta.get("orientation") or {}
    working = [int(v) for v in orientation.get("shape", volume_meta["shape"])]
    if not orientation:
        return tuple(working)
    back = [0, 0, 0]
    for axis, (target, _) in enumerate(np.asarray(orientation["transform"], dtype=int)):
        back[axis] = working[target]
    return tuple(back)


def check_geometry(volume_meta: dict, vid: str, source: Optional[PathLike] = None) -> None:
    """Refuse a metadata entry whose geometry records disagree (an edited or damaged ``metadata.json``):
    the grid the slices restore to (orientation record, crop, kept slices) must be the recorded ``shape``.
    One-line :class:`InputError` naming ``source``, the volume and both shapes, before any work."""
    shape = tuple(int(v) for v in volume_meta["shape"])
    try:
        back = restored_shape(volume_meta)
        working = tuple(int(v) for v in (volume_meta.get("orientation") or {}).get("shape", shape))
        crop = [(int(a), int(b)) for a, b in volume_meta["crop"]]
        after_crop = tuple(int(v) for v in volume_meta["shape_after_crop"])
        first, stop = (int(v) for v in volume_meta["z_split"])
        depth = int(volume_meta["shape_before_padding"][0])
    except (TypeError, ValueError, KeyError, IndexError) as err:
        raise InputError(f"volume {vid!r}: unreadable geometry record in the metadata ({err})", source) from None
    if back != shape:
        raise InputError(f"volume {vid!r}: the metadata names shape {shape} but its slices restore to shape {back} "
                         "(orientation record): an edited or damaged metadata file?", source)
    if len(crop) != 3 or any(not 0 <= a < b <= n for (a, b), n in zip(crop, working)):
        raise InputError(f"volume {vid!r}: crop {crop} does not fit the volume's grid {working} (shape {shape}): "
                         "an edited or damaged metadata file?", source)
    cropped = tuple(b - a for a, b in crop)
    if cropped != after_crop:
        raise InputError(f"volume {vid!r}: crop {crop} gives shape {cropped} but the metadata says "
                         f"shape_after_crop {after_crop}: an edited or damaged metadata file?", source)
    if not 0 <= first < stop <= int(volume_meta["depth_before_split"]) or stop - first != depth:
        raise InputError(f"volume {vid!r}: kept slices {[first, stop]} disagree with the {depth} slice(s) and depth "
                         f"{volume_meta['depth_before_split']} the metadata records: an edited or damaged metadata "
                         "file?", source)


def check_slices_match(meta: dict, volumes: Mapping[str, Sequence[Path]], source: Optional[PathLike] = None) -> None:
    """Refuse metadata that does not describe these slices (``{volume id: slice paths in index order}``).

    Per volume: known to the metadata; the same slice file names as recorded (hence the same
    count); slices of the metadata's ``size``; and, when the metadata has one (written since the
    fingerprints exist), the fingerprint of the recorded slice equals
    :func:`robustmedseg.data.slices.data_digest` of that file.  Another site's or another
    preprocessing run's metadata fails one of these: a one-line :class:`InputError` naming
    ``source`` (the metadata file).  Metadata without fingerprints gets a ``warning:``.  The geometry of
    each entry is checked too (:func:`check_geometry`).
    """
    unchecked = []
    for vid, paths in volumes.items():
        vmeta = volume_meta(meta, vid, source)
        recorded = [Path(name).name for name in vmeta.get("slices", [])]
        names = [Path(p).name for p in paths]
        if recorded and names != recorded:
            raise InputError(f"volume {vid!r} has {len(names)} slice file(s) in {Path(paths[0]).parent} but the "
                             f"metadata lists {len(recorded)} other(s) ({recorded[0]} ...): these slices are not "
                             "the ones this metadata describes", source)
        depth = vmeta["shape_before_padding"][0]
        if len(names) != depth:
            raise InputError(f"volume {vid!r} has {len(names)} slice file(s), the metadata {depth}", source)
        by_name = {Path(p).name: Path(p) for p in paths}
        fingerprint = vmeta.get("fingerprint")
        if not fingerprint:
            unchecked.append(vid)
            probe = Path(paths[len(paths) // 2])
        else:
            probe = by_name.get(Path(fingerprint["slice"]).name)
            if probe is None:
                raise InputError(f"volume {vid!r}: its fingerprint slice {fingerprint['slice']} is missing", source)
        data = load_slice(probe)["data"]
        if "size" in meta and data.shape[0] != meta["size"]:
            raise InputError(f"slices of volume {vid!r} are {data.shape[0]} px but the metadata says {meta['size']} "
                             f"px ({probe})", source)
        if fingerprint and data_digest(data) != fingerprint["sha256"]:
            raise InputError(f"volume {vid!r}: {probe} is not the slice this metadata was written with "
                             "(fingerprint differs): metadata of another site or another preprocessing run?",
                             source)
        check_geometry(vmeta, vid, source)
    if unchecked:
        warn(f"no slice fingerprints in this metadata (written by an older version): {len(unchecked)} volume(s) "
             "checked by names and sizes only", source)
