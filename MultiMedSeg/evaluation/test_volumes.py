"""Segment the test volumes of a preprocessed site (the library of ``MultiMedSeg/inference.py``,
docs/method.md#inference, with the docs/differences.md#d9-39 fixes): NIfTI output and metrics.

:func:`run_inference` segments every test volume with the ``--ensemble_size`` best
checkpoints of a training run (``best.json``, best first; a run that kept fewer uses all it kept)
with the one ensemble code, :class:`MultiMedSeg.ensemble.Ensemble` (each file loaded once).  ``--ensemble_size`` and
``--ensemble_weights`` default to the run's evaluation settings (``checkpoints/evaluation.json``,
:mod:`MultiMedSeg.evaluation.settings`; the paper's 5 and 0.6/0.4 for a run without them);
``inference.json`` records the values used and where they came from.

* ``intra`` = mean over the checkpoints of the probabilities in the slice's own (target)
  domain; ``inter`` = mean of the probabilities of the translated slice segmented by the
  source head (FIX: the reference accumulated the intra probabilities twice);
* ``pred`` = argmax of ``w_inter * inter + w_intra * intra`` (``--ensemble_weights``);
  the means divide by the number of checkpoints actually used;
* ``trans`` = the translated image of the best checkpoint, written as float32 (never
  quantised to the header's integer type).

As the original, the weight maps are not applied at inference; with ``--mask_outside_weight``
pixels outside a slice's weight map are background (and -1 in ``trans``).  With
``invert_intensity`` the translated image is negated again where that checkpoint's inter
prediction is background (undoing the interpreter's inversion there), as the original.  Label volumes
and the translation are mapped back to the original grid with the preprocessing metadata
(:func:`MultiMedSeg.data.restore.restore_volume`) and written with the original affine
(:func:`~MultiMedSeg.data.restore.write_nifti_like`) as ``<id>_intra``, ``<id>_inter``,
``<id>_pred`` and ``<id>_trans`` ``.nii.gz``.  A pretraining (source-only) run writes only
``<id>_intra``.

Determinism (docs/differences.md#d9-36): models run in ``eval()`` -- the generator uses its fixed noise
buffers and BatchNorm its running statistics (``bn_mode='running'``, the default), so the
same inputs always give the same files, whatever the batch composition.

Before any work, the test slices are checked against the metadata
(:func:`MultiMedSeg.data.restore.check_slices_match`: every volume known, same slice files,
same size, and the slice fingerprint preprocessing recorded), so another site's metadata is
refused instead of restoring onto the wrong grid.

With ground truth (the label path recorded in the metadata, or ``--labels DIR`` holding
``<id>.nii.gz``) a ``metrics.csv`` lists per volume, prediction and class the Dice and the
95th-percentile and maximum Hausdorff distances in mm (voxel spacing from the affine).  Volumes
without a ground-truth file still get their predictions; a ``warning:`` line names them,
``inference.json`` lists them under ``no_ground_truth`` and ``metrics.csv`` covers the others.
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader

from MultiMedSeg.data.images_dataset import VolumeDataset
from MultiMedSeg.data.restore import check_slices_match, load_metadata, restore_volume, volume_meta, write_nifti_like
from MultiMedSeg.data.transforms import eval_transform
from MultiMedSeg.ensemble import label_volumes, load_ensemble, resolve_checkpoints, translation_volume, volume_labels
from MultiMedSeg import checkpoints as ck
from MultiMedSeg.evaluation.settings import resolve_settings
from MultiMedSeg.evaluation.metrics import METRICS_CSV_FIELDS, METRICS_UNIT, volume_scores
from robustmedseg.device import configure_backends, resolve_device, seed_everything
from robustmedseg.errors import InputError, warn
from robustmedseg.io import atomic_dir, check_new_output

BRANCHES = ("intra", "inter", "pred")


# ---------------------------------------------------------------------------------- ground truth
def spacing_from_affine(affine: Sequence[Sequence[float]]) -> Tuple[float, float, float]:
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def ground_truth_path(vid: str, meta: Mapping[str, Any], labels_dir: Optional[Path]) -> Tuple[Optional[Path], str]:
    """``(path, "")`` of the ground truth -- ``--labels DIR/<id>.nii[.gz]`` if given, else the
    metadata's label path -- or ``(None, why)`` when there is none."""
    if labels_dir is not None:
        if not labels_dir.is_dir():
            raise InputError("ground-truth folder not found (given by --labels)", labels_dir)
        for name in (f"{vid}.nii.gz", f"{vid}.nii"):
            if (labels_dir / name).is_file():
                return labels_dir / name, ""
        return None, f"no {vid}.nii.gz in {labels_dir}"
    label = meta.get("label")
    if not label:
        return None, "no label file at preprocessing"
    if not Path(label).is_file():
        return None, f"{label} not found"
    return Path(label), ""


