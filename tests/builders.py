"""Builders shared by several test modules (plain functions; the fixtures are in conftest.py).

Test modules import these instead of importing each other.

``TINY_GEN`` / :func:`tiny_generator_file`
    The tiny phase-1 generator of the phase-2 tests (32 px, style 32, 2 mapping layers, 3 domains,
    channels capped at 16) and a factory file of it, written with the project's one writer
    (``robustmedseg.factory_file.write_factory_file``), initialised from ``torch.manual_seed(seed)``.
``MMS_TINY`` / :func:`exit_message`
    The flags of a tiny phase-2 run (CPU, IResNet-10, 32 px) and the one-line-error check of a CLI.
:func:`register_tiny_clip` / ``TINY_CLIP``
    A tiny random open_clip architecture (embed 16, ``image_size`` px input) registered by name; the
    ``tiny_clip`` fixture of conftest.py registers ``TINY_CLIP`` (32 px) with a weights file.
``REPO`` / :func:`subprocess_env` / ``FACTORY_TINY_FLAGS``
    The repository, the environment of a ``train.py`` subprocess (this checkout first on PYTHONPATH,
    no ``FBM_`` variable) and the ``train.py`` flags of a tiny federated factory.
``Geometry`` / :func:`write_volumes` / :func:`round_trip` / :func:`check_exact`
    Preprocess -> restore round trips whose geometry loses nothing (exact expectations).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import pytest
import torch

from model import Generator, GeneratorArgs
from MultiMedSeg.data.preprocessing import PreprocessConfig, preprocess
from MultiMedSeg.data.restore import load_metadata, restore_volume
from robustmedseg.data.slices import load_slice
from robustmedseg.errors import run_cli
from robustmedseg.factory_file import write_factory_file

REPO = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda *a, **k: None}

TINY_GEN = GeneratorArgs(size=32, style_dim=32, n_mlp=2, n_domains=3, channel_multiplier=2, channel_cap=16)


def tiny_generator_file(path: Path, seed: int = 0, **overrides) -> Path:
    """A factory file of :data:`TINY_GEN` (fields replaced by ``overrides``), initialised locally."""
    import dataclasses

    args = dataclasses.replace(TINY_GEN, **overrides)
    torch.manual_seed(seed)
    return write_factory_file(path, Generator.from_args(args), args)


# ------------------------------------------------------------------------------------------ phase 2 runs
MMS_TINY = ["--encoder_depth", "10", "--encoder_base_channels", "8", "--encoder_input_size", "32",
            "--latent_avg_samples", "256", "--feature_scale_rate", "0.1", "--batch_size", "4", "--test_batch_size",
            "8", "--board_interval", "2", "--image_interval", "4", "--start_from_latent_avg", "--device", "cpu"]


def exit_message(capsys, main, argv) -> str:
    """Run a CLI main through run_cli in-process; assert exit 2 and a one-line error; return it."""
    with pytest.raises(SystemExit) as info:
        run_cli(main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ------------------------------------------------------------------------------------------ CLIP
TINY_CLIP = "rms-plan-test-tiny-clip"  # the 32 px architecture of the ``tiny_clip`` fixture (conftest.py)

def register_tiny_clip(folder: Path, name: str, image_size: int) -> str:
    """Register a tiny random open_clip architecture ``name`` (embed 16, ``image_size`` px input, one layer
    per tower) through a JSON config written in ``folder``; returns ``name``."""
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": image_size, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    path = Path(folder) / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


# ------------------------------------------------------------------------------------------ federation
FACTORY_TINY_FLAGS = ["--size", "32", "--latent", "32", "--n_mlp", "2", "--channel-cap", "16", "--n_sample", "2",
                      "--augment", "--batch", "4", "--sample-every", "4", "--log-every", "4", "--wait-nodes", "120"]


def subprocess_env() -> Dict[str, str]:
    """Environment of a researcher subprocess: this checkout first on PYTHONPATH, no FBM_ variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FBM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ------------------------------------------------------------------------------------------ restore round trips
@dataclass
class Geometry:
    """One synthetic volume: grid, spacing, and the label box [lo, hi) per axis (class 2 in its core)."""

    shape: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    box: Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]


def write_volumes(root: Path, geometries: Sequence[Geometry], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i, geo in enumerate(geometries):
        label = np.zeros(geo.shape, np.uint8)
        box = tuple(slice(a, b) for a, b in geo.box)
        label[box] = 1
        core = tuple(slice(a + (b - a) // 3, max(a + (b - a) // 3 + 1, b - (b - a) // 3)) for a, b in geo.box)
        label[core] = 2
        image = (rng.normal(0.0, 0.1, geo.shape) + label).astype(np.float32)
        affine = np.diag([*geo.spacing, 1.0])
        affine[:3, 3] = [-3.0 * i, 5.0, 1.5]
        for folder, array in (("images", image), ("labels", label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), str(root / folder / f"vol{i}.nii.gz"))
    return root


def stack(out: Path, vol: dict, key: str) -> np.ndarray:
    slices = [load_slice(out / rel) for rel in vol["slices"]]
    if key == "mask":
        return np.stack([s["mask"].argmax(axis=-1) for s in slices])
    return np.stack([s["data"][..., 0] for s in slices])


def round_trip(root: Path, out: Path, size: int, crop: bool, flip_axis: Optional[int],
               target_spacing: Optional[Tuple[float, float, float]] = None) -> List[dict]:
    """Preprocess ``root`` and restore every volume; returns one record per volume."""
    preprocess(PreprocessConfig(images=root / "images", labels=root / "labels", out=out, size=size, num_classes=3,
                                val_frac=0.0, test_frac=0.0, crop=crop, flip_axis=flip_axis,
                                target_spacing=target_spacing, discard_outside_labels=True), **QUIET)
    meta = load_metadata(out)
    records = []
    for vid, vol in sorted(meta["volumes"].items()):
        records.append({
            "vol": vol,
            "label": restore_volume(stack(out, vol, "mask"), vol, kind="label"),
            "image": restore_volume(stack(out, vol, "data"), vol, kind="image"),
            "original_label": np.asarray(nib.load(vol["label"]).dataobj),
            "original_image": nib.load(vol["image"]).get_fdata(),
        })
    return records


def kept_region(vol: dict) -> np.ndarray:
    """Original-grid voxels that survive: inside the crop box and the kept z range (no resampling)."""
    inside = np.zeros(vol["shape"], bool)
    (x0, x1), (y0, y1), (z0, z1) = vol["crop"]
    first, stop = vol["z_split"]
    inside[x0:x1, y0:y1, z0 + first:z0 + stop] = True
    return inside if vol["flip_axis"] is None else np.flip(inside, axis=vol["flip_axis"])


def check_exact(records: List[dict]) -> None:
    for r in records:
        vol, label, original = r["vol"], r["label"], r["original_label"]
        assert vol["shape_after_resampling"] == vol["shape_after_crop"]  # the geometry loses nothing
        assert label.shape == original.shape and label.dtype == np.uint8
        np.testing.assert_array_equal(label, original, err_msg=vol["id"])
        inside = kept_region(vol)
        image, source = r["image"], r["original_image"]
        assert np.all(image[~inside] == -1.0)
        # inside: the affine map of the preprocessing (standardise, scale to [-1, 1]) except where clipped
        free = inside & (image > -1 + 1e-4) & (image < 1 - 1e-4)
        slope, intercept = np.polyfit(source[free], image[free], 1)
        assert slope > 0 and np.abs(slope * source[free] + intercept - image[free]).max() < 1e-4
