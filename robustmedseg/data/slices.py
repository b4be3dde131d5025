"""Per-slice files: the input of every phase-1 and phase-2 script (the one definition of the format).

Phase 1 (``prepare_data.py``, :mod:`robustmedseg.data.lmdb_store`) and phase 2
(``MultiMedSeg/``) both list, name and read slices through this module, so they agree on what a
slice file is and in which order slices come (:func:`list_slices`).

Format (replaces the reference's pickled ``.npy`` dicts, docs/method.md#slice-format):

* name ``<volume>_slice<NNN>.npz``: ``<volume>`` is the NIfTI basename without ``.nii.gz`` /
  ``.nii``; ``NNN`` is the 0-based slice index after the z-split, zero-padded to at least 3
  digits.  Readers must not assume contiguous numbering (use :func:`slice_index`).
* content: an uncompressed ``np.savez`` archive, readable with ``np.load(path,
  allow_pickle=False)``, holding

  ========  =======  ===========  ====================================================
  key       dtype    shape        values
  ========  =======  ===========  ====================================================
  data      float32  (H, W, 1)    in [-1, 1]; padding is -1
  mask      bool     (H, W, C)    one-hot: exactly one True per pixel; channel 0 is
                                  background.  Absent for volumes without a label file
  weight    bool     (H, W, 1)    True where losses and metrics count.  Absent when the
                                  weight map is all ones
  ========  =======  ===========  ====================================================

  H == W == the preprocessing ``--size``.  ``data`` holds no NaN or inf and no value outside
  [-1, 1]; no array is empty.

Hidden files and folders (names starting with '.', e.g. the temporaries of
:mod:`robustmedseg.io`) are never slices: :func:`list_slices` skips them.

:func:`load_slice` validates all of this and raises :class:`~robustmedseg.errors.InputError`
naming the file when anything is wrong.  :func:`convert_legacy_folder` converts the
reference's pickled ``.npy`` slices (it unpickles: only for files you trust).
"""
from __future__ import annotations

import os
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from robustmedseg.errors import InputError
from robustmedseg.io import atomic_dir, atomic_path, check_apart, is_hidden

PathLike = Union[str, os.PathLike]

SLICE_SUFFIX = ".npz"
SLICE_RE = re.compile(r"^(?P<volume>.+)_slice(?P<index>\d+)\.npz$")
LEGACY_SLICE_RE = re.compile(r"^(?P<volume>.+)_slice(?P<index>\d+)\.npy$")
SLICE_KEYS = ("data", "mask", "weight")


def slice_name(volume: str, index: int) -> str:
    """File name of slice ``index`` of ``volume``: ``<volume>_slice<NNN>.npz``."""
    if index < 0:
        raise ValueError(f"slice index must be >= 0, got {index}")
    return f"{volume}_slice{index:03d}{SLICE_SUFFIX}"


def _match(path: PathLike) -> re.Match:
    name = Path(path).name
    match = SLICE_RE.match(name)
    if match is None:
        raise InputError("not a slice file name (expected <volume>_slice<NNN>.npz)", path)
    return match


def volume_id(slice_path: PathLike) -> str:
    """The ``<volume>`` part of ``<volume>_slice<NNN>.npz`` (the last ``_slice<digits>`` splits)."""
    return _match(slice_path).group("volume")


def slice_index(slice_path: PathLike) -> int:
    """The integer ``NNN`` of ``<volume>_slice<NNN>.npz``."""
    return int(_match(slice_path).group("index"))


