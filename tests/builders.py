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
:func:`input_error_message` / :func:`one_hot_slice`
    The text of the one-line ``InputError`` a call raises; the arrays of a small valid slice.
``FACTORY_TINY`` / :func:`factory_trainer` / :func:`write_slices` / :func:`node_round`
    Phase 1 in-process: the tiny factory's ``model_args`` (16 px), a ``FactoryTrainer`` of a config,
    a folder of random slices and one node round of the training plan (``federation.inprocess``).
:func:`make_slices`
    Phase-2 slices: a square of class 1 and one of class ``classes - 1``.
:func:`tiny_psp_config`
    The tiny pSp of the phase-2 tests: the ``TINY_GEN`` decoder, IResNet-10 with 8 base channels, 3 classes.
Synthetic volumes (``generate_volumes``, :func:`write_checkpoints`, :func:`make_cfg`, :func:`phase1_file`, ...)
    A 2-member "best" checkpoint set of :func:`tiny_generation_config` (5 z-bins) written through the
    phase-2 API, the generation settings of a test, a noisy phase-1 file, a volume read back.
:func:`run_test_ids` / :func:`run_predict` / :func:`read_labels` / :func:`copy_run` / :func:`write_nifti`
    Around the ``runs`` fixture (conftest.py): a site's test volumes, ``predict.py`` on scans with one
    of the runs (its ``predict.json``), a label file's array, a copy of a run, a NIfTI file of an array.
``Geometry`` / :func:`write_volumes` / :func:`round_trip` / :func:`check_exact`
    Preprocess -> restore round trips whose geometry loses nothing (exact expectations).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import pytest
import torch

from model import Generator, GeneratorArgs
from MultiMedSeg import generation as gen
from MultiMedSeg.data.volumes_to_slices import PreprocessConfig, preprocess
from MultiMedSeg.data.restore import load_metadata, restore_volume
from MultiMedSeg.models.psp import PSP, PSPConfig
from MultiMedSeg import checkpoints as ck
from robustmedseg.data.slices import group_slices_by_volume, load_slice
from robustmedseg.errors import InputError, run_cli
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


# ------------------------------------------------------------------------------------------ phase 1 in-process
FACTORY_TINY = dict(size=16, style_dim=32, n_mlp=2, channel_cap=16, clip_dim=16, n_sample=2)


def factory_trainer(cfg, params=None):
    """A ``FactoryTrainer`` of ``cfg`` (networks initialised from the global stream, or ``params``)."""
    from robustmedseg.factory.network import FactoryModel
    from robustmedseg.factory.optim import AlternatingAdam
    from robustmedseg.factory.trainer import FactoryTrainer

    model = FactoryModel(cfg)
    if params is not None:
        model.load_state_dict(params)
    opt = AlternatingAdam(model.discriminator.parameters(), model.generator.parameters(), lr=0.002,
                          d_reg_every=cfg.d_reg_every, g_reg_every=cfg.g_reg_every)
    return FactoryTrainer(model, opt, cfg)


def write_slices(folder: Path, n_vol: int = 2, n_slices: int = 6, size: int = 16, seed: int = 0) -> Path:
    """``n_vol`` volumes of ``n_slices`` random slices (one class) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for v in range(n_vol):
        for n in range(n_slices):
            data = np.tanh(rng.normal(size=(size, size, 1))).astype(np.float32)
            mask = np.eye(2, dtype=bool)[np.zeros((size, size), int)]
            np.savez(folder / f"vol{v}_slice{n:03d}.npz", data=data, mask=mask)
    return folder


def node_round(dataset: Path, num_updates: int, round_: int = 0, params=None, batch: int = 4, **model_args):
    """One round of the training plan on ``dataset`` in this process (``federation.inprocess``)."""
    from robustmedseg.federation.inprocess import run_node_round
    from training_plan import FactoryTrainingPlan

    args = {**FACTORY_TINY, "run_id": "test", **model_args}
    training = {"num_updates": num_updates, "loader_args": {"batch_size": batch},
                "optimizer_args": {"lr": 0.002}, "log_interval": 0}
    return run_node_round(FactoryTrainingPlan, args, training, dataset, node_id="NODE_t", round_=round_,
                          params=params)


# ------------------------------------------------------------------------------------------ one-line errors, slices
def input_error_message(fn, *args, **kwargs) -> str:
    """The message of the ``InputError`` that ``fn(*args, **kwargs)`` raises (fails when it raises none)."""
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def one_hot_slice(h=4, w=4, c=3):
    """A valid slice's ``data`` (float32 zeros, (h, w, 1)) and one-hot ``mask`` (class 0, (h, w, c))."""
    data = np.zeros((h, w, 1), np.float32)
    mask = np.zeros((h, w, c), bool)
    mask[..., 0] = True
    return data, mask


# ------------------------------------------------------------------------------------------ phase 2 runs
def make_slices(folder: Path, vid: str, n: int, size: int = 16, classes: int = 3, labeled: bool = True,
                background_only: tuple = (), weight_zero: tuple = ()) -> list:
    """Synthetic slices: a square of class 1 and one of class 2 (background-only / zero-weight on request)."""
    from robustmedseg.data.slices import save_slice

    paths = []
    for z in range(n):
        lab = np.zeros((size, size), np.int64)
        if z not in background_only:
            lab[2:6, 2:6] = 1
            lab[8:12, 8:12] = classes - 1
        data = np.where(lab > 0, 0.5, -1.0).astype(np.float32)[..., None] + 0.01 * z
        mask = (lab[..., None] == np.arange(classes)) if labeled else None
        weight = np.zeros((size, size, 1), bool) if z in weight_zero else None
        paths.append(save_slice(folder / f"{vid}_slice{z:03d}.npz", data, mask, weight))
    return paths


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


