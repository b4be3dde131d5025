"""The vessel case (issue 24): thin-structure metrics on hand-made volumes, the vascular phantom
(demo/vessels.py), and the ground truth of brain-mask runs in the slices' class layout."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from MultiMedSeg.evaluation.metrics import (binary_scores, centreline_radii, cl_dice, skeleton,
                                            small_vessel_detection, vessel_scores)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- metrics

def _line(shape=(24, 24, 24), start=2, stop=22, at=(12, 12)) -> np.ndarray:
    vol = np.zeros(shape, bool)
    vol[start:stop, at[0], at[1]] = True
    return vol


def _tube(radius: float, shape=(24, 24, 24), start=2, stop=22, at=(12, 12)) -> np.ndarray:
    _, y, z = np.indices(shape)
    vol = ((y - at[0]) ** 2 + (z - at[1]) ** 2) <= radius ** 2
    vol[:start] = vol[stop:] = False
    return vol


def test_skeleton_of_a_line_is_the_line_and_of_a_tube_its_axis() -> None:
    line = _line()
    assert np.array_equal(skeleton(line), line)
    axis = skeleton(_tube(3.0))
    assert axis.any() and (axis & ~_line()).sum() == 0  # the skeleton lies on the tube's axis
    assert not skeleton(np.zeros((5, 5, 5), bool)).any()


def test_cldice_known_values() -> None:
    line = _line()
    assert cl_dice(line, line) == 1.0
    assert cl_dice(np.zeros_like(line), np.zeros_like(line)) == 1.0
    assert cl_dice(line, np.zeros_like(line)) == 0.0 and cl_dice(np.zeros_like(line), line) == 0.0
    half = _line(stop=12)  # half of the length found: precision 1, sensitivity 10/20
    assert cl_dice(half, line) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    # thickness-insensitive: the axis alone of a thick tube has a poor Dice but an almost perfect clDice
    tube = _tube(3.0)
    assert binary_scores(line, tube, distances=())["dice"] < 0.2
    assert cl_dice(line, tube) > 0.9


def test_small_vessel_detection_counts_thin_centreline_only() -> None:
    thin = _line(at=(5, 5))
    thick = _tube(3.0, at=(15, 15))
    gt = thin | thick
    radius = np.where(thin, 0.5, 0.0) + np.where(thick, 3.0, 0.0)
    only_thick = small_vessel_detection(thick, gt, max_radius=1.0, radius_map=radius)
    only_thin = small_vessel_detection(thin, gt, max_radius=1.0, radius_map=radius)
    assert only_thick["n"] == only_thin["n"] == int(thin.sum())
    assert only_thick["rate"] == 0.0 and only_thin["rate"] == 1.0
    half = small_vessel_detection(_line(at=(5, 5), stop=12), gt, max_radius=1.0, radius_map=radius)
    assert half["rate"] == pytest.approx(0.5)
    # without a radius map the radius is the distance to the background: the line's is 1 voxel, the tube's more
    centre, radii = centreline_radii(gt)
    assert radii.min() == pytest.approx(1.0) and radii.max() >= 3.0 and centre.sum() == radii.size
    assert np.isnan(small_vessel_detection(thick, thick, max_radius=0.5, radius_map=np.where(thick, 3.0, 0))["rate"])
    with pytest.raises(ValueError, match="radius map"):
        small_vessel_detection(thin, gt, 1.0, radius_map=np.zeros((3, 3, 3)))


def test_vessel_scores_restricted_to_a_region() -> None:
    line = _line()
    outside = _line(at=(2, 2))
    region = np.zeros_like(line)
    region[:, 8:16, 8:16] = True
    inside_only = vessel_scores(line | outside, line, small_radius=1.0, radius_map=np.where(line, 0.5, 0.0),
                                region=region)
    assert inside_only["dice"] == 1.0 and inside_only["cldice"] == 1.0 and inside_only["small_detection"] == 1.0
    assert vessel_scores(line | outside, line, small_radius=1.0)["dice"] == pytest.approx(2 * 20 / 60)


# ----------------------------------------------------------------------------------------- phantom

@pytest.fixture(scope="module")
def vessel_phantom(tmp_path_factory) -> Path:
    from demo.vessels import generate_vessel_phantom

    out = tmp_path_factory.mktemp("vessels") / "data"
    generate_vessel_phantom(out, seed=0, n_subjects=2, spacing=4.0, montage=out.parent / "mip.png")
    return out


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_vessel_phantom_layout_and_volumes(vessel_phantom: Path) -> None:
    from demo.vessels import FOLDERS

    info = json.loads((vessel_phantom / "sites.json").read_text())
    assert info["task"] == "vessels" and [s["index"] for s in info["sites"]] == [0, 1, 2]
    assert (vessel_phantom.parent / "mip.png").stat().st_size > 0
    for site in (0, 1, 2):
        for folder in FOLDERS:
            assert sorted(p.name for p in (vessel_phantom / f"site{site}" / folder).iterdir()) == \
                ["sub-000.nii.gz", "sub-001.nii.gz"], (site, folder)
        name = "sub-001.nii.gz"
        vol = {f: _read(vessel_phantom / f"site{site}" / f / name) for f in FOLDERS}
        assert len({v.shape for v in vol.values()}) == 1
        assert vol["images"].dtype == np.float32 and vol["labels"].dtype == np.uint8
        vessel, brain, weight = vol["labels"] > 0, vol["brain_masks"] > 0, vol["weights"] > 0
        assert set(np.unique(vol["labels"])) == {0, 1}
        assert not (vessel & ~brain).any()  # vessels of the brain only
        assert weight[brain].all() and not weight.all()  # an ROI box around the brain
        assert np.array_equal(vol["radii"] > 0, vessel)  # a radius at every vessel voxel, nowhere else
        # by construction (Murray splits from ~4 mm roots down to half a voxel): a sparse tree, not empty
        assert 0.001 < vessel.sum() / brain.sum() < 0.05
        stats = info["statistics"][str(site)]
        assert stats["radius_mm_max"]["max"] <= 4.0 + 1e-6 and stats["radius_mm_min"]["min"] > 0


def test_vessel_phantom_site_contrasts(vessel_phantom: Path) -> None:
    name = "sub-000.nii.gz"

    def means(site: int):
        image = _read(vessel_phantom / f"site{site}" / "images" / name)
        vessel = _read(vessel_phantom / f"site{site}" / "labels" / name) > 0
        brain = _read(vessel_phantom / f"site{site}" / "brain_masks" / name) > 0
        return image, image[vessel].mean(), image[brain & ~vessel].mean(), brain

    image, v, b, _ = means(0)
    assert v > 2 * b  # TOF-MRA-like: bright arteries
    image, v, b, brain = means(1)
    assert v > 2 * b and image[~brain].max() > 2 * v  # CTA-like: bright vessels, brighter bone outside the brain
    image, v, b, _ = means(2)
    assert v < 0.5 * b  # venography-like: dark veins


def test_vessel_subject_is_deterministic() -> None:
    from demo.vessels import SITES, make_vessel_subject

    a = make_vessel_subject(SITES[0], 3, 1, spacing=6.0)
    b = make_vessel_subject(SITES[0], 3, 1, spacing=6.0)
    c = make_vessel_subject(SITES[0], 3, 2, spacing=6.0)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.vessel, b.vessel)
    assert not np.array_equal(a.vessel, c.vessel)


def test_phantom_cli_vessel_task_and_bad_input(tmp_path: Path) -> None:
    run = lambda *a: subprocess.run([sys.executable, "-m", "demo.phantom", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    proc = run("--task", "vessels", "--out", str(tmp_path / "v"), "--n-subjects", "1", "--spacing", "8",
               "--sites", "2")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "v" / "site2" / "radii" / "sub-000.nii.gz").is_file()
    assert "vessel fraction" in (tmp_path / "v" / "README.txt").read_text()
    bad = run("--task", "vessels", "--out", str(tmp_path / "w"), "--sites", "5")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error:")


# ----------------------------------------------------------------------------------------- ground truth layout

def test_ground_truth_in_the_slices_class_layout(tmp_path: Path) -> None:
    """With brain masks (class 1), a label file's vessel (1) is scored as class 2, as in the slice masks."""
    from MultiMedSeg.evaluation.test_volumes import in_mask_layout

    brain = np.zeros((6, 6, 6), np.uint8)
    brain[1:5, 1:5, 1:5] = 1
    vessel = np.zeros_like(brain)
    vessel[2, 2, 1:5] = 1
    nib.save(nib.Nifti1Image(brain, np.eye(4)), str(tmp_path / "brain.nii.gz"))
    meta = {"options": {"brain_masks": "somewhere", "brain_class": True}}
    vmeta = {"brain_mask": str(tmp_path / "brain.nii.gz")}
    gt = in_mask_layout(vessel.astype(np.int64), meta, vmeta)
    assert set(np.unique(gt)) == {0, 1, 2}
    assert np.array_equal(gt == 2, vessel > 0) and np.array_equal(gt == 1, (brain > 0) & (vessel == 0))
    # without brain masks, or with --no-brain-class, the label file is the layout
    assert np.array_equal(in_mask_layout(vessel.astype(np.int64), {"options": {"brain_masks": None}}, vmeta), vessel)
    no_class = {"options": {"brain_masks": "x", "brain_class": False}}
    assert np.array_equal(in_mask_layout(vessel.astype(np.int64), no_class, vmeta), vessel)


