"""Phase-2 preprocessing (MultiMedSeg/preprocess.py, MultiMedSeg/data/): format, split, metadata,
round trip back to the NIfTI grid, the docs/differences.md fixes, and bad input. The slice file format itself
is checked in tests/test_slices.py, the restore step's exact round trips in tests/test_restore.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from medpy.metric.binary import dc

from MultiMedSeg import preprocess as cli
from MultiMedSeg.data import (PreprocessConfig, group_slices_by_volume, load_metadata, load_slice, preprocess,
                              restore_volume, slice_index, volume_id, write_nifti_like)
from MultiMedSeg.data.volumes_to_slices import axis_crop, pick_labeled_train, split_volumes, z_range
from robustmedseg.errors import InputError
from builders import brain_dataset as _brain_dataset

QUIET = {"log": lambda *a, **k: None}
SIZE = 32  # conftest PREP_SIZE


def _site_config(phantom_dir: Path, site: int, out: Path, **kw) -> PreprocessConfig:
    base = dict(images=phantom_dir / f"site{site}" / "images", labels=phantom_dir / f"site{site}" / "labels",
                out=out, size=64, num_classes=3, val_frac=0.25, test_frac=0.25, discard_outside_labels=True)
    base.update(kw)
    return PreprocessConfig(**base)


def _stack(out: Path, vol: dict, key: str) -> np.ndarray:
    slices = [load_slice(out / rel) for rel in vol["slices"]]
    if key == "mask":
        return np.stack([s["mask"].argmax(axis=-1) for s in slices])
    return np.stack([s["data"][..., 0] for s in slices])


def _write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return path


def _box_dataset(root: Path, n: int = 3, ext: str = ".nii.gz", weights: bool = False) -> Path:
    """Small synthetic volumes: a bright box (label 1) with a brighter core (label 2)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.normal(0, 0.05, (20, 24, 12)).astype(np.float32)
        label = np.zeros(image.shape, np.uint8)
        label[5:15, 6:18, 3:9] = 1
        label[8:12, 9:14, 4:8] = 2
        image += label
        _write_nifti(root / "images" / f"vol{i}{ext}", image)
        _write_nifti(root / "labels" / f"vol{i}{ext}", label)
        if weights:
            weight = np.ones(image.shape, np.uint8)
            weight[:, :4, :6] = 0  # the first 6 slices have an excluded region
            _write_nifti(root / "weights" / f"vol{i}{ext}", weight)
    return root


# --------------------------------------------------------------------------- output format


def test_slice_files_format(preprocessed_sites):
    for site, out in preprocessed_sites.items():
        files = sorted(out.rglob("*.npz"))
        assert files
        meta = load_metadata(out)
        windows = {v["id"]: v["inplane_window"] for v in meta["volumes"].values()}
        for path in files:
            with np.load(path, allow_pickle=False) as archive:  # plain arrays, no pickle
                assert set(archive.files) == {"data", "mask"}
                data, mask = archive["data"], archive["mask"]
            assert data.dtype == np.float32 and data.shape == (SIZE, SIZE, 1)
            assert mask.dtype == np.bool_ and mask.shape == (SIZE, SIZE, 3)
            assert data.min() >= -1.0 and data.max() <= 1.0
            assert np.all(mask.sum(axis=-1) == 1)
            (_, row_dst, rows), (_, col_dst, cols) = windows[volume_id(path)]
            outside = np.ones((SIZE, SIZE), bool)
            outside[row_dst:row_dst + rows, col_dst:col_dst + cols] = False
            assert np.all(data[outside, 0] == -1.0) and np.all(mask[outside, 0])  # pad: -1 and background
        # the normalisation uses the train+val window: both ends are reached somewhere
        all_data = np.concatenate([load_slice(p)["data"].ravel() for p in files])
        assert all_data.min() == -1.0 and all_data.max() == 1.0


