"""Segmentation metric values (MultiMedSeg.evaluation.metrics, inference spacing) against definitions.

The Hausdorff distances are recomputed here from their definition (surface voxels, Euclidean
distance transform with the voxel spacing, maximum and 95th percentile of the symmetric surface
distances) with scipy only, on volumes built so that the expected numbers are known.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from MultiMedSeg.evaluation.test_volumes import spacing_from_affine
from MultiMedSeg.evaluation.metrics import binary_scores, branch_metrics, mean_metrics, selection_score, volume_scores


def surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from every surface voxel of ``a`` to the nearest surface voxel of ``b``."""
    def border(m):
        return m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(m.ndim, 1))

    dist = ndimage.distance_transform_edt(~border(b), sampling=spacing)
    return dist[border(a)]


def reference_scores(pred: np.ndarray, gt: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> dict:
    pred, gt = pred.astype(bool), gt.astype(bool)
    dice = 2.0 * (pred & gt).sum() / (pred.sum() + gt.sum())
    both = np.concatenate([surface_distances(pred, gt, spacing), surface_distances(gt, pred, spacing)])
    return {"dice": float(dice), "hd": float(both.max()), "hd95": float(np.percentile(both, 95))}


def cube(shape=(30, 30, 30), lo=8, hi=20) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo:hi, lo:hi, lo:hi] = True
    return m


def test_hd95_is_the_95th_percentile_not_the_maximum():
    gt = cube()
    pred = gt.copy()
    pred[27, 27, 27] = True  # one stray voxel far away: the maximum sees it, the 95th percentile does not
    s = binary_scores(pred, gt)
    ref = reference_scores(pred, gt)
    assert s["hd"] == pytest.approx(ref["hd"]) == pytest.approx(math.sqrt(3 * 8 ** 2))
    assert s["hd95"] == pytest.approx(ref["hd95"]) and s["hd95"] < 1.0 < s["hd"]
    assert s["dice"] == pytest.approx(2 * 12 ** 3 / (2 * 12 ** 3 + 1))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 0.8, 3.0)])
def test_distances_are_in_mm_with_anisotropic_spacing(spacing):
    rng = np.random.default_rng(0)
    gt = cube()
    pred = ndimage.shift(gt.astype(float), (1, -2, 3), order=0) > 0.5
    pred |= rng.random(gt.shape) > 0.9995  # a few scattered voxels: hd and hd95 differ
    s = binary_scores(pred, gt, spacing=spacing)
    ref = reference_scores(pred, gt, spacing)
    for key in ("dice", "hd", "hd95"):
        assert s[key] == pytest.approx(ref[key], rel=1e-9), key
    assert s["hd95"] < s["hd"]


def test_a_shift_along_z_scales_with_the_z_spacing():
    gt = cube()
    pred = np.roll(gt, 2, axis=2)
    assert binary_scores(pred, gt, spacing=(1.0, 1.0, 2.5))["hd"] == pytest.approx(5.0)
    assert binary_scores(pred, gt, spacing=(1.0, 1.0, 2.5))["hd95"] == pytest.approx(5.0)
    assert binary_scores(pred, gt, spacing=(2.5, 1.0, 1.0))["hd"] == pytest.approx(2.0)


def test_spacing_from_affine_uses_column_norms():
    theta = 0.3
    rot = np.array([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 1.2, 3.0])
    affine[:3, 3] = [10, -4, 2]
    assert spacing_from_affine(affine.tolist()) == pytest.approx((0.7, 1.2, 3.0))


def _two_class_volumes():
    gt = np.zeros((20, 20, 12), np.int64)
    gt[4:16, 4:16, 2:10] = 1
    gt[8:12, 8:12, 4:8] = 2
    pred = gt.copy()
    pred[4:6, 4:16, 2:10] = 0      # under-segmented class 1
    pred[12:14, 8:12, 4:8] = 2     # over-segmented class 2
    pred[0, 0, 0] = 1              # a stray voxel of class 1
    return pred, gt


