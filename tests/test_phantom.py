"""Demo phantom (demo/phantom.py): determinism, labels, geometry, site contrasts, CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from demo import phantom
from robustmedseg.errors import InputError

PHANTOM_SPACING = 6.0  # as in conftest.py (phantom_params)
PHANTOM_SUBJECTS = 4


def _read(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img


def test_layout_and_description(phantom_dir, phantom_params):
    assert (phantom_params["spacing"], phantom_params["n_subjects"]) == (PHANTOM_SPACING, PHANTOM_SUBJECTS)
    info = json.loads((phantom_dir / "sites.json").read_text())
    assert [s["index"] for s in info["sites"]] == [0, 1, 2]
    assert (phantom_dir / "README.txt").read_text().startswith("Demo phantom")
    for site in (0, 1, 2):
        images = sorted(p.name for p in (phantom_dir / f"site{site}" / "images").iterdir())
        labels = sorted(p.name for p in (phantom_dir / f"site{site}" / "labels").iterdir())
        assert images == labels == [f"sub-{i:03d}.nii.gz" for i in range(PHANTOM_SUBJECTS)]


def test_labels_and_geometry(phantom_dir):
    for site in (0, 1, 2):
        image, img = _read(phantom_dir / f"site{site}" / "images" / "sub-001.nii.gz")
        label, lab = _read(phantom_dir / f"site{site}" / "labels" / "sub-001.nii.gz")
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape == label.shape == (33, 39, 32)  # ceil(197/6), ceil(233/6), ceil(189/6)
        np.testing.assert_allclose(img.affine, lab.affine)
        np.testing.assert_allclose(img.header.get_zooms(), [PHANTOM_SPACING] * 3)
        np.testing.assert_allclose(np.diag(img.affine)[:3], [PHANTOM_SPACING] * 3)  # nilearn's RAS kept
        assert set(np.unique(label)) == {0, 1, 2}
        assert 0.05 < (label > 0).mean() < 0.6  # a brain, not an empty or full volume


def test_site_contrasts(phantom_dir):
    means = {}
    for site in (0, 1, 2):
        vals = {c: [] for c in range(3)}
        for i in range(PHANTOM_SUBJECTS):
            image, _ = _read(phantom_dir / f"site{site}" / "images" / f"sub-{i:03d}.nii.gz")
            label, _ = _read(phantom_dir / f"site{site}" / "labels" / f"sub-{i:03d}.nii.gz")
            for c in range(3):
                vals[c].append(image[label == c])
        means[site] = [float(np.concatenate(vals[c]).mean()) for c in range(3)]
    for site in (0, 1):  # T1: WM > GM > background/CSF
        bg, gm, wm = means[site]
        assert wm > gm > bg
    bg, gm, wm = means[2]  # PET-like: GM brighter than WM
    assert gm > wm > bg
    # scanner B's gamma and blur compress the GM/WM contrast relative to scanner A
    assert means[1][2] / means[1][1] < means[0][2] / means[0][1]


def test_deterministic_per_seed():
    site = phantom.SITES[1]
    a_img, a_lab, a_aff = phantom.make_subject(site, seed=3, subject=1, spacing=PHANTOM_SPACING)
    b_img, b_lab, b_aff = phantom.make_subject(site, seed=3, subject=1, spacing=PHANTOM_SPACING)
    c_img, c_lab, _ = phantom.make_subject(site, seed=4, subject=1, spacing=PHANTOM_SPACING)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    np.testing.assert_array_equal(a_aff, b_aff)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lab, c_lab)  # the anatomy (deformation) changes with the seed


def test_files_reproducible_and_out_refused(phantom_dir, tmp_path):
    out = phantom.generate_phantom(tmp_path / "again", seed=0, n_subjects=2, spacing=PHANTOM_SPACING, sites=[2])
    for kind in ("images", "labels"):
        a, _ = _read(out / "site2" / kind / "sub-001.nii.gz")
        b, _ = _read(phantom_dir / "site2" / kind / "sub-001.nii.gz")
        np.testing.assert_array_equal(a, b)  # independent of n_subjects and of the other sites
    with pytest.raises(InputError, match="already exists"):
        phantom.generate_phantom(out, seed=0, n_subjects=1, spacing=PHANTOM_SPACING, sites=[2])
    phantom.generate_phantom(out, seed=0, n_subjects=1, spacing=PHANTOM_SPACING, sites=[2], overwrite=True)
    assert len(list((out / "site2" / "images").iterdir())) == 1


def test_montage(phantom_dir, tmp_path):
    png = tmp_path / "montage.png"
    phantom.write_montage(phantom_dir, png, sites=[0, 1, 2])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_template_is_a_clear_error(monkeypatch, tmp_path):
    from demo import anatomy  # the template helpers shared by the brain and vessel phantoms

    monkeypatch.setattr(anatomy, "template_dir", lambda: tmp_path)
    with pytest.raises(InputError, match="template file missing"):
        anatomy.template_paths()


def test_cli_help_and_bad_site():
    out = subprocess.run([sys.executable, "-m", "demo.phantom", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--out", "--seed", "--n-subjects", "--spacing", "--sites", "--montage", "--overwrite"):
        assert flag in out.stdout
    with pytest.raises(InputError, match="unknown site"):
        phantom.site_by_index(7)
