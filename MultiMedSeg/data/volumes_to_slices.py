"""NIfTI volumes -> normalised 2-D slice files (docs/method.md#preprocessing, with the docs/differences.md fixes).

Inputs per volume: the image, and optionally a label map (integer classes, 0 = background), a
weight map (> 0 where losses and metrics count) and a brain mask (> 0 inside the brain), each
found with ``label_rule`` in its own folder.  A volume without a label file is *unlabeled*: its
slices carry no mask (``missing_labels='none'``, default); with ``missing_labels='empty'`` (the
original's not-required annotation mode) a training volume without a label file gets an all-zero label
volume instead (brain masks and the z-split apply as to any volume without labels); validation and test
volumes are drawn from the annotated ones.

Pipeline (:func:`preprocess`), per volume unless noted:

1. discovery: ``.nii``/``.nii.gz`` files under ``images`` (recursive, sorted), basename
   matching ``path_rule`` from its start; label, weight and brain-mask files are found with
   ``label_rule`` (:func:`find_companion`); with ``annotation_required`` the unlabeled volumes
   are left out altogether (the original's "annotation required" dataset mode);
2. split (:func:`split_volumes`): seeded val/test draws from the labeled volumes;
3. reorientation to ``orientation`` (default ``RAS``, :mod:`MultiMedSeg.data.orientation`: axis
   permutations and reversals only, so that every volume is sliced along the same anatomical axis;
   ``stored`` keeps the array order as stored, as the original), optional flip of one axis, then
   the heuristic crop (:func:`heuristic_crop`, integer histogram
   counts as the original, FIX docs/differences.md#d9-17: the end bin is searched in the reversed histogram),
   widened to contain every labeled voxel so that no annotation is ever cropped away;
4. target spacing from train+val (:func:`compute_target_spacing`); resampling: images
   with a cubic spline (skimage ``resize`` order 3, mode edge, no anti-aliasing), labels,
   weights and brain masks class by class with linear interpolation thresholded at 0.5 (the
   mask rule of :mod:`MultiMedSeg.data.resample`, batchgenerators 0.24
   ``resize_segmentation(order=1)``); ``ignore_z`` keeps the z spacing without mutating shared
   state (FIX docs/differences.md#d9-18);
5. transpose (X, Y, Z) -> (Z, X, Y): a slice is an (X, Y) plane of the 3rd working axis (an axial
   plane with the default ``RAS``; the 3rd stored axis with ``orientation='stored'``);
6. z-split (:func:`split_region`; the z-extent of the volume's foreground before it is recorded as
   ``foreground_z``, :mod:`MultiMedSeg.data.field_of_view`): every volume with a non-empty brain mask, labeled or not, keeps
   the slices from its first to its last brain slice *inclusive* (FIX docs/differences.md#d9-19), as the original's
   default ``discard_extracerebral_slices`` (off with ``discard_extracerebral=False``); a volume
   without a brain mask keeps all slices, or with ``discard_outside_labels`` its labeled slices;
7. with brain masks and ``brain_class`` (default) the mask layout is the original's [background,
   brain, label 1, label 2, ...]: label k becomes class k + 1, brain voxels without a label class 1
   (:func:`with_brain_class`); without ``brain_class`` the brain mask only selects slices;
8. optional standardisation (x - mean) / (std + 1e-8) over the kept volume (statistics and
   arithmetic in float64, so that no intensity range overflows float32);
9. intensity window: percentiles (default 0.1 / 99.9) of the train+val histogram
   (256 bins), each read as the upper edge of the bin where the cumulative count reaches it
   (as the original);
10. per slice: clip to the window, scale to [-1, 1], pad with -1 (mask: background,
    weight: 1 if the slice's weight is all ones else 0) or centre-crop to ``size``,
    one-hot masks, write ``<volume>_slice<NNN>.npz`` (:mod:`robustmedseg.data.slices`).

Bad values (one rule each, see docs/bad-input.md): image voxels that are NaN or +-inf are
repaired -- set to the volume's smallest finite value (background) with a ``warning:`` line
counting them; an image without any finite voxel, and label, weight or brain-mask volumes with
a NaN or inf voxel, are refused; an empty volume (a dimension of length 0) is refused.  No NaN
is ever written (the slice format refuses it).

Everything is written into a temporary folder that becomes ``out`` only when complete;
``out/metadata.json`` (schema in :mod:`MultiMedSeg.data.restore`) records what is needed
to map predictions back onto the original NIfTI grid, and per volume a ``fingerprint`` of
its slices that inference checks (:func:`robustmedseg.data.slices.data_digest`).  The per-volume
steps (:func:`inspect_volume`, :func:`process_volume`, :func:`volume_entry`) also preprocess a
single new scan from a run's plan (:mod:`MultiMedSeg.data.preprocessing_plan`).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np

from robustmedseg.data.slices import data_digest, one_hot, save_slice, slice_name
from robustmedseg.errors import InputError, warn
from robustmedseg.io import atomic_dir, check_apart, check_new_output

from . import orientation as orient
from .field_of_view import foreground_extent
from .resample import resize_image, resize_labels  # noqa: F401  (re-exported)

METADATA_NAME = "metadata.json"
METADATA_FORMAT = "multimedseg-slices"
METADATA_VERSION = 1
SPLITS = ("train", "val", "test")
RULE_FIELDS = {"name", "id", "ext"}
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
MAX_SLICE_SIZE = 4096  # the generator stops at 1024 px; larger slices can only be a typo
MAX_CLASSES = 256


# --------------------------------------------------------------------------- configuration


#: ``--missing-labels``: a training volume without a label file has no mask ('none') or all-zero labels ('empty')
MISSING_LABELS = ("none", "empty")


@dataclass
class PreprocessConfig:
    """All options of :func:`preprocess` (the CLI flags of ``MultiMedSeg/preprocess.py``)."""

    images: Path
    out: Path
    labels: Optional[Path] = None
    weights: Optional[Path] = None
    brain_masks: Optional[Path] = None
    label_rule: str = "{name}"
    path_rule: str = ""
    size: int = 512
    val_frac: float = 0.15
    test_frac: float = 0.15
    seed: int = 0
    labeled_train: Optional[int] = None
    target_spacing: Optional[Tuple[float, float, float]] = None
    crop: bool = True
    ignore_z: bool = False
    standardize: bool = True
    num_classes: Optional[int] = None
    discard_outside_labels: bool = False
    discard_extracerebral: bool = True
    brain_class: bool = True
    annotation_required: bool = False
    missing_labels: str = "none"
    flip_axis: Optional[int] = None
    orientation: str = orient.DEFAULT
    percentiles: Tuple[float, float] = (0.1, 99.9)
    overwrite: bool = False

    def check(self) -> None:
        """Raise :class:`InputError` for inconsistent options (before any work)."""
        if not 4 <= self.size <= MAX_SLICE_SIZE:
            raise InputError(f"--size must be in [4, {MAX_SLICE_SIZE}], got {self.size}")
        for name in ("val_frac", "test_frac"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise InputError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        if self.val_frac + self.test_frac >= 1.0:
            raise InputError("--val-frac + --test-frac must be < 1")
        if self.labeled_train is not None and (self.labeled_train < 0 or self.labels is None):
            raise InputError("--labeled-train needs --labels and a count >= 0")
        if self.num_classes is not None and not 2 <= self.num_classes <= MAX_CLASSES:
            raise InputError(f"--label-nc counts the background and must be in [2, {MAX_CLASSES}], "
                             f"got {self.num_classes}")
        if self.target_spacing is not None and (len(self.target_spacing) != 3 or not all(
                math.isfinite(v) and v > 0 for v in self.target_spacing)):
            raise InputError(f"--target-spacing needs 3 positive numbers, got {self.target_spacing}")
        if self.flip_axis not in (None, 0, 1, 2):
            raise InputError(f"--flip-axis must be 0, 1 or 2, got {self.flip_axis}")
        self.orientation = orient.check_code(self.orientation)
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise InputError(f"--percentiles must satisfy 0 <= LOW < HIGH <= 100, got {low} {high}")
        check_rule(self.label_rule)
        try:
            re.compile(self.path_rule)
        except re.error as err:
            raise InputError(f"--path-rule is not a valid regular expression: {err}") from None
        if self.discard_outside_labels and self.labels is None:
            raise InputError("--discard-outside-labels needs --labels")
        if self.annotation_required and self.labels is None:
            raise InputError("--annotation-required needs --labels")
        if self.missing_labels not in MISSING_LABELS:
            raise InputError(f"--missing-labels must be one of {', '.join(MISSING_LABELS)}, got {self.missing_labels!r}")
        if self.missing_labels == "empty":
            if self.annotation_required:
                raise InputError("--missing-labels empty keeps the volumes without a label file, "
                                 "--annotation-required leaves them out: give one of them")
            if self.labels is None:
                raise InputError("--missing-labels empty needs --labels")
            if self.labeled_train is not None:
                raise InputError("--missing-labels empty cannot be combined with --labeled-train (the volumes "
                                 "without a label file would be the unlabeled subset)")
        if self.num_classes is not None and self.brain_masks is not None and self.brain_class and self.num_classes < 3:
            raise InputError(f"with --brain-masks (brain = class 1) --label-nc must be >= 3, got {self.num_classes}")


# --------------------------------------------------------------------------- discovery


@dataclass
class VolumeSource:
    """An image and its optional label, weight and brain-mask files."""

    id: str
    image: Path
    label: Optional[Path] = None
    weight: Optional[Path] = None
    brain: Optional[Path] = None


def strip_nifti_extension(name: str) -> str:
    """``sub-1.nii.gz`` / ``sub-1.nii`` -> ``sub-1`` (FIX docs/differences.md#d9-22: ``.nii`` is stripped too)."""
    for ext in NIFTI_EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def is_nifti(name: str) -> bool:
    return name.endswith(NIFTI_EXTENSIONS)


def find_images(folder: Path, path_rule: str = "") -> List[Path]:
    """NIfTI files under ``folder`` (recursive, sorted walk) whose basename matches ``path_rule``
    from its start; :class:`InputError` when the folder is missing or nothing matches."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("image folder does not exist" if not folder.exists() else "is a file; the image "
                         "folder is expected here", folder)
    pattern = re.compile(path_rule)
    found: List[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # hidden folders (temporaries) are skipped
        for name in sorted(files):
            if is_nifti(name) and pattern.match(name) and not name.startswith("."):
                found.append(Path(root) / name)
    if not found:
        raise InputError(f"no .nii/.nii.gz file matching --path-rule {path_rule!r} found", folder)
    return found


def check_rule(rule: str) -> None:
    """A companion rule is a format string using only ``{name}``, ``{id}`` and ``{ext}``."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(rule) if f is not None]
    except ValueError as err:
        raise InputError(f"--label-rule {rule!r} is not a valid format string: {err}") from None
    bad = [f for f in fields if f not in RULE_FIELDS]
    if bad or not fields:
        raise InputError(f"--label-rule {rule!r} must use only the fields {{name}}, {{id}}, {{ext}}")


def find_companion(image: Path, images_root: Path, companion_root: Optional[Path], rule: str) -> Optional[Path]:
    """Label/weight file of ``image``: ``companion_root/<same subfolder>/<rule>``, else
    ``companion_root/<rule>``; None when neither exists.

    ``rule`` is formatted with ``name`` (image basename), ``id`` (basename without
    ``.nii.gz``/``.nii``) and ``ext`` (``.nii.gz`` or ``.nii``).
    """
    if companion_root is None:
        return None
    name = image.name
    vid = strip_nifti_extension(name)
    filename = rule.format(name=name, id=vid, ext=name[len(vid):])
    relative = image.parent.relative_to(images_root)
    for candidate in (companion_root / relative / filename, companion_root / filename):
        if candidate.is_file():
            return candidate
    return None


def discover_volumes(cfg: PreprocessConfig) -> List[VolumeSource]:
    """Images with their label/weight/brain-mask files; :class:`InputError` on duplicate volume ids.

    With ``annotation_required`` the volumes without a label file are left out (the original's
    "vessel annotation required" dataset mode): splits, training slices and statistics then use the
    annotated volumes only.
    """
    images_root = Path(cfg.images)
    for folder, flag in ((cfg.labels, "--labels"), (cfg.weights, "--weights"), (cfg.brain_masks, "--brain-masks")):
        if folder is not None and not Path(folder).is_dir():
            raise InputError(f"{flag} folder does not exist", folder)
    sources: List[VolumeSource] = []
    seen: Dict[str, Path] = {}
    for image in find_images(images_root, cfg.path_rule):
        vid = strip_nifti_extension(image.name)
        if vid in seen:
            raise InputError(f"two images share the volume id {vid!r} (other: {seen[vid]})", image)
        seen[vid] = image
        sources.append(VolumeSource(
            id=vid, image=image.resolve(),
            label=_resolved(find_companion(image, images_root, cfg.labels, cfg.label_rule)),
            weight=_resolved(find_companion(image, images_root, cfg.weights, cfg.label_rule)),
            brain=_resolved(find_companion(image, images_root, cfg.brain_masks, cfg.label_rule))))
    if cfg.annotation_required:
        sources = [src for src in sources if src.label is not None]
        if not sources:
            raise InputError("--annotation-required: no image has a label file", cfg.labels)
    return sources


def _resolved(path: Optional[Path]) -> Optional[Path]:
    return None if path is None else path.resolve()


# --------------------------------------------------------------------------- split


def _count(n_total: int, frac: float) -> int:
    """floor(n_total * frac), but at least 1 when ``frac`` > 0."""
    if frac <= 0:
        return 0
    return max(1, int(math.floor(n_total * frac + 1e-9)))


def split_volumes(ids: Sequence[str], labeled: Iterable[str], val_frac: float, test_frac: float,
                  seed: int) -> Dict[str, List[str]]:
    """Seeded train/val/test split (docs/method.md#split).

    With N = ``len(ids)``: ``n_val = floor(N * val_frac)`` and ``n_test = floor(N * test_frac)``
    (each at least 1 when its fraction is positive).  Validation is
    ``random.Random(seed).sample`` of the sorted labeled ids (all ids if none is labeled);
    test is ``random.Random(seed + 1).sample`` of the remaining ones.  Train is every other
    volume.  Lists are sorted.
    """
    ids = sorted(ids)
    labeled_set = set(labeled)
    pool = [i for i in ids if i in labeled_set] or list(ids)
    n_val, n_test = _count(len(ids), val_frac), _count(len(ids), test_frac)
    if n_val + n_test > len(pool):
        kind = "labeled " if labeled_set else ""
        raise InputError(f"only {len(pool)} {kind}volume(s) to draw {n_val} validation and {n_test} test "
                         "volumes from; lower --val-frac/--test-frac")
    if len(ids) - n_val - n_test < 1:
        raise InputError(f"{len(ids)} volume(s) leave no training volume after {n_val} validation and "
                         f"{n_test} test volumes; lower --val-frac/--test-frac")
    val = random.Random(seed).sample(pool, n_val)
    rest = [i for i in pool if i not in set(val)]
    test = random.Random(seed + 1).sample(rest, n_test)
    held = set(val) | set(test)
    return {"train": [i for i in ids if i not in held], "val": sorted(val), "test": sorted(test)}


def pick_labeled_train(train: Sequence[str], labeled: Iterable[str], count: int, seed: int) -> List[str]:
    """Seeded choice (``random.Random(seed)``) of ``count`` labeled training volumes (sorted)."""
    pool = sorted(set(train) & set(labeled))
    if count > len(pool):
        raise InputError(f"--labeled-train {count} but only {len(pool)} labeled training volume(s)")
    return sorted(random.Random(seed).sample(pool, count))


# --------------------------------------------------------------------------- reading


def load_nifti(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
        _ = img.shape
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad input file
        raise InputError(f"cannot read NIfTI file: {err}", path) from None
    return img


def volume_shape(img: nib.Nifti1Image, path: Path) -> Tuple[int, int, int]:
    """The 3-D shape (trailing singleton dimensions dropped); :class:`InputError` otherwise."""
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(f"expected a 3-D volume, got shape {shape}", path)
    if min(shape) < 1:
        raise InputError(f"empty volume (shape {shape})", path)
    return shape  # type: ignore[return-value]


def read_array(img: nib.Nifti1Image, path: Path, flip_axis: Optional[int], dtype=np.float32,
               transform: Optional[np.ndarray] = None, nonfinite: str = "refuse", kind: str = "volume"
               ) -> np.ndarray:
    """Voxel array (3-D, float32 by default), reoriented with ``transform``
    (:mod:`MultiMedSeg.data.orientation`; None: as stored), then with ``flip_axis`` reversed.

    NaN/inf voxels (also values beyond the float32 range): ``nonfinite='refuse'`` raises an
    :class:`InputError` counting them (labels, weights, brain masks); ``'repair'`` sets them to
    the smallest finite value of the volume, ``'warn'`` does the same and prints a ``warning:``
    line counting them (images; an image without any finite voxel is refused).
    """
    shape = volume_shape(img, path)
    try:
        array = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as err:  # noqa: BLE001 - truncated data etc.
        raise InputError(f"cannot read voxel data: {err}", path) from None
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        if nonfinite == "refuse" or bad == finite.size:
            raise InputError(f"{kind} has {bad} of {finite.size} voxel(s) that are NaN or inf", path)
        fill = float(array[finite].min())
        array = np.where(finite, array, np.float32(fill))
        if nonfinite == "warn":
            warn(f"{bad} of {finite.size} voxel(s) are NaN or inf: set to the volume's smallest finite value "
                 f"{fill:.6g}", path)
    if transform is not None:
        array = orient.apply(array, transform)
    if flip_axis is not None:
        array = np.flip(array, axis=flip_axis)
    return np.ascontiguousarray(array, dtype=dtype)


def read_labels(path: Path, shape: Sequence[int], flip_axis: Optional[int], num_classes: Optional[int],
                transform: Optional[np.ndarray] = None) -> np.ndarray:
    """Integer label volume (uint8/int16) checked against the image's stored ``shape`` and ``num_classes``,
    oriented like the image (``transform``: labels share the image's voxel grid)."""
    img = load_nifti(path)
    if volume_shape(img, path) != tuple(shape):
        raise InputError(f"label shape {volume_shape(img, path)} differs from the image shape {tuple(shape)}", path)
    values = read_array(img, path, flip_axis, transform=transform, kind="label volume")
    labels = np.rint(values)
    if not np.allclose(values, labels, atol=1e-3) or labels.min() < 0:
        raise InputError("labels must be non-negative integers", path)
    top = int(labels.max())
    if num_classes is not None and top >= num_classes:
        raise InputError(f"label value {top} >= --num-classes {num_classes}", path)
    return labels.astype(np.uint8 if top < 256 else np.int16)


def read_weight(path: Path, shape: Sequence[int], flip_axis: Optional[int], kind: str = "weight",
                transform: Optional[np.ndarray] = None) -> np.ndarray:
    """Boolean volume (> 0): a weight map (True where losses/metrics count) or a brain mask."""
    img = load_nifti(path)
    if volume_shape(img, path) != tuple(shape):
        raise InputError(f"{kind} shape {volume_shape(img, path)} differs from the image shape {tuple(shape)}", path)
    return read_array(img, path, flip_axis, transform=transform, kind=kind) > 0


def header_info(img: nib.Nifti1Image) -> dict:
    """JSON-able header fields needed to write a NIfTI on the original grid."""
    header = img.header
    qform, qcode = img.get_qform(coded=True)
    sform, scode = img.get_sform(coded=True)
    spatial, temporal = header.get_xyzt_units()
    return {
        "affine": np.asarray(img.affine, dtype=float).tolist(),
        "qform": None if qform is None else np.asarray(qform, dtype=float).tolist(),
        "qform_code": int(qcode),
        "sform": None if sform is None else np.asarray(sform, dtype=float).tolist(),
        "sform_code": int(scode),
        "zooms": [float(z) for z in header.get_zooms()],
        "dtype": str(img.get_data_dtype()),
        "xyzt_units": [spatial, temporal],
    }


# --------------------------------------------------------------------------- geometry


def _threshold_minimum(counts: np.ndarray) -> Optional[float]:
    """skimage ``threshold_minimum`` of the histogram counts, passed as the integer "image" the
    original passed: skimage then histograms it with one bin per integer value."""
    from skimage.filters import threshold_minimum

    try:
        return float(threshold_minimum(np.asarray(counts, dtype=np.int64)))
    except (RuntimeError, ValueError):
        return None


def axis_crop(profile: np.ndarray) -> Tuple[int, int]:
    """Crop ``[start, stop)`` along one axis from its max-intensity profile (docs/method.md#crop, FIX
    docs/differences.md#d9-17).

    ``c`` = cumulative sum of the profile (float64), histogram of ``c`` in 255 bins, threshold of the
    integer bin counts by ``threshold_minimum`` (as the original: integer counts, so skimage uses one
    bin per integer count value).  The start bin is the first bin with a count <= threshold, the end
    bin the first such bin searched from the *end* (the original reused the start index, docs/differences.md#d9-17).
    ``start`` is the first index where ``c`` reaches the start bin's left edge, ``stop`` one past the
    first index where ``c`` reaches the end bin's right edge.  The full axis is kept when the
    heuristic fails.
    """
    length = int(profile.shape[0])
    c = np.cumsum(profile.astype(np.float64))
    if length < 3 or c[-1] == c[0]:
        return 0, length
    counts, edges = np.histogram(c, bins=255)
    thr = _threshold_minimum(counts)
    if thr is None:
        return 0, length
    low = np.nonzero(counts <= thr)[0]
    if low.size == 0:
        return 0, length
    k_start, k_end = int(low[0]), int(low[-1])
    start = int(np.argmax(c >= edges[k_start]))
    stop = int(np.argmax(c >= edges[k_end + 1])) + 1 if k_end < 254 else length
    if stop <= start:
        return 0, length
    return start, min(stop, length)


def heuristic_crop(volume: np.ndarray) -> List[Tuple[int, int]]:
    """Per-axis ``[start, stop)`` bounding box from :func:`axis_crop` of the max-intensity profiles
    (the raw maximum over the other two axes, as the original; not of ``|volume|``)."""
    box = []
    for axis in range(volume.ndim):
        others = tuple(a for a in range(volume.ndim) if a != axis)
        box.append(axis_crop(volume.max(axis=others)))
    return box


def union_with_labels(box: List[Tuple[int, int]], labels: Optional[np.ndarray]) -> List[Tuple[int, int]]:
    """Widen ``box`` so that it contains every voxel with a label > 0."""
    if labels is None or not labels.any():
        return box
    out = []
    for axis, (start, stop) in enumerate(box):
        others = tuple(a for a in range(labels.ndim) if a != axis)
        present = np.nonzero(labels.any(axis=others))[0]
        out.append((min(start, int(present[0])), max(stop, int(present[-1]) + 1)))
    return out


def compute_target_spacing(spacings: Sequence[Sequence[float]], cropped_shapes: Sequence[Sequence[int]],
                           size: int, ignore_z: bool = False) -> List[float]:
    """docs/method.md#target-spacing: median spacing ``m``; ``M`` = max over volumes of
    ``round(spacing / m * cropped_shape)``; target ``m * M / size`` where ``M > size``, else ``m``.

    With ``ignore_z`` the z axis is not capped (it is not resampled at all, see
    :func:`volume_target_spacing`).
    """
    sp = np.asarray(spacings, dtype=np.float64)
    shapes = np.asarray(cropped_shapes, dtype=np.float64)
    median = np.median(sp, axis=0)
    largest = np.max(np.round(sp / median * shapes), axis=0)
    target = np.where(largest > size, median * largest / size, median)
    if ignore_z:
        target[2] = median[2]
    return [float(t) for t in target]


def volume_target_spacing(target: Sequence[float], spacing: Sequence[float], ignore_z: bool) -> List[float]:
    """Target spacing of one volume: ``target``, with its own z spacing when ``ignore_z`` (a new list)."""
    out = [float(t) for t in target]
    if ignore_z:
        out[2] = float(spacing[2])
    return out


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> Tuple[int, ...]:
    return tuple(max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target))


def z_range(region_zxy: Optional[np.ndarray], depth: int, discard: bool) -> Tuple[int, int]:
    """``[first, stop)`` of the slices to keep: the slices where ``region`` (a brain mask, or a label
    map) is non-zero, the last one included (FIX docs/differences.md#d9-19), when ``discard`` and the region is
    non-empty;
    else all ``depth`` slices."""
    if not discard or region_zxy is None or not region_zxy.any():
        return 0, depth
    present = np.nonzero(region_zxy.reshape(region_zxy.shape[0], -1).any(axis=1))[0]
    return int(present[0]), int(present[-1]) + 1


def split_region(brain: Optional[np.ndarray], labels: Optional[np.ndarray], cfg: "PreprocessConfig"
                 ) -> Tuple[Optional[np.ndarray], str]:
    """The (Z, X, Y) region that selects the kept slices and its name: the brain mask of a volume that
    has a non-empty one (unless ``--keep-extracerebral-slices``), else its labels with
    ``--discard-outside-labels``, else none."""
    if brain is not None and brain.any() and cfg.discard_extracerebral:
        return brain, "brain"
    if labels is not None and cfg.discard_outside_labels:
        return labels, "labels"
    return None, "none"


def with_brain_class(labels: np.ndarray, brain: Optional[np.ndarray]) -> np.ndarray:
    """The original's mask layout [background, brain, vessel...]: label k > 0 becomes class k + 1 and
    brain voxels without a label become class 1 (the brain mask and the labels are both resampled
    first, as the original)."""
    out = np.where(labels > 0, labels.astype(np.int16) + 1, 0)
    if brain is not None:
        out = np.where((labels == 0) & brain, 1, out)
    top = int(out.max(initial=0))
    return out.astype(np.uint8 if top < 256 else np.int16)


def inplane_window(length: int, size: int) -> Tuple[int, int, int]:
    """``(src_start, dst_start, n)``: copy ``src[src_start:+n]`` to ``dst[dst_start:+n]``.

    Padding puts the data at ``floor(size/2 - length/2)``; centre-cropping keeps
    ``[floor(length/2 - size/2), +size)`` (docs/method.md#normalisation).
    """
    if length <= size:
        return 0, (size - length) // 2, length
    return (length - size) // 2, 0, size


def volume_windows(shape: Sequence[int], size: int) -> List[Tuple[int, int, int]]:
    """In-plane windows (rows, columns) of a (Z, X, Y) volume fitted to ``size`` (:func:`inplane_window`)."""
    return [inplane_window(int(shape[1]), size), inplane_window(int(shape[2]), size)]


def fit_slices(volume: np.ndarray, size: int, fill, windows: Sequence[Tuple[int, int, int]]) -> np.ndarray:
    """(Z, X, Y) -> (Z, size, size) by padding with ``fill`` and/or centre-cropping."""
    (rs, rd, rn), (cs, cd, cn) = windows
    out = np.full((volume.shape[0], size, size), fill, dtype=volume.dtype)
    out[:, rd:rd + rn, cd:cd + cn] = volume[:, rs:rs + rn, cs:cs + cn]
    return out


# --------------------------------------------------------------------------- intensities


def histogram_window(volumes: Iterable[np.ndarray], low: float, high: float, vmin: float, vmax: float,
                     bins: int = 256) -> Tuple[float, float]:
    """Percentiles ``low``/``high`` (in %) of the voxels of ``volumes`` from a ``bins``-bin histogram
    on ``[vmin, vmax]``, read as the original does: the **upper edge** of the first bin whose
    cumulative percentage reaches the percentile (for both ends)."""
    edges = np.linspace(vmin, vmax, bins + 1)
    counts = np.zeros(bins, dtype=np.float64)
    for vol in volumes:
        counts += np.histogram(vol, bins=edges)[0]
    cumulative = np.cumsum(counts / counts.sum() * 100.0)

    def upper_edge(p: float) -> float:
        index = int(np.nonzero(cumulative >= p)[0][0]) if p <= cumulative[-1] else bins - 1
        return float(edges[index + 1])

    return upper_edge(low), upper_edge(high)


def scale_to_unit(volume: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Clip to ``[vmin, vmax]`` and map linearly onto [-1, 1] (float32)."""
    clipped = np.clip(volume.astype(np.float64), vmin, vmax)
    return ((clipped - vmin) / (vmax - vmin) * 2.0 - 1.0).astype(np.float32)  # ends map exactly to -1, 1


# --------------------------------------------------------------------------- pipeline


@dataclass
class VolumeInfo:
    """What the first pass learns about a volume (becomes its metadata entry)."""

    source: VolumeSource
    shape: Tuple[int, int, int]          # stored voxel grid
    spacing: List[float]                 # mm along the working axes (after reorientation)
    header: dict
    crop: List[Tuple[int, int]]          # in the working orientation
    orientation: dict = field(default_factory=dict)  # :func:`MultiMedSeg.data.orientation.describe`
    label_max: int = 0
    split: str = "train"
    subset: Optional[str] = None
    empty_label: bool = False            # no label file, all-zero labels written (--missing-labels empty)
    extra: dict = field(default_factory=dict)

    @property
    def has_labels(self) -> bool:
        return self.source.label is not None or self.empty_label

    @property
    def cropped_shape(self) -> List[int]:
        return [stop - start for start, stop in self.crop]

    @property
    def transform(self) -> np.ndarray:
        """Stored -> working orientation (:mod:`MultiMedSeg.data.orientation`)."""
        return np.asarray(self.orientation.get("transform", orient.identity()), dtype=int)


def inspect_volume(src: VolumeSource, cfg: PreprocessConfig, img: Optional[nib.Nifti1Image] = None) -> VolumeInfo:
    """First pass: shape/spacing/header checks, orientation, label consistency, crop box.

    ``img``: the image already in memory (e.g. converted from another format); default: read
    ``src.image`` as NIfTI."""
    img = load_nifti(src.image) if img is None else img
    shape = volume_shape(img, src.image)
    stored_spacing = [float(z) for z in img.header.get_zooms()[:3]]
    if not all(math.isfinite(z) and z > 0 for z in stored_spacing):
        raise InputError(f"voxel spacing {stored_spacing} in the header is not positive and finite", src.image)
    transform = orient.transform_for(img.affine, cfg.orientation, src.image)
    orientation = orient.describe(cfg.orientation, img.affine, transform, shape, stored_spacing)
    labels = read_labels(src.label, shape, cfg.flip_axis, cfg.num_classes, transform) if src.label else None
    if src.weight is not None:
        read_weight(src.weight, shape, cfg.flip_axis, transform=transform)  # validate early
    if src.brain is not None:
        read_weight(src.brain, shape, cfg.flip_axis, kind="brain mask", transform=transform)
    if not np.isfinite(np.asarray(img.affine, dtype=np.float64)).all():
        raise InputError("the header's affine holds NaN or inf", src.image)
    image = read_array(img, src.image, cfg.flip_axis, transform=transform, nonfinite="warn", kind="image")
    if cfg.crop:  # (the read above prints the one warning about NaN/inf voxels)
        box = union_with_labels(heuristic_crop(image), labels)
    else:
        box = [(0, n) for n in orientation["shape"]]
    return VolumeInfo(source=src, shape=shape, spacing=orientation["spacing"], header=header_info(img), crop=box,
                      orientation=orientation, label_max=int(labels.max()) if labels is not None else 0)


def crop_array(volume: np.ndarray, box: Sequence[Tuple[int, int]]) -> np.ndarray:
    return volume[tuple(slice(a, b) for a, b in box)]


def process_volume(info: VolumeInfo, cfg: PreprocessConfig, target: Sequence[float],
                   img: Optional[nib.Nifti1Image] = None
                   ) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray], dict]:
    """Second pass: reorient, crop, resample, transpose to (Z, X, Y), z-split, standardise.

    Returns ``(image, labels or None, weight or None, geometry metadata)``; ``img`` as in
    :func:`inspect_volume`.
    """
    src = info.source
    img = load_nifti(src.image) if img is None else img
    t = info.transform
    image = crop_array(read_array(img, src.image, cfg.flip_axis, transform=t, nonfinite="repair", kind="image"),
                       info.crop)
    labels = crop_array(read_labels(src.label, info.shape, cfg.flip_axis, cfg.num_classes, t), info.crop) \
        if src.label else None
    weight = crop_array(read_weight(src.weight, info.shape, cfg.flip_axis, transform=t), info.crop) \
        if src.weight else None
    brain = crop_array(read_weight(src.brain, info.shape, cfg.flip_axis, "brain mask", t), info.crop) \
        if src.brain else None

    vol_target = volume_target_spacing(target, info.spacing, cfg.ignore_z)
    new_shape = resampled_shape(image.shape, info.spacing, vol_target)
    image = resize_image(image, new_shape)
    labels = resize_labels(labels, new_shape) if labels is not None else None
    weight = resize_labels(weight.astype(np.uint8), new_shape).astype(bool) if weight is not None else None
    brain = resize_labels(brain.astype(np.uint8), new_shape).astype(bool) if brain is not None else None

    def to_zxy(a: Optional[np.ndarray]) -> Optional[np.ndarray]:
        return None if a is None else np.ascontiguousarray(np.transpose(a, (2, 0, 1)))

    image, labels, weight, brain = to_zxy(image), to_zxy(labels), to_zxy(weight), to_zxy(brain)
    depth = image.shape[0]
    foreground_z = foreground_extent(image)  # where the head is, for predict's field of view
    region, region_name = split_region(brain, labels, cfg)
    first, stop = z_range(region, depth, region is not None)
    image = image[first:stop]
    labels = None if labels is None else labels[first:stop]
    weight = None if weight is None else weight[first:stop]
    brain = None if brain is None else brain[first:stop]
    if labels is None and info.empty_label:  # after the z-split, which treats it as any volume without labels
        labels = np.zeros(image.shape, dtype=np.uint8)
    if labels is not None and cfg.brain_masks is not None and cfg.brain_class:
        labels = with_brain_class(labels, brain)
    # float64 statistics and arithmetic: a float32 sum of large intensities (e.g. 1e38) overflows
    mean, std = float(image.mean(dtype=np.float64)), float(image.std(dtype=np.float64))
    if cfg.standardize:
        image = ((image.astype(np.float64) - mean) / (std + 1e-8)).astype(np.float32)
    geometry = {
        "target_spacing": vol_target,
        "shape_after_resampling": [int(n) for n in new_shape],
        "depth_before_split": int(depth),
        "z_split": [int(first), int(stop)],
        "z_split_by": region_name,
        "foreground_z": foreground_z,
        "shape_before_padding": [int(n) for n in image.shape],
        "mean": mean,
        "std": std,
        "min": float(image.min()),
        "max": float(image.max()),
    }
    return image, labels, weight, geometry


def write_volume_slices(folder: Path, vid: str, image: np.ndarray, labels: Optional[np.ndarray],
                        weight: Optional[np.ndarray], cfg: PreprocessConfig, num_classes: Optional[int],
                        window: Tuple[float, float]) -> Tuple[List[Path], List[List[int]], str]:
    """Normalise, pad/crop and write one volume's slices; return the paths, the in-plane windows and
    the fingerprint of the middle slice (:func:`robustmedseg.data.slices.data_digest`)."""
    size = cfg.size
    windows = volume_windows(image.shape, size)
    scaled = scale_to_unit(image, *window)
    paths = []
    digest = ""
    for z in range(scaled.shape[0]):  # one slice at a time: memory stays at one volume
        data = fit_slices(scaled[z:z + 1], size, -1.0, windows)[0]
        if z == scaled.shape[0] // 2:
            digest = data_digest(data[:, :, None])
        mask = None
        if labels is not None and num_classes is not None:
            mask = one_hot(fit_slices(labels[z:z + 1], size, 0, windows)[0], num_classes)
        slice_weight = None
        if weight is not None:
            pad_value = bool(weight[z].all())  # docs/method.md#normalisation: pad with 1 only if the slice is all ones
            slice_weight = fit_slices(weight[z:z + 1], size, pad_value, windows)[0][:, :, None]
        path = folder / slice_name(vid, z)
        save_slice(path, data[:, :, None], mask, slice_weight)
        paths.append(path)
    return paths, [list(w) for w in windows], digest


def split_folder(split: str, subset: Optional[str]) -> str:
    return split if subset is None else f"{split}/{subset}"


def preprocess(cfg: PreprocessConfig, log=print) -> dict:
    """Run the whole pipeline; write ``cfg.out`` atomically and return the metadata dict."""
    cfg.check()
    out = Path(cfg.out)
    check_apart({"--out": out}, {"--images": cfg.images, "--labels": cfg.labels, "--weights": cfg.weights,
                                 "--brain-masks": cfg.brain_masks})
    check_new_output(out, cfg.overwrite)
    sources = discover_volumes(cfg)
    infos = [inspect_volume(src, cfg) for src in sources]
    labeled_ids = [i.source.id for i in infos if i.source.label is not None]
    shift = 1 if cfg.brain_masks is not None and cfg.brain_class else 0  # brain = class 1
    num_classes = cfg.num_classes
    if num_classes is None and labeled_ids:
        num_classes = max(2 + shift, max(i.label_max for i in infos) + 1 + shift)
    elif num_classes is not None:
        for info in infos:
            if info.label_max + shift >= num_classes:
                raise InputError(f"label value {info.label_max} needs {info.label_max + shift + 1} mask channels "
                                 f"(brain = class 1 shifts the labels by one) but --num-classes is {num_classes}",
                                 info.source.label)

    if cfg.missing_labels == "empty" and not labeled_ids:
        raise InputError("--missing-labels empty: no image has a label file (validation and test need annotated "
                         "volumes)", cfg.labels)
    splits = split_volumes([i.source.id for i in infos], labeled_ids, cfg.val_frac, cfg.test_frac, cfg.seed)
    labeled_train = (pick_labeled_train(splits["train"], labeled_ids, cfg.labeled_train, cfg.seed)
                     if cfg.labeled_train is not None else None)
    by_id = {i.source.id: i for i in infos}
    for split, ids in splits.items():
        for vid in ids:
            by_id[vid].split = split
            by_id[vid].empty_label = (cfg.missing_labels == "empty" and split == "train"
                                      and by_id[vid].source.label is None)
            if split == "train" and labeled_train is not None:
                by_id[vid].subset = "labeled" if vid in labeled_train else "unlabeled"

    fit = [i for i in infos if i.split in ("train", "val")]
    target = list(cfg.target_spacing) if cfg.target_spacing is not None else compute_target_spacing(
        [i.spacing for i in fit], [i.cropped_shape for i in fit], cfg.size, cfg.ignore_z)
    empty = sum(i.empty_label for i in infos)
    log(f"{len(infos)} volumes ({len(labeled_ids)} labeled"
        f"{f', {empty} with all-zero labels' if empty else ''}): train {len(splits['train'])}, "
        f"val {len(splits['val'])}, test {len(splits['test'])}; target spacing {np.round(target, 4).tolist()}")

    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        meta = _run_passes(tmp, infos, cfg, target, num_classes, splits, labeled_train, log)
        (tmp / METADATA_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _run_passes(tmp: Path, infos: List[VolumeInfo], cfg: PreprocessConfig, target: List[float],
                num_classes: Optional[int], splits: Dict[str, List[str]], labeled_train: Optional[List[str]],
                log) -> dict:
    work = tmp / ".work"
    work.mkdir()
    for split in SPLITS:
        subsets = ("labeled", "unlabeled") if split == "train" and labeled_train is not None else (None,)
        for subset in subsets:
            (tmp / split_folder(split, subset)).mkdir(parents=True, exist_ok=True)

    # pass 2: geometry + standardisation, volumes cached as plain .npy (no pickle)
    for info in infos:
        image, labels, weight, geometry = process_volume(info, cfg, target)
        info.extra = geometry
        np.save(work / f"{info.source.id}.image.npy", image)
        if labels is not None:
            np.save(work / f"{info.source.id}.labels.npy", labels)
        if weight is not None:
            np.save(work / f"{info.source.id}.weight.npy", weight)

    # intensity window from train+val
    fit = [i for i in infos if i.split in ("train", "val")]
    vmin = min(i.extra["min"] for i in fit)
    vmax = max(i.extra["max"] for i in fit)
    if not vmax > vmin:
        raise InputError("train/val images are constant; cannot normalise intensities", cfg.images)
    low, high = histogram_window((np.load(work / f"{i.source.id}.image.npy") for i in fit),
                                 cfg.percentiles[0], cfg.percentiles[1], vmin, vmax)
    if not high > low:
        high = low + 1e-6

    # pass 3: slices
    volumes = {}
    for info in infos:
        vid = info.source.id
        folder_rel = split_folder(info.split, info.subset)
        image = np.load(work / f"{vid}.image.npy")
        labels = np.load(work / f"{vid}.labels.npy") if info.has_labels else None
        weight = np.load(work / f"{vid}.weight.npy") if info.source.weight else None
        paths, windows, digest = write_volume_slices(tmp / folder_rel, vid, image, labels, weight, cfg,
                                                     num_classes, (low, high))
        slices = [f"{folder_rel}/{p.name}" for p in paths]
        volumes[vid] = volume_entry(info, windows, slices, cfg)
        volumes[vid]["fingerprint"] = {"slice": slices[len(slices) // 2], "sha256": digest}
        log(f"  {info.split:5s} {vid}: {len(paths)} slices -> {folder_rel}/")
    shutil.rmtree(work)
    return {
        "format": METADATA_FORMAT,
        "version": METADATA_VERSION,
        "size": cfg.size,
        "num_classes": num_classes,
        "target_spacing": target,
        "orientation": cfg.orientation,
        "intensity": {"min": low, "max": high, "percentiles": list(cfg.percentiles),
                      "standardized": cfg.standardize},
        "layout": {split: (["train/labeled", "train/unlabeled"]
                           if split == "train" and labeled_train is not None else [split])
                   for split in SPLITS},
        "splits": splits,
        "labeled_train": labeled_train,
        "options": _options(cfg),
        "volumes": volumes,
    }


def volume_entry(info: VolumeInfo, windows: List[List[int]], slices: List[str], cfg: PreprocessConfig) -> dict:
    """A volume's ``metadata.json`` entry (schema in :mod:`MultiMedSeg.data.restore`)."""
    src = info.source
    entry = {
        "id": src.id,
        "split": info.split,
        "subset": info.subset,
        "image": str(src.image),
        "label": None if src.label is None else str(src.label),
        **({"empty_label": True} if info.empty_label else {}),  # --missing-labels empty: all-zero labels written
        "weight": None if src.weight is None else str(src.weight),
        "brain_mask": None if src.brain is None else str(src.brain),
        "shape": list(info.shape),
        "spacing": [float(z) for z in info.header["zooms"][:3]],
        "header": info.header,
        "affine": info.header["affine"],
        "orientation": info.orientation,
        "flip_axis": cfg.flip_axis,
        "crop": [list(c) for c in info.crop],
        "shape_after_crop": info.cropped_shape,
        "inplane_window": windows,
        "slices": slices,
    }
    entry.update(info.extra)
    return entry


def _options(cfg: PreprocessConfig) -> dict:
    opts = asdict(cfg)
    return {k: (str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v))
            for k, v in opts.items()}
