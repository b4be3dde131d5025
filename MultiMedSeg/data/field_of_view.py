"""The field of view of a trained run: where ``predict`` may put labels (docs/phase2.md, "Segment new scans").

A model only knows what it was trained on.  A new scan is segmented slice by slice over its whole
extent, so without a rule the model also labels the air around the head and the slices that lie
beyond the slab its training slices covered (the demo's labels are trained with
``--discard-outside-labels``: only the slices inside the labelled z-extent).  ``predict`` therefore
sets to background (0) every voxel outside the field of view, which is the intersection of:

(a) **the head** (:func:`head_mask`, on the scan's own voxel grid and intensities): voxels above
    the Otsu threshold of the scan's finite intensities (:func:`foreground_mask`), the largest
    26-connected component, holes filled (in 3-D, then slice by slice along each axis), dilated by
    :data:`HEAD_DILATION` voxels (6-connected steps).  An image without contrast (one value) has no
    head to tell from the air: the whole grid is kept.
(b) **the training slab** (:func:`slab_slices`, only when the plan records it): preprocessing records
    per volume the z-extent of its foreground on the resampled working grid before the z-split
    (``foreground_z``, same :func:`foreground_mask`); the plan keeps, over the train and val volumes
    whose slices were selected (by labels or brain masks), the union of their kept slabs relative to
    that extent (``field_of_view.slab``: ``[lo, hi]`` with 0 = the lowest, 1 = one past the highest
    foreground slice).  A new scan keeps the working slices ``[floor(f0 + lo*L), ceil(f0 + hi*L))``
    of its own foreground extent ``[f0, f0 + L)``; the others get background.  Training without
    slice selection covered whole volumes: ``slab`` is null and the rule is (a) alone.  A plan
    written before this rule existed has no ``field_of_view``: (a) alone, with a ``note:``.

``predict --no_fov_mask`` writes the raw output of the model instead.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi

#: voxels (6-connected dilation steps) added around the head mask: 1 keeps every ground-truth brain voxel of the
#: demo phantom (3 sites x 4 volumes) inside the mask, and every mask voxel within 3 voxels of the brain
HEAD_DILATION = 1
#: splits whose selected slices define the training slab
TRAINING_SPLITS = ("train", "val")


def otsu_threshold(values: np.ndarray) -> Optional[float]:
    """skimage's Otsu threshold of the finite ``values``; None when they hold fewer than two levels."""
    from skimage.filters import threshold_otsu

    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0 or finite.min() == finite.max():
        return None
    return float(threshold_otsu(finite))


def foreground_mask(volume: np.ndarray) -> Optional[np.ndarray]:
    """The largest 26-connected component of the voxels above the Otsu threshold of ``volume`` (any
    axis order); None when ``volume`` has no contrast."""
    threshold = otsu_threshold(volume)
    if threshold is None:
        return None
    above = np.nan_to_num(np.asarray(volume, dtype=np.float64), nan=-np.inf) > threshold
    components, count = ndi.label(above, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return None
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def foreground_extent(volume_zxy: np.ndarray) -> Optional[List[int]]:
    """``[first, stop)`` of the slices (axis 0) that hold foreground (:func:`foreground_mask`); None
    without contrast."""
    mask = foreground_mask(volume_zxy)
    if mask is None:
        return None
    present = np.nonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0]
    return [int(present[0]), int(present[-1]) + 1]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Holes filled in 3-D, then in every 2-D slice along each axis (cavities open in 3-D)."""
    out = ndi.binary_fill_holes(mask)
    for axis in range(out.ndim):
        moved = np.moveaxis(out, axis, 0)
        moved[:] = np.stack([ndi.binary_fill_holes(plane) for plane in moved])
    return out


def head_mask(image: np.ndarray, dilation: int = HEAD_DILATION) -> Optional[np.ndarray]:
    """Rule (a): the head of a scan on its own grid (see the module doc); None without contrast."""
    mask = foreground_mask(image)
    if mask is None:
        return None
    mask = fill_holes(mask)
    if dilation > 0:
        mask = ndi.binary_dilation(mask, iterations=int(dilation))
    return mask


# ------------------------------------------------------------------------------------- the training slab


def training_slab(volumes: Iterable[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The plan's ``field_of_view`` from the metadata entries of a preprocessed site.

    ``{"slab": [lo, hi] | None, "volumes": n, "rule": ...}``: the union of the kept slabs of the
    train/val volumes whose slices were selected (``z_split_by`` labels or brain), relative to
    their foreground extent; ``slab`` None when no volume was selected (training covered whole
    volumes).  None when an entry lacks ``foreground_z`` (metadata written before this rule).
    """
    lows, highs = [], []
    for vol in volumes:
        if vol.get("split") not in TRAINING_SPLITS:
            continue
        if "foreground_z" not in vol:
            return None
        if vol.get("z_split_by", "none") == "none" or vol["foreground_z"] is None:
            continue
        (f0, f1), (first, stop) = vol["foreground_z"], vol["z_split"]
        length = max(int(f1) - int(f0), 1)
        lows.append((int(first) - int(f0)) / length)
        highs.append((int(stop) - int(f0)) / length)
    if not lows:
        return {"slab": None, "volumes": 0,
                "rule": "training slices covered whole volumes: labels outside the head only"}
    return {"slab": [round(min(lows), 6), round(max(highs), 6)], "volumes": len(lows),
            "rule": "kept slabs of the selected train/val volumes, relative to their foreground z-extent"}


