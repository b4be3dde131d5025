"""A trained run carries the settings it was judged with (issue 19 point 4): ``checkpoints/evaluation.json``.

The module fixture trains tiny runs on the conftest phantom (pretraining on site 0, adaptation to
site 2; 4 steps, a validation every step, so the adapted run keeps several best checkpoints) and
checks that: training writes the file (the choice from the weight grid, every candidate's validation
score, the scores really are the ensemble's validation Dice); ``inference.py`` and ``predict.py``
with only the required flags use it and say so; an explicit flag overrides it and is recorded; a run
without it (or with a stale one) falls back to the paper's 0.6/0.4 and 5 with one ``note:`` line;
``python -m MultiMedSeg.select_evaluation`` (re)writes it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from MultiMedSeg import inference as inference_cli
from MultiMedSeg import predict as predict_cli
from MultiMedSeg import pretrain as pretrain_cli
from MultiMedSeg import select_evaluation as select_cli
from MultiMedSeg import train as train_cli
from MultiMedSeg.data.images_dataset import VolumeDataset
from MultiMedSeg.data.restore import load_metadata
from MultiMedSeg.data.transforms import eval_transform
from MultiMedSeg.ensemble import SegmentationEnsemble, resolve_checkpoints
from MultiMedSeg.evaluation.settings import (EVALUATION_NAME, PAPER_WEIGHTS, WEIGHT_GRID, best_candidate, read_settings,
                                             write_settings)
from MultiMedSeg.evaluation.metrics import volume_scores
from builders import MMS_TINY as TINY, exit_message, tiny_generator_file as write_generator


@pytest.fixture(scope="module")
def runs(preprocessed_sites, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation_runs")
    gen = write_generator(root / "final_global_model.pt")
    pre, ada = root / "pretrain", root / "adapt"
    pretrain_cli.main(["--exp_dir", str(pre), "--source_data", str(preprocessed_sites[0]), "--stylegan_weights",
                       str(gen), "--src_label", "0", "--lpips_lambda", "0", "--max_steps", "4", "--val_interval", "2",
                       *TINY])
    train_cli.main(["--exp_dir", str(ada), "--source_data", str(preprocessed_sites[0]), "--target_data",
                    str(preprocessed_sites[2]), "--checkpoint_dir", str(pre), "--src_label", "0", "--tgt_label", "2",
                    "--one_target_slice", "--max_steps", "4", "--val_interval", "1", "--lpips_lambda", "0", *TINY])
    return {"root": root, "pretrain": pre, "adapt": ada, "site2": preprocessed_sites[2]}


def _settings(run: Path) -> dict:
    return json.loads((run / "checkpoints" / EVALUATION_NAME).read_text())


def _best_files(run: Path) -> list:
    return [e["file"] for e in json.loads((run / "checkpoints" / "best.json").read_text())]


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _infer(run: Path, site: Path, out: Path, *extra: str) -> dict:
    inference_cli.main(["--exp_dir", str(out), "--checkpoint_dir", str(run), "--target_data", str(site),
                        "--device", "cpu", *extra])
    return json.loads((out / "inference.json").read_text())


def _labels(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


# --------------------------------------------------------------------------------- training writes the file


def test_adaptation_records_the_choice_and_every_candidates_score(runs):
    rec = _settings(runs["adapt"])
    kept = _best_files(runs["adapt"])
    assert len(kept) >= 2  # an ensemble, not one checkpoint
    assert rec["format"] == "multimedseg-evaluation/1" and rec["branch"] == "pred" and rec["rule"] == "validation"
    assert rec["ensemble_size"] == len(kept) and rec["checkpoints"] == kept
    val_ids = load_metadata(runs["site2"])["splits"]["val"]
    assert rec["validation"]["volumes"] == val_ids and rec["validation"]["classes"] == ["1", "2"]
    grid = [(c["inter"], c["intra"]) for c in rec["candidates"]]
    assert grid == [tuple(map(float, w)) for w in WEIGHT_GRID] and grid[0] == PAPER_WEIGHTS
    for c in rec["candidates"]:
        assert set(c["dice"]) == {"1", "2"} and all(0.0 <= d <= 1.0 for d in c["dice"].values())
        assert c["mean_dice"] == pytest.approx(np.mean(list(c["dice"].values())))
    best = max(c["mean_dice"] for c in rec["candidates"])
    first_best = next(c for c in rec["candidates"] if c["mean_dice"] == best)  # ties: the earliest, the paper's
    assert rec["ensemble_weights"] == {"inter": first_best["inter"], "intra": first_best["intra"]}


def test_ties_go_to_the_papers_weights():
    scores = [0.5, 0.7, 0.7, 0.2, 0.7, 0.1]  # in WEIGHT_GRID order: the paper's first
    assert best_candidate([{"mean_dice": s} for s in scores]) == 1
    assert best_candidate([{"mean_dice": 0.7}, {"mean_dice": 0.7}]) == 0


def test_the_intra_candidate_is_the_ensembles_validation_dice(runs):
    """The (0, 1) candidate recomputed with other code: SegmentationEnsemble's target head on the
    validation slices, ground truth and prediction multiplied by the weight map, MedPy Dice."""
    rec = _settings(runs["adapt"])
    ensemble = SegmentationEnsemble.load(resolve_checkpoints(runs["adapt"]), label=2)
    assert ensemble.head == "target"
    data = VolumeDataset(runs["site2"] / "val", 1, eval_transform(32), label_nc=3)
    per_class = {"1": [], "2": []}
    for vid, idx in data.volumes.items():
        items = [data[i] for i in idx]
        images = torch.stack([it["data"] for it in items])
        weight = torch.stack([it["weight"] for it in items])
        gt = (torch.stack([it["mask"] for it in items]) * weight).argmax(1).numpy()
        pred = (ensemble.probabilities(images) * weight).argmax(1).numpy()
        scores = volume_scores(pred, gt, 3, distances=())
        for c in per_class:
            per_class[c].append(scores[c]["dice"])
    intra = next(c for c in rec["candidates"] if (c["inter"], c["intra"]) == (0.0, 1.0))
    for c, values in per_class.items():
        assert intra["dice"][c] == pytest.approx(np.mean(values), abs=1e-6)


def test_pretraining_records_its_branch_and_ensemble_size(runs):
    rec = _settings(runs["pretrain"])
    kept = _best_files(runs["pretrain"])
    assert rec["branch"] == "intra" and rec["rule"] == "intra-only" and rec["ensemble_weights"] is None
    assert rec["ensemble_size"] == len(kept) and rec["checkpoints"] == kept and rec["candidates"] == []


# --------------------------------------------------------------------------------- inference and predict use it


def test_inference_uses_the_runs_settings_and_matches_the_explicit_flags(runs, tmp_path, capsys):
    rec = _settings(runs["adapt"])
    w = rec["ensemble_weights"]
    capsys.readouterr()
    default = _infer(runs["adapt"], runs["site2"], tmp_path / "default")
    assert "note:" not in capsys.readouterr().err
    assert default["ensemble_weights"] == w and default["ensemble_size"] == rec["ensemble_size"]
    assert len(default["checkpoints"]) == rec["ensemble_size"]
    assert default["evaluation_settings"] == {"file": str(runs["adapt"] / "checkpoints" / EVALUATION_NAME),
                                              "ensemble_size": "run file", "ensemble_weights": "run file"}
    explicit = _infer(runs["adapt"], runs["site2"], tmp_path / "explicit", "--ensemble_weights",
                      f"{w['inter']},{w['intra']}", "--ensemble_size", str(rec["ensemble_size"]))
    assert explicit["evaluation_settings"] == {"file": None, "ensemble_size": "flag", "ensemble_weights": "flag"}
    assert explicit["ensemble_weights"] == w and explicit["checkpoints"] == default["checkpoints"]
    assert (tmp_path / "default" / "metrics.csv").read_text() == (tmp_path / "explicit" / "metrics.csv").read_text()


def test_the_files_weights_decide_pred(runs, tmp_path):
    """A run whose file says inter 0 / intra 1: inference's default _pred is its _intra, voxel for voxel;
    inter 1 / intra 0: its _inter."""
    run = _copy(runs["adapt"], tmp_path / "run")
    rec = _settings(run)
    for (w_inter, w_intra), branch in (((0.0, 1.0), "intra"), ((1.0, 0.0), "inter")):
        write_settings(run / "checkpoints", dict(rec, ensemble_weights={"inter": w_inter, "intra": w_intra}))
        out = tmp_path / f"out_{branch}"
        info = _infer(run, runs["site2"], out)
        assert info["ensemble_weights"] == {"inter": w_inter, "intra": w_intra}
        for vid in info["volumes"]:
            assert np.array_equal(_labels(out / f"{vid}_pred.nii.gz"), _labels(out / f"{vid}_{branch}.nii.gz"))


def test_an_explicit_flag_overrides_the_file_and_is_recorded(runs, tmp_path, capsys):
    rec = _settings(runs["adapt"])
    capsys.readouterr()
    info = _infer(runs["adapt"], runs["site2"], tmp_path / "out", "--ensemble_weights", "0.3,0.7")
    assert "note:" not in capsys.readouterr().err
    assert info["ensemble_weights"] == {"inter": 0.3, "intra": 0.7} and info["ensemble_size"] == rec["ensemble_size"]
    assert info["evaluation_settings"]["ensemble_weights"] == "flag"
    assert info["evaluation_settings"]["ensemble_size"] == "run file"
    scan = load_metadata(runs["site2"])["volumes"][load_metadata(runs["site2"])["splits"]["test"][0]]["image"]
    predict_cli.main(["-i", scan, "-o", str(tmp_path / "pred"), "--checkpoint_dir", str(runs["adapt"]),
                      "--device", "cpu", "--quiet", "--ensemble_size", "1"])
    summary = json.loads((tmp_path / "pred" / "predict.json").read_text())
    assert summary["ensemble_size"] == 1 and len(summary["checkpoints"]) == 1
    assert summary["ensemble_weights"] == rec["ensemble_weights"]
    assert summary["evaluation_settings"] == {"file": str(runs["adapt"] / "checkpoints" / EVALUATION_NAME),
                                              "ensemble_size": "flag", "ensemble_weights": "run file"}


# --------------------------------------------------------------------------------- older runs


def test_a_run_without_the_file_falls_back_with_one_notice(runs, tmp_path, capsys):
    run = _copy(runs["adapt"], tmp_path / "old")
    (run / "checkpoints" / EVALUATION_NAME).unlink()
    capsys.readouterr()
    info = _infer(run, runs["site2"], tmp_path / "out")
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and str(run / "checkpoints" / EVALUATION_NAME) in notes[0]
    assert "--ensemble_weights 0.6,0.4" in notes[0] and "--ensemble_size 5" in notes[0]
    assert "python -m MultiMedSeg.select_evaluation" in notes[0]
    assert info["ensemble_weights"] == {"inter": 0.6, "intra": 0.4}
    assert info["ensemble_size"] == min(5, len(_best_files(run)))
    assert info["evaluation_settings"] == {"file": None, "ensemble_size": "fallback", "ensemble_weights": "fallback"}
    scan = load_metadata(runs["site2"])["volumes"][info["volumes"][0]]["image"]
    predict_cli.main(["-i", scan, "-o", str(tmp_path / "pred"), "--checkpoint_dir", str(run), "--device", "cpu",
                      "--quiet"])
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    assert len([n for n in notes if EVALUATION_NAME in n]) == 1
    assert json.loads((tmp_path / "pred" / "predict.json").read_text())["evaluation_settings"]["ensemble_weights"] \
        == "fallback"
    # both flags given: nothing falls back, no notice (only, when the run kept fewer than 5, the note saying so)
    _infer(run, runs["site2"], tmp_path / "flags", "--ensemble_weights", "0.6,0.4", "--ensemble_size", "5")
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    kept = len(_best_files(run))
    assert notes == ([] if kept >= 5 else [f"note: {run / 'checkpoints' / 'best.json'}: --ensemble_size 5 but the "
                                           f"run kept {kept} best checkpoint(s): using all {kept}"])


def test_a_stale_file_is_not_used(runs, tmp_path, capsys):
    """A file that judged other checkpoints than best.json lists now (the run went on) falls back."""
    run = _copy(runs["adapt"], tmp_path / "run")
    rec = _settings(run)
    write_settings(run / "checkpoints", dict(rec, checkpoints=rec["checkpoints"][:1],
                                             ensemble_weights={"inter": 0.0, "intra": 1.0}))
    capsys.readouterr()
    info = _infer(run, runs["site2"], tmp_path / "out")
    err = capsys.readouterr().err
    assert "judged other checkpoints" in err and info["evaluation_settings"]["ensemble_weights"] == "fallback"
    assert info["ensemble_weights"] == {"inter": 0.6, "intra": 0.4}


def test_select_evaluation_command_rewrites_the_file(runs, tmp_path, capsys):
    run = _copy(runs["adapt"], tmp_path / "run")
    path = run / "checkpoints" / EVALUATION_NAME
    path.unlink()
    select_cli.main(["--checkpoint_dir", str(run), "--device", "cpu"])  # validation folder from the run's opt.json
    assert read_settings(run / "checkpoints") == _settings(runs["adapt"])  # what training chose, deterministically
    err = exit_message(capsys, select_cli.main, ["--checkpoint_dir", str(run), "--device", "cpu"])
    assert str(path) in err and "--overwrite" in err
    select_cli.main(["--checkpoint_dir", str(run / "checkpoints"), "--target_data", str(runs["site2"]),
                     "--ensemble_selection", "paper", "--overwrite", "--device", "cpu"])
    rec = _settings(run)
    assert rec["rule"] == "paper" and rec["ensemble_weights"] == {"inter": 0.6, "intra": 0.4}
    assert rec["candidates"] == [] and rec["ensemble_size"] == len(_best_files(run))
    path.write_text('{"format": "multimedseg-evaluation/1", "branch": "pred"}')
    err = exit_message(capsys, inference_cli.main, ["--exp_dir", str(tmp_path / "o"), "--checkpoint_dir", str(run),
                                                    "--target_data", str(runs["site2"]), "--device", "cpu"])
    assert err.startswith(f"error: {path}: malformed evaluation settings")