def test_layout_split_and_metadata(preprocessed_sites):
    for site, out in preprocessed_sites.items():
        meta = load_metadata(out / "metadata.json")
        assert meta["size"] == SIZE and meta["num_classes"] == 3
        ids = set(meta["volumes"])
        splits = meta["splits"]
        assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(ids)
        assert len(splits["val"]) == len(splits["test"]) == 1 and len(splits["train"]) == 2
        folders = {p.name for p in out.iterdir() if p.is_dir()}
        assert folders == {"train", "val", "test"}
        if site == 0:
            assert meta["labeled_train"] is None and meta["layout"]["train"] == ["train"]
        else:
            assert {p.name for p in (out / "train").iterdir()} == {"labeled", "unlabeled"}
            assert len(meta["labeled_train"]) == 1 and meta["labeled_train"][0] in splits["train"]
        for vid, vol in meta["volumes"].items():
            assert vol["split"] in splits and vid in splits[vol["split"]]
            depth = vol["shape_before_padding"][0]
            first, stop = vol["z_split"]
            assert 0 <= first < stop <= vol["depth_before_split"] and stop - first == depth
            assert [slice_index(p) for p in vol["slices"]] == list(range(depth))
            expected = vol["split"] if vol["subset"] is None else f"train/{vol['subset']}"
            assert all(Path(p).parent.as_posix() == expected and (out / p).is_file() for p in vol["slices"])
            assert np.asarray(vol["affine"]).shape == (4, 4) and len(vol["crop"]) == 3
            assert vol["header"]["sform_code"] == 2 and vol["header"]["xyzt_units"][0] == "mm"
        groups = group_slices_by_volume(out, recursive=True)
        assert set(groups) == ids


def test_split_rules():
    ids = [f"v{i:02d}" for i in range(20)]
    labeled = ids[::2]
    a = split_volumes(ids, labeled, 0.15, 0.15, seed=0)
    assert a == split_volumes(list(reversed(ids)), labeled, 0.15, 0.15, seed=0)  # deterministic, order-free
    assert len(a["val"]) == len(a["test"]) == 3  # floor(20 * 0.15)
    assert set(a["val"]) | set(a["test"]) <= set(labeled)  # held-out volumes are labeled
    assert not set(a["val"]) & set(a["test"]) and not (set(a["val"]) | set(a["test"])) & set(a["train"])
    assert len(a["train"]) == 14
    others = [split_volumes(ids, labeled, 0.15, 0.15, seed=s)["val"] for s in range(1, 6)]
    assert any(o != a["val"] for o in others)
    picked = pick_labeled_train(a["train"], labeled, 2, seed=0)
    assert picked == pick_labeled_train(a["train"], labeled, 2, seed=0) and set(picked) <= set(labeled)
    with pytest.raises(InputError, match="only"):
        pick_labeled_train(a["train"], labeled, 50, seed=0)
    with pytest.raises(InputError, match="no training volume"):
        split_volumes(["a", "b"], [], 0.3, 0.3, seed=0)


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("options", [{}, {"flip_axis": 1, "percentiles": (1.0, 99.0)}])
def test_label_and_image_round_trip(phantom_dir, tmp_path, options):
    out = tmp_path / "prep"
    meta = preprocess(_site_config(phantom_dir, 0, out, **options), **QUIET)
    assert meta["target_spacing"] == [6.0, 6.0, 6.0]  # fits in 64 px: no resampling
    for vol in meta["volumes"].values():
        assert all(src == 0 for src, _, _ in vol["inplane_window"])  # padded, not centre-cropped
        label = restore_volume(_stack(out, vol, "mask"), vol, kind="label")
        original = np.asarray(nib.load(vol["label"]).dataobj)
        assert label.shape == original.shape and label.dtype == np.uint8
        for c in range(3):
            assert dc(label == c, original == c) >= 0.99
        image = restore_volume(_stack(out, vol, "data"), vol, kind="image")
        source = nib.load(vol["image"]).get_fdata()
        inside = _crop_mask(vol)
        assert np.corrcoef(image[inside], source[inside])[0, 1] > 0.98
        assert np.all(image[~inside] == -1)


def _crop_mask(vol: dict) -> np.ndarray:
    """Voxels inside the crop box, in the original orientation (the box is stored after the flip)."""
    inside = np.zeros(vol["shape"], bool)
    inside[tuple(slice(a, b) for a, b in vol["crop"])] = True
    return inside if vol["flip_axis"] is None else np.flip(inside, axis=vol["flip_axis"])


