"""Phase-2 training and inference: datasets, sampler, transforms, metrics, checkpoint index,
options, and the pretrain -> adapt -> inference pipeline on the embedded phantom (32 px, tiny
encoder and generator, a few steps).
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from MultiMedSeg import inference as inference_cli
from MultiMedSeg import pretrain as pretrain_cli
from MultiMedSeg import train as train_cli
from MultiMedSeg.data.images_dataset import ImagesDataset
from MultiMedSeg.data.sampler import BalancedSampler
from MultiMedSeg.data.transforms import RandomMirror, RandomRotateScale, eval_transform, train_transform
from MultiMedSeg import checkpoints as ck
from MultiMedSeg.ensemble import label_volumes
from MultiMedSeg.evaluation.metrics import binary_scores, branch_metrics, selection_score, volume_scores
from MultiMedSeg.options import parse_inference_options, parse_training_options
from builders import MMS_TINY, exit_message, make_slices, tiny_generator_file
from robustmedseg.errors import InputError, run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = MMS_TINY


# ------------------------------------------------------------------------------------ helpers
def write_generator(path: Path, **overrides) -> Path:
    """A tiny phase-1 generator file, initialised locally (:func:`builders.tiny_generator_file`)."""
    return tiny_generator_file(path, **overrides)


def write_alexnet(folder: Path) -> tuple:
    """Random AlexNet features + LPIPS heads (real weights cannot be downloaded in tests)."""
    from torchvision.models import alexnet

    torch.manual_seed(0)
    feats = folder / "alex_pretr.pth"
    heads = folder / "alex.pth"
    torch.save(alexnet(weights=None).features.state_dict(), feats)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) / c for i, c in enumerate((64, 192, 384, 256, 256))},
               heads)
    return heads, feats





# ------------------------------------------------------------------------------------ datasets
def test_dataset_interleaves_domains_and_filters_labeled_targets(tmp_path):
    src = make_slices(tmp_path / "src", "s", 5)
    lab = make_slices(tmp_path / "lab", "t", 4, background_only=(0,), weight_zero=(3,))
    unl = make_slices(tmp_path / "unl", "u", 2, labeled=False)
    ds = ImagesDataset(tmp_path / "src", tmp_path / "lab", tmp_path / "unl", transform=train_transform(16),
                       label_nc=3)
    assert len(ds) == 2 * 6 - 0  # n_src 5 < n_tgt 6
    assert ds.labeled_target == {lab[1], lab[2]}  # background-only and zero-weight slices are not labeled
    for i in range(len(ds)):
        item = ds[i]
        domain, pos = ds.locate(i)
        assert domain == i % 2 and item["domain"].tolist() == ([1.0, 0.0] if domain == 0 else [0.0, 1.0])
        assert ds.path(i) == (src[(i // 2) % 5] if domain == 0 else (lab + unl)[(i // 2) % 6])
        assert bool(item["has_gt"]) == (domain == 0 or ds.path(i) in ds.labeled_target)
        if not item["has_gt"]:
            assert not item["mask"].any()  # unlabeled: mask entirely False, background included
        assert item["data"].shape == (1, 16, 16) and item["weight"].shape == (1, 16, 16)
    more = ImagesDataset(tmp_path / "src", tmp_path / "lab", transform=None, label_nc=3)
    assert len(more) == 2 * 5 - 1  # n_src 5 > n_tgt 4: minus one
    assert len(ImagesDataset(tmp_path / "src", label_nc=3, min_length=12)) == 12


def test_one_target_slice_keeps_middle_labeled_slice(tmp_path):
    make_slices(tmp_path / "lab", "a", 5, background_only=(0,))
    b = make_slices(tmp_path / "lab", "b", 4)
    a_paths = sorted((tmp_path / "lab").glob("a_*"))
    ds = ImagesDataset(target_labeled=tmp_path / "lab", one_target_slice=True, label_nc=3)
    # volume a: filtered = slices 1..4 -> element 4//2 = slice 3; volume b: slices 0..3 -> slice 2
    assert ds.labeled_target == {a_paths[3], b[2]}


def test_source_slice_without_mask_has_no_ground_truth(tmp_path):
    make_slices(tmp_path / "src", "a", 1)
    make_slices(tmp_path / "src", "b", 1, labeled=False)
    ds = ImagesDataset(tmp_path / "src", label_nc=3, transform=train_transform(16))
    assert [bool(ds[i]["has_gt"]) for i in range(2)] == [True, False]
    assert not ds[1]["mask"].any()


def test_invert_intensity(tmp_path):
    make_slices(tmp_path / "src", "s", 1)
    make_slices(tmp_path / "tgt", "t", 1)
    plain = ImagesDataset(tmp_path / "src", tmp_path / "tgt", label_nc=3)
    inv = ImagesDataset(tmp_path / "src", tmp_path / "tgt", label_nc=3, invert_intensity=True)
    s0, s1 = plain[0], inv[0]
    bg = s0["mask"][..., 0]
    assert np.array_equal(s1["data"][bg], -s0["data"][bg]) and np.array_equal(s1["data"][~bg], s0["data"][~bg])
    assert np.array_equal(inv[1]["data"], -plain[1]["data"])


def test_label_nc_mismatch_names_the_slice(tmp_path):
    make_slices(tmp_path / "src", "s", 2, classes=3)
    with pytest.raises(InputError, match=r"s_slice000\.npz.*3 channels.*--label_nc is 4"):
        ImagesDataset(tmp_path / "src", label_nc=4)


@pytest.mark.parametrize("batch_size", [2, 3, 4, 6])
def test_balanced_sampler_puts_labeled_target_in_every_batch(tmp_path, batch_size):
    make_slices(tmp_path / "src", "s", 13)
    make_slices(tmp_path / "lab", "t", 3, background_only=(0, 2))  # one labeled target slice
    make_slices(tmp_path / "unl", "u", 2, labeled=False)
    ds = ImagesDataset(tmp_path / "src", tmp_path / "lab", tmp_path / "unl", label_nc=3)
    torch.manual_seed(batch_size)
    sampler = BalancedSampler(ds, batch_size)
    for _ in range(3):
        order = list(iter(sampler))
        assert len(order) == len(ds)
        assert {i for i in order if i % 2 == 0} == set(range(0, len(ds), 2))  # every source slice, once
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = order[start:start + batch_size]
            assert any(ds.locate(i)[0] == 1 and ds.has_gt(i) for i in batch), batch
    unbalanced = BalancedSampler(ds, batch_size, balanced=False)
    assert sorted(unbalanced.epoch_indices()) == list(range(len(ds)))


def test_balanced_sampler_draws_each_labeled_target_slice_equally_often(tmp_path):
    """The replacing labeled target slice is uniform over the labeled target *slices*, as the original
    (``lucky_paths``). 7 source and 5 target slices (2 labeled): the interleaved list wraps the target
    list, so its first slice sits at two target indices and the second at one; a draw uniform over
    dataset indices would pick the first 2/3 of the time."""
    make_slices(tmp_path / "src", "s", 7)
    make_slices(tmp_path / "lab", "t", 2)
    make_slices(tmp_path / "unl", "u", 3, labeled=False)
    ds = ImagesDataset(tmp_path / "src", tmp_path / "lab", tmp_path / "unl", label_nc=3)
    target_slots = [i for i in range(ds.natural_length) if ds.locate(i)[0] == 1]
    first, second = ds.target[0], ds.target[1]
    assert [ds.path(i) for i in target_slots].count(first) == 2  # the case the test is about
    assert [ds.path(i) for i in target_slots].count(second) == 1
    sampler = BalancedSampler(ds, 2)
    unlabeled = next(i for i in target_slots if not ds.has_gt(i))
    n = 6000  # groups (source, unlabeled target): each gets one draw
    order = sampler._balance([0, unlabeled] * n, torch.Generator().manual_seed(0))
    drawn = [ds.path(i) for i in order[1::2]]
    assert set(drawn) == {first, second}
    share = drawn.count(first) / n
    assert abs(share - 0.5) < 5 * math.sqrt(0.25 / n), share  # 2/3 lies 25 sigma away


def test_balanced_sampler_needs_two_slots(tmp_path):
    make_slices(tmp_path / "src", "s", 2)
    make_slices(tmp_path / "lab", "t", 2)
    ds = ImagesDataset(tmp_path / "src", tmp_path / "lab", label_nc=3)
    with pytest.raises(InputError, match="--batch_size"):
        BalancedSampler(ds, 1)


# ------------------------------------------------------------------------------------ transforms
def _sample(size: int = 24):
    rng = np.random.default_rng(0)
    lab = np.zeros((size, size), np.int64)
    lab[3:9, 2:15] = 1
    lab[12:20, 5:10] = 2
    mask = lab[..., None] == np.arange(3)
    data = rng.uniform(-1, 1, (size, size, 1)).astype(np.float32)
    return {"data": data, "mask": mask, "weight": mask[..., 1:2].copy()}


def test_mirror_flips_weight_like_mask():
    s = _sample()
    for seed in range(8):
        out = RandomMirror(0.5)(s, np.random.default_rng(seed))
        assert np.array_equal(out["weight"][..., 0], out["mask"][..., 1])  # FIX docs/differences.md#d9-33


def test_rotate_scale_keeps_one_hot_and_border():
    s = _sample(32)
    s["data"][:] = 1.0
    # coordinates x 1.4: the content shrinks (batchgenerators convention), the corners are padding
    out = RandomRotateScale(angle_range=(0.5, 0.5), scale_range=(1.4, 1.4))(s, np.random.default_rng(0))
    assert out["data"].shape == (32, 32, 1) and out["mask"].shape == (32, 32, 3)
    assert np.all(out["mask"].sum(-1) == 1)
    assert np.isclose(out["data"][0, 0, 0], -1.0)  # zoomed-out rotated corner is padding (-1)
    assert np.isclose(out["data"][16, 16, 0], 1.0, atol=1e-3)
    assert not out["mask"][0, 0, 1:].any()  # border: background


def test_rotate_scale_does_not_clamp_the_cubic_overshoot():
    """``--use_da`` warps the image with a cubic kernel, which overshoots at a sharp edge; the result is
    not clamped to [-1, 1], as the original's batchgenerators order-3 spline (no clipping)."""
    s = _sample(32)
    s["data"][:] = -1.0
    s["data"][:, 16:] = 1.0  # a sharp vertical edge
    t = RandomRotateScale()
    t.draw = lambda rng: (0.3, 1.0)
    out = t(s, np.random.default_rng(0))["data"]
    assert out.max() > 1.0 + 1e-3 and out.min() < -1.0 - 1e-3


