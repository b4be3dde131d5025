"""predict stays inside what the model knows (MultiMedSeg/data/field_of_view.py): no labels outside the head
or outside the slab the training slices covered, ``--no_fov_mask`` for the raw output, older plans, and the
warning for scans whose axes are oblique to the canonical axes.

Uses the tiny trained runs of the ``runs`` fixture (tests/conftest.py, shared with tests/test_predict.py: the
conftest phantom preprocessed without label-dependent steps, so the plan's training slab is null).
"""
from __future__ import annotations

import copy
import json

import nibabel as nib
import numpy as np
import pytest

from MultiMedSeg.data import field_of_view as fov
from MultiMedSeg.data.preprocessing_plan import PLAN_NAME, load_plan, plan_from_metadata
from MultiMedSeg.data.restore import load_metadata
from builders import copy_run as _copy_run, read_labels as _labels, run_predict as _predict, run_test_ids as _test_ids
from builders import write_nifti as _nifti

AIR_GAP = 4  # empty slices between the top of the phantom and the structure placed in the air above it


def _scan(runs):
    vid = _test_ids(runs, 2)[0]
    return vid, nib.load(str(runs["images"][2] / f"{vid}.nii.gz"))


def _with_structure_above(img: nib.Nifti1Image, path):
    """The scan extended upwards (RAS: 3rd axis = superior) by ``AIR_GAP`` empty slices and a bright copy of
    six of its own brain slices: brain-like structure in the air above the head, not connected to it."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    top = data.shape[2]
    structure = data[:, :, top // 3: top // 3 + 6]
    grown = np.concatenate([data, np.zeros(data.shape[:2] + (AIR_GAP,), np.float32), structure], axis=2)
    return _nifti(path, grown, img.affine), top


def test_structure_in_the_air_gets_no_labels_with_the_rule_and_some_without(runs, tmp_path):
    vid, img = _scan(runs)
    scan, top = _with_structure_above(img, tmp_path / "in" / "air.nii.gz")
    raw = _predict(runs, [scan], tmp_path / "raw", "--no_fov_mask", "--save_probabilities")
    ruled = _predict(runs, [scan], tmp_path / "ruled", "--save_probabilities")
    a, b = _labels(tmp_path / "raw" / "air.nii.gz"), _labels(tmp_path / "ruled" / "air.nii.gz")
    assert (a[:, :, top:] > 0).sum() > 0  # the model labels the structure in the air: the rule has work to do
    assert (b[:, :, top:] > 0).sum() == 0 and (b[:, :, :top] > 0).sum() > 0  # the head keeps its labels
    assert np.array_equal(b, np.where(b > 0, a, 0))  # the rule only sets voxels to background
    record = ruled["scans"][0]["field_of_view"]
    assert record["rule"] == "head" and record["training_slab"] is None  # this run's plan covers whole volumes
    assert record["removed_voxels"] == record["removed_outside_head"] == int(((a > 0) & (b == 0)).sum()) > 0
    assert raw["scans"][0]["field_of_view"] == {"rule": "off", "removed_voxels": 0}
    assert ruled["field_of_view"]["applied"] and not raw["field_of_view"]["applied"]
    p = np.asarray(nib.load(str(tmp_path / "ruled" / "air_probabilities.nii.gz")).dataobj)
    assert np.all(p[:, :, top + AIR_GAP:, 0] == 1.0)  # background probability 1 outside the field of view
    assert np.allclose(p.sum(-1), 1.0, atol=1e-4)


def test_without_the_rule_predict_equals_inference_exactly(runs, tmp_path):
    vid, _ = _scan(runs)
    _predict(runs, [runs["images"][2] / f"{vid}.nii.gz"], tmp_path / "raw", "--no_fov_mask")
    theirs = _labels(runs["inference"]["adapt"] / f"{vid}_pred.nii.gz")
    assert np.array_equal(_labels(tmp_path / "raw" / f"{vid}.nii.gz"), theirs)


def test_the_training_slab_limits_the_slices(runs, tmp_path):
    vid, _ = _scan(runs)
    run = _copy_run(runs, "adapt", tmp_path / "run")
    plan = json.loads((run / "checkpoints" / PLAN_NAME).read_text())
    plan["field_of_view"] = {"slab": [0.0, 0.5], "volumes": 1, "rule": "the lower half of the head"}
    (run / "checkpoints" / PLAN_NAME).write_text(json.dumps(plan))
    scan = runs["images"][2] / f"{vid}.nii.gz"
    head_only = _predict(runs, [scan], tmp_path / "head")
    summary = _predict({**runs, "half": run}, [scan], tmp_path / "half", run="half")
    record = summary["scans"][0]["field_of_view"]
    f0, f1 = record["foreground_z"]
    assert record["rule"] == "head+slab" and record["slab_slices"] == [f0, f0 + int(np.ceil(0.5 * (f1 - f0)))]
    assert record["removed_outside_slab"] > 0
    a, b = _labels(tmp_path / "head" / f"{vid}.nii.gz"), _labels(tmp_path / "half" / f"{vid}.nii.gz")
    top_a, top_b = (np.nonzero((x > 0).any(axis=(0, 1)))[0].max() for x in (a, b))
    assert top_b < top_a  # the upper half of the head (RAS: 3rd axis superior) has no labels
    assert np.array_equal(a[:, :, :f0 + (f1 - f0) // 3], b[:, :, :f0 + (f1 - f0) // 3])  # the lower part: as before
    assert head_only["scans"][0]["field_of_view"]["removed_outside_slab"] == 0


def test_an_older_plan_without_the_field_of_view_still_works(runs, tmp_path, capsys):
    vid, _ = _scan(runs)
    run = _copy_run(runs, "adapt", tmp_path / "old")
    plan = json.loads((run / "checkpoints" / PLAN_NAME).read_text())
    del plan["field_of_view"]
    (run / "checkpoints" / PLAN_NAME).write_text(json.dumps(plan))
    assert load_plan(run / "checkpoints").field_of_view is None
    capsys.readouterr()
    summary = _predict({**runs, "old": run}, [runs["images"][2] / f"{vid}.nii.gz"], tmp_path / "out", run="old")
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "outside the head only" in notes[0]
    assert summary["scans"][0]["field_of_view"]["rule"] == "head" and summary["field_of_view"]["training"] is None


def _rotated(affine: np.ndarray, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[c, -s], [s, c]]  # about the x (left-right) axis
    return rotation @ affine


def test_an_oblique_scan_gets_a_warning_and_a_canonical_one_does_not(runs, tmp_path, capsys):
    _, img = _scan(runs)
    data = np.asarray(img.dataobj, dtype=np.float32)
    oblique = _nifti(tmp_path / "in" / "oblique.nii.gz", data, _rotated(img.affine, 20.0))
    slight = _nifti(tmp_path / "in" / "slight.nii.gz", data, _rotated(img.affine, 3.0))
    canonical = _nifti(tmp_path / "in" / "canonical.nii.gz", data, img.affine)
    capsys.readouterr()
    summary = _predict(runs, [canonical, oblique, slight], tmp_path / "out")
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and str(oblique) in warnings[0] and "oblique by 20.0 degrees" in warnings[0]
    by_id = {s["id"]: s for s in summary["scans"]}
    assert by_id["oblique"]["obliquity_degrees"] == pytest.approx(20.0, abs=1e-3)
    assert len(by_id["oblique"]["warnings"]) == 1 and "oblique" in by_id["oblique"]["warnings"][0]
    assert by_id["canonical"]["warnings"] == [] and by_id["canonical"]["obliquity_degrees"] == 0.0
    assert by_id["slight"]["warnings"] == []  # 3 degrees: under the tolerance
    assert (tmp_path / "out" / "oblique.nii.gz").is_file()  # still segmented


# --------------------------------------------------------------------------------- the plan's slab


def test_preprocessing_records_the_foreground_and_the_plan_the_slab(preprocessed_sites):
    """conftest's sites are preprocessed with --discard-outside-labels: the plan records the slab."""
    meta = load_metadata(preprocessed_sites[2])
    for vol in meta["volumes"].values():
        f0, f1 = vol["foreground_z"]
        assert 0 <= f0 < f1 <= vol["depth_before_split"] and vol["z_split_by"] == "labels"
    plan = plan_from_metadata(meta, preprocessed_sites[2] / "metadata.json", 2, "target")
    lo, hi = plan.field_of_view["slab"]
    chosen = [v for v in meta["volumes"].values() if v["split"] in ("train", "val")]
    assert plan.field_of_view["volumes"] == len(chosen)
    fractions = [((v["z_split"][0] - v["foreground_z"][0]) / (v["foreground_z"][1] - v["foreground_z"][0]),
                  (v["z_split"][1] - v["foreground_z"][0]) / (v["foreground_z"][1] - v["foreground_z"][0]))
                 for v in chosen]
    assert lo == pytest.approx(min(f[0] for f in fractions)) and hi == pytest.approx(max(f[1] for f in fractions))
    # metadata written before foreground_z: no slab, and the plan says so with null
    old = copy.deepcopy(meta)
    for vol in old["volumes"].values():
        del vol["foreground_z"]
    assert fov.training_slab(old["volumes"].values()) is None
    # no slice selection: training covered whole volumes
    whole = copy.deepcopy(meta)
    for vol in whole["volumes"].values():
        vol["z_split_by"] = "none"
    assert fov.training_slab(whole["volumes"].values())["slab"] is None


def test_slab_slices_and_head_mask_rules():
    assert fov.slab_slices([10, 30], [0.1, 0.9], 40) == (12, 28)
    assert fov.slab_slices([10, 30], [-1.0, 2.0], 40) == (0, 40)
    assert fov.slab_slices(None, [0.2, 0.4], 40) == (0, 40)
    volume = np.zeros((20, 20, 20), np.float32)
    volume[5:15, 5:15, 5:15] = 100.0
    volume[8:12, 8:12, 8:12] = 0.0  # a dark cavity inside the head
    volume[1, 1, 1] = 100.0  # a bright speck in the air
    head = fov.head_mask(volume)
    assert head[10, 10, 10] and not head[1, 1, 1]
    assert head.sum() == fov.head_mask(volume, dilation=0).sum() + 6 * 10 * 10  # one 6-connected step
    assert fov.head_mask(np.full((5, 5, 5), 3.0)) is None  # no contrast: no head to tell from the air