def test_round_trip_with_resampling_and_nifti_output(phantom_dir, tmp_path):
    out = tmp_path / "prep"
    meta = preprocess(_site_config(phantom_dir, 1, out, target_spacing=(4.0, 4.0, 4.0)), **QUIET)
    vol = meta["volumes"][meta["splits"]["test"][0]]
    assert vol["shape_after_resampling"] != vol["shape_after_crop"]
    label = restore_volume(_stack(out, vol, "mask"), vol, kind="label")
    written = write_nifti_like(label, vol, tmp_path / "pred" / f"{vol['id']}_pred.nii.gz")
    back = nib.load(str(written))
    original = nib.load(vol["label"])
    np.testing.assert_allclose(back.affine, original.affine)
    assert back.get_data_dtype() == np.uint8 and back.header["sform_code"] == original.header["sform_code"]
    restored = np.asarray(back.dataobj)
    for c in range(3):
        assert dc(restored == c, np.asarray(original.dataobj) == c) >= 0.97  # 6 mm -> 4 mm -> 6 mm
    image = restore_volume(_stack(out, vol, "data"), vol, kind="image")
    write_nifti_like(image, vol, tmp_path / "pred" / "trans.nii.gz")
    assert nib.load(str(tmp_path / "pred" / "trans.nii.gz")).get_data_dtype() == np.float32  # no quantisation


# --------------------------------------------------------------------------- docs/differences.md fixes


def test_crop_end_searched_from_the_end():
    profile = np.zeros(200)
    profile[20:60] = 1.0  # object near the start, long empty tail
    start, stop = axis_crop(profile)
    assert 15 <= start <= 21 and 59 <= stop <= 65  # the reference reused the start bin and kept the tail


def test_z_range_keeps_last_labeled_slice():
    labels = np.zeros((10, 4, 4), np.uint8)
    labels[3:7, 1, 1] = 1
    assert z_range(labels, 10, discard=True) == (3, 7)
    assert z_range(labels, 10, discard=False) == (0, 10)
    assert z_range(np.zeros_like(labels), 10, discard=True) == (0, 10)


def test_nii_names_weights_and_unlabeled(tmp_path):
    root = _box_dataset(tmp_path / "raw", n=4, ext=".nii", weights=True)
    (root / "labels" / "vol3.nii").unlink()  # one unlabeled volume
    out = tmp_path / "prep"
    meta = preprocess(PreprocessConfig(images=root / "images", labels=root / "labels", weights=root / "weights",
                                       out=out, size=32, val_frac=0.25, test_frac=0.25), **QUIET)
    assert sorted(meta["volumes"]) == ["vol0", "vol1", "vol2", "vol3"]  # ".nii" stripped (d9-22)
    assert meta["num_classes"] == 3  # inferred from the largest label
    assert "vol3" in meta["splits"]["train"]  # unlabeled volumes never go to val/test
    for path in sorted(out.rglob("*.npz")):
        s = load_slice(path)
        assert (s["mask"] is None) == (volume_id(path) == "vol3")
        vol = meta["volumes"][volume_id(path)]
        z = vol["z_split"][0] + slice_index(path)
        if z < 6:  # weight not all ones: stored, padded with 0
            assert s["weight"] is not None and s["weight"].dtype == np.bool_
            assert not s["weight"][0, 0, 0] and s["weight"].sum() == 20 * 20
        else:
            assert s["weight"] is None
    with pytest.raises(InputError, match="no 'mask'"):
        load_slice(next(out.rglob("vol3_slice000.npz")), require_mask=True)


# --------------------------------------------------------------------------- bad input


def test_bad_volumes(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .nii"):
        preprocess(PreprocessConfig(images=tmp_path / "empty", out=tmp_path / "o1"), **QUIET)

    four_d = _write_nifti(tmp_path / "4d" / "a.nii.gz", np.zeros((8, 8, 4, 2), np.float32))
    with pytest.raises(InputError, match="3-D") as err:
        preprocess(PreprocessConfig(images=four_d.parent, out=tmp_path / "o2", val_frac=0, test_frac=0), **QUIET)
    assert str(four_d) in str(err.value) and "\n" not in str(err.value)

    root = _box_dataset(tmp_path / "raw", n=3)
    _write_nifti(root / "labels" / "vol1.nii.gz", np.zeros((20, 24, 11), np.uint8))
    with pytest.raises(InputError, match="label shape") as err:
        preprocess(PreprocessConfig(images=root / "images", labels=root / "labels", out=tmp_path / "o3",
                                    val_frac=0, test_frac=0, size=32), **QUIET)
    assert "vol1.nii.gz" in str(err.value)
    assert not (tmp_path / "o3").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o3")]


def test_existing_output_and_cli(tmp_path):
    root = _box_dataset(tmp_path / "raw", n=3)
    out = tmp_path / "prep"
    args = ["--images", str(root / "images"), "--labels", str(root / "labels"), "--out", str(out),
            "--size", "32", "--val-frac", "0", "--test-frac", "0", "--quiet"]
    assert cli.main(args) == 0
    stamp = (out / "metadata.json").stat().st_mtime_ns
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "MultiMedSeg.preprocess", *args], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--overwrite" in lines[0] and str(out) in lines[0]
    assert (out / "metadata.json").stat().st_mtime_ns == stamp
    assert cli.main(args + ["--overwrite", "--size", "16"]) == 0
    assert load_slice(next(out.rglob("*.npz")))["data"].shape == (16, 16, 1)

    helptext = subprocess.run([sys.executable, "-m", "MultiMedSeg.preprocess", "--help"], capture_output=True,
                              text=True, env=env)
    assert helptext.returncode == 0
    for flag in ("--images", "--labels", "--label-rule", "--weights", "--path-rule", "--out", "--size",
                 "--val-frac", "--test-frac", "--seed", "--labeled-train", "--target-spacing", "--no-crop",
                 "--ignore-z", "--no-standardize", "--num-classes", "--discard-outside-labels", "--flip-axis",
                 "--overwrite", "--convert-legacy", "UNPICKLES"):
        assert flag in helptext.stdout


