"""generate_volumes.py / MultiMedSeg.generation: synthetic labelled source volumes (docs/method.md#generation,
docs/differences.md#d9-40).

Tiny CPU models: 32 px generator (channel cap 16, style_dim 32, n_mlp 2, 5 z-bins), a 2-member
"best" checkpoint set written through the phase-2 API (PSP.checkpoint_payload + BestIndex).
Sections: the latent path, end to end, post-processing, errors and CLI, then the values (the W latents of
``--label``, each volume index's own z, the three noise modes recomputed from the generator) and the
settings, inputs and outputs (one-line setting errors, CLIP mean file, log/progress/generation.json, montage).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from builders import GEN_KW, LABEL_NC, N_ZBINS, generate_volumes, make_cfg, phase1_file, quiet, read_volume
from builders import tiny_generation_config as tiny_config, write_checkpoints
from model import Generator, make_condition
from MultiMedSeg import generation as gen
from robustmedseg.data.slices import group_slices_by_volume, load_slice
from MultiMedSeg.models.psp import PSP
from MultiMedSeg import checkpoints as ck
from robustmedseg.errors import InputError, run_cli

torch.set_num_threads(1)

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    exp = tmp_path_factory.mktemp("src_run")
    write_checkpoints(exp, tiny_config())
    return exp


# ----------------------------------------------------------------------------- latent path
@pytest.mark.parametrize("n_zbins,s", [(29, 10), (5, 2), (4, 3), (2, 1), (1, 7), (7, 1)])
def test_slice_count_formula_and_exact_bins(n_zbins, s):
    torch.manual_seed(n_zbins * 10 + s)
    w = torch.randn(n_zbins, 3, 8, dtype=torch.float64)
    path = gen.interpolate_latents(w, s)
    assert path.shape[0] == gen.slice_count(n_zbins, s) == (n_zbins - 1) * s + 1
    for i in range(n_zbins):  # every bin latent appears exactly, at slice i*s
        assert torch.equal(path[i * s], w[i])
    assert torch.equal(path[0], w[0]) and torch.equal(path[-1], w[-1])
    flat = path.reshape(path.shape[0], -1)
    dist = torch.cdist(flat, flat) + torch.eye(flat.shape[0], dtype=flat.dtype) * 1e9
    assert dist.min() > 1e-6  # no duplicated latent, not even up to rounding


def test_interpolated_latents_distinct_and_monotone_along_each_gap():
    w = torch.randn(4, 2, 6, dtype=torch.float64)
    s = 5
    path = gen.interpolate_latents(w, s)
    steps = path[1:] - path[:-1]
    assert (steps.flatten(1).norm(dim=1) > 1e-6).all()  # consecutive latents strictly distinct
    for i in range(w.shape[0] - 1):
        seg = path[i * s:(i + 1) * s + 1]
        d = (w[i + 1] - w[i]).flatten()
        t = ((seg - w[i]).flatten(1) @ d) / (d @ d)
        assert torch.all(t[1:] > t[:-1])  # monotone progress from bin i to bin i+1
        torch.testing.assert_close(t, torch.linspace(0, 1, s + 1, dtype=torch.float64))


def test_bin_latents_equal_the_generators_forward_latents():
    torch.manual_seed(0)
    g = Generator(32, **GEN_KW).eval()
    z = torch.randn(1, 32)
    e = torch.randn(1, 768)
    got = gen.bin_latents(g, z, 1, e)
    cond = g.condition(1, list(range(N_ZBINS)))
    _, want = g([z.expand(N_ZBINS, -1)], (cond, e.expand(N_ZBINS, -1)), return_latents=True)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, gen.bin_latents(g, z, 1, None))  # the encoding is used


@pytest.mark.parametrize("n_zbins,s,batch", [(3, 2, 2), (4, 3, 4), (2, 4, 3)])
def test_volume_slice_count_with_batches_not_dividing(run_dir, tmp_path, n_zbins, s, batch):
    g_file = phase1_file(tmp_path / "g.pt", n_zbins, seed=n_zbins)
    cfg = make_cfg(run_dir, tmp_path / "out", generator=g_file, slices_in_one_z=s, batch_size=batch)
    factory, _ = gen.build_factory(cfg, log=quiet)
    path, _ = factory.latents(0)
    images, labels = factory.volume(0)
    n = (n_zbins - 1) * s + 1
    assert path.shape[0] == images.shape[0] == labels.shape[0] == n
    # the synthesised slices follow the path exactly, batch after batch (no shift at batch boundaries)
    for k in (0, batch - 1, batch, n - 1):
        k = min(k, n - 1)
        img = factory.synthesize(path[k:k + 1], factory._batch_noise(0, k, k + 1, factory.latents(0)[1]))
        np.testing.assert_allclose(images[k], img[0, 0].numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- end to end
def test_outputs_loaded_once_readable_and_ensemble_mean(run_dir, tmp_path, monkeypatch):
    ckpts = sorted((run_dir / "checkpoints").glob("best_*.pt"))
    real_load = torch.load
    loads: List[str] = []

    def spy(f, *a, **kw):
        loads.append(str(f))
        return real_load(f, *a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    out = tmp_path / "fake"
    summary = gen.generate(make_cfg(run_dir, out, n_volumes=2, nifti=True, montage=True), log=quiet, progress=False)
    monkeypatch.undo()
    # each checkpoint read exactly once for 2 volumes x 3 batches
    assert sorted(p for p in loads if p.endswith(".pt")) == sorted(str(p) for p in ckpts)

    n = (N_ZBINS - 1) * 2 + 1
    groups = group_slices_by_volume(out)
    assert list(groups) == ["fakeVolume0", "fakeVolume1"] and all(len(v) == n for v in groups.values())
    assert [p.name for p in groups["fakeVolume0"]][:2] == ["fakeVolume0_slice000.npz", "fakeVolume0_slice001.npz"]
    for p in groups["fakeVolume1"]:
        s = load_slice(p, require_mask=True)
        assert s["data"].dtype == np.float32 and s["data"].shape == (32, 32, 1) and s["weight"] is None
        assert s["mask"].dtype == np.bool_ and s["mask"].shape == (32, 32, LABEL_NC)
        assert np.all(s["mask"].sum(-1) == 1) and np.abs(s["data"]).max() <= 1.0
    assert summary["slices_per_volume"] == n and summary["head"] == "source"
    assert json.loads((out / "generation.json").read_text())["checkpoints"] == summary["checkpoints"]

    import nibabel as nib
    vol = read_volume(out, "fakeVolume1")
    img = nib.load(str(out / "nifti" / "fakeVolume1.nii.gz"))
    lab = nib.load(str(out / "nifti" / "fakeVolume1_label.nii.gz"))
    assert img.shape == lab.shape == (32, 32, n) and lab.get_data_dtype() == np.uint8
    np.testing.assert_allclose(np.asarray(img.dataobj).transpose(2, 0, 1), vol["data"])
    np.testing.assert_array_equal(np.asarray(lab.dataobj).transpose(2, 0, 1), vol["labels"])
    assert (out / "montage" / "fakeVolume1.png").stat().st_size > 100

    # labels = argmax of the mean source-head probabilities of the two checkpoints (independent recomputation),
    # both with the best checkpoint's feature scale (--feature_scale_from best, the default, as the original)
    x = torch.from_numpy(vol["data"][:, None])
    probs = 0
    entries = ck.BestIndex.load(run_dir / "checkpoints").entries
    for entry in entries:
        net, fs = PSP.from_checkpoint(run_dir / "checkpoints" / entry.file).eval(), min(1.0, 1e-4 * entries[0].step)
        with torch.no_grad():
            probs = probs + net(net.face_pool(x), torch.tensor([[1.0, 0.0]]).expand(n, 2), resize=False,
                                feature_scale=fs)[:, 1:]
    np.testing.assert_array_equal(probs.argmax(1).numpy(), vol["labels"])
    assert len(np.unique(vol["labels"])) > 1  # a non-trivial segmentation was checked


def test_deterministic_for_a_seed_and_batch_independent(run_dir, tmp_path):
    a = gen.generate(make_cfg(run_dir, tmp_path / "a", seed=3, noise="slice"), log=quiet, progress=False)
    gen.generate(make_cfg(run_dir, tmp_path / "b", seed=3, noise="slice"), log=quiet, progress=False)
    gen.generate(make_cfg(run_dir, tmp_path / "c", seed=3, noise="slice", batch_size=1), log=quiet, progress=False)
    gen.generate(make_cfg(run_dir, tmp_path / "d", seed=4, noise="slice"), log=quiet, progress=False)
    va, vb, vc, vd = (read_volume(tmp_path / k) for k in "abcd")
    np.testing.assert_array_equal(va["data"], vb["data"])
    np.testing.assert_array_equal(va["labels"], vb["labels"])
    np.testing.assert_allclose(va["data"], vc["data"], atol=1e-5)
    assert (va["labels"] == vc["labels"]).mean() > 0.99
    assert not np.allclose(va["data"], vd["data"], atol=1e-3)
    assert a["settings"]["seed"] == 3


def test_noise_modes(run_dir, tmp_path):
    cfg = make_cfg(run_dir, tmp_path / "x", slices_in_one_z=1)
    vols = {}
    for mode in gen.NOISE_MODES:
        factory, _ = gen.build_factory(cfg, log=quiet)
        factory.noise = mode
        vols[mode] = factory.volume(0)[0]
    # the three modes really give different syntheses of the same latent path
    assert not np.allclose(vols["volume"], vols["slice"], atol=1e-4)
    assert not np.allclose(vols["volume"], vols["fixed"], atol=1e-4)
    # default: fresh noise for every slice, as the original
    assert cfg.noise == "slice"
    import generate_volumes

    assert generate_volumes.build_parser().get_default("noise") == "slice"


def test_generator_override_and_ckpt_dir_forms(run_dir, tmp_path):
    from MultiMedSeg.ensemble import resolve_checkpoints

    ckpt_form = resolve_checkpoints(run_dir / "checkpoints")
    assert ckpt_form == resolve_checkpoints(run_dir) and len(ckpt_form) == 2
    assert resolve_checkpoints(run_dir, 1) == ckpt_form[:1]
    with pytest.raises(InputError, match="only 2"):
        resolve_checkpoints(run_dir, 3)
    assert resolve_checkpoints(run_dir, 3, exact=False) == ckpt_form  # inference: up to --ensemble_size
    base, _ = gen.build_factory(make_cfg(run_dir, tmp_path / "o"), log=quiet)
    g_file = phase1_file(tmp_path / "g.pt", N_ZBINS, 7)
    other, _ = gen.build_factory(make_cfg(run_dir, tmp_path / "o", generator=g_file), log=quiet)
    assert base.generator is base.ensemble.members[0].net.decoder
    assert other.generator is not other.ensemble.members[0].net.decoder
    assert base.ensemble.members[1].net.decoder is base.ensemble.members[0].net.decoder  # equal decoders shared
    assert not np.allclose(base.volume(0)[0], other.volume(0)[0], atol=1e-3)


def test_clip_mean_conditioning(run_dir, tmp_path):
    good = tmp_path / "clip_mean.npy"
    np.save(good, np.random.default_rng(0).normal(size=(1, 768)).astype(np.float32))
    plain, _ = gen.build_factory(make_cfg(run_dir, tmp_path / "o"), log=quiet)
    clip, _ = gen.build_factory(make_cfg(run_dir, tmp_path / "o", clip_mean=good), log=quiet)
    assert not torch.allclose(plain.latents(0)[0], clip.latents(0)[0])
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((1, 12), np.float32))
    with pytest.raises(InputError, match=r"bad\.npy.*\(1, 768\)"):
        gen.build_factory(make_cfg(run_dir, tmp_path / "o", clip_mean=bad), log=quiet)


# ----------------------------------------------------------------------------- post-processing
def test_keep_largest_components_per_label_and_slice():
    """8-connected components, every component tied for the largest kept (the original's helper)."""
    lab = np.zeros((3, 8, 8), np.uint8)
    lab[0, 0:2, 0:3] = 1           # 6 px, label 1: kept
    lab[0, 5:7, 5:6] = 1           # 2 px, label 1: removed
    lab[0, 3, 3] = 2               # label 2: with its diagonal neighbour ONE 2-px component (8-connectivity)
    lab[0, 4, 4] = 2
    lab[0, 7, 0] = 2               # 1 px, label 2: removed
    lab[1, 0, 0] = 1
    lab[1, 2:5, 2:5] = 1           # slice 1: the 9 px blob wins
    lab[2, 0:2, 0:2] = 1           # slice 2: two 4-px components tied for the largest: both kept
    lab[2, 5:7, 5:7] = 1
    lab[2, 3, 7] = 1               # 1 px: removed
    out = gen.keep_largest_components(lab)
    assert out[0, 0:2, 0:3].all() and (out[0, 5:7, 5] == 0).all()
    assert out[0, 3, 3] == 2 and out[0, 4, 4] == 2 and out[0, 7, 0] == 0
    assert out[1, 0, 0] == 0 and (out[1, 2:5, 2:5] == 1).all()
    assert out[2, 0:2, 0:2].all() and out[2, 5:7, 5:7].all() and out[2, 3, 7] == 0
    np.testing.assert_array_equal(gen.keep_largest_components(lab[1]), out[1])
    assert lab[0, 5, 5] == 1  # input untouched


def test_keep_largest_component_flag_applies(run_dir, tmp_path):
    plain, _ = gen.build_factory(make_cfg(run_dir, tmp_path / "o"), log=quiet)
    kept, _ = gen.build_factory(make_cfg(run_dir, tmp_path / "o", keep_largest_component=True), log=quiet)
    lab_plain, lab_kept = plain.volume(0)[1], kept.volume(0)[1]
    np.testing.assert_array_equal(gen.keep_largest_components(lab_plain), lab_kept)


# ----------------------------------------------------------------------------- errors and CLI
def test_label_count_and_model_mismatches_are_one_line_errors(run_dir, tmp_path):
    cases = [
        (dict(n_segmentation_labels=4), "checkpoint segments 3 labels but --label_nc is 4"),
        (dict(n_domains=2), "n_domains = 3 but --n_domains is 2"),
        (dict(z_depth=29), "5 z-bins but --n_zbins is 29"),
        (dict(label=1), "--label 1 is not a domain of the checkpoints"),
        (dict(label=1, head="target"), "--head target needs an adaptation checkpoint"),
        (dict(label=5, head="source"), "--label 5 is not a domain of the generator"),
        (dict(ckpt_dir=tmp_path / "nope"), "checkpoint folder not found"),
    ]
    for kw, msg in cases:
        with pytest.raises(InputError) as err:
            gen.generate(make_cfg(run_dir, tmp_path / "o", **kw), log=quiet, progress=False)
        assert msg in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()
    # a foreign domain can still be segmented with a named head
    factory, _ = gen.build_factory(make_cfg(run_dir, tmp_path / "o", label=1, head="source"), log=quiet)
    assert factory.ensemble.head == "source" and factory.label == 1


def test_cli_help_and_errors(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as ex:
        generate_volumes.main(["--help"])
    assert ex.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--ckpt_dir", "--generator", "--label", "--n_volumes", "--slices_in_one_z",
                 "--n_segmentation_labels", "--out_dir", "--clip_mean", "--z_depth", "--batch_size", "--device",
                 "--n_domains", "--ensemble_size", "--keep-largest-component", "--seed", "--nifti", "--montage",
                 "--overwrite", "--head", "--noise", "(n_zbins - 1) * s + 1"):
        assert flag in text, flag
    argv = ["--ckpt_dir", str(run_dir), "--label", "0", "--n_volumes", "1", "--slices_in_one_z", "1",
            "--n_segmentation_labels", "4", "--out_dir", str(tmp_path / "cli"), "--device", "cpu", "--quiet"]
    with pytest.raises(SystemExit) as ex:
        run_cli(generate_volumes.main, argv)
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2 and err.startswith("error: ") and "\n" not in err and "--label_nc is 4" in err


def test_cli_end_to_end_and_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--ckpt_dir", str(run_dir / "checkpoints"), "--label", "0", "--n_volumes", "1", "--slices_in_one_z",
            "1", "--n_segmentation_labels", "3", "--out_dir", str(out), "--device", "cpu", "--no-nifti",
            "--no-montage", "--remove_largest_components", "--quiet", "--batch_size", "2"]
    assert generate_volumes.main(argv) == 0
    assert len(group_slices_by_volume(out)["fakeVolume0"]) == N_ZBINS
    assert not (out / "nifti").exists() and not (out / "montage").exists()
    assert json.loads((out / "generation.json").read_text())["settings"]["keep_largest_component"] is True
    with pytest.raises(InputError, match="already exists"):
        generate_volumes.main(argv)
    assert generate_volumes.main(argv + ["--overwrite"]) == 0


def test_montage_overlay():
    images = np.full((9, 32, 32), -1.0, np.float32)
    labels = np.zeros((9, 32, 32), np.uint8)
    labels[:, :4, :4] = 2
    m = gen.montage_image(images, labels, n=3)
    assert m.shape == (128, 3 * 128 + 2 * 2, 3)  # 32 px tiles enlarged 4x, 2 px separators
    np.testing.assert_allclose(m[0, 0], 0.45 * gen.PALETTE[1])  # label 2 over black
    np.testing.assert_allclose(m[-1, -1], 0.0)  # background stays the image (black)


# ----------------------------------------------------------------------------- values
# The values depend on --label, on the volume index and on the noise mode as documented
# (MultiMedSeg.generation), recomputed here from the generator's own forward pass (``run_dir``'s models).

S = 2  # slices_in_one_z of these tests
SEED = 5


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
        "head": "source", "checkpoints": ckpts, "feature_scales": [1.0, 1.0],
        "checkpoint_feature_scales": [1.0, 0.5],
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