def read_ground_truth(path: Path, shape: Sequence[int]) -> np.ndarray:
    try:
        arr = np.asarray(nib.load(str(path)).dataobj)
    except Exception as err:  # noqa: BLE001 - unreadable NIfTI
        raise InputError(f"cannot read ground-truth NIfTI ({err})", path) from None
    if arr.shape != tuple(shape):
        raise InputError(f"ground truth has shape {arr.shape}, the test volume {tuple(shape)}", path)
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(f"ground truth has {bad} voxel(s) that are NaN or inf", path)
    return np.rint(arr).astype(np.int64)


def in_mask_layout(gt: np.ndarray, meta: Mapping[str, Any], vmeta: Mapping[str, Any]) -> np.ndarray:
    """The label file's values in the slices' class layout: with brain masks and the brain class
    (``preprocess --brain-masks`` without ``--no-brain-class``) the masks are [background, brain, label 1, ...],
    so a label file's vessel (1) is class 2 and its unlabelled brain voxels are class 1, as the slice masks
    (:func:`MultiMedSeg.data.volumes_to_slices.with_brain_class`, here on the original grid).  Otherwise
    ``gt`` unchanged."""
    from MultiMedSeg.data.volumes_to_slices import with_brain_class

    options = meta.get("options", {}) if isinstance(meta, Mapping) else {}
    brain_path = vmeta.get("brain_mask")
    if not (options.get("brain_masks") and options.get("brain_class", True) and brain_path):
        return gt
    brain = read_ground_truth(Path(brain_path), gt.shape) > 0
    return with_brain_class(gt, brain).astype(np.int64)


# ---------------------------------------------------------------------------------- run
def _fmt(v: float) -> str:
    return f"{v:.6f}" if math.isfinite(v) else str(v)


