"""Choosing a run's evaluation settings on its validation volumes (the writer of ``checkpoints/evaluation.json``).

:mod:`MultiMedSeg.evaluation.settings` owns the file (its format, reading it, what ``inference.py`` and
``predict.py`` take from it); this module scores the candidates, which needs the inference code
(:mod:`MultiMedSeg.evaluation.test_volumes`), so that the file's reader stays below the inference code and the
two modules import each other in one direction only. Used at the end of training
(:meth:`MultiMedSeg.training.coach.Coach.record_evaluation_settings`) and by
``python -m MultiMedSeg.select_evaluation`` (:func:`select_for_run`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from MultiMedSeg import checkpoints as ck
from MultiMedSeg.evaluation.settings import (EVALUATION_NAME, FORMAT, INTRA_ONLY, PAPER_WEIGHTS, RULES, WEIGHT_GRID,
                                             best_candidate, describe, write_settings)
from robustmedseg.errors import InputError


# ---------------------------------------------------------------------------------- choosing
def validation_scores(members: Sequence[Any], dataset: Any, device: Any, batch_size: int, label_nc: int,
                      grid: Sequence[Tuple[float, float]] = WEIGHT_GRID, vessels_within_gt: bool = False,
                      workers: int = 0, both_empty: str = "perfect", classes: Optional[Sequence[str]] = None
                      ) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Validation volumes scored and ``[{inter, intra, mean_dice, dice: {class: mean over volumes}}]``
    for each weight pair of ``grid``, of the ensemble ``members`` of an adapted run on ``dataset``
    (a :class:`~MultiMedSeg.data.images_dataset.VolumeDataset` of target slices); ``both_empty`` scores a
    class absent from both (:func:`MultiMedSeg.evaluation.metrics.binary_scores`); ``classes`` (default every
    class but the background; a run's ``--optimize_mode`` classes, :func:`MultiMedSeg.losses.selected_classes`)
    are the ones scored and averaged."""
    import torch
    from torch.utils.data import DataLoader

    from MultiMedSeg.ensemble import Ensemble, label_volumes, volume_labels
    from MultiMedSeg.evaluation.metrics import volume_scores

    ensemble = members if isinstance(members, Ensemble) else Ensemble(members, device)
    classes = [str(c) for c in classes] if classes else [str(c) for c in range(1, label_nc)]
    per_volume: List[List[Dict[str, float]]] = [[] for _ in grid]
    scored: List[str] = []
    for vid, idx in dataset.volumes.items():
        loader = DataLoader(dataset, batch_sampler=[idx[i:i + batch_size] for i in range(0, len(idx), batch_size)],
                            num_workers=workers)
        masks: List[torch.Tensor] = []

        def batches(loader=loader, masks=masks):  # the ground truth of the batches the ensemble sees
            for batch in loader:
                masks.append(batch["mask"])
                yield batch

        pred = ensemble.predict_volume(batches(), inter=True)
        mask = torch.cat(masks)
        if not bool(mask.any()):  # a volume without ground truth, skipped as in validation
            continue
        gt = volume_labels(mask, pred["weight"]).numpy()
        scored.append(vid)
        for scores, weights in zip(per_volume, grid):
            labels = label_volumes(pred, weights, mask_outside_weight=True)["pred"]
            dice = volume_scores(labels, gt, label_nc, distances=(), vessels_within_gt=vessels_within_gt,
                                 both_empty=both_empty, background="0" in classes)
            scores.append({c: dice[c]["dice"] for c in classes})
    candidates = []
    for scores, (w_inter, w_intra) in zip(per_volume, grid):
        dice = {c: float(np.mean([s[c] for s in scores])) for c in classes} if scores else {}
        mean = float(np.mean(list(dice.values()))) if dice else float("nan")
        candidates.append({"inter": float(w_inter), "intra": float(w_intra), "mean_dice": mean, "dice": dice})
    return scored, candidates


