"""Shared pytest fixtures, built in pytest's tmp folder (session scope unless said otherwise).

``phantom_dir`` -> Path
    A tiny demo phantom (``demo.phantom.generate_phantom``): seed 0, sites 0, 1, 2,
    ``PHANTOM_SUBJECTS`` (4) subjects per site at ``PHANTOM_SPACING`` (6 mm, volumes of
    33 x 39 x 32 voxels).  Layout ``phantom_dir/site<k>/{images,labels}/sub-<NNN>.nii.gz``;
    labels uint8 in {0 background, 1 GM, 2 WM}.

``preprocessed_sites`` -> Dict[int, Path]
    Each phantom site preprocessed by ``MultiMedSeg.data.preprocessing.preprocess`` at ``PREP_SIZE`` (32) px
    with ``num_classes=3``, ``val_frac=test_frac=0.25`` (1 val + 1 test + 2 train volumes),
    ``discard_outside_labels`` and seed 0.  Site 0 (the labeled source) has a flat
    ``train/``; sites 1 and 2 (targets) use ``labeled_train=1``, i.e. ``train/labeled/`` (1
    volume) and ``train/unlabeled/`` (1 volume).  Every site has ``val/``, ``test/`` and
    ``metadata.json``.  All training slices of a site: ``sorted(out.glob("train/**/*.npz"))``.
    Slices: ``data`` float32 (32, 32, 1) in [-1, 1], ``mask`` bool (32, 32, 3) one-hot, no weight.

``phantom_params`` -> dict
    The constants above: ``seed``, ``n_subjects``, ``spacing``, ``sites``, ``size``, ``num_classes``.

``tiny_clip`` -> {"model", "pretrained"} (module scope)
    A tiny random open_clip architecture (``builders.TINY_CLIP``: embed 16, 32 px input) and a weights
    file of it initialised from ``torch.manual_seed(0)``: the CLIP of prepare_data and of the CLIP loss.

Plain builders shared by several test files (tiny generator files, flag lists, restore round trips)
are in ``tests/builders.py``.

Treat both folders as read-only (they are shared by all tests of the session); copy them
(``shutil.copytree``) before modifying anything.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import pytest

try:  # property-based tests (tests/test_properties.py): small, derandomized runs by default
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None, database=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("thorough", max_examples=500, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - hypothesis is in requirements.txt
    pass

PHANTOM_SEED = 0
PHANTOM_SUBJECTS = 4
PHANTOM_SPACING = 6.0
PHANTOM_SITES = (0, 1, 2)
PREP_SIZE = 32
PREP_NUM_CLASSES = 3


@pytest.fixture(scope="session")
def phantom_params() -> dict:
    return {"seed": PHANTOM_SEED, "n_subjects": PHANTOM_SUBJECTS, "spacing": PHANTOM_SPACING,
            "sites": PHANTOM_SITES, "size": PREP_SIZE, "num_classes": PREP_NUM_CLASSES}


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from demo.phantom import generate_phantom

    out = tmp_path_factory.mktemp("phantom") / "data"
    return generate_phantom(out, seed=PHANTOM_SEED, n_subjects=PHANTOM_SUBJECTS, spacing=PHANTOM_SPACING,
                            sites=PHANTOM_SITES)


@pytest.fixture(scope="session")
def preprocessed_sites(phantom_dir, tmp_path_factory) -> Dict[int, Path]:
    from MultiMedSeg.data.preprocessing import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("preprocessed")
    outs: Dict[int, Path] = {}
    for site in PHANTOM_SITES:
        out = root / f"site{site}"
        preprocess(PreprocessConfig(
            images=phantom_dir / f"site{site}" / "images", labels=phantom_dir / f"site{site}" / "labels",
            out=out, size=PREP_SIZE, num_classes=PREP_NUM_CLASSES, val_frac=0.25, test_frac=0.25, seed=0,
            labeled_train=None if site == 0 else 1, discard_outside_labels=True), log=lambda *a: None)
        outs[site] = out
    return outs


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Dict[str, str]:
    import open_clip
    import torch

    from builders import TINY_CLIP, register_tiny_clip

    folder = tmp_path_factory.mktemp("clip")
    register_tiny_clip(folder, TINY_CLIP, 32)
    torch.manual_seed(0)
    weights = folder / "tiny_clip.pt"
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), weights)
    return {"model": TINY_CLIP, "pretrained": str(weights)}
