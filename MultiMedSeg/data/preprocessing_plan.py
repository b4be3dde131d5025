"""The preprocessing plan of a training run: how to turn a new scan into the slices the run was trained on.

Pretraining and adaptation write ``<exp_dir>/checkpoints/plan.json`` next to their checkpoints, from
the ``metadata.json`` of the preprocessed site whose domain the run segments (the source site for
``pretrain.py``, the target site for ``train.py``).  ``predict`` then needs nothing but the run
folder and the images.  A run trained before plans existed gets one with
``python -m MultiMedSeg.plan --checkpoint_dir RUN --metadata PREP/metadata.json``.

``plan.json`` (format ``multimedseg-plan``, version 1)::

    {
      "format": "multimedseg-plan", "version": 1,
      "num_classes": 3,                  # mask channels incl. background
      "size": 512,                       # slice side in pixels
      "orientation": "RAS" | "stored",   # working orientation (MultiMedSeg.data.orientation)
      "flip_axis": null | 0 | 1 | 2,     # working axis reversed after reorientation
      "crop": true,                      # heuristic bounding-box crop (false: whole volume)
      "target_spacing": [sx, sy, sz],    # mm along the working axes
      "ignore_z": false,                 # true: the slice axis keeps each volume's own spacing
      "intensity": {"standardized": true,          # per-volume (x - mean) / (std + 1e-8) first
                    "min": LOW, "max": HIGH,       # window of the site's train+val histogram -> [-1, 1]
                    "percentiles": [0.1, 99.9]},
      "spacing": {"median": [...], "min": [...], "max": [...]},  # training volumes, working axes (mm)
      "domain": {"label": 2, "role": "target" | "source"},       # phase-1 domain id the run segments
      "training_only": {"discard_outside_labels": bool, "brain_masks": bool, "brain_class": bool},
      "field_of_view": {"slab": [lo, hi] | null, "volumes": n, "rule": "..."},  # optional (see below)
      "source": {"metadata": "/abs/prep/site2/metadata.json", "sha256": "..."}
    }

``training_only`` lists the label-dependent steps of the training data (slice selection by labels
or brain masks, the brain class): a new scan has no labels, so every one of its slices is
segmented.  :func:`prepare_scan` preprocesses one scan exactly as :func:`MultiMedSeg.data.preprocess`
did the training volumes (same functions: :func:`~MultiMedSeg.data.volumes_to_slices.inspect_volume`,
:func:`~MultiMedSeg.data.volumes_to_slices.process_volume`, the window of the plan) and returns its
metadata entry, so that :func:`MultiMedSeg.data.restore.restore_volume` maps predictions back.

``field_of_view`` records what the training slices covered
(:func:`MultiMedSeg.data.field_of_view.training_slab`): the union of the kept slabs of the selected
train/val volumes relative to their foreground z-extent (``slab`` null when training covered whole
volumes).  It is optional: a plan written before it existed, or from metadata without
``foreground_z``, loads with ``field_of_view`` null, and ``predict`` then masks labels outside the
head only (:mod:`MultiMedSeg.data.field_of_view`).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np

from robustmedseg.errors import InputError
from robustmedseg.io import write_text_atomic

from . import orientation as orient
from .field_of_view import training_slab
from .volumes_to_slices import (PreprocessConfig, VolumeSource, fit_slices, inspect_volume, process_volume,
                            scale_to_unit, volume_entry, volume_windows)

PLAN_NAME = "plan.json"
PLAN_FORMAT = "multimedseg-plan"
PLAN_VERSION = 1
ROLES = ("source", "target")
#: keys a plan may lack (written by an older version)
OPTIONAL_KEYS = ("training_only", "source", "field_of_view")
#: spacing ratio (scan / training median, per axis) beyond which predict warns
SPACING_TOLERANCE = 2.0
WRITE_PLAN_HINT = ("write it with: python -m MultiMedSeg.plan --checkpoint_dir {run} (from the site named by the run's "
                   "options; add --metadata PREP/metadata.json of the site the run segments if that data moved), or "
                   "re-train the run")


@dataclass
class PreprocessingPlan:
    """Everything needed to preprocess a new scan like a run's training data (see the module doc)."""

    num_classes: int
    size: int
    orientation: str
    flip_axis: Optional[int]
    crop: bool
    target_spacing: List[float]
    ignore_z: bool
    intensity: Dict[str, Any]
    spacing: Dict[str, List[float]]
    domain: Dict[str, Any]
    training_only: Dict[str, bool] = field(default_factory=dict)
    source: Dict[str, Any] = field(default_factory=dict)
    field_of_view: Optional[Dict[str, Any]] = None

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, path: Optional[Path] = None) -> "PreprocessingPlan":
        """Check and build; :class:`InputError` naming ``path`` on anything unexpected."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise InputError(f"not a {PLAN_FORMAT} file", path)
        if data.get("version") != PLAN_VERSION:
            raise InputError(f"unsupported plan version {data.get('version')!r} (expected {PLAN_VERSION})", path)
        names = {f.name for f in fields(cls)}
        body = {k: v for k, v in data.items() if k not in ("format", "version")}
        unknown, missing = sorted(set(body) - names), sorted(
            f.name for f in fields(cls) if f.name not in body and f.name not in OPTIONAL_KEYS)
        if unknown or missing:
            raise InputError(f"plan has unknown keys {unknown} / lacks keys {missing}", path)
        try:
            plan = cls(**body)
            plan.check()
        except InputError as err:
            raise InputError(f"invalid plan: {err}", path) from None
        except (TypeError, ValueError, KeyError) as err:
            raise InputError(f"invalid plan: {err}", path) from None
        return plan

    def check(self) -> None:
        if int(self.num_classes) < 2 or int(self.size) < 4:
            raise InputError(f"num_classes {self.num_classes} (>= 2) and size {self.size} (>= 4) out of range")
        if len(self.target_spacing) != 3 or min(float(v) for v in self.target_spacing) <= 0:
            raise InputError(f"target_spacing needs 3 positive numbers, got {self.target_spacing}")
        orient.check_code(self.orientation)
        if self.flip_axis not in (None, 0, 1, 2):
            raise InputError(f"flip_axis must be null, 0, 1 or 2, got {self.flip_axis}")
        if not float(self.intensity["max"]) > float(self.intensity["min"]):
            raise InputError("intensity window is empty (max <= min)")
        if self.domain.get("role") not in ROLES or not isinstance(self.domain.get("label"), int):
            raise InputError(f"domain must be {{'label': int, 'role': 'source'|'target'}}, got {self.domain}")
        for key in ("median", "min", "max"):
            if len(self.spacing[key]) != 3:
                raise InputError(f"spacing.{key} needs 3 numbers")
        fov = self.field_of_view
        if fov is not None:
            slab = fov.get("slab") if isinstance(fov, dict) else "?"
            if slab is not None and not (len(slab) == 2 and all(math.isfinite(float(v)) for v in slab)
                                         and float(slab[0]) < float(slab[1])):
                raise InputError(f"field_of_view.slab must be null or [lo, hi] with lo < hi, got {slab}")

    # ---------------------------------------------------------------- use
    @property
    def window(self) -> Tuple[float, float]:
        return float(self.intensity["min"]), float(self.intensity["max"])

    def preprocess_config(self) -> PreprocessConfig:
        """The :class:`PreprocessConfig` that reproduces the training data's per-volume steps on a scan
        without labels (no slice selection, no brain class)."""
        return PreprocessConfig(images=Path("."), out=Path("."), size=int(self.size), crop=bool(self.crop),
                                ignore_z=bool(self.ignore_z), standardize=bool(self.intensity["standardized"]),
                                num_classes=int(self.num_classes), flip_axis=self.flip_axis,
                                orientation=self.orientation, target_spacing=tuple(self.target_spacing))

    def spacing_warning(self, spacing: Sequence[float]) -> Optional[str]:
        """A one-line warning when a scan's spacing (working axes, mm) is more than
        :data:`SPACING_TOLERANCE` times finer or coarser than the training median on some axis."""
        median = np.asarray(self.spacing["median"], dtype=np.float64)
        ratio = np.asarray(spacing, dtype=np.float64) / median
        if np.all((ratio <= SPACING_TOLERANCE) & (ratio >= 1.0 / SPACING_TOLERANCE)):
            return None
        axes = "" if self.orientation == orient.STORED else f" ({self.orientation} axes)"
        return (f"voxel spacing {np.round(spacing, 3).tolist()} mm{axes} is far from the training data's "
                f"(median {np.round(median, 3).tolist()} mm, range {np.round(self.spacing['min'], 3).tolist()} to "
                f"{np.round(self.spacing['max'], 3).tolist()}); the segmentation may be poor")


# -------------------------------------------------------------------------------- building and files


def working_spacing(volume: dict) -> List[float]:
    """A metadata volume's spacing along the working axes (stored order for old metadata)."""
    return list((volume.get("orientation") or {}).get("spacing", volume["spacing"]))