def choose_settings(folder: Path, rule: str, dataset: Any = None, device: Any = None, batch_size: int = 8,
                    vessels_within_gt: bool = False, workers: int = 0, inter: Optional[bool] = None,
                    members: Optional[Sequence[Any]] = None, both_empty: str = "perfect",
                    classes: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The content of ``evaluation.json`` for the run whose ``checkpoints`` folder is ``folder``.

    ``rule`` is ``validation`` (needs ``dataset``, the validation volumes) or ``paper``; a pretraining
    run records :data:`INTRA_ONLY`.  ``inter`` (adapted run or not) is read from the checkpoints when
    None.  Every checkpoint the run kept is part of the ensemble (``members``: already loaded with
    :func:`~MultiMedSeg.ensemble.load_ensemble`, else read here when needed).  ``both_empty``
    (``--empty_class_score``) scores a class absent from both in the validation Dice; ``classes`` are the
    classes that judge the weights (:func:`validation_scores`; the run's ``--optimize_mode`` classes)."""
    import torch

    from MultiMedSeg.ensemble import load_ensemble, resolve_checkpoints

    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    device = torch.device("cpu") if device is None else device
    paths = resolve_checkpoints(folder)  # all the run kept, best first
    if members is None and (inter is None or (inter and rule == "validation")):
        members = load_ensemble(paths, device)
    if inter is None:
        inter = len(members[0].net.config.src_tgt_domains) == 2
    record: Dict[str, Any] = {"format": FORMAT, "branch": "pred" if inter else "intra", "ensemble_size": len(paths),
                              "ensemble_weights": None, "rule": rule if inter else INTRA_ONLY,
                              "checkpoints": [p.name for p in paths], "validation": None, "candidates": []}
    if not inter:
        return record
    chosen = PAPER_WEIGHTS
    if rule == "validation":
        if dataset is None:
            raise ValueError("the validation rule needs the validation volumes")
        label_nc = members[0].net.config.label_nc
        classes = [str(c) for c in classes] if classes else [str(c) for c in range(1, label_nc)]
        scored, candidates = validation_scores(members, dataset, device, batch_size, label_nc,
                                               vessels_within_gt=vessels_within_gt, workers=workers,
                                               both_empty=both_empty, classes=classes)
        record["validation"] = {"volumes": scored, "classes": classes,
                                "empty_class_score": both_empty,
                                "score": "mean over the classes of the mean Dice over the volumes (slice grid, "
                                         "weight maps applied, as validation)"}
        if scored:
            record["candidates"] = candidates
            best = candidates[best_candidate(candidates)]
            chosen = (best["inter"], best["intra"])
        else:  # nothing to judge with: the paper's weights
            record["rule"] = "paper"
            record["validation"]["note"] = "no validation volume has ground truth: the paper's weights"
    record["ensemble_weights"] = {"inter": float(chosen[0]), "intra": float(chosen[1])}
    return record


# ---------------------------------------------------------------------------------- existing runs
def select_for_run(opts: Any, saved: Optional[Any] = None, log: Callable[[str], None] = print) -> Path:
    """``python -m MultiMedSeg.select_evaluation``: (re)write the ``evaluation.json`` of an existing run.

    Validation volumes: ``--val_root``, else ``--target_data``/val, else the ``val_root`` of the run's
    stored options (``saved``: its ``opt.json`` read back by the command,
    :func:`MultiMedSeg.options.load_run_options`; None when the run has none)."""
    from MultiMedSeg.data.images_dataset import VolumeDataset
    from MultiMedSeg.data.transforms import eval_transform
    from MultiMedSeg.ensemble import load_ensemble, resolve_checkpoints
    from robustmedseg.device import resolve_device, seed_everything

    folder = ck.checkpoints_folder(Path(opts.checkpoint_dir))
    path = folder / EVALUATION_NAME
    if path.exists() and not opts.overwrite:
        raise InputError("the run already has evaluation settings (pass --overwrite to choose them again)", path)
    device = resolve_device(opts.device)
    seed_everything(0)
    members = load_ensemble(resolve_checkpoints(folder), device)
    config = members[0].net.config
    inter = len(config.src_tgt_domains) == 2
    dataset = None
    if inter and opts.ensemble_selection == "validation":
        val_root = opts.val_root or (opts.target_data / "val" if opts.target_data else None)
        if val_root is None and saved is not None and saved.val_root is not None:
            val_root = Path(saved.val_root)
        if val_root is None:
            raise InputError("the run's opt.json names no validation folder: give --target_data or --val_root",
                             folder.parent / "opt.json")
        dataset = VolumeDataset(Path(val_root), 1, eval_transform(config.encoder_input_size),
                                label_nc=config.label_nc, invert_intensity=config.invert_intensity,
                                flag="--val_root")
    both_empty = opts.empty_class_score or (saved.empty_class_score if saved is not None else "perfect")
    classes = None  # a run without opt.json: every class but the background
    if saved is not None:
        from MultiMedSeg.losses import LossConfig, selected_classes

        classes = selected_classes(LossConfig.from_options(saved), config.label_nc)
    record = choose_settings(folder, opts.ensemble_selection, dataset, device, opts.test_batch_size,
                             bool(saved is not None and saved.consider_only_vessels_within_brain), inter=inter,
                             members=members, both_empty=both_empty, classes=classes)
    out = write_settings(folder, record)
    log(f"wrote {out}: {describe(record)}")
    return out

