"""Segmenting new scans (MultiMedSeg/predict.py): the run's preprocessing plan, equivalence with
inference.py, orientation invariance, formats (NIfTI, NRRD, MetaImage, DICOM) with their geometry,
and bad input.

The ``runs`` fixture (conftest.py) trains tiny runs (4 steps each, ~10 s) on the conftest phantom preprocessed
*without* label-dependent steps (no ``--discard-outside-labels``), so that a raw test volume
preprocessed by the plan must give exactly the slices ``MultiMedSeg.preprocess`` wrote for it.
"""
from __future__ import annotations

import json
import locale
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from medpy.metric.binary import dc

from MultiMedSeg import plan as plan_cli
from MultiMedSeg import predict as predict_cli
from MultiMedSeg.data import load_slice
from MultiMedSeg.data.formats import ItkGeometry, nifti_to_itk
from MultiMedSeg.data.preprocessing_plan import PLAN_NAME, PreprocessingPlan, load_plan, plan_from_metadata, prepare_scan
from MultiMedSeg.data.restore import load_metadata
from builders import exit_message
from robustmedseg.errors import run_cli
from builders import copy_run as _copy_run, read_labels as _labels, run_predict as _predict, run_test_ids as _test_ids
from builders import write_nifti as _nifti

REPO = Path(__file__).resolve().parents[1]
REORIENT = np.array([[2, -1], [0, 1], [1, -1]])  # stored axis i -> axis REORIENT[i, 0], reversed if -1


def resample_from_to(src: nib.Nifti1Image, ref: nib.Nifti1Image, order: int = 0) -> nib.Nifti1Image:
    """Nearest-neighbour resampling of ``src`` onto the grid of ``ref`` through world coordinates
    (``nibabel.processing.resample_from_to`` drops boundary voxels whose coordinate lands a rounding
    error outside the volume); voxels outside ``src`` are 0."""
    assert order == 0
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in ref.shape[:3]], indexing="ij"), -1).reshape(-1, 3)
    world = grid @ ref.affine[:3, :3].T + ref.affine[:3, 3]
    vox = np.rint((world - src.affine[:3, 3]) @ np.linalg.inv(src.affine[:3, :3]).T).astype(int)
    inside = np.all((vox >= 0) & (vox < np.asarray(src.shape[:3])), axis=1)
    data = np.asarray(src.dataobj)
    out = np.zeros(len(grid), dtype=data.dtype)
    out[inside] = data[tuple(vox[inside].T)]
    return nib.Nifti1Image(out.reshape(ref.shape[:3]), ref.affine)


def _reoriented_copy(src: Path, dest: Path) -> nib.Nifti1Image:
    """The same scan with permuted and reversed axes, the affine updated (same world positions)."""
    img = nib.load(str(src)).as_reoriented(REORIENT)
    dest.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(dest))
    return img


# --------------------------------------------------------------------------------- plan


def test_training_writes_the_plan_and_it_round_trips(runs):
    for name, site, role in (("pretrain", 0, "source"), ("adapt", 2, "target")):
        folder = runs[name] / "checkpoints"
        raw = json.loads((folder / PLAN_NAME).read_text())
        plan = load_plan(folder)
        assert plan.to_dict() == raw and PreprocessingPlan.from_dict(plan.to_dict()) == plan
        meta = load_metadata(runs["prep"][site])
        expected = plan_from_metadata(meta, runs["prep"][site] / "metadata.json", site, role)
        assert plan == expected
        assert plan.domain == {"label": site, "role": role} and plan.num_classes == 3 and plan.size == 32
        assert plan.orientation == "RAS" and plan.window == (meta["intensity"]["min"], meta["intensity"]["max"])
        assert plan.target_spacing == meta["target_spacing"] and not plan.training_only["discard_outside_labels"]