def tiny_psp_config(**kw) -> PSPConfig:
    """The tiny pSp configuration (fields replaced by ``kw``)."""
    base = PSPConfig.from_generator_args(TINY_GEN, src_tgt_domains=[0, 1], label_nc=3, encoder_depth=10,
                                         encoder_base_channels=8, encoder_input_size=32).to_dict()
    return PSPConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------ synthetic volumes
# the top-level script, imported from its file (works whatever the current folder)
_spec = importlib.util.spec_from_file_location("generate_volumes",
                                               REPO / "generate_volumes.py")
generate_volumes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate_volumes)

N_ZBINS = 5  # z-bins of the generation tests' generator
LABEL_NC = 3
GEN_KW = dict(style_dim=32, n_mlp=2, n_domains=3, channel_cap=16, n_zbins=N_ZBINS)


def tiny_generation_config(**kw) -> PSPConfig:
    """:func:`tiny_psp_config` with 5 z-bins, the source domain only and a 16 px encoder input."""
    return tiny_psp_config(**{"n_zbins": N_ZBINS, "src_tgt_domains": [0], "label_nc": LABEL_NC,
                              "encoder_input_size": 16, **kw})


def _noisy(g: Generator) -> None:
    """Make the synthesis noise matter (NoiseInjection weights start at 0)."""
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.3)


def write_checkpoints(exp: Path, config: PSPConfig, steps=(20000, 5000), scores=(0.8, 0.7)) -> List[Path]:
    """Two 'best' checkpoints sharing one decoder (as a run with a frozen decoder) + best.json."""
    torch.manual_seed(0)
    first = PSP(config)
    _noisy(first.decoder)
    first.compute_latent_avg(256, seed=0)
    index = ck.BestIndex(exp / "checkpoints", k=len(steps))
    for i, (step, score) in enumerate(zip(steps, scores)):
        torch.manual_seed(100 + i)
        net = PSP(config)
        net.decoder.load_state_dict(first.decoder.state_dict())
        net.compute_latent_avg(256, seed=0)
        index.add(score, step, {"dice": score}, net.checkpoint_payload(step, {"feature_scale_rate": 1e-4}))
    return index.paths()


def make_cfg(run_dir: Path, out: Path, **kw) -> gen.GenerationConfig:
    base = dict(ckpt_dir=run_dir, label=0, n_volumes=1, slices_in_one_z=2, n_segmentation_labels=LABEL_NC,
                out_dir=out, batch_size=3, device="cpu", nifti=False, montage=False)
    base.update(kw)
    return gen.GenerationConfig(**base)


def quiet(*_a) -> None:
    pass


def read_volume(folder: Path, name: str = "fakeVolume0") -> Dict[str, np.ndarray]:
    paths = group_slices_by_volume(folder)[name]
    slices = [load_slice(p, require_mask=True) for p in paths]
    return {"data": np.stack([s["data"][..., 0] for s in slices]),
            "labels": np.stack([s["mask"].argmax(-1) for s in slices])}


def phase1_file(path: Path, n_zbins: int, seed: int) -> Path:
    torch.manual_seed(seed)
    g = Generator(32, **{**GEN_KW, "n_zbins": n_zbins})
    _noisy(g)
    args = dict(size=32, channel_multiplier=2, lr_mlp=0.01, clip_dim=768, **{**GEN_KW, "n_zbins": n_zbins})
    return write_factory_file(path, g, GeneratorArgs(**args))


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


# ------------------------------------------------------------------------------------------ predict runs
def run_test_ids(runs, site: int):
    return load_metadata(runs["prep"][site])["splits"]["test"]


def run_predict(runs, inputs, out: Path, *extra: str, run: str = "adapt") -> dict:
    from MultiMedSeg import predict as predict_cli

    predict_cli.main(["-i", *map(str, inputs), "-o", str(out), "--checkpoint_dir", str(runs[run]),
                      "--device", "cpu", "--quiet", *extra])
    return json.loads((out / "predict.json").read_text())


def read_labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def copy_run(runs, name: str, dest: Path) -> Path:
    shutil.copytree(runs[name], dest)
    return dest


def write_nifti(path: Path, array: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([6.0, 6.0, 6.0, 1.0]) if affine is None else affine), str(path))
    return path


def brain_dataset(root: Path, n: int = 4, labeled: int = 3, seed: int = 1) -> Path:
    """``n`` volumes (20 x 24 x 12, spacing 1 x 1 x 2 mm) with a brain mask on slices 2..9 and labels (1)
    inside it on slices 4..6 (``root/images``, ``root/brain``, ``root/labels``); the last ``n - labeled``
    volumes have no label file."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = rng.normal(0, 0.05, (20, 24, 12)).astype(np.float32)
        brain = np.zeros(image.shape, np.uint8)
        brain[3:17, 4:20, 2:10] = 1
        label = np.zeros(image.shape, np.uint8)
        label[8:12, 9:14, 4:7] = 1
        image += brain + label
        for kind, array in (("images", image), ("brain", brain), *((("labels", label),) if i < labeled else ())):
            write_nifti(root / kind / f"vol{i}.nii.gz", array, affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    return root