def list_slices(folder: PathLike, recursive: bool = False) -> List[Path]:
    """Slice files in ``folder`` (optionally its subfolders), sorted by (volume, index, path).

    Every ``*.npz`` file found must be named ``<volume>_slice<NNN>.npz``; another name is an
    :class:`InputError` naming it (a renamed or stray file is a mistake, not something to skip).
    Hidden files and folders (a name starting with '.': temporaries) are skipped.
    An empty list is returned when there is no ``.npz`` file: callers word that error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            raise InputError("is a file; a slice folder is expected here", folder)
        raise InputError("slice folder does not exist", folder)
    pattern = "**/*" + SLICE_SUFFIX if recursive else "*" + SLICE_SUFFIX
    paths = [p for p in folder.glob(pattern) if p.is_file() and not is_hidden(p, folder)]
    for p in paths:
        _match(p)
    return sorted(paths, key=lambda p: (volume_id(p), slice_index(p), str(p)))


def group_slices_by_volume(folder: PathLike, recursive: bool = False) -> "OrderedDict[str, List[Path]]":
    """``{volume id: [slice paths sorted by slice index]}``, volumes in sorted order.

    Raises :class:`InputError` if two files of one volume carry the same index (possible
    with ``recursive`` when a volume appears in two subfolders).
    """
    groups: "OrderedDict[str, List[Path]]" = OrderedDict()
    for path in list_slices(folder, recursive):
        groups.setdefault(volume_id(path), []).append(path)
    for vol, paths in groups.items():
        indices = [slice_index(p) for p in paths]
        if len(set(indices)) != len(indices):
            raise InputError(f"volume {vol!r} has several slice files with the same index", folder)
    return groups


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Integer label map (...) -> bool one-hot (..., n_classes), the layout of a slice's ``mask``."""
    return labels[..., None] == np.arange(n_classes, dtype=labels.dtype)


def validate_slice(arrays: Dict[str, np.ndarray], path: PathLike, require_mask: bool = False) -> None:
    """Check keys, dtypes, shapes and one-hotness of a slice dict; :class:`InputError` naming ``path``."""
    unknown = set(arrays) - set(SLICE_KEYS)
    if unknown:
        raise InputError(f"unexpected keys {sorted(unknown)} in slice file", path)
    if "data" not in arrays:
        raise InputError("slice file has no 'data' array", path)
    data = arrays["data"]
    if data.dtype != np.float32 or data.ndim != 3 or data.shape[2] != 1:
        raise InputError(f"'data' must be float32 (H, W, 1), got {data.dtype} {data.shape}", path)
    if data.size == 0:
        raise InputError(f"'data' is empty (shape {data.shape})", path)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise InputError(f"'data' has {bad} non-finite value(s) (NaN or inf); slices must hold values in [-1, 1]",
                         path)
    low, high = float(data.min()), float(data.max())
    if low < -1.0 or high > 1.0:
        raise InputError(f"'data' values must lie in [-1, 1], found [{low:.6g}, {high:.6g}]", path)
    height, width = data.shape[:2]
    mask = arrays.get("mask")
    if mask is None and require_mask:
        raise InputError("slice file has no 'mask' array (unlabeled volume?)", path)
    if mask is not None:
        if mask.dtype != np.bool_ or mask.ndim != 3 or mask.shape[:2] != (height, width) or mask.shape[2] < 2:
            raise InputError(f"'mask' must be bool (H, W, C>=2) matching 'data' {data.shape}, "
                             f"got {mask.dtype} {mask.shape}", path)
        if not np.all(mask.sum(axis=2) == 1):
            raise InputError("'mask' is not one-hot (each pixel needs exactly one True channel)", path)
    weight = arrays.get("weight")
    if weight is not None and (weight.dtype != np.bool_ or weight.shape != (height, width, 1)):
        raise InputError(f"'weight' must be bool (H, W, 1), got {weight.dtype} {weight.shape}", path)


def load_slice(path: PathLike, require_mask: bool = False) -> Dict[str, Optional[np.ndarray]]:
    """Read and validate one slice file.

    Returns ``{"data": float32 (H,W,1), "mask": bool (H,W,C) or None, "weight": bool (H,W,1)
    or None}``.  Never unpickles.  Raises :class:`InputError` naming the file when it is
    missing, corrupt or truncated, lacks a key, has a wrong dtype/shape, or when the
    mask is not one-hot (or is absent while ``require_mask``).
    """
    path = Path(path)
    if path.is_dir():
        raise InputError("is a folder; a slice file is expected here", path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # .npy bytes under a .npz name
            raise ValueError(f"a single {type(loaded).__name__}, not an .npz archive")
        with loaded as archive:
            arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise InputError("slice file does not exist", path) from None
    except PermissionError as err:
        raise InputError(f"cannot read slice file: {err.strerror}", path) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise InputError(f"cannot read slice file (corrupt, truncated or not an .npz archive): {err}",
                         path) from None
    validate_slice(arrays, path, require_mask=require_mask)
    return {"data": arrays["data"], "mask": arrays.get("mask"), "weight": arrays.get("weight")}


def data_digest(data: np.ndarray) -> str:
    """Fingerprint of a slice image: sha256 of its float32 little-endian bytes (first 16 hex digits).

    Preprocessing records it for one slice per volume (``metadata.json``); inference recomputes it
    to make sure the metadata describes these very slices (another site's metadata is refused).
    """
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(data, dtype="<f4").tobytes()).hexdigest()[:16]