def test_volume_scores_per_class_and_foreground_match_the_definition():
    pred, gt = _two_class_volumes()
    spacing = (1.0, 2.0, 0.5)
    scores = volume_scores(pred, gt, 3, spacing)
    assert set(scores) == {"1", "2", "foreground"}
    for name, (p, g) in {"1": (pred == 1, gt == 1), "2": (pred == 2, gt == 2), "foreground": (pred > 0, gt > 0)}.items():
        ref = reference_scores(p, g, spacing)
        for key in ("dice", "hd", "hd95"):
            assert scores[name][key] == pytest.approx(ref[key], rel=1e-9), (name, key)
    with_bg = volume_scores(pred, gt, 3, spacing, background=True)
    assert with_bg["0"]["dice"] == pytest.approx(reference_scores(pred == 0, gt == 0)["dice"])


def test_a_class_absent_from_both_is_perfect_and_absent_from_one_is_worst():
    pred, gt = _two_class_volumes()
    scores = volume_scores(pred, gt, 4)  # class 3 exists in neither
    assert scores["3"] == {"dice": 1.0, "hd": 0.0, "hd95": 0.0}
    only_gt = volume_scores(np.where(pred == 2, 1, pred), gt, 3)["2"]
    assert only_gt["dice"] == 0.0 and math.isinf(only_gt["hd"]) and math.isinf(only_gt["hd95"])


def test_a_class_absent_from_both_scores_as_the_original_on_request():
    """``both_empty="original"``: Dice 0 (MedPy 0.4.0) and distances inf (its wrapper), as the original
    code; every other score, and a class absent from one volume only, are the same in both conventions."""
    pred, gt = _two_class_volumes()
    perfect = volume_scores(pred, gt, 4)
    original = volume_scores(pred, gt, 4, both_empty="original")
    assert original["3"]["dice"] == 0.0 and math.isinf(original["3"]["hd"]) and math.isinf(original["3"]["hd95"])
    assert {k: v for k, v in original.items() if k != "3"} == {k: v for k, v in perfect.items() if k != "3"}
    flat = branch_metrics({"": pred}, gt, 4, both_empty="original")
    assert flat["dice_3"] == 0.0 and math.isinf(flat["hausdorff_3"])
    with pytest.raises(ValueError):
        binary_scores(pred == 3, gt == 3, both_empty="zero")


def test_the_empty_class_convention_can_change_the_best_checkpoint():
    """Two validation volumes, the class present in the first only. Checkpoint A segments it less well
    (Dice 0.5) but leaves the second volume empty; checkpoint B segments it exactly (Dice 1) and adds
    false positives to the second. Ours rewards A's correct "absent" (A wins); the original's convention
    scores the second volume 0 for both, so B wins."""
    gt1, gt2 = cube(lo=8, hi=20).astype(np.int64), np.zeros((30, 30, 30), np.int64)
    half = np.zeros_like(gt1)
    half[8:20, 8:20, 8:14] = 1  # half of the cube: Dice 2 * 0.5 / 1.5 = 2/3
    false_positive = np.zeros_like(gt1)
    false_positive[2:5, 2:5, 2:5] = 1
    runs = {"A": (half, np.zeros_like(gt2)), "B": (gt1.copy(), false_positive)}
    chosen = {}
    for convention in ("perfect", "original"):
        scores = {}
        for name, (p1, p2) in runs.items():
            per_volume = [branch_metrics({"": p1}, gt1, 2, both_empty=convention),
                          branch_metrics({"": p2}, gt2, 2, both_empty=convention)]
            scores[name] = selection_score(mean_metrics(per_volume), ["1"], only_intra=False)
        chosen[convention] = max(scores, key=scores.get)
        if convention == "perfect":
            assert scores == pytest.approx({"A": (2 / 3 + 1) / 2, "B": (1 + 0) / 2})
        else:
            assert scores == pytest.approx({"A": (2 / 3 + 0) / 2, "B": (1 + 0) / 2})
    assert chosen == {"perfect": "A", "original": "B"}