def slab_slices(foreground_z: Optional[Sequence[int]], slab: Sequence[float], depth: int) -> Tuple[int, int]:
    """Rule (b): ``[first, stop)`` of the working slices inside the training slab of a scan whose
    foreground spans ``foreground_z`` of ``depth`` slices (all of them without a foreground)."""
    if foreground_z is None:
        return 0, int(depth)
    f0, f1 = int(foreground_z[0]), int(foreground_z[1])
    length = max(f1 - f0, 1)
    first = max(0, int(math.floor(f0 + float(slab[0]) * length + 1e-9)))
    stop = min(int(depth), int(math.ceil(f0 + float(slab[1]) * length - 1e-9)))
    return first, max(first, stop)


def slab_mask(volume_meta: Dict[str, Any], slab: Sequence[float]) -> Tuple[np.ndarray, Tuple[int, int]]:
    """The training slab of a prepared scan (:func:`MultiMedSeg.data.preprocessing_plan.prepare_scan`'s entry) on the
    scan's own grid (False outside the crop, where predictions are background anyway), and its
    working slice range."""
    from .restore import restore_volume

    first, stop = slab_slices(volume_meta.get("foreground_z"), slab, volume_meta["depth_before_split"])
    kept_first, kept_stop = volume_meta["z_split"]
    depth = volume_meta["shape_before_padding"][0]
    (_, rd, rn), (_, cd, cn) = volume_meta["inplane_window"]
    side = max(rd + rn, cd + cn)  # any side holding the in-plane window: restore_volume reads only that
    inside = np.zeros((depth, side, side), dtype=np.uint8)
    z = np.arange(kept_first, kept_stop)
    inside[(z >= first) & (z < stop)] = 1
    return restore_volume(inside, volume_meta, kind="label").astype(bool), (first, stop)


# ------------------------------------------------------------------------------------- the rule


def field_of_view(image: np.ndarray, volume_meta: Dict[str, Any], plan_fov: Optional[Dict[str, Any]]
                  ) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Dict[str, Any]]:
    """Masks of the two rules for one scan: ``(head or None, slab or None, record)``.

    ``image``: the scan's voxels on its own grid (stored order); ``volume_meta``: its prepared
    entry; ``plan_fov``: the plan's ``field_of_view`` (None for an older plan).  ``record`` names
    the rule applied (``"head"``, ``"head+slab"``; ``"none"`` when neither applies).
    """
    head = head_mask(image)
    slab = plan_fov.get("slab") if plan_fov else None
    inside_slab, slices = (slab_mask(volume_meta, slab) if slab is not None else (None, None))
    parts = [name for name, mask in (("head", head), ("slab", inside_slab)) if mask is not None]
    record: Dict[str, Any] = {"rule": "+".join(parts) or "none", "head_dilation_voxels": HEAD_DILATION,
                              "head_voxels": None if head is None else int(head.sum()),
                              "training_slab": slab, "slab_slices": None if slices is None else list(slices),
                              "foreground_z": volume_meta.get("foreground_z")}
    return head, inside_slab, record


def apply_field_of_view(labels: np.ndarray, head: Optional[np.ndarray], slab: Optional[np.ndarray]
                        ) -> Tuple[np.ndarray, Dict[str, int]]:
    """Labels with every voxel outside ``head`` or ``slab`` set to 0, and the counts of labelled
    voxels each rule set to background (``removed_voxels`` in all; a voxel outside both counts
    under ``outside_head``)."""
    outside_head = np.zeros(labels.shape, dtype=bool) if head is None else ~head
    outside_slab = np.zeros(labels.shape, dtype=bool) if slab is None else ~slab
    labelled = labels > 0
    counts = {"removed_voxels": int((labelled & (outside_head | outside_slab)).sum()),
              "removed_outside_head": int((labelled & outside_head).sum()),
              "removed_outside_slab": int((labelled & outside_slab & ~outside_head).sum())}
    out = labels.copy()
    out[outside_head | outside_slab] = 0
    return out, counts


def inside_mask(head: Optional[np.ndarray], slab: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The field of view as one mask (None: everything)."""
    if head is None:
        return slab
    return head if slab is None else head & slab