def test_plan_reproduces_the_preprocessed_slices_of_every_volume(runs):
    """prepare_scan(raw NIfTI, plan) == what MultiMedSeg.preprocess wrote: geometry and slice data."""
    prep = runs["prep"][2]
    meta = load_metadata(prep)
    plan = load_plan(runs["adapt"] / "checkpoints")
    geometry_keys = ("shape", "spacing", "affine", "orientation", "crop", "shape_after_crop", "target_spacing",
                     "shape_after_resampling", "depth_before_split", "z_split", "shape_before_padding",
                     "inplane_window", "mean", "std")
    for vid, vol in meta["volumes"].items():
        entry, slices = prepare_scan(nib.load(vol["image"]), vol["image"], vid, plan)
        for key in geometry_keys:
            assert entry[key] == vol[key], (vid, key)
        written = np.stack([load_slice(prep / rel)["data"][..., 0] for rel in vol["slices"]])
        assert slices.dtype == np.float32 and np.array_equal(slices, written), vid


def test_plan_command_writes_the_plan_of_an_old_run(runs, tmp_path, capsys):
    run = _copy_run(runs, "adapt", tmp_path / "old_run")
    (run / "checkpoints" / PLAN_NAME).unlink()
    err = exit_message(capsys, predict_cli.main, ["-i", str(runs["images"][2]), "-o", str(tmp_path / "out"),
                                                  "--checkpoint_dir", str(run), "--device", "cpu"])
    assert "no preprocessing plan" in err and "python -m MultiMedSeg.plan" in err and str(run) in err
    assert not (tmp_path / "out").exists()
    # the wrong site: the source's metadata for an adapted run
    err = exit_message(capsys, plan_cli.main, ["--checkpoint_dir", str(run), "--metadata", str(runs["prep"][0])])
    assert "trained on the site of" in err and str(runs["prep"][2]) in err and "--force" in err
    plan_cli.main(["--checkpoint_dir", str(run), "--metadata", str(runs["prep"][2] / "metadata.json")])
    assert load_plan(run / "checkpoints") == load_plan(runs["adapt"] / "checkpoints")
    err = exit_message(capsys, plan_cli.main, ["--checkpoint_dir", str(run)])
    assert "--overwrite" in err
    plan_cli.main(["--checkpoint_dir", str(run), "--overwrite"])  # the site named by the run's options
    assert load_plan(run / "checkpoints") == load_plan(runs["adapt"] / "checkpoints")
    capsys.readouterr()
    plan_cli.main(["--checkpoint_dir", str(run), "--show"])
    assert json.loads(capsys.readouterr().out)["domain"] == {"label": 2, "role": "target"}


def test_plan_for_the_wrong_domain_is_refused(runs, tmp_path, capsys):
    run = _copy_run(runs, "adapt", tmp_path / "run")
    shutil.copyfile(runs["pretrain"] / "checkpoints" / PLAN_NAME, run / "checkpoints" / PLAN_NAME)
    err = exit_message(capsys, predict_cli.main, ["-i", str(runs["images"][2]), "-o", str(tmp_path / "out"),
                                                  "--checkpoint_dir", str(run), "--device", "cpu"])
    assert "source domain 0" in err and "target domain 2" in err


# --------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("run, site, branch", [("adapt", 2, "pred"), ("pretrain", 0, "intra")])
def test_predict_equals_inference_on_the_test_volumes(runs, tmp_path, run, site, branch):
    ids = _test_ids(runs, site)
    out = tmp_path / "pred"
    summary = _predict(runs, [runs["images"][site] / f"{v}.nii.gz" for v in ids], out, run=run)
    assert summary["branch"] == branch and [s["id"] for s in summary["scans"]] == ids
    for vid, scan in zip(ids, summary["scans"]):
        ours = nib.load(str(out / f"{vid}.nii.gz"))
        theirs = nib.load(str(runs["inference"][run] / f"{vid}_{branch}.nii.gz"))
        a, b = np.asarray(ours.dataobj), np.asarray(theirs.dataobj)
        # the field-of-view rule only sets voxels to background, exactly as many as predict.json says
        # (exact equality without the rule: tests/test_predict_fov.py)
        assert np.array_equal(a, np.where(a > 0, b, 0)), vid
        assert int(((b > 0) & (a == 0)).sum()) == scan["field_of_view"]["removed_voxels"], vid
        assert np.array_equal(ours.affine, theirs.affine) and ours.header["sform_code"] == theirs.header["sform_code"]
        assert len(np.unique(np.asarray(ours.dataobj))) >= 2  # a real segmentation, not a constant