def test_branch_metrics_flat_keys_and_voxel_unit_hausdorff():
    pred, gt = _two_class_volumes()
    other = np.where(pred == 2, 0, pred)
    flat = branch_metrics({"intra_": pred, "": other}, gt, 3)
    assert set(flat) == {f"{p}{m}_{c}" for p in ("intra_", "") for m in ("dice", "hausdorff")
                         for c in ("0", "1", "2", "foreground")}
    for prefix, vol in (("intra_", pred), ("", other)):
        for c, (p, g) in {"0": (vol == 0, gt == 0), "1": (vol == 1, gt == 1), "2": (vol == 2, gt == 2),
                          "foreground": (vol > 0, gt > 0)}.items():
            if not p.any():
                assert flat[f"{prefix}dice_{c}"] == 0.0 and math.isinf(flat[f"{prefix}hausdorff_{c}"])
                continue
            ref = reference_scores(p, g)  # voxel units, whatever the volume's spacing
            assert flat[f"{prefix}dice_{c}"] == pytest.approx(ref["dice"], rel=1e-9)
            assert flat[f"{prefix}hausdorff_{c}"] == pytest.approx(ref["hd"], rel=1e-9)


def test_only_the_requested_distances_are_computed():
    pred, gt = _two_class_volumes()
    scores = volume_scores(pred, gt, 3, distances=("hd",))
    assert all(set(s) == {"dice", "hd"} for s in scores.values())
    restricted = volume_scores(pred, gt, 3, distances=("hd95",), vessels_within_gt=True)
    assert all(set(s) == {"dice", "hd95"} for s in restricted.values())


def test_restricting_label_2_to_the_gt_foreground():
    """--consider_only_vessels_within_brain: label 2 is scored on (pred & gt != 0) vs (gt == 2 & gt != 0)."""
    pred, gt = _two_class_volumes()
    pred[18, 18, 10] = 2  # a label-2 voxel outside the GT foreground (dropped by the restriction)
    roi = gt != 0
    spacing = (2.5, 0.5, 2.0)
    restricted = volume_scores(pred, gt, 3, spacing, vessels_within_gt=True)
    ref = reference_scores((pred == 2) & roi, (gt == 2) & roi, spacing)
    for key in ("dice", "hd", "hd95"):
        assert restricted["2"][key] == pytest.approx(ref[key], rel=1e-9), key
    assert restricted["2"]["hd"] == pytest.approx(2 * 2.5)  # over-segmented by 2 voxels along x, in mm
    restricted = volume_scores(pred, gt, 3, vessels_within_gt=True)
    ref = reference_scores((pred == 2) & roi, (gt == 2) & roi)
    plain = volume_scores(pred, gt, 3)
    assert branch_metrics({"": pred}, gt, 3)["dice_2"] == plain["2"]["dice"]  # no restriction by default
    assert plain["2"]["hd"] > restricted["2"]["hd"] and plain["2"]["dice"] < restricted["2"]["dice"]
    assert restricted["1"] == plain["1"] and restricted["foreground"] == plain["foreground"]
    flat = branch_metrics({"": pred}, gt, 3, only_inside_gt=True)
    assert flat["dice_2"] == pytest.approx(ref["dice"]) and flat["hausdorff_2"] == pytest.approx(ref["hd"])
    # with two classes there is no label 2 to restrict
    assert volume_scores(np.minimum(pred, 1), np.minimum(gt, 1), 2, vessels_within_gt=True) == \
        volume_scores(np.minimum(pred, 1), np.minimum(gt, 1), 2)


def test_mean_metrics_averages_each_key_over_the_volumes_that_have_it():
    per_volume = [{"dice_1": 0.5, "hausdorff_1": 2.0}, {"dice_1": 0.9, "hausdorff_1": 4.0, "dice_2": 0.3},
                  {"dice_1": 0.1, "hausdorff_1": math.inf}]
    means = mean_metrics(per_volume)
    assert list(means) == ["dice_1", "dice_2", "hausdorff_1"]
    assert means["dice_1"] == pytest.approx(0.5) and means["dice_2"] == pytest.approx(0.3)
    assert math.isinf(means["hausdorff_1"])  # a failed distance is not averaged away
    assert mean_metrics(per_volume[:2])["hausdorff_1"] == pytest.approx(3.0)
    assert mean_metrics([]) == {}