def test_rotate_scale_draws_batchgenerators_scale_law():
    """Coordinate scale: U(0.7, 1) or U(1, 1.4) with probability 1/2 each (not U(0.7, 1.4))."""
    t = RandomRotateScale()
    rng = np.random.default_rng(0)
    n = 20000
    scales = np.array([t.draw(rng)[1] for _ in range(n)])
    below = scales < 1
    assert abs(below.mean() - 0.5) < 5 * np.sqrt(0.25 / n)  # U(0.7, 1.4) would give 3/7 = 0.43
    assert scales.min() >= 0.7 and scales.max() <= 1.4
    assert abs(scales[below].mean() - 0.85) < 0.01 and abs(scales[~below].mean() - 1.2) < 0.01


def test_rotate_scale_coordinate_scale_shrinks_content():
    s = _sample(32)
    area = s["mask"][..., 1:].sum()
    grow = RandomRotateScale(angle_range=(0.0, 0.0), scale_range=(0.8, 0.8))
    grow.draw = lambda rng: (0.0, 0.8)
    shrink = RandomRotateScale(angle_range=(0.0, 0.0))
    shrink.draw = lambda rng: (0.0, 1.25)
    rng = np.random.default_rng(0)
    assert grow(s, rng)["mask"][..., 1:].sum() > area > shrink(s, rng)["mask"][..., 1:].sum()