def test_probabilities_are_on_the_scan_grid_and_sum_to_one(runs, tmp_path):
    vid = _test_ids(runs, 2)[0]
    out = tmp_path / "pred"
    _predict(runs, [runs["images"][2] / f"{vid}.nii.gz"], out, "--save_probabilities")
    labels = _labels(out / f"{vid}.nii.gz")
    probs = nib.load(str(out / f"{vid}_probabilities.nii.gz"))
    p = np.asarray(probs.dataobj)
    assert p.shape == labels.shape + (3,) and probs.get_data_dtype() == np.float32
    assert np.allclose(probs.affine, nib.load(str(runs["images"][2] / f"{vid}.nii.gz")).affine)
    assert p.min() >= 0 and p.max() <= 1 and np.allclose(p.sum(-1), 1.0, atol=1e-4)
    assert np.mean(p.argmax(-1) == labels) > 0.95  # linear vs label resampling differ only at a few boundaries


# --------------------------------------------------------------------------------- orientation


def test_a_reoriented_copy_gets_the_same_segmentation_in_world_space(runs, tmp_path):
    vid = _test_ids(runs, 2)[0]
    original = runs["images"][2] / f"{vid}.nii.gz"
    copy = _reoriented_copy(original, tmp_path / "in" / f"{vid}_copy.nii.gz")
    assert nib.aff2axcodes(copy.affine) != nib.aff2axcodes(nib.load(str(original)).affine)
    out = tmp_path / "pred"
    _predict(runs, [original, tmp_path / "in"], out)
    a = nib.load(str(out / f"{vid}.nii.gz"))
    b = nib.load(str(out / f"{vid}_copy.nii.gz"))
    assert b.shape == copy.shape and np.array_equal(b.affine, copy.affine)  # the copy's own grid
    b_on_a = np.asarray(resample_from_to(b, a, order=0).dataobj)
    la = np.asarray(a.dataobj)
    present = [c for c in (1, 2) if (la == c).any()]
    assert present
    for c in present:
        assert dc(b_on_a == c, la == c) >= 0.99, c

    # control: with the array order as stored (the original's behaviour) the copy is sliced along
    # another anatomical axis and gets another segmentation
    stored = _copy_run(runs, "adapt", tmp_path / "stored_run")
    plan = json.loads((stored / "checkpoints" / PLAN_NAME).read_text())
    plan["orientation"] = "stored"
    (stored / "checkpoints" / PLAN_NAME).write_text(json.dumps(plan))
    out2 = tmp_path / "pred_stored"
    predict_cli.main(["-i", str(original), str(tmp_path / "in"), "-o", str(out2), "--checkpoint_dir", str(stored),
                      "--device", "cpu", "--quiet"])
    a2 = nib.load(str(out2 / f"{vid}.nii.gz"))
    b2_on_a2 = np.asarray(resample_from_to(nib.load(str(out2 / f"{vid}_copy.nii.gz")), a2, order=0).dataobj)
    assert np.array_equal(np.asarray(a2.dataobj), la)  # the phantom is stored RAS: same as before
    assert not np.array_equal(b2_on_a2, la)


# --------------------------------------------------------------------------------- formats


def _itk_copy(original: Path, dest: Path) -> sitk.Image:
    """The scan reoriented (non-trivial direction) and written through SimpleITK (NRRD, MetaImage)."""
    img = nib.load(str(original)).as_reoriented(REORIENT)
    image = nifti_to_itk(np.asarray(img.dataobj, dtype=np.float32), ItkGeometry.from_affine(img.affine))
    dest.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(dest), True)
    return sitk.ReadImage(str(dest))