def test_selection_score_is_the_best_branch_mean_dice():
    m = {"dice_1": 0.9, "dice_2": 0.7, "inter_dice_1": 0.5, "inter_dice_2": 0.7, "intra_dice_1": 0.2,
         "intra_dice_2": 0.4}
    assert selection_score(m, ["1", "2"], only_intra=False) == pytest.approx(0.8)  # the ensemble wins
    m["intra_dice_1"] = 1.0
    assert selection_score(m, ["1", "2"], only_intra=False) == pytest.approx(0.8)
    m["intra_dice_2"] = 0.8
    assert selection_score(m, ["1", "2"], only_intra=False) == pytest.approx(0.9)  # intra wins
    assert selection_score({"inter_dice_1": 0.3}, ["1"], only_intra=True) == 0.0  # no intra metrics
    assert selection_score({}, ["1"], only_intra=False) == 0.0


# ------------------------------------------------------------------------------------ small cases
def test_binary_scores_edge_cases_and_spacing():
    a = np.zeros((5, 6, 7), bool)
    a[1:3, 1:3, 1:3] = True
    b = np.zeros_like(a)
    b[1:3, 1:3, 2:4] = True
    s = binary_scores(a, b)
    assert s["dice"] == pytest.approx(0.5) and s["hd"] == pytest.approx(1.0)
    assert binary_scores(a, b, spacing=(1, 1, 2.5))["hd"] == pytest.approx(2.5)
    assert binary_scores(a, a)["dice"] == 1.0
    empty = np.zeros_like(a)
    assert binary_scores(empty, empty) == {"dice": 1.0, "hd": 0.0, "hd95": 0.0}
    one = binary_scores(a, empty)
    assert one["dice"] == 0.0 and math.isinf(one["hd"]) and math.isinf(one["hd95"])
    scores = volume_scores(a.astype(int) + b.astype(int), b.astype(int) * 2, 3)
    assert set(scores) == {"1", "2", "foreground"}


def test_selection_score_takes_best_branch():
    m = {"dice_1": 0.2, "dice_2": 0.4, "inter_dice_1": 0.5, "inter_dice_2": 0.7, "intra_dice_1": 0.1,
         "intra_dice_2": 0.1}
    assert selection_score(m, ["1", "2"], only_intra=False) == pytest.approx(0.6)
    assert selection_score(m, ["1", "2"], only_intra=True) == pytest.approx(0.1)
    assert selection_score(m, ["2"], only_intra=False) == pytest.approx(0.7)


def test_consider_only_vessels_within_brain_scores_label_2_only():
    """As the original: label 2 is scored inside the GT non-background region; the other labels and
    the foreground Dice are those of the unrestricted prediction."""
    gt = np.zeros((4, 8, 8), np.int64)
    gt[:, 2:6, 2:6] = 1
    gt[:, 3:5, 3:5] = 2
    pred = gt.copy()
    pred[:, 0, 0] = 2          # a vessel outside the brain: ignored for label 2 only
    pred[:, 7, 7] = 1          # a false brain voxel: counts for label 1 whatever the flag
    plain = volume_scores(pred, gt, 3, distances=("hd",))
    within = volume_scores(pred, gt, 3, distances=("hd",), vessels_within_gt=True)
    assert plain["2"]["dice"] < 1.0 and within["2"]["dice"] == 1.0
    assert within["1"] == plain["1"] and within["foreground"] == plain["foreground"]
    assert within["foreground"]["dice"] < 1.0
    flat = branch_metrics({"intra_": pred}, gt, 3, only_inside_gt=True)
    assert flat["intra_dice_2"] == 1.0 and flat["intra_dice_foreground"] == plain["foreground"]["dice"]
    assert "intra_dice_0" in flat  # background scored too, as the original
