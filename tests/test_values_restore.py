"""Preprocessing -> restore round trips with exact expectations.

Where the geometry loses nothing (no resampling: every volume already has the target spacing; slices
padded, not centre-cropped) the labels restored from the slice files must equal the original label
map voxel for voxel (Dice 1.0 for every class), whatever the crop box, the flipped axis and the kept
z range -- which here never starts at slice 0, so an offset lost on the way back cannot hide. The
image comes back as an affine function of the original intensities inside the kept region, -1 outside.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from builders import Geometry, check_exact, round_trip, write_volumes
from MultiMedSeg.data.restore import load_metadata, restore_volume, write_nifti_like


def test_round_trip_is_exact_when_the_kept_slices_do_not_start_at_zero(tmp_path):
    geos = [Geometry((14, 11, 16), (0.8, 0.8, 2.0), ((3, 10), (2, 9), (5, 12))),
            Geometry((12, 13, 12), (0.8, 0.8, 2.0), ((4, 8), (5, 11), (7, 11)))]
    records = round_trip(write_volumes(tmp_path / "src", geos), tmp_path / "prep", size=16, crop=False,
                         flip_axis=None)
    assert [r["vol"]["z_split"] for r in records] == [[5, 12], [7, 11]]  # never from 0
    check_exact(records)


@pytest.mark.parametrize("flip_axis", [None, 0, 2])
def test_round_trip_is_exact_with_the_heuristic_crop_and_a_flip(tmp_path, flip_axis):
    geos = [Geometry((18, 15, 14), (1.0, 1.0, 1.5), ((4, 13), (3, 12), (4, 10))),
            Geometry((16, 17, 14), (1.0, 1.0, 1.5), ((5, 12), (6, 14), (6, 11)))]
    records = round_trip(write_volumes(tmp_path / "src", geos), tmp_path / "prep", size=24, crop=True,
                         flip_axis=flip_axis)
    assert any(r["vol"]["crop"][2][0] + r["vol"]["z_split"][0] > 0 for r in records)
    check_exact(records)


def test_centre_cropped_slices_restore_exactly_inside_the_window(tmp_path):
    """Slices smaller than the volume (a target spacing given, so no downsampling to fit): the centre
    window comes back exactly, the cut border as background."""
    geos = [Geometry((20, 18, 10), (1.0, 1.0, 1.0), ((6, 14), (5, 13), (3, 8))),
            Geometry((20, 18, 10), (1.0, 1.0, 1.0), ((7, 13), (6, 12), (2, 7)))]
    records = round_trip(write_volumes(tmp_path / "src", geos), tmp_path / "prep", size=12, crop=False,
                         flip_axis=None, target_spacing=(1.0, 1.0, 1.0))
    for r in records:
        vol = r["vol"]
        (rs, _, rn), (cs, _, cn) = vol["inplane_window"]
        assert rn == cn == 12 and (rs, cs) == (4, 3)
        window = np.zeros(vol["shape"], bool)
        window[rs:rs + rn, cs:cs + cn, :] = True
        np.testing.assert_array_equal(r["label"][window], r["original_label"][window])
        assert not r["label"][~window].any()


def test_written_nifti_keeps_the_restored_labels_and_the_grid(tmp_path):
    geos = [Geometry((10, 9, 12), (0.7, 0.9, 2.5), ((2, 8), (3, 7), (4, 9))),
            Geometry((10, 9, 12), (0.7, 0.9, 2.5), ((3, 7), (2, 8), (6, 10)))]
    records = round_trip(write_volumes(tmp_path / "src", geos), tmp_path / "prep", size=12, crop=False,
                         flip_axis=1)
    for r in records:
        path = write_nifti_like(r["label"], r["vol"], tmp_path / "pred" / f"{r['vol']['id']}.nii.gz")
        back = nib.load(str(path))
        original = nib.load(r["vol"]["label"])
        np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(original.dataobj))
        np.testing.assert_allclose(back.affine, original.affine)
        assert back.header.get_zooms()[:3] == pytest.approx(original.header.get_zooms()[:3])


# ------------------------------------------------------------------------------------ file formats
def _meta_entry(shape=(4, 5, 6), qform_code=1, sform_code=4, units=("mm", "sec")) -> dict:
    affine = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -5.0], [0.0, 0.0, 3.0, 2.5], [0, 0, 0, 1]])
    qform = affine.copy()
    qform[:3, 3] += 1.0  # the affine is the sform (nibabel's choice when sform_code > 0); the qform differs
    return {"id": "v", "shape": list(shape), "affine": affine.tolist(),
            "header": {"qform": qform.tolist(), "qform_code": qform_code, "sform": affine.tolist(),
                       "sform_code": sform_code, "zooms": [2.0, 1.5, 3.0], "xyzt_units": list(units)}}


@pytest.mark.parametrize("array,dtype", [
    (np.zeros((2, 2), bool), np.uint8),
    (np.full((2, 2), 0.5, np.float64), np.float32),
    (np.full((2, 2), 0.5, np.float32), np.float32),
    (np.full((2, 2), 3, np.float32), np.float32),
    (np.full((2, 2), 255, np.int64), np.uint8),
    (np.full((2, 2), 256, np.int64), np.int16),
    (np.array([[-1, 3]]), np.int16),
    (np.array([[-(2 ** 15) + 1, 2 ** 15 - 1]]), np.int16),
    (np.array([[0, 2 ** 15]]), np.int32),
    (np.array([[-(2 ** 15), 0]]), np.int32),
    (np.zeros((0,), np.int64), np.int16),
])
def test_output_dtype_is_the_smallest_that_holds_the_values(array, dtype):
    from MultiMedSeg.data.restore import _output_dtype

    assert _output_dtype(array) == np.dtype(dtype)


@pytest.mark.parametrize("name", ["pred.nii.gz", "pred.nii"])
def test_write_nifti_like_keeps_the_header_of_the_original(tmp_path, name):
    entry = _meta_entry()
    labels = np.arange(4 * 5 * 6).reshape(4, 5, 6) % 3
    path = write_nifti_like(labels, entry, tmp_path / "out" / name)
    assert path == tmp_path / "out" / name and path.is_file()
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels)
    assert img.get_data_dtype() == np.uint8
    qform, qcode = img.get_qform(coded=True)
    sform, scode = img.get_sform(coded=True)
    np.testing.assert_allclose(qform, entry["header"]["qform"], atol=1e-6)
    np.testing.assert_allclose(sform, entry["header"]["sform"], atol=1e-6)
    assert (int(qcode), int(scode)) == (1, 4)
    np.testing.assert_allclose(img.header.get_zooms(), (2.0, 1.5, 3.0))
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")  # gzip only for .nii.gz
    floats = write_nifti_like(labels.astype(np.float64) / 3, entry, tmp_path / "f.nii.gz")
    assert nib.load(str(floats)).get_data_dtype() == np.float32
    bare = write_nifti_like(labels, entry, tmp_path / "noext")  # no extension: written as .nii.gz
    assert bare.read_bytes()[:2] == b"\x1f\x8b"
    with pytest.raises(ValueError, match=r"\(4, 5, 5\).*\(4, 5, 6\)"):
        write_nifti_like(labels[:, :, :5], entry, tmp_path / "bad.nii.gz")


def test_write_nifti_like_without_q_or_s_form_uses_the_affine_uncoded(tmp_path):
    entry = _meta_entry(units=("unknown", "unknown"))
    entry["header"].update(qform=None, sform=None, zooms=None)
    del entry["header"]["xyzt_units"]
    path = write_nifti_like(np.ones((4, 5, 6), np.uint8), entry, tmp_path / "p.nii.gz")
    img = nib.load(str(path))
    assert int(img.header["qform_code"]) == 0 and int(img.header["sform_code"]) == 0
    np.testing.assert_allclose(img.get_qform(), entry["affine"], atol=1e-6)  # stored, marked unknown
    np.testing.assert_allclose(img.get_sform(), entry["affine"], atol=1e-6)
    assert img.header.get_xyzt_units() == ("unknown", "unknown")


def test_load_metadata_and_volume_meta_errors(tmp_path):
    from MultiMedSeg.data.preprocessing import METADATA_FORMAT, METADATA_VERSION
    from MultiMedSeg.data.restore import VOLUME_KEYS, volume_meta
    from robustmedseg.errors import InputError

    good = {"format": METADATA_FORMAT, "version": METADATA_VERSION,
            "volumes": {"a": {k: 0 for k in VOLUME_KEYS}}}
    folder = tmp_path / "site"
    folder.mkdir()
    path = folder / "metadata.json"
    path.write_text(json.dumps(good))
    assert load_metadata(folder) == good == load_metadata(path)  # a folder or the file itself
    assert volume_meta(good, "a") is good["volumes"]["a"]
    with pytest.raises(InputError, match=r"^src\.json: volume 'b' is not in the metadata$"):
        volume_meta(good, "b", "src.json")
    no_volumes = {k: v for k, v in good.items() if k != "volumes"}
    path.write_text(json.dumps(no_volumes))
    assert load_metadata(folder) == no_volumes
    cases = [
        (None, "metadata file does not exist"),
        ("{not json", "cannot read metadata JSON"),
        (json.dumps([1, 2]), f"not a {METADATA_FORMAT} metadata file"),
        (json.dumps({**good, "format": "other"}), f"not a {METADATA_FORMAT} metadata file"),
        (json.dumps({**good, "version": 99}), rf"unsupported metadata version 99 \(expected {METADATA_VERSION}\)"),
        (json.dumps({**good, "volumes": {"a": {"id": "a"}}}), r"volume 'a' lacks metadata keys \['shape'"),
    ]
    for text, message in cases:
        target = tmp_path / "case.json"
        target.unlink(missing_ok=True)
        if text is not None:
            target.write_text(text)
        with pytest.raises(InputError, match=rf"^{target}: {message}"):
            load_metadata(target)


def test_restore_volume_rejects_bad_input():
    from robustmedseg.errors import InputError

    vol = {"id": "v", "shape_before_padding": [3, 4, 4]}
    with pytest.raises(ValueError, match=r"^kind must be 'label'.*'image'.*, got 'mask'$"):
        restore_volume(np.zeros((3, 4, 4), np.uint8), vol, kind="mask")
    with pytest.raises(InputError, match=r"volume 'v': expected \(3, H, W\) slices, got \(2, 4, 4\)"):
        restore_volume(np.zeros((2, 4, 4), np.uint8), vol)
    with pytest.raises(InputError, match="expected"):
        restore_volume(np.zeros((3, 4), np.uint8), vol)
    with pytest.raises(ValueError, match="label slices must be integers, got float32"):
        restore_volume(np.zeros((3, 4, 4), np.float32), vol)


def test_restore_keeps_large_labels_and_fills_images_with_minus_one():
    vol = {"id": "v", "shape": [3, 3, 4], "shape_before_padding": [2, 3, 3], "inplane_window": [[0, 0, 3], [0, 0, 3]],
           "z_split": [1, 3], "depth_before_split": 4, "shape_after_crop": [3, 3, 4], "crop": [[0, 3], [0, 3], [0, 4]],
           "flip_axis": None}
    labels = np.full((2, 3, 3), 300, np.int64)
    out = restore_volume(labels, vol)
    assert out.dtype == np.int16 and np.all(out[:, :, 1:3] == 300) and not out[:, :, [0, 3]].any()
    small = restore_volume(labels.astype(bool), vol)
    assert small.dtype == np.uint8 and small.max() == 1
    image = restore_volume(np.zeros((2, 3, 3), np.float64), vol, kind="image")
    assert image.dtype == np.float32 and np.all(image[:, :, [0, 3]] == -1.0) and np.all(image[:, :, 1:3] == 0)


def test_restore_pastes_at_the_crop_box_and_resamples_images_with_the_spline():
    from MultiMedSeg.data.resample import resize_image

    vol = {"id": "v", "shape": [6, 5, 7], "crop": [[1, 5], [1, 4], [2, 6]], "shape_after_crop": [4, 3, 4],
           "depth_before_split": 2, "z_split": [0, 2], "shape_before_padding": [2, 2, 3],
           "inplane_window": [[0, 0, 2], [0, 0, 3]], "flip_axis": None}
    labels = np.ones((2, 2, 3), np.int64)
    labels[:, 0, 0] = 256  # beyond uint8
    out = restore_volume(labels, vol)
    assert out.dtype == np.int16 and out.max() == 256
    inside = np.zeros(vol["shape"], bool)
    inside[1:5, 1:4, 2:6] = True
    assert np.all(out[inside] > 0) and not out[~inside].any()
    ramp = np.linspace(-0.9, 0.9, 12, dtype=np.float32).reshape(2, 2, 3)
    image = restore_volume(ramp, vol, kind="image")
    want = resize_image(np.ascontiguousarray(np.transpose(ramp, (1, 2, 0))), (4, 3, 4))
    np.testing.assert_allclose(image[1:5, 1:4, 2:6], want, atol=1e-6)
    assert np.all(image[~inside] == -1.0) and len(np.unique(image[inside])) > 12  # interpolated, not labels
