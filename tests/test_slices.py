"""The slice file format (robustmedseg/data/slices.py, re-exported by MultiMedSeg.data): validation with its
exact one-line errors, reading and writing, names, grouping by volume, legacy ``.npy`` conversion."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from builders import input_error_message as message, one_hot_slice as good
from robustmedseg.data.slices import (convert_legacy_folder, group_slices_by_volume, list_slices, load_slice,
                                      save_slice, slice_index, validate_slice, volume_id)
from robustmedseg.errors import InputError


# ------------------------------------------------------------------------------------------- format and errors
def test_validate_slice_messages():
    data, mask = good()
    p = "s.npz"
    assert message(validate_slice, {"data": data, "extra": data}, p) == "s.npz: unexpected keys ['extra'] in slice file"
    assert message(validate_slice, {"mask": mask}, p) == "s.npz: slice file has no 'data' array"
    assert message(validate_slice, {"data": data[..., 0]}, p) == "s.npz: 'data' must be float32 (H, W, 1), got float32 (4, 4)"
    assert message(validate_slice, {"data": data.astype(np.float64)}, p).endswith("got float64 (4, 4, 1)")
    assert message(validate_slice, {"data": data}, p, require_mask=True) == \
        "s.npz: slice file has no 'mask' array (unlabeled volume?)"
    assert message(validate_slice, {"data": data, "mask": mask[..., :1]}, p) == \
        "s.npz: 'mask' must be bool (H, W, C>=2) matching 'data' (4, 4, 1), got bool (4, 4, 1)"
    assert "got uint8 (4, 4, 3)" in message(validate_slice, {"data": data, "mask": mask.astype(np.uint8)}, p)
    assert "got bool (4, 5, 3)" in message(validate_slice, {"data": data, "mask": np.ones((4, 5, 3), bool)}, p)
    two = mask.copy()
    two[0, 0, 1] = True
    assert message(validate_slice, {"data": data, "mask": two}, p) == \
        "s.npz: 'mask' is not one-hot (each pixel needs exactly one True channel)"
    assert message(validate_slice, {"data": data, "weight": np.ones((4, 4), bool)}, p) == \
        "s.npz: 'weight' must be bool (H, W, 1), got bool (4, 4)"
    assert "got float32 (4, 4, 1)" in message(validate_slice, {"data": data, "weight": data}, p)
    validate_slice({"data": data, "mask": mask, "weight": np.ones((4, 4, 1), bool)}, p, require_mask=True)


def test_slice_files_round_trip_and_errors(tmp_path):
    data, mask = good()
    weight = np.ones((4, 4, 1), bool)
    weight[0, 0, 0] = False
    path = save_slice(tmp_path / "v_slice003.npz", data, mask, weight)
    got = load_slice(path)
    np.testing.assert_array_equal(got["data"], data)
    np.testing.assert_array_equal(got["mask"], mask)
    np.testing.assert_array_equal(got["weight"], weight)
    assert load_slice(save_slice(tmp_path / "v_slice004.npz", data))["weight"] is None
    assert message(load_slice, tmp_path / "v_slice009.npz") == f"{tmp_path / 'v_slice009.npz'}: slice file does not exist"
    (tmp_path / "bad_slice001.npz").write_bytes(b"junk")
    assert "cannot read slice file (corrupt, truncated or not an .npz archive)" in \
        message(load_slice, tmp_path / "bad_slice001.npz")
    assert message(list_slices, tmp_path / "nope") == f"{tmp_path / 'nope'}: slice folder does not exist"


def test_bad_slice_files(tmp_path):
    good = save_slice(tmp_path / "v_slice000.npz", np.zeros((8, 8, 1), np.float32),
                      np.eye(2, dtype=bool)[np.zeros((8, 8), int)])
    assert load_slice(good)["mask"].shape == (8, 8, 2)

    truncated = tmp_path / "v_slice001.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputError, match="v_slice001.npz"):
        load_slice(truncated)
    garbage = tmp_path / "v_slice002.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(InputError, match="cannot read"):
        load_slice(garbage)

    def raw(name, **arrays):
        with open(tmp_path / name, "wb") as f:
            np.savez(f, **arrays)
        return tmp_path / name

    not_one_hot = np.zeros((8, 8, 2), bool)
    with pytest.raises(InputError, match="one-hot"):
        load_slice(raw("v_slice003.npz", data=np.zeros((8, 8, 1), np.float32), mask=not_one_hot))
    with pytest.raises(InputError, match="float32"):
        load_slice(raw("v_slice004.npz", data=np.zeros((8, 8, 1), np.float64)))
    with pytest.raises(InputError, match="'mask' must be bool"):
        load_slice(raw("v_slice005.npz", data=np.zeros((8, 8, 1), np.float32), mask=np.zeros((8, 8, 2), np.uint8)))
    with pytest.raises(InputError, match="no 'data'"):
        load_slice(raw("v_slice006.npz", mask=not_one_hot))
    pickled = tmp_path / "v_slice007.npz"
    with zipfile.ZipFile(pickled, "w") as zf:  # an object array needs pickle: refused
        with zf.open("data.npy", "w") as f:
            np.lib.format.write_array(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="cannot read"):
        load_slice(pickled)


# ------------------------------------------------------------------------------------------- names and grouping
def test_grouping_by_volume_and_duplicate_indices(tmp_path):
    data, _ = good()
    for rel in ("a/v_slice002.npz", "a/v_slice010.npz", "a/w_slice001.npz", "b/v_slice1.npz", "b/v_slice010.npz"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        save_slice(tmp_path / rel, data)
    groups = group_slices_by_volume(tmp_path / "a")
    assert list(groups) == ["v", "w"] and [p.name for p in groups["v"]] == ["v_slice002.npz", "v_slice010.npz"]
    assert [p.name for p in list_slices(tmp_path, recursive=True)] == \
        ["v_slice1.npz", "v_slice002.npz", "v_slice010.npz", "v_slice010.npz", "w_slice001.npz"]
    assert message(group_slices_by_volume, tmp_path, recursive=True) == \
        f"{tmp_path}: volume 'v' has several slice files with the same index"


def test_slice_names():
    assert volume_id("a/b/sub_slice3_slice012.npz") == "sub_slice3" and slice_index("x_slice012.npz") == 12
    assert slice_index("x_slice1234.npz") == 1234
    with pytest.raises(InputError):
        volume_id("x_slice.npz")


def test_group_non_contiguous(tmp_path):
    for vid, idx in [("b", 7), ("a", 10), ("a", 2), ("b", 0)]:
        save_slice(tmp_path / f"{vid}_slice{idx:03d}.npz", np.zeros((4, 4), np.float32))
    groups = group_slices_by_volume(tmp_path)
    assert list(groups) == ["a", "b"]
    assert [slice_index(p) for p in groups["a"]] == [2, 10]


# ------------------------------------------------------------------------------------------- legacy slices
def test_legacy_slices_convert_exactly(tmp_path):
    from robustmedseg.data.slices import convert_legacy_folder, convert_legacy_slice

    src = tmp_path / "legacy"
    (src / "sub").mkdir(parents=True)
    labels = np.zeros((4, 5), np.int64)
    labels[1:3, 1:4] = 2
    mask = (labels[..., None] == np.arange(3)).astype(np.uint8)
    weight = np.ones((4, 5, 1))
    weight[0, 0, 0] = 0
    data = np.linspace(-1, 1, 20).reshape(4, 5)
    np.save(src / "v_slice7.npy", {"data": data, "mask": mask, "weight": weight}, allow_pickle=True)
    np.save(src / "sub" / "w_slice012.npy", {"data": data[..., None], "mask": None, "weight": np.ones((4, 5, 1))},
            allow_pickle=True)
    out = convert_legacy_slice(src / "v_slice7.npy", tmp_path / "one")
    assert out == tmp_path / "one" / "v_slice007.npz"
    got = load_slice(out)
    assert got["data"].dtype == np.float32 and got["data"].shape == (4, 5, 1)
    np.testing.assert_allclose(got["data"][..., 0], data.astype(np.float32))
    np.testing.assert_array_equal(got["mask"], mask.astype(bool))
    np.testing.assert_array_equal(got["weight"], weight.astype(bool))
    assert convert_legacy_folder(src, tmp_path / "all") == 2
    nested = load_slice(tmp_path / "all" / "sub" / "w_slice012.npz")
    assert nested["mask"] is None and nested["weight"] is None  # an all-ones weight is not stored
    assert message(convert_legacy_folder, src, tmp_path / "all") == \
        f"{tmp_path / 'all'}: output already exists (pass --overwrite to replace it)"
    assert convert_legacy_folder(src, tmp_path / "all", overwrite=True) == 2
    assert message(convert_legacy_folder, tmp_path / "one", tmp_path / "x") == \
        f"{tmp_path / 'one'}: no legacy <volume>_slice<NNN>.npy files found"
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "a_slice1.npy", {"mask": mask}, allow_pickle=True)
    np.save(bad / "b_slice1.npy", np.zeros(3), allow_pickle=True)
    (bad / "c_slice1.npy").write_bytes(b"junk")
    np.save(bad / "notaslice.npy", np.zeros(3))
    assert message(convert_legacy_slice, bad / "a_slice1.npy", tmp_path) == \
        f"{bad / 'a_slice1.npy'}: legacy slice is not a dict with a 'data' key"
    assert message(convert_legacy_slice, bad / "b_slice1.npy", tmp_path).startswith(
        f"{bad / 'b_slice1.npy'}: cannot read legacy slice: ")
    assert message(convert_legacy_slice, bad / "c_slice1.npy", tmp_path).startswith(
        f"{bad / 'c_slice1.npy'}: cannot read legacy slice: ")
    assert message(convert_legacy_slice, bad / "notaslice.npy", tmp_path) == \
        f"{bad / 'notaslice.npy'}: not a legacy slice file name (expected <volume>_slice<NNN>.npy)"


def test_legacy_conversion(tmp_path):
    src = tmp_path / "legacy"
    src.mkdir()
    mask = np.zeros((8, 8, 2), bool)
    mask[..., 0] = True
    np.save(src / "vol_slice004.npy", {"data": np.zeros((8, 8, 1), np.float32), "mask": mask, "weight": None},
            allow_pickle=True)
    assert convert_legacy_folder(src, tmp_path / "new") == 1
    converted = load_slice(tmp_path / "new" / "vol_slice004.npz")
    assert converted["weight"] is None and converted["mask"].shape == (8, 8, 2)
    with pytest.raises(InputError, match="already exists"):
        convert_legacy_folder(src, tmp_path / "new")