def test_label_rule_path_rule_and_ignore_z(tmp_path):
    root = _box_dataset(tmp_path / "raw", n=3)
    for p in (root / "labels").iterdir():
        p.rename(p.with_name(p.name.replace(".nii.gz", "_seg.nii.gz")))
    _write_nifti(root / "images" / "skip_me.nii.gz", np.zeros((20, 24, 12), np.float32))
    meta = preprocess(PreprocessConfig(
        images=root / "images", labels=root / "labels", label_rule="{id}_seg{ext}", path_rule="vol",
        out=tmp_path / "o", size=16, val_frac=0, test_frac=0, ignore_z=True, crop=False), **QUIET)
    assert sorted(meta["volumes"]) == ["vol0", "vol1", "vol2"]
    assert all(v["label"] and v["label"].endswith("_seg.nii.gz") for v in meta["volumes"].values())
    vol = meta["volumes"]["vol0"]
    assert vol["crop"] == [[0, 20], [0, 24], [0, 12]]
    assert vol["target_spacing"][2] == 2.0 and vol["depth_before_split"] == 12  # z not resampled
    assert vol["shape_after_resampling"][:2] == [16, 16]  # each axis capped by --size (20, 24 > 16)
    with pytest.raises(InputError, match="label-rule"):
        preprocess(PreprocessConfig(images=root / "images", out=tmp_path / "o2", label_rule="{path}"), **QUIET)


# --------------------------------------------------------------------------- matched to the original


def _original_crop_start(profile: np.ndarray) -> int:
    """The original cropVolume's start index, written out independently of axis_crop."""
    from skimage.filters import threshold_minimum

    c = np.cumsum(profile.astype(np.float64))
    counts, edges = np.histogram(c, 255)  # integer counts
    try:
        thr = threshold_minimum(counts)
    except RuntimeError:
        return 0  # the original keeps the full axis
    k = int(np.argmin(counts > thr))
    return int(np.argmin(c < edges[k]))


def _crop_profile(a: int = 80, n: int = 400, seed: int = 0) -> np.ndarray:
    """Noise (0..3), an object on [a, 300), noise again."""
    rng = np.random.default_rng(seed)
    prof = np.zeros(n)
    prof[a:300] = 100 + 30 * np.sin(np.arange(300 - a) / 7.0) + rng.normal(0, 5, 300 - a)
    prof[:a] = rng.uniform(0, 3, a)
    prof[300:] = rng.uniform(0, 3, n - 300)
    return prof


def test_crop_threshold_is_taken_on_the_integer_histogram():
    """threshold_minimum gets the integer bin counts (skimage: one bin per integer count), as the
    original; a float cast (256 bins) gives another threshold, here another crop start (53, not 80)."""
    from skimage.filters import threshold_minimum

    prof = _crop_profile()
    start, _ = axis_crop(prof)
    assert start == _original_crop_start(prof) == 80
    counts, edges = np.histogram(np.cumsum(prof), 255)
    k_float = int(np.argmin(counts > threshold_minimum(counts.astype(np.float64))))
    assert int(np.argmin(np.cumsum(prof) < edges[k_float])) == 53
    starts = []
    for a in (90, 100, 120, 140, 160, 170):
        prof = _crop_profile(a)
        starts.append(axis_crop(prof)[0])
        assert starts[-1] == _original_crop_start(prof), a
    assert len(set(starts)) > 3


