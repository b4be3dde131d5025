"""Phase-2 training data (MultiMedSeg/data/): the slice dataset (domains, labelled targets, ground truth,
inverted intensity), the balanced sampler, the augmentations and the mask resizing rule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from builders import make_slices
from MultiMedSeg.data.images_dataset import ImagesDataset
from MultiMedSeg.data.sampler import BalancedSampler
from MultiMedSeg.data.transforms import RandomMirror, RandomRotateScale, eval_transform, train_transform
from robustmedseg.errors import InputError


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