def test_itk_formats_keep_their_geometry_exactly(runs, tmp_path):
    vid = _test_ids(runs, 2)[0]
    original = runs["images"][2] / f"{vid}.nii.gz"
    inputs = {ext: _itk_copy(original, tmp_path / "in" / f"{vid}_{ext}.{ext}") for ext in ("nrrd", "nhdr", "mha",
                                                                                           "mhd")}
    (tmp_path / "in" / "notes.txt").write_text("ignored: not an image")
    out = tmp_path / "pred"
    summary = _predict(runs, [tmp_path / "in", original], out, "--output_format", "input")
    assert sorted(s["format"] for s in summary["scans"]) == ["metaimage", "metaimage", "nifti", "nrrd", "nrrd"]
    reference = nib.load(str(out / f"{vid}.nii.gz"))
    for ext, image in inputs.items():
        result = sitk.ReadImage(str(out / f"{vid}_{ext}.{ext}"))
        assert result.GetSize() == image.GetSize()
        assert result.GetOrigin() == image.GetOrigin() and result.GetSpacing() == image.GetSpacing()
        assert result.GetDirection() == image.GetDirection()
        assert result.GetPixelID() == sitk.sitkUInt8
        labels = np.transpose(sitk.GetArrayFromImage(result), (2, 1, 0))
        as_nifti = nib.Nifti1Image(labels, ItkGeometry.of(result).affine())
        assert np.array_equal(np.asarray(resample_from_to(as_nifti, reference, order=0).dataobj),
                              np.asarray(reference.dataobj)), ext
    # NIfTI output (default) of an ITK input: the same geometry as a NIfTI affine
    out2 = tmp_path / "pred_nifti"
    _predict(runs, [tmp_path / "in" / f"{vid}_nrrd.nrrd"], out2)
    written = nib.load(str(out2 / f"{vid}_nrrd.nii.gz"))
    image = inputs["nrrd"]
    assert written.shape == image.GetSize()
    np.testing.assert_allclose(written.affine, ItkGeometry.of(image).affine(), atol=1e-4)
    assert written.header["qform_code"] == 1 and written.header["sform_code"] == 1