def test_crop_profile_is_the_raw_maximum():
    """CT-like data (negative background): the profile is the raw max over the other axes, as the
    original, not the max of |x| (which here keeps the whole axis instead of cropping to the object)."""
    from MultiMedSeg.data.volumes_to_slices import heuristic_crop

    rng = np.random.default_rng(0)
    obj = 100 + 30 * np.sin(np.arange(220) / 7.0) + rng.normal(0, 5, 220)
    profile = np.concatenate([rng.uniform(-20, -17, 80), obj, rng.uniform(-20, -17, 100)])
    vol = np.broadcast_to(profile[:, None, None], (400, 3, 3)).copy()
    box = heuristic_crop(vol)
    assert box[0] == axis_crop(profile) == (92, 277)
    assert axis_crop(np.abs(profile)) == (0, 400)


def test_intensity_window_is_the_upper_bin_edge():
    from MultiMedSeg.data.volumes_to_slices import histogram_window

    vol = np.concatenate([np.zeros(10), np.full(980, 5.0), np.full(10, 10.0)])  # 1 % at 0, 1 % at 10
    edges = np.linspace(0, 10, 257)
    low, high = histogram_window([vol], 0.1, 99.9, 0.0, 10.0)
    # 0.1 % is reached in bin 0 -> its upper edge; 99.9 % only in the last bin -> 10
    assert low == pytest.approx(edges[1]) and high == pytest.approx(10.0)
    low, high = histogram_window([vol], 1.0, 50.0, 0.0, 10.0)
    assert low == pytest.approx(edges[1]) and high == pytest.approx(edges[np.searchsorted(edges, 5.0, "right")])


def test_brain_masks_discard_extracerebral_slices_of_every_volume(tmp_path):
    root = _brain_dataset(tmp_path / "raw")
    out = tmp_path / "prep"
    meta = preprocess(PreprocessConfig(images=root / "images", labels=root / "labels", brain_masks=root / "brain",
                                       out=out, size=32, val_frac=0.25, test_frac=0.25, target_spacing=(1, 1, 2),
                                       crop=False), **QUIET)
    assert meta["num_classes"] == 3  # [background, brain, label 1]
    for vid, vol in meta["volumes"].items():
        assert vol["z_split"] == [2, 10] and vol["z_split_by"] == "brain", vid  # last brain slice kept
        assert len(vol["slices"]) == 8 and vol["brain_mask"].endswith(f"{vid}.nii.gz")
    unlabeled = meta["volumes"]["vol3"]
    assert unlabeled["split"] == "train" and unlabeled["label"] is None  # z-split without a label file
    assert "mask" not in np.load(out / unlabeled["slices"][0])  # unlabeled: no mask
    labeled = next(v for v in meta["volumes"].values() if v["label"])
    masks = np.stack([load_slice(out / rel)["mask"] for rel in labeled["slices"]])
    classes = masks.argmax(-1)
    assert set(np.unique(classes)) == {0, 1, 2}
    assert np.all(masks.sum(-1) == 1)
    assert classes[2:5].max() == 2 and classes[0].max() == 1  # labels (class 2) on slices 4..6 of the volume
    # --keep-extracerebral-slices and --no-brain-class
    meta = preprocess(PreprocessConfig(images=root / "images", labels=root / "labels", brain_masks=root / "brain",
                                       out=tmp_path / "keep", size=32, val_frac=0.25, test_frac=0.25,
                                       target_spacing=(1, 1, 2), crop=False, discard_extracerebral=False,
                                       brain_class=False), **QUIET)
    assert meta["num_classes"] == 2
    assert all(v["z_split"] == [0, 12] and len(v["slices"]) == 12 for v in meta["volumes"].values())


def test_annotation_required_leaves_out_unlabeled_volumes(tmp_path):
    root = _brain_dataset(tmp_path / "raw", n=5, labeled=4)
    base = dict(images=root / "images", labels=root / "labels", size=32, val_frac=0.25, test_frac=0.25,
                target_spacing=(1, 1, 2), crop=False)
    every = preprocess(PreprocessConfig(out=tmp_path / "all", **base), **QUIET)
    assert len(every["volumes"]) == 5 and "vol4" in every["splits"]["train"]
    required = preprocess(PreprocessConfig(out=tmp_path / "req", annotation_required=True, **base), **QUIET)
    assert sorted(required["volumes"]) == ["vol0", "vol1", "vol2", "vol3"]
    assert len(required["splits"]["val"]) == len(required["splits"]["test"]) == 1  # floor(4 * 0.25)
    with pytest.raises(InputError, match="--annotation-required"):
        PreprocessConfig(images=root / "images", out=tmp_path / "x", annotation_required=True).check()