def plan_from_metadata(meta: dict, metadata_path: Union[str, Path], domain_label: int, role: str
                       ) -> PreprocessingPlan:
    """The plan of a run trained on the site described by ``meta`` (a loaded ``metadata.json``)."""
    metadata_path = Path(metadata_path)
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if meta.get("num_classes") is None:
        raise InputError("the preprocessed site has no labels (num_classes is null); a run cannot have "
                         "been trained on it", metadata_path)
    opts = meta.get("options", {})
    fit = [v for v in meta["volumes"].values() if v.get("split") in ("train", "val")] or list(meta["volumes"].values())
    spacings = np.asarray([working_spacing(v) for v in fit], dtype=np.float64)
    digest = hashlib.sha256(metadata_path.read_bytes()).hexdigest() if metadata_path.is_file() else None
    intensity = meta["intensity"]
    return PreprocessingPlan(
        num_classes=int(meta["num_classes"]), size=int(meta["size"]),
        orientation=meta.get("orientation", orient.STORED), flip_axis=opts.get("flip_axis"),
        crop=bool(opts.get("crop", True)), target_spacing=[float(v) for v in meta["target_spacing"]],
        ignore_z=bool(opts.get("ignore_z", False)),
        intensity={"standardized": bool(intensity.get("standardized", True)), "min": float(intensity["min"]),
                   "max": float(intensity["max"]), "percentiles": list(intensity.get("percentiles", []))},
        spacing={"median": np.median(spacings, axis=0).tolist(), "min": spacings.min(axis=0).tolist(),
                 "max": spacings.max(axis=0).tolist()},
        domain={"label": int(domain_label), "role": role},
        training_only={"discard_outside_labels": bool(opts.get("discard_outside_labels", False)),
                       "brain_masks": opts.get("brain_masks") is not None,
                       "brain_class": bool(opts.get("brain_masks") is not None and opts.get("brain_class", True))},
        field_of_view=training_slab(meta["volumes"].values()),
        source={"metadata": str(metadata_path.resolve()), "sha256": digest})


