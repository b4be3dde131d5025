"""Synthetic volumes: the values depend on --label, on the volume index and on the noise mode as
documented (MultiMedSeg.generation), recomputed here from the generator's own forward pass.

Tiny models from tests/test_generate_volumes.py (32 px, 5 z-bins, 3 domains, 2 checkpoints of domain 0).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model import make_condition
from MultiMedSeg import generation as gen
from builders import N_ZBINS, generate_volumes, make_cfg, quiet, read_volume, write_checkpoints
from builders import tiny_generation_config as tiny_config

S = 2  # slices_in_one_z of these tests
SEED = 5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    exp = tmp_path_factory.mktemp("gen_values_run")
    write_checkpoints(exp, tiny_config())
    return exp


def factory(run_dir, tmp_path, **kw) -> gen.VolumeFactory:
    kw = {"slices_in_one_z": S, "seed": SEED, **kw}
    if kw.get("label", 0) != 0:
        kw.setdefault("head", "source")  # the checkpoints' only domain is 0
    f, _ = gen.build_factory(make_cfg(run_dir, tmp_path / "unused", **kw), log=quiet)
    return f


def expected_bin_latents(f: gen.VolumeFactory, label: int, index: int) -> torch.Tensor:
    """W latents of the n_zbins conditions [one-hot(label); one-hot(bin)] through the generator's forward,
    with z drawn from the documented stream of volume ``index``."""
    g = f.generator
    z = torch.randn(1, g.style_dim, generator=torch.Generator().manual_seed(gen.derived_seed(SEED, index)))
    cond = make_condition([label] * N_ZBINS, list(range(N_ZBINS)), g.n_domains, g.n_zbins)
    with torch.no_grad():
        _, w = g([z.expand(N_ZBINS, -1)], (cond, None), return_latents=True)
    return w


@pytest.mark.parametrize("label", [0, 1, 2])
def test_the_label_is_the_generators_domain_condition(run_dir, tmp_path, label):
    f = factory(run_dir, tmp_path, label=label)
    path, _ = f.latents(0)
    want = expected_bin_latents(f, label, 0)
    for i in range(N_ZBINS):  # the bins of the path are the latents of (label, bin i)
        torch.testing.assert_close(path[i * S], want[i])


def test_different_labels_give_different_volumes_through_the_cli(run_dir, tmp_path):
    outs = {}
    for label in (0, 2):
        out = tmp_path / f"label{label}"
        argv = ["--ckpt_dir", str(run_dir), "--label", str(label), "--n_volumes", "1", "--slices_in_one_z", str(S),
                "--n_segmentation_labels", "3", "--out_dir", str(out), "--device", "cpu", "--no-nifti",
                "--no-montage", "--quiet", "--seed", str(SEED), "--head", "source"]
        assert generate_volumes.main(argv) == 0
        outs[label] = read_volume(out)["data"]
        # what the CLI wrote is the library's volume of that label
        images, _ = factory(run_dir, tmp_path, label=label).volume(0)
        np.testing.assert_allclose(outs[label], images, atol=1e-4)  # batch sizes differ: float rounding only
    assert np.abs(outs[0] - outs[2]).mean() > 1e-3


def test_each_volume_index_has_its_own_noise_vector(run_dir, tmp_path):
    f = factory(run_dir, tmp_path, label=0)
    paths = [f.latents(i)[0] for i in range(3)]
    for i, path in enumerate(paths):
        torch.testing.assert_close(path[0], expected_bin_latents(f, 0, i)[0])
    assert not torch.allclose(paths[0], paths[1]) and not torch.allclose(paths[1], paths[2])


def test_volumes_of_one_run_differ_and_do_not_depend_on_the_run_size(run_dir, tmp_path):
    out = tmp_path / "two"
    gen.generate(make_cfg(run_dir, out, n_volumes=2, slices_in_one_z=S, seed=SEED), log=quiet, progress=False)
    v0, v1 = read_volume(out, "fakeVolume0")["data"], read_volume(out, "fakeVolume1")["data"]
    assert np.abs(v0 - v1).mean() > 1e-3
    # volume i depends only on (seed, i): the same as made alone
    np.testing.assert_allclose(v1, factory(run_dir, tmp_path, label=0).volume(1)[0], atol=1e-4)


def _synth(f: gen.VolumeFactory, latents: torch.Tensor, noise):
    with torch.no_grad():
        img, _ = f.generator([latents], input_is_latent=True, noise=noise, randomize_noise=False)
    return img.clamp(-1, 1)[:, 0].numpy()


def test_noise_modes_use_the_documented_noise(run_dir, tmp_path):
    """'slice': noise of slice k drawn from (seed, volume, k); 'volume': one set drawn after z from the
    volume's stream, shared by every slice; 'fixed': the generator's stored noise buffers."""
    index = 1
    images = {}
    for mode in gen.NOISE_MODES:
        f = factory(run_dir, tmp_path, label=0, noise=mode)
        images[mode] = f.volume(index)[0]
    path, _ = factory(run_dir, tmp_path, label=0).latents(index)
    n = path.shape[0]
    g = f.generator
    # slice
    per_slice = [gen.draw_noise(g, torch.Generator().manual_seed(gen.derived_seed(SEED, index, k))) for k in range(n)]
    want = np.concatenate([_synth(f, path[k:k + 1], per_slice[k]) for k in range(n)])
    np.testing.assert_allclose(images["slice"], want, atol=1e-5)
    # volume
    rng = torch.Generator().manual_seed(gen.derived_seed(SEED, index))
    torch.randn(1, g.style_dim, generator=rng)  # z comes first in the volume's stream
    shared = gen.draw_noise(g, rng)
    np.testing.assert_allclose(images["volume"], _synth(f, path, shared), atol=1e-5)
    # fixed
    buffers = [getattr(g.noises, f"noise_{j}") for j in range(g.num_layers)]
    np.testing.assert_allclose(images["fixed"], _synth(f, path, buffers), atol=1e-5)
    # the modes really differ, and 'slice' differs from giving every slice the first slice's noise
    assert np.abs(images["slice"] - images["volume"]).mean() > 1e-3
    assert np.abs(images["volume"] - images["fixed"]).mean() > 1e-3
    same_noise = np.concatenate([_synth(f, path[k:k + 1], per_slice[0]) for k in range(n)])
    assert np.abs(images["slice"][1:] - same_noise[1:]).mean() > 1e-3


# ----------------------------------------------------------------------------- settings, inputs, outputs
@pytest.mark.parametrize("change,message", [
    (dict(label=-1), "--label must be >= 0, got -1"),
    (dict(n_volumes=0), "--n_volumes must be >= 1, got 0"),
    (dict(slices_in_one_z=0), "--slices_in_one_z must be >= 1, got 0"),
    (dict(batch_size=0), "--batch_size must be >= 1, got 0"),
    (dict(n_segmentation_labels=1), "--label_nc must be >= 2, got 1"),
    (dict(noise="pink"), "--noise must be one of slice, volume, fixed, got 'pink'"),
    (dict(head="left"), "--head must be one of auto, source, target, got 'left'"),
    (dict(device="tpu"), "--device must be auto, cpu or cuda, got 'tpu'"),
])
def test_settings_are_checked_with_one_line_errors(tmp_path, change, message):
    from robustmedseg.errors import InputError

    cfg = make_cfg(tmp_path, tmp_path / "out", **change)
    with pytest.raises(InputError) as info:
        cfg.validate()
    assert str(info.value) == message


def test_valid_settings_pass():
    for kw in (dict(n_segmentation_labels=2, n_volumes=1, slices_in_one_z=1, batch_size=1, label=0),
               dict(device="cuda:1", head="target", noise="fixed"), dict(device="auto"), dict(device="cuda")):
        make_cfg(Path("x"), Path("y"), **kw).validate()


def test_clip_mean_file_checks(tmp_path):
    from robustmedseg.errors import InputError

    vec = np.arange(8, dtype=np.float64) / 8
    np.save(tmp_path / "flat.npy", vec)
    got = gen.load_encoding(tmp_path / "flat.npy", 8)
    assert got.dtype == torch.float32 and got.shape == (1, 8)
    torch.testing.assert_close(got, torch.from_numpy(vec[None]).float())
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "ints.npy", np.zeros((1, 8), np.int64))
    np.save(tmp_path / "wide.npy", np.zeros((2, 8), np.float32))
    np.save(tmp_path / "cube.npy", np.zeros((1, 1, 8), np.float32))
    np.save(tmp_path / "nan.npy", np.full((1, 8), np.nan, np.float32))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    cases = {"missing.npy": "CLIP mean file not found",
             "pickled.npy": "cannot read CLIP mean (ValueError: ",
             "junk.npy": "cannot read CLIP mean (",
             "ints.npy": "CLIP mean must be a float (1, 8) array, got int64 (1, 8)",
             "wide.npy": "CLIP mean must be a float (1, 8) array, got float32 (2, 8)",
             "cube.npy": "CLIP mean must be a float (1, 8) array, got float32 (1, 1, 8)",
             "nan.npy": "CLIP mean contains NaN or inf"}
    for name, message in cases.items():
        with pytest.raises(InputError) as info:
            gen.load_encoding(tmp_path / name, 8)
        assert str(info.value).startswith(f"{tmp_path / name}: {message}"), str(info.value)


def test_generation_log_progress_and_summary(run_dir, tmp_path, capsys):
    from robustmedseg.errors import InputError

    out = tmp_path / "run"
    lines = []
    summary = gen.generate(make_cfg(run_dir, out, n_volumes=2, slices_in_one_z=S, seed=SEED), log=lines.append,
                           progress=True)
    n = (N_ZBINS - 1) * S + 1
    assert lines[0].startswith("segmentation: 2 checkpoint(s), source head, label_nc 3; synthesis: decoder of ")
    assert lines[1] == f"2 volume(s) of N = (n_zbins - 1) * s + 1 = ({N_ZBINS} - 1) * {S} + 1 = {n} slices -> {out}"
    assert f"{2 * n}/{2 * n}" in capsys.readouterr().err  # the bar counts slices, batch after batch
    ckpts = [str(p) for p in sorted((run_dir / "checkpoints").glob("best_*.pt"), key=lambda p: -int(p.stem[9:]))]
    assert summary == {
        "settings": {**{k: v for k, v in vars(make_cfg(run_dir, out, n_volumes=2, slices_in_one_z=S,
                                                        seed=SEED)).items()}, "ckpt_dir": str(run_dir),
                     "out_dir": str(out)},
        "n_zbins": N_ZBINS, "slices_per_volume": n, "slice_count_formula": "(n_zbins - 1) * slices_in_one_z + 1",
        "head": "source", "checkpoints": ckpts, "feature_scales": [1.0, 1.0], "checkpoint_feature_scales": [1.0, 0.5],
        "synthesis_generator": f"decoder of {ckpts[0]}", "nifti_spacing_mm": [1.0, 1.0, 1.0]}
    assert json.loads((out / "generation.json").read_text()) == summary
    with pytest.raises(InputError) as info:
        gen.generate(make_cfg(run_dir, out), log=quiet, progress=False)
    assert str(info.value) == f"{out}: output already exists (pass --overwrite to replace it)"


def test_nifti_files_have_the_identity_grid(tmp_path):
    import nibabel as nib

    images = np.random.default_rng(0).uniform(-1, 1, (3, 4, 4)).astype(np.float32)
    labels = (images > 0).astype(np.uint8)
    gen.write_nifti(tmp_path, "v", images, labels)
    for name, array, dtype in (("v", images, np.float32), ("v_label", labels, np.uint8)):
        img = nib.load(str(tmp_path / f"{name}.nii.gz"))
        np.testing.assert_array_equal(img.affine, np.eye(4))
        assert img.get_data_dtype() == dtype and img.header.get_xyzt_units() == ("mm", "unknown")
        np.testing.assert_array_equal(np.asarray(img.dataobj), array.transpose(1, 2, 0))


def test_montage_tiles_values_and_zoom():
    images = np.stack([np.full((43, 43), v, np.float32) for v in (-3.0, -0.5, 0.0, 0.5, 2.0)])
    labels = np.zeros((5, 43, 43), np.uint8)
    labels[:, :5, :5] = 1
    m = gen.montage_image(images, labels, n=5, alpha=0.5)
    zoom = 128 // 43  # 2: tiles below min_tile px are enlarged by an integer factor
    assert m.shape == (43 * zoom, 5 * 43 * zoom + 4 * 2, 3)
    step = 43 * zoom + 2
    for i, v in enumerate((-3.0, -0.5, 0.0, 0.5, 2.0)):  # first to last slice, grey = clip((x + 1) / 2)
        np.testing.assert_allclose(m[-1, i * step], np.clip((v + 1) / 2, 0, 1))
        np.testing.assert_allclose(m[0, i * step], 0.5 * np.clip((v + 1) / 2, 0, 1) + 0.5 * gen.PALETTE[0])
    np.testing.assert_allclose(m[:, 43 * zoom:43 * zoom + 2], 1.0)  # white separators
    big = gen.montage_image(np.zeros((2, 128, 128), np.float32), np.zeros((2, 128, 128), np.uint8))
    assert big.shape == (128, 2 * 128 + 2, 3)  # no enlargement at 128 px


def test_montage_png_is_written(tmp_path):
    from PIL import Image

    path = tmp_path / "m" / "v.png"
    path.parent.mkdir()
    gen.write_montage(path, np.zeros((3, 32, 32), np.float32), np.ones((3, 32, 32), np.uint8))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(path).size == (3 * 128 + 2 * 2, 128)


def test_phase1_generator_override_is_reported(run_dir, tmp_path):
    from robustmedseg.errors import InputError
    from builders import phase1_file

    g_file = phase1_file(tmp_path / "g.pt", N_ZBINS, seed=3)
    lines = []
    summary = gen.generate(make_cfg(run_dir, tmp_path / "o", generator=g_file), log=lines.append, progress=False)
    assert summary["synthesis_generator"] == str(g_file)
    assert f"synthesis: phase-1 file {g_file} (32 px, {N_ZBINS} z-bins)" in lines[0]
    with pytest.raises(InputError) as info:
        gen.build_factory(make_cfg(run_dir, tmp_path / "p", generator=g_file, z_depth=N_ZBINS + 1), log=quiet)
    assert str(info.value) == f"{g_file}: generator has {N_ZBINS} z-bins but --n_zbins is {N_ZBINS + 1}"
    first = sorted((run_dir / "checkpoints").glob("best_*.pt"), key=lambda p: -int(p.stem[9:]))[0]
    with pytest.raises(InputError) as info:
        gen.build_factory(make_cfg(run_dir, tmp_path / "p", n_segmentation_labels=4), log=quiet)
    assert str(info.value) == f"{first}: checkpoint segments 3 labels but --label_nc is 4"
    with pytest.raises(InputError) as info:
        gen.build_factory(make_cfg(run_dir, tmp_path / "p", z_depth=N_ZBINS + 1), log=quiet)
    assert str(info.value).startswith(f"{first}: generator has")