def run_inference(opts: Any, log=print, notice=None) -> Dict[str, Any]:
    """Segment the test volumes, write NIfTI files (and metrics.csv); returns a summary dict.  ``opts``: the
    typed options of ``inference.py`` (:class:`MultiMedSeg.options.InferenceOptions`).

    ``notice`` (default: stderr) gets the one-line note when the run has no evaluation settings."""
    device = resolve_device(opts.device)
    seed_everything(opts.seed)
    configure_backends(opts.allow_tf32, opts.cudnn_benchmark)
    settings = resolve_settings(opts.checkpoint_dir, opts.ensemble_size, opts.ensemble_weights)
    # up to the ensemble size: a run that kept fewer best checkpoints uses all it kept (a note when the flag asked more)
    paths = resolve_checkpoints(opts.checkpoint_dir, settings.ensemble_size, exact=False)
    short = settings.shortfall(len(paths), ck.checkpoints_folder(Path(opts.checkpoint_dir)) / ck.INDEX_NAME)
    if short:
        (notice or (lambda m: print(m, file=sys.stderr)))(short)
    models = load_ensemble(paths, device, trans_clamp=opts.trans_clamp)
    config = models.config
    if opts.label_nc is not None and opts.label_nc != config.label_nc:
        raise InputError(f"checkpoints segment {config.label_nc} classes but --label_nc is {opts.label_nc}",
                         models[0].path)
    inter = models.adapted
    note = settings.notice(inter)
    if note:
        (notice or (lambda m: print(m, file=sys.stderr)))(note)
    weights = settings.ensemble_weights
    domain = 1 if inter else 0  # test data is the target domain of an adapted run, the source otherwise
    meta = load_metadata(opts.metadata)
    dataset = VolumeDataset(opts.test_root, domain, eval_transform(config.encoder_input_size),
                            label_nc=config.label_nc, invert_intensity=config.invert_intensity, flag="--test_root")
    check_slices_match(meta, {vid: [dataset.paths[i] for i in idx] for vid, idx in dataset.volumes.items()},
                       opts.metadata)  # fail before any work when the metadata describes other slices
    check_new_output(opts.exp_dir, opts.overwrite)
    rows: List[Dict[str, Any]] = []
    written: List[str] = []
    no_gt: Dict[str, str] = {}
    with atomic_dir(opts.exp_dir, overwrite=opts.overwrite) as out_dir:
        for vid, idx in dataset.volumes.items():
            vmeta = volume_meta(meta, vid, opts.metadata)
            batches = [idx[i:i + opts.test_batch_size] for i in range(0, len(idx), opts.test_batch_size)]
            loader = DataLoader(dataset, batch_sampler=batches, num_workers=opts.test_workers)
            masks: List[Any] = []

            def with_masks(loader=loader, masks=masks):  # the slices' ground truth, for --metrics_space preprocessed
                for batch in loader:
                    masks.append(batch["mask"])
                    yield batch

            pred = models.predict_volume(with_masks(), inter)
            labels = label_volumes(pred, weights, opts.mask_outside_weight)
            restored = {k: restore_volume(v, vmeta, kind="label") for k, v in labels.items()}
            for k, v in restored.items():
                written.append(str(write_nifti_like(v, vmeta, out_dir / f"{vid}_{k}.nii.gz").name))
            if inter:
                trans = translation_volume(pred, opts.mask_outside_weight)
                image = restore_volume(trans, vmeta, kind="image").astype(np.float32)
                written.append(str(write_nifti_like(image, vmeta, out_dir / f"{vid}_trans.nii.gz").name))
            unit = METRICS_UNIT[opts.metrics_space]
            if opts.metrics_space == "preprocessed":  # the original's figures: the slice stack, voxel units
                mask = torch.cat(masks)
                gt_path, why = (vid, "") if bool(mask.any()) else (None, "its test slices carry no mask")
                scored = {k: (v.astype(np.int64), None) for k, v in labels.items()}
            else:
                gt_path, why = ground_truth_path(vid, vmeta, opts.labels)
                scored = {k: (v.astype(np.int64), spacing_from_affine(vmeta["affine"])) for k, v in restored.items()}
            if gt_path is None:
                no_gt[vid] = why
            else:
                if opts.metrics_space == "preprocessed":
                    gt = volume_labels(mask, torch.ones_like(mask[:, :1])).numpy()  # argmax, no weight map
                else:
                    gt = in_mask_layout(read_ground_truth(gt_path, vmeta["shape"]), meta, vmeta)
                for branch, (vol, spacing) in scored.items():
                    scores = volume_scores(vol, gt, config.label_nc, spacing,
                                           distances=("hd95", "hd") if spacing is not None else ("hd",),
                                           vessels_within_gt=opts.consider_only_vessels_within_brain,
                                           both_empty=opts.empty_class_score)
                    for cls, s in scores.items():
                        rows.append({"volume": vid, "prediction": branch, "class": cls, "dice": s["dice"],
                                     "hd95": s.get("hd95"), "hd": s["hd"], "unit": unit})
            log(f"{vid}: wrote {', '.join(f'{vid}_{k}' for k in list(restored) + (['trans'] if inter else []))}")
        if rows:
            with open(out_dir / "metrics.csv", "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=METRICS_CSV_FIELDS)
                w.writeheader()
                for r in rows:
                    w.writerow({k: (_fmt(v) if isinstance(v, float) else v) for k, v in r.items()})
        ck.write_json(out_dir / "inference.json", {
            "checkpoints": [str(m.path) for m in models], "feature_scales": [m.feature_scale for m in models],
            **settings.record(inter, len(models)),  # ensemble_size, ensemble_weights and where they came from
            "domain": "target" if inter else "source", "volumes": list(dataset.volumes), "files": written,
            "no_ground_truth": no_gt, "empty_class_score": opts.empty_class_score, "trans_clamp": opts.trans_clamp,
            "metrics_space": opts.metrics_space, "metrics_unit": METRICS_UNIT[opts.metrics_space]})
    if no_gt:
        scored = len(dataset.volumes) - len(no_gt)
        warn(f"no ground truth for {len(no_gt)} of {len(dataset.volumes)} test volume(s) ("
             + "; ".join(f"{vid}: {why}" for vid, why in no_gt.items()) + "): predictions written, "
             + (f"metrics.csv covers the other {scored}" if scored else "no metrics.csv"), opts.exp_dir)
    summary = summarize(rows, "pred" if inter else "intra")
    if summary:
        log(summary["line"])
    return {"volumes": list(dataset.volumes), "files": written, "rows": rows, "summary": summary,
            "n_checkpoints": len(models), "no_ground_truth": no_gt, **settings.record(inter, len(models))}


def summarize(rows: Sequence[Mapping[str, Any]], branch: str) -> Dict[str, Any]:
    """Mean Dice / HD95 / HD per class over volumes for one prediction branch, and a printable line."""
    sel = [r for r in rows if r["prediction"] == branch]
    if not sel:
        return {}
    classes = sorted({r["class"] for r in sel}, key=lambda c: (c == "foreground", c))
    means: Dict[str, Dict[str, float]] = {}
    for c in classes:
        rs = [r for r in sel if r["class"] == c]
        means[c] = {m: float(np.mean([r[m] if r[m] is not None else math.nan for r in rs]))
                    for m in ("dice", "hd95", "hd")}
    per_class = [c for c in classes if c != "foreground"]
    mean_dice = float(np.mean([means[c]["dice"] for c in per_class])) if per_class else float("nan")
    parts = ", ".join(f"class {c} Dice {means[c]['dice']:.3f} HD95 {means[c]['hd95']:.2f}" for c in classes)
    line = (f"summary ({branch}, {len({r['volume'] for r in sel})} volumes): mean Dice {mean_dice:.3f}; {parts}")
    return {"branch": branch, "per_class": means, "mean_dice": mean_dice, "line": line}