def write_dicom_series(volume: np.ndarray, geometry: ItkGeometry, folder: Path, uid: str) -> None:
    """An int16 (x, y, z) volume as a DICOM series (one file per slice) with ``geometry``.  GDCM's writer
    switches the process locale to "C" (Python's default text encoding becomes ASCII): restored after."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_series(volume, geometry, folder, uid)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_series(volume: np.ndarray, geometry: ItkGeometry, folder: Path, uid: str) -> None:
    image = nifti_to_itk(volume.astype(np.int16), geometry)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    for z in range(image.GetDepth()):
        s = image[:, :, z]
        for tag, value in (("0008|0060", "MR"), ("0020|000d", uid + ".1"), ("0020|000e", uid),
                           ("0020|0037", "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z))))),
                           ("0020|0013", str(z + 1)), ("0018|0050", str(geometry.spacing[2]))):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid[-4:]}_{z:03d}.dcm"))
        writer.Execute(s)


def test_dicom_series_and_several_series(runs, tmp_path, capsys):
    vid = _test_ids(runs, 2)[0]
    img = nib.load(str(runs["images"][2] / f"{vid}.nii.gz")).as_reoriented(REORIENT)
    data = np.asarray(img.dataobj, dtype=np.float32)
    volume = np.rint((data - data.min()) / (data.max() - data.min()) * 2000)
    geometry = ItkGeometry.from_affine(img.affine)
    folder = tmp_path / "dicom" / "patient1"
    write_dicom_series(volume, geometry, folder, "1.2.826.0.1.3680043.2.1125.9.1001")
    out = tmp_path / "pred"
    summary = _predict(runs, [tmp_path / "dicom"], out)  # a folder of series folders
    assert summary["scans"][0]["format"] == "dicom" and summary["scans"][0]["id"] == "patient1"
    written = nib.load(str(out / "patient1.nii.gz"))
    series = sitk.ReadImage(sorted(str(p) for p in folder.glob("*.dcm")))
    assert written.shape == series.GetSize() == img.shape
    np.testing.assert_allclose(written.affine, ItkGeometry.of(series).affine(), atol=1e-4)
    np.testing.assert_allclose(written.affine, img.affine, atol=1e-4)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}

    write_dicom_series(volume, geometry, folder, "1.2.826.0.1.3680043.2.1125.9.2002")
    err = exit_message(capsys, predict_cli.main, ["-i", str(folder), "-o", str(tmp_path / "out2"),
                                                  "--checkpoint_dir", str(runs["adapt"]), "--device", "cpu"])
    assert "several DICOM series" in err and "9.1001" in err and "9.2002" in err and "--series" in err
    _predict(runs, [folder], tmp_path / "out3", "--series", "1.2.826.0.1.3680043.2.1125.9.2002")
    assert (tmp_path / "out3" / "patient1.nii.gz").is_file()
    # README's second example: --output_format input with an NRRD scan and a DICOM series (issue 22: the
    # DICOM series was refused); the NRRD keeps its format, the DICOM series falls back to NIfTI, as documented
    nrrd = tmp_path / "scans" / "sub-nrrd.nrrd"
    nrrd.parent.mkdir()
    sitk.WriteImage(nifti_to_itk(volume.astype(np.int16), geometry), str(nrrd))
    summary = _predict(runs, [nrrd, folder], tmp_path / "out4", "--output_format", "input", "--save_probabilities",
                       "--ensemble_size", "5", "--series", "1.2.826.0.1.3680043.2.1125.9.1001")
    assert [(s["id"], s["output"], s["probabilities"]) for s in summary["scans"]] == [
        ("sub-nrrd", "sub-nrrd.nrrd", "sub-nrrd_probabilities.nrrd"),
        ("patient1", "patient1.nii.gz", "patient1_probabilities.nii.gz")]
    assert sorted(p.name for p in (tmp_path / "out4").iterdir()) == sorted(
        ["predict.json", "sub-nrrd.nrrd", "sub-nrrd_probabilities.nrrd", "patient1.nii.gz",
         "patient1_probabilities.nii.gz"])


# --------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_and_write_nothing(runs, tmp_path, capsys):
    good = runs["images"][2] / f"{_test_ids(runs, 2)[0]}.nii.gz"
    out = tmp_path / "out"

    def error(*inputs, run=runs["adapt"], extra=()):
        msg = exit_message(capsys, predict_cli.main, ["-i", *map(str, inputs), "-o", str(out), "--checkpoint_dir",
                                                      str(run), "--device", "cpu", *extra])
        assert not out.exists()
        return msg

    png = tmp_path / "scan.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert str(png) in error(good, png) and "unknown image format '.png'" in error(png)
    flat = _nifti(tmp_path / "flat.nii.gz", np.zeros((20, 20), np.float32))
    assert str(flat) in error(flat) and "2-D image" in error(flat)
    assert "2-D image" in error(_nifti(tmp_path / "one_slice.nii.gz", np.zeros((20, 20, 1), np.float32)))
    series = _nifti(tmp_path / "t.nii.gz", np.zeros((8, 8, 8, 3), np.float32))
    assert "4-D image" in error(series) and str(series) in error(series)
    assert "input not found" in error(tmp_path / "missing.nii.gz")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no scan found" in error(empty)
    # two inputs with one volume id
    other = tmp_path / "other"
    (other).mkdir()
    shutil.copyfile(good, other / good.name)
    assert "two inputs give the volume id" in error(good, other)
    # a run folder without best.json, a label count mismatch between plan and checkpoints
    (tmp_path / "norun").mkdir()
    assert "best.json" in error(good, run=tmp_path / "norun")
    run = _copy_run(runs, "adapt", tmp_path / "run4")
    plan = json.loads((run / "checkpoints" / PLAN_NAME).read_text())
    plan["num_classes"] = 4
    (run / "checkpoints" / PLAN_NAME).write_text(json.dumps(plan))
    msg = error(good, run=run)
    assert "label count mismatch" in msg and "4 classes" in msg and "segment 3" in msg
    # a corrupt plan
    (run / "checkpoints" / PLAN_NAME).write_text("{not json")
    assert "cannot read the plan JSON" in error(good, run=run)
    # output inside an input folder, an existing output
    msg = exit_message(capsys, predict_cli.main, ["-i", str(other), "-o", str(other / "seg"), "--checkpoint_dir",
                                                  str(runs["adapt"]), "--device", "cpu"])
    assert "--output lies inside the input --input" in msg and not (other / "seg").exists()
    out.mkdir()
    (out / "keep.txt").write_text("old")
    msg = exit_message(capsys, predict_cli.main, ["-i", str(good), "-o", str(out), "--checkpoint_dir",
                                                  str(runs["adapt"]), "--device", "cpu"])
    assert "--overwrite" in msg and (out / "keep.txt").read_text() == "old"
    # a scan whose data is truncated (its header is fine): every scan is read completely before any work,
    # so it is refused at once -- the old output folder stays as it was, nothing new is left behind
    truncated = tmp_path / "late" / "zz_truncated.nii"
    truncated.parent.mkdir()
    nib.save(nib.load(str(good)), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-5000])
    msg = exit_message(capsys, predict_cli.main, ["-i", str(good), str(truncated), "-o", str(out), "--checkpoint_dir",
                                                  str(runs["adapt"]), "--device", "cpu", "--overwrite"])
    assert msg.startswith(f"error: {truncated}: cannot read")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_one_corrupt_scan_among_five(runs, tmp_path, capsys):
    """Issue 22: predict segmented three scans, stopped at the fifth (corrupt) and wrote nothing. Now the
    corrupt one is refused before any work (no checkpoint even loaded), and --keep_going writes every good
    scan, lists the bad one in predict.json and exits with status 3."""
    good = runs["images"][2] / f"{_test_ids(runs, 2)[0]}.nii.gz"
    batch = tmp_path / "batch"
    batch.mkdir()
    for i in range(4):
        shutil.copyfile(good, batch / f"scan{i}.nii.gz")
    corrupt = batch / "scan4.nii"
    nib.save(nib.load(str(good)), str(corrupt))
    corrupt.write_bytes(corrupt.read_bytes()[:-3000])  # header fine, voxel data truncated
    out = tmp_path / "out"
    norun = tmp_path / "norun"  # not a run: the scans are checked before the run is even opened
    norun.mkdir()
    msg = exit_message(capsys, predict_cli.main, ["-i", str(batch), "-o", str(out), "--checkpoint_dir", str(norun),
                                                  "--device", "cpu"])
    assert msg.startswith(f"error: {corrupt}: cannot read the voxel data") and not out.exists()

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(predict_cli.main, ["-i", str(batch), "-o", str(out), "--checkpoint_dir", str(runs["adapt"]),
                                   "--device", "cpu", "--quiet", "--keep_going"])
    assert info.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert [ln for ln in err if ln.startswith("error:")] == [err[-1]]
    assert err[-1].startswith(f"error: {out}: 1 of 5 scan(s) not segmented") and str(corrupt) in err[-1]
    assert any(ln.startswith(f"warning: {corrupt}: cannot read the voxel data") for ln in err)
    summary = json.loads((out / "predict.json").read_text())
    assert [s["id"] for s in summary["scans"]] == [f"scan{i}" for i in range(4)]
    assert [(f["id"], f["input"]) for f in summary["failed"]] == [("scan4", str(corrupt))]
    assert sorted(p.name for p in out.iterdir()) == ["predict.json"] + [f"scan{i}.nii.gz" for i in range(4)]
    reference = _labels(out / "scan0.nii.gz")
    assert all(np.array_equal(_labels(out / f"scan{i}.nii.gz"), reference) for i in range(1, 4))


def test_spacing_far_from_the_plan_warns(runs, tmp_path, capsys):
    good = runs["images"][2] / f"{_test_ids(runs, 2)[0]}.nii.gz"
    img = nib.load(str(good))
    coarse = _nifti(tmp_path / "in" / "coarse.nii.gz", np.asarray(img.dataobj),
                    img.affine @ np.diag([3.0, 1.0, 1.0, 1.0]))
    summary = _predict(runs, [coarse, good], tmp_path / "out")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and str(coarse) in lines[0] and "far from the training data" in lines[0]
    assert [bool(s["warnings"]) for s in summary["scans"]] == [True, False]
    assert (tmp_path / "out" / "coarse.nii.gz").is_file()


# --------------------------------------------------------------------------------- command line


def test_predict_help_and_script_invocation(runs, tmp_path):
    res = subprocess.run([sys.executable, "MultiMedSeg/predict.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for flag in ("-i", "-o", "--checkpoint_dir", "--ensemble_size", "--ensemble_weights", "--save_probabilities",
                 "--overwrite", "--output_format", "--series", "--device"):
        assert flag in res.stdout
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    good = runs["images"][2] / f"{_test_ids(runs, 2)[0]}.nii.gz"
    res = subprocess.run([sys.executable, "-m", "MultiMedSeg.predict", "-i", str(good), "-o", str(tmp_path / "o"),
                          "--checkpoint_dir", str(runs["adapt"]), "--device", "cpu"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "o" / good.name).is_file() and "wrote 1 segmentation" in res.stdout