def test_brain_mask_cli_flags(tmp_path):
    root = _brain_dataset(tmp_path / "raw")
    args = cli.build_parser().parse_args(["--images", str(root / "images"), "--out", str(tmp_path / "o"),
                                          "--brain-masks", str(root / "brain"), "--annotation-required",
                                          "--labels", str(root / "labels"), "--keep-extracerebral-slices",
                                          "--no-brain-class"])
    cfg = cli.config_from_args(args)
    assert cfg.brain_masks == root / "brain" and cfg.annotation_required
    assert not cfg.discard_extracerebral and not cfg.brain_class
    defaults = cli.config_from_args(cli.build_parser().parse_args(["--images", "i", "--out", "o"]))
    assert defaults.discard_extracerebral and defaults.brain_class and not defaults.annotation_required


# --------------------------------------------------------------------------- orientation


def _reoriented_site(phantom_dir: Path, dest: Path, transform) -> Path:
    """Phantom site 0 with every image and label stored with permuted/reversed axes (affine updated)."""
    for kind in ("images", "labels"):
        for path in sorted((phantom_dir / "site0" / kind).glob("*.nii.gz")):
            (dest / kind).mkdir(parents=True, exist_ok=True)
            nib.save(nib.load(str(path)).as_reoriented(np.asarray(transform)), str(dest / kind / path.name))
    return dest


def test_reoriented_volumes_give_the_same_slices_and_restore_to_their_own_grid(phantom_dir, tmp_path):
    """Default RAS: a site stored in another axis order (sagittal-first, reversed axes) is sliced along
    the same anatomical axis (axial) -- identical slice files -- and restore_volume maps back onto each
    volume's stored grid.  With --orientation stored (the original's behaviour) the slices differ."""
    copy = _reoriented_site(phantom_dir, tmp_path / "copy", [[2, -1], [0, 1], [1, -1]])
    kw = dict(size=48, num_classes=3, val_frac=0.25, test_frac=0.25, target_spacing=(5.0, 5.0, 5.0))
    ref = preprocess(_site_config(phantom_dir, 0, tmp_path / "ref", **kw), **QUIET)
    args = ["--images", str(copy / "images"), "--labels", str(copy / "labels"), "--out", str(tmp_path / "rot"),
            "--size", "48", "--num-classes", "3", "--val-frac", "0.25", "--test-frac", "0.25",
            "--target-spacing", "5", "5", "5", "--discard-outside-labels", "--quiet"]
    assert cli.main(args) == 0
    rot = load_metadata(tmp_path / "rot")
    assert rot["orientation"] == ref["orientation"] == "RAS"
    for vid, vol in rot["volumes"].items():
        assert vol["orientation"]["stored_axcodes"] == "AIL" and vol["orientation"]["code"] == "RAS"
        assert vol["orientation"]["shape"] == ref["volumes"][vid]["shape"] != vol["shape"]
        assert vol["slices"] == ref["volumes"][vid]["slices"]
        for rel in vol["slices"]:
            a, b = load_slice(tmp_path / "ref" / rel), load_slice(tmp_path / "rot" / rel)
            assert np.array_equal(a["data"], b["data"]) and np.array_equal(a["mask"], b["mask"])
        label = restore_volume(_stack(tmp_path / "rot", vol, "mask"), vol, kind="label")
        stored = np.asarray(nib.load(vol["label"]).dataobj)
        assert label.shape == stored.shape
        for c in (1, 2):
            assert dc(label == c, stored == c) >= 0.95  # 6 mm -> 5 mm -> 6 mm
    # the original's behaviour: slices of the 3rd stored axis (sagittal here), another slice count
    assert cli.main(args[:5] + [str(tmp_path / "stored")] + args[6:] + ["--orientation", "stored"]) == 0
    stored_meta = load_metadata(tmp_path / "stored")
    vid = next(iter(stored_meta["volumes"]))
    assert stored_meta["volumes"][vid]["orientation"]["transform"] == [[0, 1], [1, 1], [2, 1]]
    assert len(stored_meta["volumes"][vid]["slices"]) != len(ref["volumes"][vid]["slices"])
    with pytest.raises(InputError, match="--orientation"):
        preprocess(_site_config(phantom_dir, 0, tmp_path / "bad", orientation="RAX"), **QUIET)