def save_plan(plan: PreprocessingPlan, folder: Union[str, Path]) -> Path:
    """Write ``folder/plan.json`` atomically; returns its path."""
    path = Path(folder) / PLAN_NAME
    write_text_atomic(path, json.dumps(plan.to_dict(), indent=1) + "\n")
    return path


def load_plan(folder: Union[str, Path]) -> PreprocessingPlan:
    """Read ``folder/plan.json`` (``folder``: a run's checkpoints folder); a missing plan is an
    :class:`InputError` that says how to get one."""
    path = Path(folder) / PLAN_NAME
    if not path.is_file():
        run = Path(folder).parent if Path(folder).name == "checkpoints" else Path(folder)
        raise InputError(f"this run has no preprocessing plan ({PLAN_NAME}; runs trained before plans existed have "
                         f"none); {WRITE_PLAN_HINT.format(run=run)}", Path(folder))
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the plan JSON: {err}", path) from None
    return PreprocessingPlan.from_dict(data, path)


# -------------------------------------------------------------------------------- one scan


def prepare_scan(img: nib.Nifti1Image, path: Union[str, Path], vid: str, plan: PreprocessingPlan
                 ) -> Tuple[dict, np.ndarray]:
    """Preprocess one scan (``img`` in memory, ``path`` for messages) like the run's training data.

    Returns ``(volume metadata entry, slices)``: slices float32 (Z, size, size) in [-1, 1] (padding
    -1), exactly the ``data`` the preprocessing writes into ``<id>_slice<NNN>.npz``; the entry is what
    :func:`MultiMedSeg.data.restore.restore_volume` needs to map predictions back onto the scan's grid.
    """
    cfg = plan.preprocess_config()
    info = inspect_volume(VolumeSource(id=vid, image=Path(path)), cfg, img)
    image, _, _, geometry = process_volume(info, cfg, plan.target_spacing, img)
    info.extra = geometry
    info.split = "predict"
    windows = volume_windows(image.shape, cfg.size)
    slices = fit_slices(scale_to_unit(image, *plan.window), cfg.size, -1.0, windows)
    return volume_entry(info, [list(w) for w in windows], [], cfg), slices
