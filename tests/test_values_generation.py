"""Synthetic volumes: the values depend on --label, on the volume index and on the noise mode as
documented (MultiMedSeg.generation), recomputed here from the generator's own forward pass.

Tiny models from tests/test_generate_volumes.py (32 px, 5 z-bins, 3 domains, 2 checkpoints of domain 0).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model import make_condition
from MultiMedSeg import generation as gen
from test_generate_volumes import N_ZBINS, generate_volumes, make_cfg, quiet, read_volume, write_checkpoints
from test_generate_volumes import tiny_config

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