def test_train_and_eval_transforms_shapes():
    s = _sample(24)
    t = train_transform(16, use_da=True)(s, np.random.default_rng(1))
    assert t["data"].shape == (1, 16, 16) and t["mask"].shape == (3, 16, 16) and t["weight"].shape == (1, 16, 16)
    assert torch.all(t["mask"].sum(0) == 1)
    e = eval_transform(16)(s, np.random.default_rng(1))
    assert e["data"].shape == (1, 16, 16) and e["mask"].shape == (3, 24, 24)


# ------------------------------------------------------------------------------------ metrics
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


def test_ensemble_weights_are_honoured():
    intra = torch.zeros(1, 3, 2, 2)
    inter = torch.zeros(1, 3, 2, 2)
    intra[:, 1] = 1.0
    inter[:, 2] = 0.8
    pred = {"intra": intra, "inter": inter, "weight": torch.ones(1, 1, 2, 2)}
    out = label_volumes(pred, (0.6, 0.4))
    assert (out["intra"] == 1).all() and (out["inter"] == 2).all() and (out["pred"] == 2).all()
    assert (label_volumes(pred, (0.3, 0.7))["pred"] == 1).all()
    pred["weight"][0, 0, 0, 0] = 0
    # as the original, the weight map is not applied at inference; --mask_outside_weight applies it
    assert label_volumes(pred, (0.6, 0.4))["pred"][0, 0, 0] == 2
    assert label_volumes(pred, (0.6, 0.4), mask_outside_weight=True)["pred"][0, 0, 0] == 0


def test_translation_volume_and_invert_intensity_undo():
    from MultiMedSeg.ensemble import translation_volume

    pred = {"trans": torch.full((1, 1, 2, 2), 0.5), "weight": torch.ones(1, 1, 2, 2)}
    pred["weight"][0, 0, 1, 1] = 0
    assert np.allclose(translation_volume(pred), 0.5)
    masked = translation_volume(pred, mask_outside_weight=True)
    assert masked[0, 1, 1] == -1.0 and masked[0, 0, 0] == 0.5


def test_invert_intensity_translation_is_negated_back_on_background():
    """As the original: with invert_intensity the interpreter negates the translated image where it predicts
    background; inference negates it again there, which gives back the generator's intensities."""
    from types import SimpleNamespace

    from MultiMedSeg.ensemble import Ensemble, Member

    seg = torch.zeros(1, 3, 4, 4)
    seg[:, 0, :2] = 1.0   # background on the top half
    seg[:, 2, 2:] = 1.0

    class Stub:
        def __init__(self, invert):
            self.config = SimpleNamespace(invert_intensity=invert)

        def __call__(self, x, label, resize=False, feature_scale=1.0):
            image = torch.full((x.shape[0], 1, 4, 4), 0.5)
            if self.config.invert_intensity:  # what the interpreter does
                image = torch.where(seg.argmax(1, keepdim=True) == 0, -image, image)
            return torch.cat([image, seg.expand(x.shape[0], -1, -1, -1)], 1)

    batch = {"data": torch.zeros(2, 1, 4, 4), "domain": torch.tensor([[0.0, 1.0]] * 2),
             "weight": torch.ones(2, 1, 4, 4)}
    out = Ensemble([Member(Stub(True), 1.0, None)], torch.device("cpu")).predict_volume([batch], inter=True)
    assert torch.allclose(out["trans"], torch.full((2, 1, 4, 4), 0.5))
    plain = Ensemble([Member(Stub(False), 1.0, None)], torch.device("cpu")).predict_volume([batch], inter=True)
    assert torch.allclose(plain["trans"], torch.full((2, 1, 4, 4), 0.5))


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


def test_favoured_mode_selects_channels_as_the_original():
    from types import SimpleNamespace

    from MultiMedSeg.losses import LossConfig
    from MultiMedSeg.training.coach import Coach

    def selected(**kw):
        opts = SimpleNamespace(label_nc=3, optimize_mode="favoured")
        coach = SimpleNamespace(opts=opts, losses=SimpleNamespace(
            favoured_channels=LossConfig(optimize_mode="favoured", **kw).favoured))
        return Coach.selected_channels(coach)

    assert selected() == ["0", "1", "2"]                         # no weights: every class, background too
    assert selected(ce_weights=[1, 1, 3]) == ["2"]
    assert selected(ce_weights=[1, 2, 1], dice_weights=[1, 1, 5]) == ["2"]  # Dice has the larger maximum
    assert selected(ce_weights=[1, 5, 1], dice_weights=[1, 1, 5]) == ["1"]  # tie of maxima: CE
    assert selected(dice_weights=[2, 1, 2]) == ["0", "2"]
    foreground = SimpleNamespace(opts=SimpleNamespace(label_nc=3, optimize_mode="foreground"),
                                 losses=SimpleNamespace(favoured_channels=lambda: []))
    assert Coach.selected_channels(foreground) == ["1", "2"]


# ------------------------------------------------------------------------------------ checkpoints / options
def test_best_index_keeps_k_best_as_json(tmp_path):
    index = ck.BestIndex(tmp_path, k=2)
    assert index.add(0.3, 10, {"dice_1": 0.3}, {"x": torch.ones(1)}) == "best_step0000010.pt"
    assert index.add(0.0, 15, {}, {}) is None  # a zero score never enters (slots start at 0)
    index.add(0.5, 20, {"hd": math.inf}, {"x": torch.ones(1)})
    index.add(0.4, 30, {}, {"x": torch.ones(1)})
    assert [e.step for e in index.entries] == [20, 30]
    assert not (tmp_path / "best_step0000010.pt").exists()  # evicted file deleted
    raw = json.loads((tmp_path / "best.json").read_text())
    assert [r["file"] for r in raw] == ["best_step0000020.pt", "best_step0000030.pt"]
    assert raw[0]["metrics"]["hd"] == "inf"
    again = ck.BestIndex.load(tmp_path)
    assert [e.score for e in again.entries] == [0.5, 0.4] and math.isinf(again.entries[0].metrics["hd"])
    assert not index.qualifies(0.35) and index.qualifies(0.45)
    (tmp_path / "best.json").write_text("[{\"file\": 1}]")
    with pytest.raises(InputError, match="malformed"):
        ck.BestIndex.load(tmp_path)


