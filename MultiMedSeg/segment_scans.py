"""Segment new scans with a trained run (the library of ``MultiMedSeg/predict.py``, ``rms-predict``).

Unlike :mod:`MultiMedSeg.evaluation.test_volumes`, which segments the test split of a preprocessed site,
:func:`run_prediction` takes raw scans -- NIfTI, NRRD, MetaImage or DICOM series, in any orientation
(:mod:`MultiMedSeg.data.formats`) -- and needs nothing but the run folder:

1. the run's preprocessing plan (``checkpoints/plan.json``, :mod:`MultiMedSeg.data.preprocessing_plan`) and its
   ``--ensemble_size`` best checkpoints (:mod:`MultiMedSeg.ensemble`, each file read once) must agree
   on the number of classes and on the domain the run segments;
2. every scan is checked before any work (format, 3-D, DICOM series, output names);
3. per scan: read, preprocess exactly as the training data (:func:`MultiMedSeg.data.preprocessing_plan.prepare_scan`:
   reorientation, crop, resampling, standardisation, the site's intensity window, padding), segment
   with the same code as ``inference.py`` (:meth:`MultiMedSeg.ensemble.Ensemble.predict_volume`,
   :func:`~MultiMedSeg.ensemble.label_volumes`), map back onto the scan's own grid
   (:func:`MultiMedSeg.data.restore.restore_volume`: same shape, spacing, origin and direction), set
   to background every voxel outside the field of view the model knows
   (:mod:`MultiMedSeg.data.field_of_view`: outside the head, and outside the slab of the head the
   training slices covered when the plan records it; ``--no_fov_mask``: the raw labels) and write it
   (:func:`MultiMedSeg.data.formats.write_result`).

An adapted run writes its ``_pred`` labels (inter and intra ensemble, ``--ensemble_weights``), a
pretraining run its ``_intra`` labels, as ``inference.py`` does; ``--ensemble_size`` and
``--ensemble_weights`` default to the run's ``checkpoints/evaluation.json``
(:func:`MultiMedSeg.evaluation.settings.resolve_settings`), and ``predict.json`` records the values
used and where they came from.  Outputs: ``OUT/<id>.nii.gz`` (or
the input's format), ``OUT/<id>_probabilities.nii.gz`` (x, y, z, class) with ``--save_probabilities``
(restored with linear interpolation, so their argmax may differ from the labels at a few boundary
voxels), and ``OUT/predict.json`` (run, checkpoints, plan, and per scan its geometry, output and
warnings).  The folder is written completely or not at all (:func:`robustmedseg.io.atomic_dir`).
A scan whose spacing is far from the training data's, or whose axes are more than
:data:`~MultiMedSeg.data.orientation.OBLIQUE_TOLERANCE_DEG` degrees oblique to the canonical axes
(:func:`~MultiMedSeg.data.orientation.oblique_warning`), gets a ``warning:`` line (it is still
segmented); ``predict.json`` records per scan its warnings, its obliquity and the field-of-view rule
applied with the number of labelled voxels it set to background.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from MultiMedSeg.data import field_of_view as fov
from MultiMedSeg.data import orientation as orient
from MultiMedSeg.data.formats import ScanSource, check_scan, find_scans, output_extension, read_scan, write_result
from MultiMedSeg.data.images_dataset import SliceArrayDataset
from MultiMedSeg.data.preprocessing_plan import PLAN_NAME, PreprocessingPlan, load_plan, prepare_scan
from MultiMedSeg.data.restore import restore_volume
from MultiMedSeg.data.transforms import eval_transform
from MultiMedSeg.ensemble import Ensemble, ensemble_probabilities, label_volumes, load_ensemble, resolve_checkpoints
from MultiMedSeg import checkpoints as ck
from MultiMedSeg.evaluation.settings import resolve_settings
from robustmedseg.device import configure_backends, resolve_device, seed_everything
from robustmedseg.errors import InputError
from robustmedseg.io import atomic_dir, check_apart, check_new_output

SUMMARY_NAME = "predict.json"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def check_output_folder(output: Path, inputs: Sequence[Path], overwrite: bool, checkpoint_dir=None) -> None:
    """The output folder may not exist (unless ``overwrite``), nor be, contain or lie inside an input
    (the project's one rule, :func:`robustmedseg.io.check_apart`)."""
    given = {("--input" if i == 0 else f"--input #{i + 1}"): src for i, src in enumerate(inputs)}
    given["--checkpoint_dir"] = checkpoint_dir
    check_apart({"--output": output}, given)
    check_new_output(output, overwrite)


def check_run(plan: PreprocessingPlan, members: Ensemble, plan_path: Path) -> bool:
    """The plan and the checkpoints agree on the classes and the domain; returns True for an adapted
    (two-domain) run."""
    config = members[0].net.config
    if int(plan.num_classes) != int(config.label_nc):
        raise InputError(f"label count mismatch: the plan's data has {plan.num_classes} classes but the checkpoints "
                         f"segment {config.label_nc}", plan_path)
    domains = list(config.src_tgt_domains)
    inter = len(domains) == 2
    role, label = ("target", domains[1]) if inter else ("source", domains[0])
    if plan.domain.get("role") != role or plan.domain.get("label") != label:
        raise InputError(f"the plan was written for the {plan.domain.get('role')} domain {plan.domain.get('label')} "
                         f"but the checkpoints segment the {role} domain {label}; rewrite the plan from the "
                         f"metadata.json of the site the run segments (python -m MultiMedSeg.plan)", plan_path)
    return inter


def segment_scan(slices: np.ndarray, members: Ensemble, inter: bool, weights: Sequence[float],
                 batch_size: int, progress: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """Ensemble prediction of one scan's (Z, S, S) slices: ``labels`` (Z, S, S) of the run's output
    branch and ``probabilities`` (Z, L, S, S) of the same branch.  ``progress`` is called with the batch
    size after every member's pass over a batch (:meth:`MultiMedSeg.ensemble.Ensemble.predict_batch`).

    An adapted run whose inter weight is 0 (``--ensemble_weights 0,W`` or a run whose validation chose
    it) skips the members' inter passes, half the work: its ``pred`` is then ``(0 * inter + W * intra) / W``
    with the inter probabilities replaced by zeros, bit for bit what the two passes give (the inter
    probabilities are finite, so ``0 * inter`` is exactly 0)."""
    net = members[0].net
    config = net.config
    dataset = SliceArrayDataset(slices, 1 if inter else 0, eval_transform(config.encoder_input_size),
                                label_nc=config.label_nc, invert_intensity=config.invert_intensity)
    need_inter = inter and float(weights[0]) != 0.0
    pred = members.predict_volume(DataLoader(dataset, batch_size=batch_size, shuffle=False), need_inter, progress)
    if inter and not need_inter:
        pred["inter"] = torch.zeros_like(pred["intra"])
    branch = "pred" if inter else "intra"
    return {"branch": branch, "labels": label_volumes(pred, weights)[branch],
            "probabilities": ensemble_probabilities(pred, weights)[branch].numpy()}


class ScanProgress:
    """ONE progress bar (tqdm, on stderr) for every scan of a ``predict.py`` call, with the estimated time left.

    It counts member-slices: one slice through one ensemble member (both its passes, intra and inter),
    updated after every member's pass over a batch.  A scan's slice count is known once it is
    preprocessed; until then each scan still to come counts as the mean of the scans prepared so far, so
    the total (and the time left) covers the whole batch from the first scan on.  ``disable``: no bar
    (``--quiet``, or stderr not a terminal); the counts are kept all the same.
    """

    def __init__(self, n_scans: int, n_members: int, disable: bool = False):
        from tqdm import tqdm

        self.n_scans, self.n_members = int(n_scans), int(n_members)
        self.slices: List[int] = []  # slice count of each scan prepared so far
        self.done, self.total = 0, 0  # member-slices segmented / expected (kept with or without a bar)
        self.bar = tqdm(total=0, desc="predict", unit=" member-slices", dynamic_ncols=True, disable=disable,
                        file=sys.stderr)

    def _retotal(self) -> None:
        left = max(0, self.n_scans - len(self.slices))
        mean = sum(self.slices) / len(self.slices) if self.slices else 0
        self.total = int(round((sum(self.slices) + mean * left) * self.n_members))
        self.bar.total = self.total
        self.bar.refresh()

    def scan_ready(self, scan_id: str, n_slices: int) -> None:
        """A scan is preprocessed: its ``n_slices`` replace the estimate."""
        self.slices.append(int(n_slices))
        self.bar.set_postfix_str(f"{scan_id} ({len(self.slices)}/{self.n_scans})", refresh=False)
        self._retotal()

    def scan_failed(self) -> None:
        """A scan refused (``--keep_going``): one scan fewer to come."""
        self.n_scans -= 1
        self._retotal()

    def update(self, n: int) -> None:
        self.done += int(n)
        self.bar.update(n)

    def around(self, fn: Callable[[str], None]) -> Callable[[str], None]:
        """``fn`` (a message printer) that clears the bar while it prints."""
        def wrapped(message: str) -> None:
            if self.bar.disable:
                fn(message)
                return
            with self.bar.external_write_mode(file=sys.stderr):
                fn(message)
        return wrapped

    def __enter__(self) -> "ScanProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


def restore_probabilities(probabilities: np.ndarray, volume_meta: dict) -> np.ndarray:
    """(Z, L, S, S) -> (X, Y, Z, L) float32 on the scan's grid (background 1 outside the segmented region)."""
    channels = [restore_volume(probabilities[:, c], volume_meta, kind="probability", fill=1.0 if c == 0 else 0.0)
                for c in range(probabilities.shape[1])]
    return np.stack(channels, axis=-1).astype(np.float32)


def run_prediction(opts: Any, log: Callable[[str], None] = print,
                   warn: Callable[[str], None] = _stderr) -> Dict[str, Any]:
    """Segment every scan of ``opts.input`` into ``opts.output`` (``opts``: the typed options of ``predict.py``,
    :class:`MultiMedSeg.options.PredictOptions`); returns the summary written to ``predict.json``."""
    scans: List[ScanSource] = find_scans(opts.input, opts.series)
    keep_going = opts.keep_going
    failed: List[Dict[str, str]] = []  # --keep_going: the scans refused, with their error line
    names = {}
    for src in scans:  # every scan read completely (header and voxel data) before any work
        names[src.id] = f"{src.id}{output_extension(src, opts.output_format)}"
        try:
            check_scan(src)
        except InputError as err:
            if not keep_going:
                raise
            failed.append({"id": src.id, "input": str(src.path), "error": str(err)})
            warn(f"warning: {err} (skipped: --keep_going)")
    scans = [src for src in scans if src.id not in {f["id"] for f in failed}]
    if not scans:
        raise InputError(f"none of the {len(failed)} scan(s) could be read (first: {failed[0]['error']})",
                         opts.input[0])
    check_output_folder(opts.output, opts.input, opts.overwrite, opts.checkpoint_dir)
    settings = resolve_settings(opts.checkpoint_dir, opts.ensemble_size, opts.ensemble_weights)
    paths = resolve_checkpoints(opts.checkpoint_dir, settings.ensemble_size, exact=False)
    short = settings.shortfall(len(paths), ck.checkpoints_folder(Path(opts.checkpoint_dir)) / ck.INDEX_NAME)
    if short:
        warn(short)
    plan_folder = ck.checkpoints_folder(Path(opts.checkpoint_dir))
    plan = load_plan(plan_folder)
    device = resolve_device(opts.device)
    seed_everything(opts.seed)
    configure_backends(opts.allow_tf32, opts.cudnn_benchmark)
    members = load_ensemble(paths, device)
    inter = check_run(plan, members, plan_folder / PLAN_NAME)
    if settings.notice(inter):
        warn(settings.notice(inter))
    use_fov = not opts.no_fov_mask
    if use_fov and plan.field_of_view is None:
        warn(f"note: {plan_folder / PLAN_NAME}: the plan does not record the slices the run was trained on (written "
             "before field-of-view support): labels are set to background outside the head only; re-preprocess the "
             "site and rewrite the plan (python -m MultiMedSeg.plan --overwrite) to add the training slab rule")
    log(f"{len(scans)} scan(s); run {plan_folder} ({len(members)} checkpoint(s), "
        f"{'adapted: _pred' if inter else 'source-only: _intra'} labels, {plan.num_classes} classes, "
        f"orientation {plan.orientation})")
    records: List[Dict[str, Any]] = []
    progress = ScanProgress(len(scans), len(members), disable=opts.quiet or not sys.stderr.isatty())
    say, tell = progress.around(log), progress.around(warn)  # messages do not break the bar's line
    with atomic_dir(opts.output, overwrite=opts.overwrite) as out_dir, progress:
        for src in scans:
            try:
                records.append(_segment_one(src, opts, names[src.id], out_dir, plan, members, inter, settings,
                                            use_fov, say, tell, progress))
            except InputError as err:  # a scan refused while segmenting (e.g. no finite voxel)
                if not keep_going:
                    raise
                progress.scan_failed()
                for written in (names[src.id], f"{src.id}_probabilities{names[src.id][len(src.id):]}"):
                    (out_dir / written).unlink(missing_ok=True)
                failed.append({"id": src.id, "input": str(src.path), "error": str(err)})
                tell(f"warning: {err} (skipped: --keep_going)")
        summary = {"run": str(plan_folder), "checkpoints": [str(m.path) for m in members],
                   "branch": "pred" if inter else "intra",
                   **settings.record(inter, len(members)),  # ensemble size and weights, and where they came from
                   "output_format": opts.output_format, "plan": plan.to_dict(),
                   "field_of_view": {"applied": use_fov, "training": plan.field_of_view,
                                     "head_dilation_voxels": fov.HEAD_DILATION,
                                     "oblique_tolerance_degrees": orient.OBLIQUE_TOLERANCE_DEG},
                   "scans": records, "failed": failed}
        ck.write_json(out_dir / SUMMARY_NAME, summary)
    log(f"wrote {len(records)} segmentation(s) to {opts.output}")
    return summary


def _segment_one(src: ScanSource, opts: Any, name: str, out_dir: Path, plan: PreprocessingPlan,
                 members: Ensemble, inter: bool, settings, use_fov: bool, log, warn,
                 progress: "ScanProgress") -> Dict[str, Any]:
    """Read, preprocess, segment, restore and write one scan; returns its ``predict.json`` record."""
    scan = read_scan(src)
    vmeta, slices = prepare_scan(scan.image, src.path, src.id, plan)
    spacing = vmeta["orientation"]["spacing"]
    angle = orient.obliquity(scan.image.affine)
    warnings = [w for w in (plan.spacing_warning(spacing), orient.oblique_warning(scan.image.affine)) if w]
    for warning in warnings:
        warn(f"warning: {src.path}: {warning}")
    progress.scan_ready(src.id, int(slices.shape[0]))
    result = segment_scan(slices, members, inter, settings.ensemble_weights, opts.test_batch_size, progress.update)
    labels = restore_volume(result["labels"], vmeta, kind="label")
    inside, fov_record = None, {"rule": "off", "removed_voxels": 0}
    if use_fov:  # no label outside what the model knows (MultiMedSeg.data.field_of_view)
        head, slab, fov_record = fov.field_of_view(scan.image.get_fdata(dtype=np.float32), vmeta,
                                                   plan.field_of_view)
        labels, removed = fov.apply_field_of_view(labels, head, slab)
        fov_record.update(removed)
        inside = fov.inside_mask(head, slab)
    write_result(labels, scan, vmeta, out_dir / name)
    prob_name = None
    if opts.save_probabilities:
        stem, ext = src.id, name[len(src.id):]
        prob_name = f"{stem}_probabilities{ext}"
        probabilities = restore_probabilities(result["probabilities"], vmeta)
        if inside is not None:  # background 1 outside the field of view, as outside the crop
            probabilities[~inside] = 0.0
            probabilities[~inside, 0] = 1.0
        write_result(probabilities, scan, vmeta, out_dir / prob_name)
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=plan.num_classes).tolist()
    log(f"{src.id}: {src.format} {tuple(vmeta['shape'])} {vmeta['orientation']['stored_axcodes']} -> {name} "
        f"({int(slices.shape[0])} slices)")
    return {"id": src.id, "input": str(src.path), "format": src.format, "series": src.series,
            "shape": list(vmeta["shape"]), "stored_axcodes": vmeta["orientation"]["stored_axcodes"],
            "spacing": spacing, "slices": int(slices.shape[0]), "output": name,
            "probabilities": prob_name, "voxels_per_class": counts,
            "obliquity_degrees": round(angle, 3) if np.isfinite(angle) else None,
            "field_of_view": fov_record, "warnings": warnings}