def save_slice(path: PathLike, data: np.ndarray, mask: Optional[np.ndarray] = None,
               weight: Optional[np.ndarray] = None) -> Path:
    """Validate and write one slice file atomically (``np.savez``, no pickle); return its path.

    ``data`` float32 (H,W,1) (a float (H,W) array is accepted and given a channel axis),
    ``mask`` bool one-hot (H,W,C) or None, ``weight`` bool (H,W,1) or None.  A weight that is
    all True is not stored.
    """
    path = Path(path)
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[:, :, None]
    arrays: Dict[str, np.ndarray] = {"data": data.astype(np.float32, copy=False)}
    if mask is not None:
        arrays["mask"] = np.asarray(mask)
    if weight is not None:
        weight = np.asarray(weight)
        if weight.ndim == 2:
            weight = weight[:, :, None]
        if not weight.all():
            arrays["weight"] = weight
    try:
        validate_slice(arrays, path)
    except InputError as err:  # a bug of the caller, not bad user input
        raise ValueError(str(err)) from None
    with atomic_path(path, suffix=SLICE_SUFFIX) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    return path


def convert_legacy_slice(src: PathLike, dst_folder: PathLike) -> Path:
    """Convert one reference ``<vol>_slice<NNN>.npy`` pickled dict into the ``.npz`` format.

    WARNING: this unpickles ``src`` (``allow_pickle=True``); run it only on files you trust.
    Uses the keys ``data`` and ``mask`` (bool one-hot), and ``weight`` when it is not None.
    """
    src = Path(src)
    match = LEGACY_SLICE_RE.match(src.name)
    if match is None:
        raise InputError("not a legacy slice file name (expected <volume>_slice<NNN>.npy)", src)
    try:
        obj = np.load(src, allow_pickle=True).item()  # trusted legacy data only, see docstring
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise InputError(f"cannot read legacy slice: {err}", src) from None
    if not isinstance(obj, dict) or "data" not in obj:
        raise InputError("legacy slice is not a dict with a 'data' key", src)
    data = np.asarray(obj["data"], dtype=np.float32)
    mask = obj.get("mask")
    mask = None if mask is None else np.asarray(mask).astype(bool)
    weight = obj.get("weight")
    weight = None if weight is None else np.asarray(weight).astype(bool)
    arrays = {"data": data if data.ndim == 3 else data[:, :, None]}
    if mask is not None:
        arrays["mask"] = mask
    if weight is not None and not weight.all():
        arrays["weight"] = weight
    validate_slice(arrays, src)
    dst = Path(dst_folder) / slice_name(match.group("volume"), int(match.group("index")))
    return save_slice(dst, arrays["data"], arrays.get("mask"), arrays.get("weight"))


def convert_legacy_folder(src: PathLike, dst: PathLike, overwrite: bool = False) -> int:
    """Convert every legacy ``*_slice<NNN>.npy`` under ``src`` (recursively, keeping subfolders)
    into ``.npz`` slices under ``dst`` (written atomically).  Returns the number converted.

    WARNING: unpickles the source files; only for data you trust.
    """
    src = Path(src)
    check_apart({"DST": dst}, {"SRC": src})
    files = sorted(p for p in src.rglob("*.npy") if LEGACY_SLICE_RE.match(p.name) and not is_hidden(p, src)) \
        if src.is_dir() else []
    if not files:
        raise InputError("no legacy <volume>_slice<NNN>.npy files found", src)
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        for path in files:
            convert_legacy_slice(path, tmp / path.parent.relative_to(src))
    return len(files)