def test_options_config_file_and_dash_aliases(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"source_root": "data/src", "val_root": "data/val", "src_label": 1,
                               "stylegan_weights": "g.pt", "batch_size": 2, "ce_weights": [1, 2, 3]}))
    opts = parse_training_options(["--config", str(cfg), "--exp-dir", "x", "--batch_size", "6"], "pretrain")
    assert opts.source_root == tmp_path / "data" / "src" and opts.batch_size == 6 and opts.src_label == 1
    assert opts.ce_weights == [1.0, 2.0, 3.0] and opts.only_intra and opts.save_interval is None
    assert opts.checkpoint_interval == opts.max_steps  # derived, not written into the options
    cfg.write_text(json.dumps({"learn_in_w": True}))
    with pytest.raises(InputError, match="cfg.json.*learn_in_w"):
        parse_training_options(["--config", str(cfg)], "pretrain")
    with pytest.raises(InputError, match="--ce_weights has 2 values"):
        parse_training_options(["--exp_dir", "x", "--source_root", "s", "--val_root", "v", "--src_label", "0",
                                "--stylegan_weights", "g", "--ce_weights", "1,2"], "pretrain")
    opts = parse_inference_options(["--exp_dir", "o", "--checkpoint_dir", "c", "--target_data", "d"])
    assert opts.test_root == Path("d/test") and opts.metadata == Path("d/metadata.json")
    assert opts.ensemble_weights is None and opts.ensemble_size is None  # the run's evaluation.json decides
    assert not opts.mask_outside_weight
    assert parse_inference_options(["--exp_dir", "o", "--checkpoint_dir", "c", "--target_data", "d",
                                    "--mask-outside-weight"]).mask_outside_weight
    train = ["--exp_dir", "x", "--source_root", "s", "--target_labeled", "t", "--val_root", "v", "--src_label", "0",
             "--tgt_label", "1", "--checkpoint_dir", "c"]
    assert not parse_training_options(train, "train").reinit_encoder
    assert parse_training_options(train + ["--reinit-encoder"], "train").reinit_encoder


def test_options_are_typed_frozen_and_read_back_with_their_type(tmp_path):
    """One configuration style: a frozen dataclass per command, its flags generated from its fields, stored
    in the run (opt.json) and read back with the same type; older opt.json files still load."""
    import dataclasses

    from MultiMedSeg import options as O

    base = ["--exp_dir", "x", "--source_root", "s", "--val_root", "v", "--src_label", "0", "--stylegan_weights", "g"]
    pre = parse_training_options(base + ["--no_amp", "--ce_weights", "1,2,3"], "pretrain")
    assert type(pre) is O.PretrainOptions and pre.mode == "pretrain" and pre.only_intra
    with pytest.raises(dataclasses.FrozenInstanceError):
        pre.save_interval = 3  # no attribute changes after parsing
    stored = json.loads(json.dumps(pre.to_dict()))  # as opt.json holds it
    assert stored["mode"] == "pretrain" and stored["only_intra"] is True and stored["amp"] == "fp16"
    back = O.stored_training_options(stored)
    assert back == pre and type(back) is O.PretrainOptions
    (tmp_path / "opt.json").write_text(json.dumps(stored))
    assert O.load_run_options(tmp_path) == pre and O.load_run_options(tmp_path / "none") is None
    # an opt.json of the earlier Namespace options: derived values written in, keys of older versions
    old = dict(stored, save_interval=15000, amp="off", mode="train", only_intra=False, tgt_label=2,
               target_labeled="t", checkpoint_dir="c", some_removed_option=1)
    adapt = O.stored_training_options(old)
    assert type(adapt) is O.AdaptOptions and adapt.target_labeled == Path("t") and adapt.checkpoint_interval == 15000
    assert adapt.amp_mode == "off" and not adapt.only_intra
    assert type(O.stored_training_options({"only_intra": True})) is O.PretrainOptions  # before "mode" was stored
    with pytest.raises(InputError, match="unknown mode"):
        O.stored_training_options({"mode": "other"})
    # the flags are the fields: each flag's type and default is its field's
    for parser, cls, not_flags in ((O.training_parser("pretrain"), O.PretrainOptions,
                                    {"target_data", "target_labeled", "target_unlabeled", "checkpoint_dir",
                                     "one_target_slice", "reinit_encoder", "tgt_label", "ensemble_selection"}),
                                   (O.training_parser("train"), O.AdaptOptions, {"stylegan_weights"}),
                                   (O.inference_parser(), O.InferenceOptions, set()),
                                   (O.predict_parser(), O.PredictOptions, set()),
                                   (O.select_evaluation_parser(), O.SelectEvaluationOptions, set()),
                                   (O.plan_parser(), O.PlanOptions, set())):
        dests = {a.dest: a for a in parser._actions if a.dest not in ("help", "paper_only_intra")}
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(dests) == names - not_flags, (cls.__name__, set(dests) ^ (names - not_flags))
        defaults = cls()
        assert all(a.default == getattr(defaults, name) for name, a in dests.items()), cls.__name__
    assert O.PretrainOptions().batch_size == 8 and O.AdaptOptions().batch_size == 4
    assert O.training_parser("pretrain").parse_args([]).max_steps == 15000
    # a checkpoint's feature scale reads its stored options with the same type (older payloads too)
    from MultiMedSeg.ensemble import feature_scale_of

    assert feature_scale_of({"opts": dict(old, feature_scale_rate=0.1), "global_step": 3}) == pytest.approx(0.3)
    assert feature_scale_of({"opts": {"only_intra": True}, "global_step": 5000}) == pytest.approx(0.5)  # default rate
    assert feature_scale_of({"global_step": 20000}) == 1.0