# ----------------------------------------------------------------------------------------- favoured-mode judging

def test_selected_classes_follow_optimize_mode() -> None:
    from MultiMedSeg.losses import LossConfig, selected_classes

    weights = [0.1, 0.2, 0.7]
    favoured = LossConfig.from_options(None, optimize_mode="favoured", ce_weights=weights, dice_weights=weights)
    assert selected_classes(favoured, 3) == ["2"]  # the vessels
    assert selected_classes(LossConfig.from_options(None, optimize_mode="foreground", ce_weights=weights), 3) == ["1", "2"]
    assert selected_classes(LossConfig.from_options(None, optimize_mode="favoured"), 3) == ["0", "1", "2"]


def test_pred_weights_are_judged_on_the_selected_classes(monkeypatch) -> None:
    """An adapted run's ``_pred`` weights are chosen on the classes that choose its best checkpoints."""
    from types import SimpleNamespace

    from MultiMedSeg.evaluation import selection

    seen = []

    def fake_scores(*a, classes=None, **kw):
        seen.append(classes)
        return ["v0"], [{"inter": 0.6, "intra": 0.4, "mean_dice": 0.2, "dice": {"2": 0.2}},
                        {"inter": 0.0, "intra": 1.0, "mean_dice": 0.5, "dice": {"2": 0.5}}]

    monkeypatch.setattr(selection, "validation_scores", fake_scores)
    monkeypatch.setattr("MultiMedSeg.ensemble.resolve_checkpoints", lambda folder: [Path("best_step1.pt")])
    members = [SimpleNamespace(net=SimpleNamespace(config=SimpleNamespace(label_nc=3, src_tgt_domains=[0, 1])))]
    record = selection.choose_settings(Path("ckpts"), "validation", dataset=object(), inter=True, members=members,
                                       classes=["2"])
    assert seen == [["2"]] and record["validation"]["classes"] == ["2"]
    assert record["ensemble_weights"] == {"inter": 0.0, "intra": 1.0}
    selection.choose_settings(Path("ckpts"), "validation", dataset=object(), inter=True, members=members)
    assert seen[-1] == ["1", "2"]  # default: every class but the background
