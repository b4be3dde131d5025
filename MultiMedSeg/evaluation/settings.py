"""The evaluation settings of a trained run: the ensemble ``inference.py`` and ``predict.py`` use by default.

A run is judged with some settings -- how many of its best checkpoints are averaged and, for an
adapted run, the (inter, intra) weights of ``_pred``.  Those settings live with the run, in ONE file,
``checkpoints/evaluation.json`` (:data:`EVALUATION_NAME`), written atomically:

* at the end of every training run (:meth:`MultiMedSeg.training.coach.Coach.train`), and
* for an existing run by ``python -m MultiMedSeg.select_evaluation --checkpoint_dir RUN``
  (:func:`MultiMedSeg.evaluation.selection.select_for_run`; the scoring lives in
  :mod:`MultiMedSeg.evaluation.selection`, which needs the ensemble).

The rule (``--ensemble_selection``): ``validation`` (default) evaluates the ensemble of ALL the best
checkpoints the run kept on the run's validation volumes for every weight pair of
:data:`WEIGHT_GRID` and keeps the one with the best mean Dice; ``paper`` records the paper's 0.6/0.4
without searching.  A pretraining run (intra branch only) records its branch and its ensemble size.

The validation score is the coach's validation Dice (:mod:`MultiMedSeg.evaluation.metrics`): per
volume on the slice grid, the ground truth and the predictions multiplied by the slices' weight
maps (:func:`~MultiMedSeg.ensemble.volume_labels`), Dice per class (both empty: 1), mean
over volumes, then mean over the foreground classes ``1..L-1``; volumes without ground truth are
skipped, as validation does.  The ensemble is computed by the one ensemble code
(:meth:`MultiMedSeg.ensemble.Ensemble.predict_volume`, :func:`~MultiMedSeg.ensemble.label_volumes`).  Ties go to the paper's weights (the first
entry of the grid).

``inference.py`` and ``predict.py`` read the file through :func:`resolve_settings`: an explicit
``--ensemble_size`` / ``--ensemble_weights`` wins, then the run file, then (older runs without the
file, or a file that judged other checkpoints than ``best.json`` lists now) the paper's 0.6/0.4 and
5 with a one-line ``note:``.  Both record the values and where they came from.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from MultiMedSeg import checkpoints as ck
from robustmedseg.errors import InputError

EVALUATION_NAME = "evaluation.json"
FORMAT = "multimedseg-evaluation/1"
PAPER_WEIGHTS: Tuple[float, float] = (0.6, 0.4)  # (inter, intra) of the paper's _pred
PAPER_ENSEMBLE_SIZE = 5
#: (inter, intra) candidates of the validation rule; the paper's first, so that ties go to it
WEIGHT_GRID: Tuple[Tuple[float, float], ...] = (PAPER_WEIGHTS, (1.0, 0.0), (0.8, 0.2), (0.4, 0.6), (0.2, 0.8),
                                                (0.0, 1.0))
RULES = ("validation", "paper")  # --ensemble_selection
INTRA_ONLY = "intra-only"  # the rule recorded for a pretraining run
FROM_FILE, FROM_FLAG, FALLBACK = "run file", "flag", "fallback"
UNUSED = "unused (intra-only run)"
COMMAND = "python -m MultiMedSeg.select_evaluation --checkpoint_dir RUN"


def best_candidate(candidates: Sequence[Mapping[str, Any]]) -> int:
    """Index of the best mean Dice; on a tie the first (the grid lists the paper's weights first)."""
    return max(range(len(candidates)), key=lambda i: (candidates[i]["mean_dice"], -i))


def write_settings(folder: Path, record: Mapping[str, Any]) -> Path:
    """Write ``folder/evaluation.json`` atomically (JSON has no NaN: non-finite scores become strings)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, Mapping):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path = Path(folder) / EVALUATION_NAME
    ck.write_json(path, clean(dict(record)))
    return path


def describe(record: Mapping[str, Any]) -> str:
    """One line: what the file says."""
    w = record.get("ensemble_weights")
    weights = f"weights inter {w['inter']:g} / intra {w['intra']:g}" if w else "intra branch"
    how = {"validation": "chosen on validation", "paper": "the paper's", INTRA_ONLY: "pretraining run"}[record["rule"]]
    best = [c for c in record.get("candidates", []) if w and (c["inter"], c["intra"]) == (w["inter"], w["intra"])]
    score = f", validation mean Dice {best[0]['mean_dice']:.3f}" if best else ""
    return f"evaluation settings: ensemble of {record['ensemble_size']}, {weights} ({how}{score})"


# ---------------------------------------------------------------------------------- reading
def read_settings(folder: Path) -> Optional[Dict[str, Any]]:
    """``folder/evaluation.json`` checked, or None when the run has none; malformed -> InputError."""
    path = Path(folder) / EVALUATION_NAME
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict) or rec.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        size, weights = rec["ensemble_size"], rec["ensemble_weights"]
        if rec["branch"] not in ("pred", "intra") or not isinstance(size, int) or size < 1:
            raise ValueError("bad branch or ensemble_size")
        if rec["branch"] == "pred":
            pair = (float(weights["inter"]), float(weights["intra"]))
            if min(pair) < 0 or sum(pair) <= 0 or not all(map(math.isfinite, pair)):
                raise ValueError(f"ensemble_weights {pair} are not two non-negative numbers with a positive sum")
        if not isinstance(rec["checkpoints"], list):
            raise ValueError("checkpoints is not a list")
    except (ValueError, TypeError, KeyError) as err:
        raise InputError(f"malformed evaluation settings ({err}); rewrite them with {COMMAND} --overwrite",
                         path) from None
    return rec


@dataclass
class EnsembleSettings:
    """The ensemble size and weights a command uses, and where each came from."""

    ensemble_size: int
    ensemble_weights: Tuple[float, float]
    sources: Dict[str, str] = field(default_factory=dict)  # option -> FROM_FLAG / FROM_FILE / FALLBACK
    file: Optional[Path] = None  # the run's evaluation.json
    why_fallback: str = ""

    def weights_for(self, inter: bool) -> Optional[Tuple[float, float]]:
        return self.ensemble_weights if inter else None

    def notice(self, inter: bool) -> Optional[str]:
        """The one-line ``note:`` when a value that matters fell back to the paper's."""
        fell = [f"--ensemble_size {self.ensemble_size}"] if self.sources["ensemble_size"] == FALLBACK else []
        if inter and self.sources["ensemble_weights"] == FALLBACK:
            fell.append("--ensemble_weights " + ",".join(f"{w:g}" for w in self.ensemble_weights))
        if not fell:
            return None
        return (f"note: {self.file}: {self.why_fallback}: using the paper's {' and '.join(fell)}; choose the run's "
                f"settings with {COMMAND} --target_data PREP (or pass the flags)")

    def shortfall(self, kept: int, index: Path) -> Optional[str]:
        """The one-line ``note:`` when ``--ensemble_size`` asked for more members than the ``kept`` best
        checkpoints that ``index`` (``best.json``) lists: all of them are used."""
        if kept >= self.ensemble_size or self.sources["ensemble_size"] != FROM_FLAG:
            return None
        return (f"note: {index}: --ensemble_size {self.ensemble_size} but the run kept {kept} best checkpoint(s): "
                f"using all {kept}")

    def record(self, inter: bool, used_size: int) -> Dict[str, Any]:
        """What ``inference.json`` / ``predict.json`` keep: values and their sources."""
        weights = self.weights_for(inter)
        from_file = FROM_FILE in (self.sources["ensemble_size"], self.sources["ensemble_weights"] if inter else None)
        return {"ensemble_size": used_size,
                "ensemble_weights": {"inter": weights[0], "intra": weights[1]} if weights else None,
                "evaluation_settings": {
                    "file": str(self.file) if from_file else None,
                    "ensemble_size": self.sources["ensemble_size"],
                    "ensemble_weights": self.sources["ensemble_weights"] if inter else UNUSED}}


def resolve_settings(checkpoint_dir: Path, ensemble_size: Optional[int],
                     ensemble_weights: Optional[Sequence[float]]) -> EnsembleSettings:
    """An explicit flag (not None) wins; then the run's ``evaluation.json``; then the paper's
    (:data:`PAPER_ENSEMBLE_SIZE`, :data:`PAPER_WEIGHTS`).  A file that judged other checkpoints than
    ``best.json`` lists now (the run went on after it was written) is not used."""
    folder = ck.checkpoints_folder(Path(checkpoint_dir))
    path = folder / EVALUATION_NAME
    rec, why = None, ""
    if ensemble_size is None or ensemble_weights is None:
        rec = read_settings(folder)
        if rec is None:
            why = "the run has no evaluation settings (trained before they were recorded)"
        else:
            kept = [e.file for e in ck.BestIndex.load(folder).entries]
            if rec["checkpoints"] != kept:
                why = f"the evaluation settings judged other checkpoints than {ck.INDEX_NAME} lists now"
                rec = None
    size_src = FROM_FLAG if ensemble_size is not None else FROM_FILE if rec else FALLBACK
    size = ensemble_size if ensemble_size is not None else rec["ensemble_size"] if rec else PAPER_ENSEMBLE_SIZE
    file_weights = rec.get("ensemble_weights") if rec else None
    if ensemble_weights is not None:
        weights, w_src = (float(ensemble_weights[0]), float(ensemble_weights[1])), FROM_FLAG
    elif file_weights:
        weights, w_src = (float(file_weights["inter"]), float(file_weights["intra"])), FROM_FILE
    else:  # no file, or the file of a pretraining run (the weights are not used then)
        weights, w_src = PAPER_WEIGHTS, FALLBACK
        if rec is not None:
            why = "the evaluation settings are a pretraining run's (no inter/intra weights)"
    return EnsembleSettings(int(size), weights, {"ensemble_size": size_src, "ensemble_weights": w_src}, path, why)