def test_gpu_options_amp_tf32_cudnn_benchmark(monkeypatch):
    """--amp fp16|bf16|off (fp16 default, as the reference; --no_amp = off), --allow_tf32, --cudnn_benchmark."""
    from MultiMedSeg.training.coach import amp_dtype

    base = ["--exp_dir", "x", "--source_root", "s", "--val_root", "v", "--src_label", "0", "--stylegan_weights", "g"]
    opts = parse_training_options(base, "pretrain")
    assert opts.amp_mode == "fp16" and not opts.allow_tf32 and not opts.cudnn_benchmark
    assert parse_training_options(base + ["--no-amp"], "pretrain").amp_mode == "off"
    opts = parse_training_options(base + ["--amp", "bf16", "--allow-tf32", "--cudnn_benchmark"], "pretrain")
    assert opts.amp_mode == "bf16" and opts.allow_tf32 and opts.cudnn_benchmark
    assert parse_inference_options(["--exp_dir", "o", "--checkpoint_dir", "c", "--target_data", "d",
                                    "--allow_tf32"]).allow_tf32
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype("fp16", cpu) is None and amp_dtype("bf16", cpu) is None  # never on CPU
    assert amp_dtype("fp16", cuda) == torch.float16 and amp_dtype("off", cuda) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype("bf16", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(InputError, match="--amp bf16: Tesla V100"):
        amp_dtype("bf16", cuda)


@pytest.mark.parametrize("script, flag", [("MultiMedSeg/pretrain.py", "--stylegan_weights"),
                                          ("-m MultiMedSeg.train", "--one_target_slice"),
                                          ("MultiMedSeg/inference.py", "--ensemble_weights")])
def test_help(script, flag):
    res = subprocess.run([sys.executable, *script.split(), "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for text in ("--exp_dir", "--device", "--config", flag):
        assert text in res.stdout


# ------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def pipeline(preprocessed_sites, tmp_path_factory):
    """pretrain on site 0 -> adapt to site 2 (one labeled slice per volume) -> inference on site 2."""
    root = tmp_path_factory.mktemp("mms_pipeline")
    gen = write_generator(root / "final_global_model.pt")
    heads, feats = write_alexnet(root)
    pre = root / "pretrain"
    pretrain_cli.main(["--exp_dir", str(pre), "--source_data", str(preprocessed_sites[0]), "--stylegan_weights",
                       str(gen), "--src_label", "0", "--lpips_lambda", "0", "--max_steps", "6", "--val_interval", "3",
                       *TINY])
    ada = root / "adapt"
    train_cli.main(["--exp_dir", str(ada), "--source_data", str(preprocessed_sites[0]), "--target_data",
                    str(preprocessed_sites[2]), "--checkpoint_dir", str(pre), "--src_label", "0", "--tgt_label", "2",
                    "--one_target_slice", "--max_steps", "6", "--val_interval", "3", "--use_da",
                    "--alex_model", str(heads), "--alex_pretr_model", str(feats), *TINY])
    out = root / "inference"
    inference_cli.main(["--exp_dir", str(out), "--checkpoint_dir", str(ada), "--target_data",
                        str(preprocessed_sites[2]), "--ensemble_size", "5", "--device", "cpu"])
    return {"root": root, "gen": gen, "pretrain": pre, "adapt": ada, "inference": out}


def test_pipeline_checkpoints_and_index(pipeline):
    for run in ("pretrain", "adapt"):
        folder = pipeline[run] / "checkpoints"
        index = json.loads((folder / "best.json").read_text())
        assert 1 <= len(index) <= 5 and all(set(e) == {"file", "score", "step", "metrics"} for e in index)
        assert [e["score"] for e in index] == sorted((e["score"] for e in index), reverse=True)
        for e in index:
            payload = torch.load(folder / e["file"], weights_only=True)
            assert payload["global_step"] == e["step"] and "optimizer" not in payload
        last = torch.load(folder / "last.pt", weights_only=True)
        assert last["global_step"] == 6 and "optimizer" in last and "optimizer_seg" in last
        assert (folder / "iteration_6.pt").is_file()
        assert list((pipeline[run] / "logs").glob("events.out.tfevents.*"))
    pre_cfg = torch.load(pipeline["pretrain"] / "checkpoints" / "last.pt", weights_only=True)["config"]
    ada_cfg = torch.load(pipeline["adapt"] / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert pre_cfg["src_tgt_domains"] == [0] and ada_cfg["src_tgt_domains"] == [0, 2]
    keys = json.loads((pipeline["adapt"] / "checkpoints" / "best.json").read_text())[0]["metrics"]
    assert {"dice_1", "inter_dice_2", "intra_hausdorff_foreground", "inter_loss"} <= set(keys)


def test_pipeline_inference_writes_nifti_on_original_grid(pipeline, preprocessed_sites, phantom_dir):
    out = pipeline["inference"]
    meta = json.loads((preprocessed_sites[2] / "metadata.json").read_text())
    test_ids = meta["splits"]["test"]
    assert test_ids
    for vid in test_ids:
        ref = nib.load(str(phantom_dir / "site2" / "images" / f"{vid}.nii.gz"))
        for kind in ("intra", "inter", "pred", "trans"):
            img = nib.load(str(out / f"{vid}_{kind}.nii.gz"))
            assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
            arr = np.asarray(img.dataobj)
            if kind == "trans":
                assert img.get_data_dtype() == np.float32 and arr.min() >= -1 and arr.max() <= 1
            else:
                assert set(np.unique(arr)) <= {0, 1, 2}
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "volume,prediction,class,dice,hd95,hd,unit" and all(r.endswith(",mm") for r in rows[1:])
    assert len(rows) == 1 + len(test_ids) * 3 * 3  # volumes x (intra, inter, pred) x (1, 2, foreground)
    info = json.loads((out / "inference.json").read_text())
    n_best = len(json.loads((pipeline["adapt"] / "checkpoints" / "best.json").read_text()))
    assert len(info["checkpoints"]) == n_best  # averaged over the checkpoints actually used


def test_pipeline_metrics_csv_recomputed_from_the_written_files(pipeline, preprocessed_sites, phantom_dir):
    """Every metrics.csv row equals MedPy on the written NIfTI prediction and the ground-truth file, with
    the voxel spacing read from the written file's header (mm), not from the slice grid."""
    import csv

    from medpy.metric.binary import dc, hd, hd95

    out = pipeline["inference"]
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    cache = {}
    for row in rows:
        vid, branch, cls = row["volume"], row["prediction"], row["class"]
        if (vid, branch) not in cache:
            img = nib.load(str(out / f"{vid}_{branch}.nii.gz"))
            gt = np.asarray(nib.load(str(phantom_dir / "site2" / "labels" / f"{vid}.nii.gz")).dataobj)
            cache[vid, branch] = (np.asarray(img.dataobj), gt, tuple(float(z) for z in img.header.get_zooms()[:3]))
        pred, gt, spacing = cache[vid, branch]
        assert spacing == (6.0, 6.0, 6.0)  # the phantom's grid, not the 32 px slices
        p, g = (pred > 0, gt > 0) if cls == "foreground" else (pred == int(cls), gt == int(cls))
        if not p.any() or not g.any():
            want = {"dice": 1.0 if p.any() == g.any() else 0.0}
            want["hd95"] = want["hd"] = 0.0 if p.any() == g.any() else math.inf
        else:
            want = {"dice": dc(p, g), "hd95": hd95(p, g, voxelspacing=spacing), "hd": hd(p, g, voxelspacing=spacing)}
        for key, value in want.items():
            assert float(row[key]) == pytest.approx(value, abs=1e-6), (vid, branch, cls, key)


def test_inference_is_deterministic_and_source_only_writes_intra(pipeline, preprocessed_sites):
    again = pipeline["root"] / "inference_again"
    inference_cli.main(["--exp_dir", str(again), "--checkpoint_dir", str(pipeline["adapt"]), "--target_data",
                        str(preprocessed_sites[2]), "--ensemble_size", "5", "--device", "cpu",
                        "--test_batch_size", "3"])  # other batch composition: same result (running BN stats)
    for f in sorted(pipeline["inference"].glob("*.nii.gz")):
        a = np.asarray(nib.load(str(f)).dataobj)
        b = np.asarray(nib.load(str(again / f.name)).dataobj)
        assert np.allclose(a, b, atol=1e-5), f.name
    src = pipeline["root"] / "inference_source_only"
    inference_cli.main(["--exp_dir", str(src), "--checkpoint_dir", str(pipeline["pretrain"]), "--target_data",
                        str(preprocessed_sites[2]), "--ensemble_size", "1", "--device", "cpu"])
    names = sorted(p.name for p in src.glob("*.nii.gz"))
    assert names and all(n.endswith("_intra.nii.gz") for n in names)


def test_resume_continues_steps_and_keeps_best_index(pipeline, preprocessed_sites, capsys):
    run = pipeline["root"] / "pretrain_resumed"
    shutil.copytree(pipeline["pretrain"], run)
    before = json.loads((run / "checkpoints" / "best.json").read_text())
    args = ["--exp_dir", str(run), "--source_data", str(preprocessed_sites[0]), "--stylegan_weights",
            str(pipeline["gen"]), "--src_label", "0", "--lpips_lambda", "0", "--val_interval", "3", *TINY]
    err = exit_message(capsys, pretrain_cli.main, args + ["--max_steps", "9"])
    assert str(run) in err and "--resume" in err  # an existing run is never silently reused
    err = exit_message(capsys, pretrain_cli.main, ["--resume", *args, "--max_steps", "6"])
    assert "step 6" in err and "--max_steps" in err
    pretrain_cli.main(["--resume", *args, "--max_steps", "9"])
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["global_step"] == 9 and (run / "checkpoints" / "iteration_9.pt").is_file()
    after = json.loads((run / "checkpoints" / "best.json").read_text())
    assert {e["file"] for e in before} <= {e["file"] for e in after}  # k = 5 > validations: nothing evicted
    assert {e["step"] for e in after} - {e["step"] for e in before} <= {9}  # only the new validation can join
    assert all((run / "checkpoints" / e["file"]).is_file() for e in after)


def test_resume_adaptation(pipeline, preprocessed_sites):
    run = pipeline["root"] / "adapt_resumed"
    shutil.copytree(pipeline["adapt"], run)
    before = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    train_cli.main(["--resume", "--exp_dir", str(run), "--source_data", str(preprocessed_sites[0]), "--target_data",
                    str(preprocessed_sites[2]), "--checkpoint_dir", str(pipeline["pretrain"]), "--src_label", "0",
                    "--tgt_label", "2", "--one_target_slice", "--max_steps", "8", "--val_interval", "3",
                    "--lpips_lambda", "0", *TINY])
    after = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert after["global_step"] == 8
    src_head = [k for k in before["state_dict"] if k.startswith("interpreter.classifiers.source.")
                and before["state_dict"][k].is_floating_point() and "running" not in k]
    assert src_head and all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in src_head)
    tgt_head = [k for k in before["state_dict"] if k.startswith("interpreter.classifiers.target.") and
                k.endswith("weight")]
    assert any(not torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in tgt_head)


def test_inference_refuses_the_metadata_of_another_site(pipeline, preprocessed_sites, tmp_path, capsys):
    """Same volume ids and slice counts at two sites: only the fingerprint tells the metadata apart."""
    site1, site2 = preprocessed_sites[1], preprocessed_sites[2]
    out = tmp_path / "out"
    meta1 = json.loads((site1 / "metadata.json").read_text())
    meta2 = json.loads((site2 / "metadata.json").read_text())
    vid = meta2["splits"]["test"][0]
    assert vid in meta1["volumes"]
    err = exit_message(capsys, inference_cli.main, ["--exp_dir", str(out), "--checkpoint_dir", str(pipeline["adapt"]),
                                                    "--target_data", str(site2), "--metadata",
                                                    str(site1 / "metadata.json"), "--device", "cpu"])
    assert err.startswith(f"error: {site1 / 'metadata.json'}: volume {vid!r}")
    other = tmp_path / "other" / "metadata.json"  # site 1's metadata made to list this volume's slice files
    other.parent.mkdir()
    for key in ("slices", "shape_before_padding"):
        meta1["volumes"][vid][key] = meta2["volumes"][vid][key]
    meta1["volumes"][vid]["fingerprint"]["slice"] = meta2["volumes"][vid]["fingerprint"]["slice"]
    other.write_text(json.dumps(meta1))
    err = exit_message(capsys, inference_cli.main, ["--exp_dir", str(out), "--checkpoint_dir", str(pipeline["adapt"]),
                                                    "--target_data", str(site2), "--metadata", str(other),
                                                    "--device", "cpu"])
    assert err.startswith(f"error: {other}: volume {vid!r}") and "fingerprint differs" in err
    assert not out.exists()


def test_inference_without_some_ground_truth_writes_predictions_and_the_other_metrics(
        pipeline, preprocessed_sites, tmp_path, capsys):
    site2 = preprocessed_sites[2]
    meta = json.loads((site2 / "metadata.json").read_text())
    test_root = tmp_path / "slices"  # the val and the test volume of site 2
    for split in ("val", "test"):
        shutil.copytree(site2 / split, test_root, dirs_exist_ok=True)
    scored, missing = meta["splits"]["test"][0], meta["splits"]["val"][0]
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(meta["volumes"][scored]["label"], labels / f"{scored}.nii.gz")
    out = tmp_path / "out"
    capsys.readouterr()
    inference_cli.main(["--exp_dir", str(out), "--checkpoint_dir", str(pipeline["adapt"]), "--test_root",
                        str(test_root), "--metadata", str(site2 / "metadata.json"), "--labels", str(labels),
                        "--device", "cpu"])
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warning == [f"warning: {out}: no ground truth for 1 of 2 test volume(s) ({missing}: no {missing}.nii.gz "
                       f"in {labels}): predictions written, metrics.csv covers the other 1"]
    assert all((out / f"{vid}_pred.nii.gz").is_file() for vid in (scored, missing))
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert rows and {r.split(",")[0] for r in rows} == {scored}
    assert json.loads((out / "inference.json").read_text())["no_ground_truth"] == {
        missing: f"no {missing}.nii.gz in {labels}"}


# ------------------------------------------------------------------------------------ one-line errors
def test_errors_are_one_line_and_name_the_culprit(pipeline, preprocessed_sites, tmp_path, capsys):
    site0, site2 = preprocessed_sites[0], preprocessed_sites[2]
    gen = pipeline["gen"]
    base_pre = ["--source_data", str(site0), "--src_label", "0", "--lpips_lambda", "0", "--max_steps", "1", *TINY]
    # label_nc mismatch with the data's mask channels
    err = exit_message(capsys, pretrain_cli.main, ["--exp_dir", str(tmp_path / "a"), "--stylegan_weights", str(gen),
                                                   *base_pre, "--label_nc", "4"])
    assert "_slice" in err and "--label_nc is 4" in err
    # source label outside the generator's domains
    err = exit_message(capsys, pretrain_cli.main, ["--exp_dir", str(tmp_path / "b"), "--stylegan_weights", str(gen),
                                                   *base_pre, "--src_label", "3"])
    assert str(gen) in err and "--src_label 3" in err
    # a generator file with another n_domains
    gen2 = write_generator(tmp_path / "gen2.pt", n_domains=2)
    err = exit_message(capsys, pretrain_cli.main, ["--exp_dir", str(tmp_path / "c"), "--stylegan_weights", str(gen2),
                                                   *base_pre, "--n_domains", "3"])
    assert str(gen2) in err and "n_domains" in err
    # generator of another size
    err = exit_message(capsys, pretrain_cli.main, ["--exp_dir", str(tmp_path / "d"), "--stylegan_weights", str(gen),
                                                   *base_pre, "--output_size", "64"])
    assert str(gen) in err and "64" in err
    base_train = ["--source_data", str(site0), "--checkpoint_dir", str(pipeline["pretrain"]), "--src_label", "0",
                  "--lpips_lambda", "0", "--max_steps", "1", *TINY]
    # missing target labeled folder
    missing = tmp_path / "nope" / "labeled"
    err = exit_message(capsys, train_cli.main, ["--exp_dir", str(tmp_path / "e"), *base_train, "--tgt_label", "2",
                                                "--target_labeled", str(missing), "--val_root", str(site2 / "val")])
    assert str(missing) in err and "--target_labeled" in err
    # pretraining checkpoint of another size
    err = exit_message(capsys, train_cli.main, ["--exp_dir", str(tmp_path / "f"), *base_train, "--tgt_label", "2",
                                                "--target_data", str(site2), "--output_size", "64"])
    assert "best_step" in err and "checkpoint" in err
    # target label outside the checkpoint's domains
    err = exit_message(capsys, train_cli.main, ["--exp_dir", str(tmp_path / "g"), *base_train, "--tgt_label", "5",
                                                "--target_data", str(site2)])
    assert "--tgt_label 5" in err and "best_step" in err
    # existing exp_dir without --resume/--overwrite
    err = exit_message(capsys, train_cli.main, ["--exp_dir", str(pipeline["adapt"]), *base_train, "--tgt_label",
                                                "2", "--target_data", str(site2)])
    assert str(pipeline["adapt"]) in err and "--resume" in err
    if not torch.cuda.is_available():
        err = exit_message(capsys, pretrain_cli.main, ["--exp_dir", str(tmp_path / "j"), "--stylegan_weights",
                                                       str(gen), *base_pre, "--device", "cuda"])
        assert "--device cuda" in err
    # inference: label_nc check and a checkpoint folder without index
    err = exit_message(capsys, inference_cli.main, ["--exp_dir", str(tmp_path / "h"), "--checkpoint_dir",
                                                    str(pipeline["adapt"]), "--target_data", str(site2),
                                                    "--label_nc", "4", "--device", "cpu"])
    assert "--label_nc is 4" in err
    (tmp_path / "empty").mkdir()
    err = exit_message(capsys, inference_cli.main, ["--exp_dir", str(tmp_path / "i"), "--checkpoint_dir",
                                                    str(tmp_path / "empty"), "--target_data", str(site2)])
    assert "best.json" in err


# ------------------------------------------------------------------------------------ mask resizing rule
def test_mask_downsampling_keeps_each_channel_at_half():
    """The original's rule (batchgenerators 0.24 resize_segmentation(order=1) on the one-hot array),
    implemented once in MultiMedSeg.data.resample, whatever batchgenerators is installed."""
    from skimage.transform import resize as sk_resize

    from MultiMedSeg.data import transforms
    from MultiMedSeg.data.resample import resize_labels, resize_onehot

    lab = np.zeros((64, 64), np.int64)
    lab[:, 10] = 2            # a vertical 1-px line (vessel-like)
    lab[30:50, 30:50] = 1     # a block
    mask = lab[..., None] == np.arange(3)
    out = transforms.resize_mask(mask, 32)
    expected = np.stack([sk_resize(mask[..., c].astype(float), (32, 32), order=1, mode="edge", clip=True,
                                   anti_aliasing=False) >= 0.5 for c in range(3)], axis=-1)
    assert np.array_equal(out, expected)
    assert out[:, 5, 2].all()                 # the thin line survives in every row (0.5 >= 0.5) ...
    assert out[:, 5, 0].all()                 # ... and so does its background: that pixel has 2 channels
    assert np.array_equal(transforms.resize_weight(mask[..., 2:3], 32), out[..., 2:3])
    # an integer map: classes written in increasing order (the larger label wins an overlap)
    small = resize_labels(lab, (32, 32))
    assert (small[:, 5] == 2).all() and small.dtype == lab.dtype
    # four classes meeting (2x2 -> 1x1): each indicator is 0.25 there, the pixel gets no channel
    quad = (np.arange(4).reshape(2, 2)[..., None] == np.arange(4))
    assert not resize_onehot(quad, (1, 1)).any()
    assert np.array_equal(resize_onehot(np.zeros((8, 8, 3), bool), (4, 4)), np.zeros((4, 4, 3), bool))


def _linear_indicator_float64(indicator: np.ndarray, shape) -> np.ndarray:
    """The rule's interpolation written out: skimage/scipy grid-mode coordinates ((o + 0.5) * n_in /
    n_out - 0.5, clamped at the edges) and the bilinear tensor-product sum of the four corners, in float64."""
    def axis(n_in, n_out):
        x = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        i0 = np.floor(x).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), x - i0

    v = indicator.astype(np.float64)
    (y0, y1, ty), (x0, x1, tx) = axis(v.shape[0], shape[0]), axis(v.shape[1], shape[1])
    out = np.zeros(shape, np.float64)
    for a in range(shape[0]):
        for b in range(shape[1]):
            out[a, b] = ((1 - ty[a]) * (1 - tx[b]) * v[y0[a], x0[b]] + (1 - ty[a]) * tx[b] * v[y0[a], x1[b]]
                         + ty[a] * (1 - tx[b]) * v[y1[a], x0[b]] + ty[a] * tx[b] * v[y1[a], x1[b]])
    return out


def test_mask_downsampling_decides_half_ties_in_float64():
    """A 3x5 -> 2x3 indicator whose exact value at one pixel is a 0.5 tie: float64 puts it just below
    0.5 (dropped, as batchgenerators 0.24's float interpolation), float32 rounds it up to 0.5 (kept)."""
    from skimage.transform import resize as sk_resize

    from MultiMedSeg.data.resample import resize_indicator, resize_labels, resize_onehot

    ind = np.array([[0, 0, 0, 1, 0], [1, 1, 0, 1, 1], [0, 1, 0, 1, 0]], bool)
    expected = _linear_indicator_float64(ind, (2, 3)) >= 0.5
    in_float32 = sk_resize(ind.astype(np.float32), (2, 3), order=1, mode="edge", clip=True, preserve_range=True,
                           anti_aliasing=False) >= 0.5
    assert not np.array_equal(in_float32, expected)  # the case is a tie the precision decides
    assert np.array_equal(resize_indicator(ind, (2, 3)), expected)
    labels = ind.astype(np.int64) * 2
    assert np.array_equal(resize_labels(labels, (2, 3)), np.where(expected, 2, 0))
    onehot = np.stack([~ind, ind], axis=-1)
    assert np.array_equal(resize_onehot(onehot, (2, 3))[..., 1], expected)
    # the written-out rule agrees with the implementation on random masks and ratios, ties included
    rng = np.random.default_rng(0)
    for _ in range(300):
        n_in, n_out = tuple(rng.integers(2, 9, 2)), tuple(rng.integers(2, 7, 2))
        mask = rng.random(n_in) < 0.5
        assert np.array_equal(resize_indicator(mask, n_out), _linear_indicator_float64(mask, n_out) >= 0.5)
