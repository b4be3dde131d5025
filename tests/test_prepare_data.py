"""prepare_data.py: slice folder -> LMDB folder (robustmedseg.data.lmdb_store / zbins / clip_embed): z-bins, the
LMDB written, CLIP encoder and mean, the CLI, bad input, option and side-file checks with their one-line errors."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import lmdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prepare_data
from robustmedseg.data import zbins as zb
from robustmedseg.data.clip_embed import OPENAI_MEAN, OPENAI_STD, load_clip_encoder
from builders import TINY_CLIP, register_tiny_clip
from builders import input_error_message as message, one_hot_slice as good
from robustmedseg.data import lmdb_store
from robustmedseg.data.slices import save_slice
from robustmedseg.errors import InputError

REPO = Path(prepare_data.__file__).resolve().parent
TINY_CLIP_48 = "rms-test-tiny-clip"  # the 48 px architecture of ``tiny_clip_48px``


# --------------------------------------------------------------------------- helpers

def write_slice(path: Path, image: np.ndarray, n_classes: int = 3, **override) -> None:
    """Write a slice .npz like MultiMedSeg/preprocess.py; ``override`` replaces arrays (None drops one)."""
    h, w = image.shape[:2]
    labels = (np.arange(h * w).reshape(h, w) % n_classes)
    arrays = {"data": image.astype(np.float32), "mask": np.eye(n_classes, dtype=bool)[labels]}
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def make_site(folder: Path, volumes: Dict[str, Iterable[int]], size: int = 32, seed: int = 0
              ) -> Dict[str, np.ndarray]:
    """Random slices ``<vol>_slice<NNN>.npz`` in [-1, 1]; returns {file name: data}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for vol, numbers in volumes.items():
        for n in numbers:
            data = rng.uniform(-1, 1, (size, size, 1)).astype(np.float32)
            data[0, 0, 0] = -1.0  # exact bounds are valid
            name = f"{vol}_slice{n:03d}.npz"
            write_slice(folder / name, data)
            written[name] = data
    return written


SITE = {"volA": range(10), "volB": [3, 5, 6, 10, 20, 21, 40], "volC": range(2, 14)}


def run(argv: List[str]) -> dict:
    prepare_data.main(argv + ["--quiet"])
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "meta.json").read_text())


def read_lmdb(out: Path) -> Dict[bytes, bytes]:
    env = lmdb.open(str(out), readonly=True, lock=False)
    with env.begin() as txn:
        items = dict(txn.cursor())
    env.close()
    return items


def entries(folder: Path) -> List[str]:
    """Everything in ``folder`` (hidden temp folders included)."""
    return sorted(os.listdir(folder))


@pytest.fixture(scope="module")
def tiny_clip_48px(tmp_path_factory) -> str:
    """The tiny random open_clip architecture with a 48 px input (the slices are resized to it)."""
    return register_tiny_clip(tmp_path_factory.mktemp("clipcfg"), TINY_CLIP_48, 48)


# --------------------------------------------------------------------------- z-bins

def test_zbins_use_rank_within_volume_not_slice_number():
    files = [f"v_slice{n:03d}.npz" for n in [3, 5, 6, 10, 20, 21, 40]] + ["w_slice000.npz", "w_slice001.npz"]
    bins = zb.zbins_for_files(files, 29)
    # ranks 0..6 of a 7-slice volume -> floor(r*29/7); the reference formula n*29/D would give 165 for n=40
    assert bins.tolist() == [0, 4, 8, 12, 16, 20, 24, 0, 14]


def test_zbins_full_coverage_with_gaps_and_shuffled_order():
    numbers = [5 + 3 * k for k in range(29)] + [1000]   # 30 slices, gaps, a 4-digit number
    files = [f"vol_slice{n:03d}.npz" for n in numbers][::-1]  # order must not matter
    bins = zb.zbins_for_files(files, 29)
    assert sorted(set(bins.tolist())) == list(range(29))
    by_number = dict(zip(numbers[::-1], bins.tolist()))
    ordered = [by_number[n] for n in sorted(numbers)]
    assert ordered == sorted(ordered) and ordered[0] == 0 and ordered[-1] == 28


def test_zbins_bad_names():
    with pytest.raises(InputError, match="stray.npz"):
        zb.zbins_for_files(["a_slice001.npz", "stray.npz"])
    with pytest.raises(InputError, match="a_slice01.npz"):
        zb.zbins_for_files(["a_slice001.npz", "a_slice01.npz"])


def test_list_slices_is_the_one_order_and_refuses_stray_files(tmp_path):
    """Phase 1 and phase 2 list slices alike: by volume, then slice number; a stray .npz is an error."""
    from robustmedseg.data.slices import list_slices

    for name in ("a_b_slice000.npz", "a_slice1000.npz", "a_slice999.npz", "a_slice000.npz"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_slices(tmp_path)] == ["a_slice000.npz", "a_slice999.npz", "a_slice1000.npz",
                                                      "a_b_slice000.npz"]
    (tmp_path / "notes.txt").write_text("not a slice")  # other files are not slice files: ignored
    assert len(list_slices(tmp_path)) == 4
    (tmp_path / "stray.npz").write_bytes(b"")
    with pytest.raises(InputError, match="stray.npz"):
        list_slices(tmp_path)


# --------------------------------------------------------------------------- writing

def test_roundtrip_bit_exact_keys_and_side_files(tmp_path):
    written = make_site(tmp_path / "site", SITE)
    out = tmp_path / "lmdb"
    meta = run([str(tmp_path / "site"), "--out", str(out), "--size", "32", "--label", "1",
                "--clip-model", "none"])
    names = sorted(written)                       # list_slices order == by name here (3-digit numbers)
    n = len(names)
    assert meta["length"] == n and meta["sizes"] == [32] and meta["files"] == names
    assert meta["label"] == 1 and meta["n_domains"] == 3 and meta["n_zbins"] == 29 and meta["clip"] is None
    labels = np.load(out / "labels.npy", allow_pickle=False)
    zaxes = np.load(out / "zaxes.npy", allow_pickle=False)
    assert labels.dtype == np.int64 and labels.tolist() == [1] * n
    assert zaxes.dtype == np.int64 and zaxes.tolist() == zb.zbins_for_files(names).tolist()
    assert max(zaxes) <= 28 and not (out / "clip_mean.npy").exists()
    items = read_lmdb(out)
    assert items.pop(b"length") == str(n).encode()
    expected_keys = {f"32-{i:05d}-1-{zaxes[i]:02d}".encode() for i in range(n)}
    assert set(items) == expected_keys
    for i, name in enumerate(names):
        raw = items[f"32-{i:05d}-1-{zaxes[i]:02d}".encode()]
        assert raw == written[name].astype("<f4").tobytes()      # bit-exact, (32,32,1) C order
    assert entries(tmp_path) == ["lmdb", "site"]                  # no temp folder left


def test_every_requested_size_is_written_with_the_chosen_kernel(tmp_path):
    written = make_site(tmp_path / "site", {"v": range(4)})
    out = tmp_path / "lmdb"
    run([str(tmp_path / "site"), "--out", str(out), "--size", "16,32,64", "--resample", "area",
         "--label", "0", "--clip-model", "none"])
    items = read_lmdb(out)
    zaxes = np.load(out / "zaxes.npy")
    for i, name in enumerate(sorted(written)):
        data = written[name][..., 0]
        tail = f"{i:05d}-0-{zaxes[i]:02d}"
        small = np.frombuffer(items[f"16-{tail}".encode()], "<f4").reshape(16, 16)
        np.testing.assert_allclose(small, data.reshape(16, 2, 16, 2).mean(axis=(1, 3)), atol=1e-6)  # 2x2 means
        assert items[f"32-{tail}".encode()] == written[name].tobytes()
        big = np.frombuffer(items[f"64-{tail}".encode()], "<f4").reshape(64, 64)
        assert big.min() >= -1 and big.max() <= 1
    # other kernels run and differ
    outs = {}
    for method in ("bilinear", "bicubic", "lanczos"):
        o = tmp_path / method
        run([str(tmp_path / "site"), "--out", str(o), "--size", "64", "--resample", method, "--label", "0",
             "--clip-model", "none"])
        (key,) = [k for k in read_lmdb(o) if k.startswith(b"64-00000")]
        outs[method] = read_lmdb(o)[key]
    assert len(set(outs.values())) == 3


def test_workers_give_identical_output(tmp_path):
    make_site(tmp_path / "site", {"v": range(6), "w": [1, 4, 9]})
    run([str(tmp_path / "site"), "--out", str(tmp_path / "a"), "--size", "32", "--label", "2",
         "--clip-model", "none"])
    run([str(tmp_path / "site"), "--out", str(tmp_path / "b"), "--size", "32", "--label", "2",
         "--clip-model", "none", "--workers", "1"])
    assert read_lmdb(tmp_path / "a") == read_lmdb(tmp_path / "b")
    write_slice(tmp_path / "site" / "w_slice004.npz", np.zeros((32, 32, 1), np.float32),
                mask=np.zeros((32, 32, 2), bool))
    _expect_error(tmp_path, [str(tmp_path / "site"), "--out", str(tmp_path / "c"), "--size", "32", "--label", "2",
                             "--clip-model", "none", "--workers", "1"], r"w_slice004\.npz: 'mask' is not one-hot")


# --------------------------------------------------------------------------- CLIP

def _direct_clip_mean(model: torch.nn.Module, images: List[np.ndarray], size: int) -> np.ndarray:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).repeat(1, 3, 1, 1)
    x = F.interpolate((x + 1) / 2, size=(size, size), mode="bicubic", align_corners=False)
    x = (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = model.encode_image(x)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    return emb.mean(0, keepdim=True).numpy()


def test_clip_mean_matches_direct_computation_with_local_weights(tmp_path, tiny_clip_48px):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip_48px, pretrained=None).eval()
    weights = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), weights)
    written = make_site(tmp_path / "site", {"v": range(5)})
    out = tmp_path / "lmdb"
    meta = run([str(tmp_path / "site"), "--out", str(out), "--size", "32", "--label", "0",
                "--clip-model", tiny_clip_48px, "--clip-pretrained", str(weights), "--no-clip-quick-gelu",
                "--clip-batch", "2", "--device", "cpu"])
    mean = np.load(out / "clip_mean.npy", allow_pickle=False)
    assert mean.dtype == np.float32 and mean.shape == (1, 16)          # width read from the model
    assert meta["clip"]["embed_dim"] == 16 and meta["clip"]["image_size"] == [48, 48]
    expected = _direct_clip_mean(model, [written[k] for k in sorted(written)], 48)
    np.testing.assert_allclose(mean, expected, rtol=1e-4, atol=1e-5)
    assert 0.0 < np.linalg.norm(mean) < 1.0                                # mean of unit vectors, not re-normalised
    # a random model (weights not loaded) gives something else
    other = _direct_clip_mean(open_clip.create_model(tiny_clip_48px, pretrained=None).eval(),
                              [written[k] for k in sorted(written)], 48)
    assert not np.allclose(mean, other, atol=1e-3)


def test_clip_encoder_defaults_quick_gelu_for_weight_files(tmp_path, tiny_clip_48px):
    import open_clip

    weights = tmp_path / "w.pt"
    torch.save(open_clip.create_model(tiny_clip_48px).state_dict(), weights)
    assert load_clip_encoder(tiny_clip_48px, str(weights), "cpu").info["quick_gelu"] is True
    with pytest.raises(InputError, match="cannot load CLIP weights 'openai' for " + tiny_clip_48px):
        load_clip_encoder(tiny_clip_48px, "openai", "cpu")
    with pytest.raises(InputError, match="missing.pt"):
        load_clip_encoder(tiny_clip_48px, str(tmp_path / "missing.pt"), "cpu")
    with pytest.raises(InputError, match="unknown CLIP model 'no-such-model'"):
        load_clip_encoder("no-such-model", None, "cpu")


def _cli(args: List[str], env_extra: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, str(REPO / "prepare_data.py"), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_help_documents_every_flag():
    proc = _cli(["--help"])
    assert proc.returncode == 0
    for flag in ("--out", "--size", "--resample", "--label", "--n-domains", "--n-zbins", "--clip-model",
                 "--clip-pretrained", "--clip-batch", "--device", "--workers", "--overwrite"):
        assert flag in proc.stdout


def test_cli_offline_openai_weights_is_one_line_error(tmp_path):
    make_site(tmp_path / "site", {"v": range(2)})
    proc = _cli([str(tmp_path / "site"), "--out", str(tmp_path / "lmdb"), "--size", "32", "--label", "0"],
                {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: cannot load CLIP weights 'openai' for ViT-L-14 (offline?): pass a local file with "
        "--clip-pretrained PATH, or --clip-model none")
    assert entries(tmp_path) == ["site"]


# --------------------------------------------------------------------------- bad input

def _expect_error(tmp_path: Path, argv: List[str], match: str) -> None:
    before = entries(tmp_path)
    with pytest.raises(InputError, match=match):
        prepare_data.main(argv + ["--quiet"])
    assert entries(tmp_path) == before          # nothing half-written, no temp folder


def _base(tmp_path: Path, *extra: str) -> List[str]:
    return [str(tmp_path / "site"), "--out", str(tmp_path / "lmdb"), "--label", "0", "--clip-model", "none",
            *extra]


def test_empty_folder(tmp_path):
    (tmp_path / "site").mkdir()
    _expect_error(tmp_path, _base(tmp_path), r"site: no slice files")


@pytest.mark.parametrize("case", ["truncated", "garbage", "float64", "int_mask", "not_one_hot", "out_of_range",
                                  "no_data"])
def test_bad_slice_files_name_the_file(tmp_path, case):
    make_site(tmp_path / "site", {"v": range(3)})
    bad = tmp_path / "site" / "v_slice001.npz"
    data = np.zeros((32, 32, 1), np.float32)
    if case == "truncated":
        bad.write_bytes(bad.read_bytes()[:300])
    elif case == "garbage":
        bad.write_bytes(b"not a zip file at all")
    elif case == "float64":
        write_slice(bad, data, data=data.astype(np.float64))
    elif case == "int_mask":
        write_slice(bad, data, mask=np.ones((32, 32, 2), np.int64))
    elif case == "not_one_hot":
        write_slice(bad, data, mask=np.ones((32, 32, 2), bool))
    elif case == "out_of_range":
        write_slice(bad, data + 1.5)
    elif case == "no_data":
        write_slice(bad, data, data=None)
    _expect_error(tmp_path, _base(tmp_path, "--size", "32"), r"v_slice001\.npz")


def test_size_differs_from_request_without_resample(tmp_path):
    make_site(tmp_path / "site", {"v": range(3)}, size=32)
    _expect_error(tmp_path, _base(tmp_path), r"v_slice000\.npz: slice size 32 differs from --size 512.*--resample")


def test_mixed_sizes(tmp_path):
    make_site(tmp_path / "site", {"a": range(2)}, size=32)
    make_site(tmp_path / "site", {"b": range(2)}, size=16)
    _expect_error(tmp_path, _base(tmp_path, "--size", "32", "--resample", "area"),
                  r"b_slice000\.npz: slice size 16 differs from 32")


def test_label_out_of_range(tmp_path):
    make_site(tmp_path / "site", {"v": range(2)})
    argv = [str(tmp_path / "site"), "--out", str(tmp_path / "lmdb"), "--size", "32", "--label", "5",
            "--n-domains", "3", "--clip-model", "none"]
    _expect_error(tmp_path, argv, r"--label 5 out of range.*0\.\.2")


def test_existing_out_refused_and_overwrite_only_on_success(tmp_path):
    make_site(tmp_path / "site", {"v": range(3)})
    out = tmp_path / "lmdb"
    out.mkdir()
    (out / "old.txt").write_text("old")
    _expect_error(tmp_path, _base(tmp_path, "--size", "32"), r"lmdb: output already exists.*--overwrite")
    # a failing --overwrite run keeps the old content
    write_slice(tmp_path / "site" / "v_slice002.npz", np.zeros((32, 32, 1)), data=np.zeros((32, 32, 1)))
    _expect_error(tmp_path, _base(tmp_path, "--size", "32", "--overwrite"), r"v_slice002\.npz")
    assert (out / "old.txt").read_text() == "old"
    # a successful one replaces it
    (tmp_path / "site" / "v_slice002.npz").unlink()
    run(_base(tmp_path, "--size", "32", "--overwrite"))
    assert not (out / "old.txt").exists() and (out / "meta.json").exists()
    assert entries(tmp_path) == ["lmdb", "site"]


def test_out_inside_input_is_refused(tmp_path):
    make_site(tmp_path / "site", {"v": range(2)})
    argv = [str(tmp_path / "site"), "--out", str(tmp_path), "--size", "32", "--label", "0",
            "--clip-model", "none", "--overwrite"]
    _expect_error(tmp_path, argv, "--out contains the input PATH")


def test_full_zbin_coverage_with_29_plus_slices_per_volume_and_recursive(tmp_path):
    site = tmp_path / "site"
    make_site(site / "labeled", {"a": [2 * k + 1 for k in range(29)]}, size=16, seed=1)   # 29, gaps
    make_site(site / "unlabeled", {"b": range(40)}, size=16, seed=2)
    make_site(site / "unlabeled", {"a": [100]}, size=16, seed=3)                           # a's 30th slice
    out = tmp_path / "lmdb"
    meta = run([str(site), "--out", str(out), "--size", "16", "--label", "0", "--clip-model", "none",
                "--recursive"])
    zaxes = np.load(out / "zaxes.npy")
    assert meta["length"] == 70 and meta["files"][0] == "labeled/a_slice001.npz"
    for vol in ("a", "b"):
        bins = [z for f, z in zip(meta["files"], zaxes) if f.split("/")[1].startswith(vol + "_")]
        assert sorted(set(bins)) == list(range(29))
    # without --recursive the subfolders are not read
    _expect_error(tmp_path, [str(site), "--out", str(tmp_path / "x"), "--size", "16", "--label", "0",
                             "--clip-model", "none"], "no slice files")


# --------------------------------------------------------------------------- chain with MultiMedSeg preprocessing

def test_chain_preprocessed_sites_to_lmdb(preprocessed_sites, tmp_path, tiny_clip_48px):
    """phantom -> MultiMedSeg preprocessing -> prepare_data for the 3 sites (labels 0, 1, 2)."""
    from robustmedseg.data.slices import load_slice, slice_index, volume_id
    from robustmedseg.data.dataset import LMDBSlices

    for label, site_dir in sorted(preprocessed_sites.items()):
        out = tmp_path / f"lmdb{label}"
        clip = ["--clip-model", "none"]
        if label == 0:
            import open_clip
            weights = tmp_path / "w.pt"
            torch.save(open_clip.create_model(tiny_clip_48px).state_dict(), weights)
            clip = ["--clip-model", tiny_clip_48px, "--clip-pretrained", str(weights)]
        meta = run([str(site_dir / "train"), "--out", str(out), "--size", "32", "--label", str(label),
                    "--recursive", *clip])
        # the one slice order of both phases: volume id, then slice number (then path)
        files = sorted(site_dir.glob("train/**/*.npz"), key=lambda p: (volume_id(p), slice_index(p), str(p)))
        assert meta["length"] == len(files) > 0
        ds = LMDBSlices(out)
        volumes: Dict[str, List] = {}
        for i, path in enumerate(files):
            img, target = ds[i]
            assert torch.equal(img[0], torch.from_numpy(load_slice(path)["data"][..., 0]))
            assert int(target[0]) == label
            volumes.setdefault(volume_id(path), []).append((slice_index(path), int(target[1])))
        for members in volumes.values():
            members.sort()
            bins = [b for _, b in members]
            depth = len(bins)
            assert bins == [r * 29 // depth for r in range(depth)] and max(bins) <= 28
        assert (ds.clip_mean() is not None) == (label == 0)
    assert np.load(tmp_path / "lmdb0" / "clip_mean.npy").shape == (1, 16)


def test_chain_phantom_volume_depth_covers_all_zbins(phantom_dir, tmp_path):
    """Phantom volumes keep >= 29 slices without cropping or z-split: every z-bin 0..28 is used."""
    from MultiMedSeg.data.volumes_to_slices import PreprocessConfig, preprocess

    prep = tmp_path / "prep"
    preprocess(PreprocessConfig(images=phantom_dir / "site0" / "images", labels=phantom_dir / "site0" / "labels",
                                out=prep, size=32, num_classes=3, val_frac=0.25, test_frac=0.25, seed=0, crop=False),
               log=lambda *a: None)
    out = tmp_path / "lmdb"
    meta = run([str(prep / "train"), "--out", str(out), "--size", "32", "--label", "0", "--clip-model", "none"])
    zaxes = np.load(out / "zaxes.npy")
    per_volume: Dict[str, set] = {}
    for name, z in zip(meta["files"], zaxes):
        per_volume.setdefault(name.rsplit("_slice", 1)[0], set()).add(int(z))
    counts = {v: sum(f.startswith(v + "_slice") for f in meta["files"]) for v in per_volume}
    assert per_volume and min(counts.values()) >= 29
    assert all(bins == set(range(29)) for bins in per_volume.values())


def test_map_size_estimate_and_growth(tmp_path, monkeypatch):
    from robustmedseg.data import lmdb_store

    assert lmdb_store.estimate_map_size(1000, [512]) >= 1000 * 512 * 512 * 4   # room for the images
    written = make_site(tmp_path / "site", {"v": range(12)}, size=64)
    monkeypatch.setattr(lmdb_store, "estimate_map_size", lambda n, sizes: 64 * 1024)  # far too small
    run([str(tmp_path / "site"), "--out", str(tmp_path / "lmdb"), "--size", "64", "--label", "0",
         "--clip-model", "none"])
    values = [v for k, v in read_lmdb(tmp_path / "lmdb").items() if k != b"length"]
    assert sorted(values) == sorted(d.tobytes() for d in written.values())


# --------------------------------------------------------------------------- reading slices, options, side files
def test_phase1_reading_refuses_values_outside_the_range(tmp_path):
    data, _ = good()
    data[0, 0, 0] = 1.5
    path = tmp_path / "v_slice000.npz"  # written by hand: save_slice itself refuses such values
    np.savez(path, data=data)
    assert message(lmdb_store.read_slice_data, path) == f"{path}: 'data' values must lie in [-1, 1], found [0, 1.5]"
    data[0, 0, 0] = np.nan
    np.savez(tmp_path / "v_slice001.npz", data=data)
    assert "1 non-finite value(s)" in message(lmdb_store.read_slice_data, tmp_path / "v_slice001.npz")
    data[0, 0, 0] = 1.0
    np.testing.assert_array_equal(lmdb_store.read_slice_data(save_slice(tmp_path / "v_slice002.npz", data)), data)


@pytest.mark.parametrize("change,text", [
    (dict(n_domains=0), "--n-domains must be >= 1, got 0"),
    (dict(label=3), "--label 3 out of range: domain labels are 0..2 (--n-domains 3)"),
    (dict(label=-1), "--label -1 out of range: domain labels are 0..2 (--n-domains 3)"),
    (dict(n_zbins=0), "--n-zbins must be >= 1, got 0"),
    (dict(sizes=(16, 16)), "--size must list distinct sizes, got [16, 16]"),
    (dict(sizes=(0,)), "--size 0: size must be a power of two in [16, 1024], got 0 (train.py would refuse it)"),
    (dict(sizes=(24,)), "--size 24: size must be a power of two in [16, 1024], got 24 (train.py would refuse it)"),
    (dict(sizes=()), "--size must list distinct sizes, got []"),
    (dict(workers=-1), f"--workers must be in [0, {4 * (os.cpu_count() or 1)}] (4 x the CPU count), got -1"),
    (dict(clip_batch=0), "--clip-batch must be >= 1, got 0"),
])
def test_prepare_options_are_checked(tmp_path, change, text):
    opts = lmdb_store.PrepareOptions(source=tmp_path / "src", out=tmp_path / "out", **{"label": 2, **change})
    assert message(lmdb_store.check_options, opts) == text


def test_prepare_output_location_is_checked(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for out, relation in ((src, "is"), (tmp_path, "contains")):
        opts = lmdb_store.PrepareOptions(source=src, out=out, label=0)
        assert message(lmdb_store.check_options, opts) == \
            f"{out}: --out {relation} the input PATH {src}: an output must be apart from every input " \
            "(it could be replaced or deleted)"
    (tmp_path / "file").write_text("x")
    opts = lmdb_store.PrepareOptions(source=src, out=tmp_path / "file", label=0)
    assert message(lmdb_store.check_options, opts) == f"{tmp_path / 'file'}: output already exists (pass --overwrite to replace it)"
    opts = dataclasses.replace(opts, overwrite=True)
    assert message(lmdb_store.check_options, opts) == f"{tmp_path / 'file'}: output exists and is not a folder"
    lmdb_store.check_options(lmdb_store.PrepareOptions(source=src, out=tmp_path / "new", label=0))


def test_side_files_are_checked(tmp_path):
    path = tmp_path / "labels.npy"
    assert message(lmdb_store.load_int_array, path, 3) == f"{path}: missing LMDB side file"
    np.save(path, np.arange(3, dtype=np.int32))
    got = lmdb_store.load_int_array(path, 3)
    assert got.dtype == np.int64 and got.tolist() == [0, 1, 2]
    assert message(lmdb_store.load_int_array, path, 4) == \
        f"{path}: expected an integer array of shape (4,), got int32 (3,)"
    np.save(path, np.zeros(3, np.float32))
    assert "got float32 (3,)" in message(lmdb_store.load_int_array, path, 3)
    assert lmdb_store.load_clip_mean(tmp_path) is None
    clip = tmp_path / lmdb_store.CLIP_MEAN_FILE
    np.save(clip, np.ones((1, 5)))
    assert lmdb_store.load_clip_mean(tmp_path).dtype == np.float32
    for bad in (np.ones((2, 5)), np.ones(5), np.ones((1, 5), np.int64)):
        np.save(clip, bad)
        assert message(lmdb_store.load_clip_mean, tmp_path) == \
            f"{clip}: expected a float (1, D) array, got {bad.dtype} {bad.shape}"
    meta = tmp_path / lmdb_store.META_FILE
    assert message(lmdb_store.load_meta, tmp_path) == f"{tmp_path}: missing {lmdb_store.META_FILE} (not a prepare_data.py output?)"
    meta.write_text('{"sizes": []}')
    assert message(lmdb_store.load_meta, tmp_path) == f"{meta}: no 'sizes' list in metadata"
    meta.write_text("{")
    assert message(lmdb_store.load_meta, tmp_path).startswith(f"{meta}: cannot read (")


# --------------------------------------------------------------------------- CLIP encoder
def test_clip_encoder_settings_and_mean(tiny_clip):
    import torch

    from robustmedseg.data import clip_embed

    enc = clip_embed.load_clip_encoder(TINY_CLIP, tiny_clip["pretrained"], device="cpu")
    assert enc.info == {"model": TINY_CLIP, "pretrained": tiny_clip["pretrained"], "quick_gelu": True,
                        "embed_dim": 16, "image_size": [32, 32], "mean": list(clip_embed.OPENAI_MEAN),
                        "std": list(clip_embed.OPENAI_STD)}
    assert enc.embed_dim == 16 and enc.image_size == (32, 32)
    assert not clip_embed.load_clip_encoder(TINY_CLIP, tiny_clip["pretrained"], "cpu", quick_gelu=False).info[
        "quick_gelu"]
    rng = np.random.default_rng(0)
    images = [np.tanh(rng.normal(size=(24, 24, 1))).astype(np.float32) for _ in range(5)]
    rows = enc.encode(torch.from_numpy(np.stack([im[..., 0] for im in images]))[:, None])
    assert rows.shape == (5, 16) and torch.allclose(rows.norm(dim=1), torch.ones(5), atol=1e-5)
    x = torch.from_numpy(np.stack([im[..., 0] for im in images]))[:, None].repeat(1, 3, 1, 1)
    x = torch.nn.functional.interpolate((x + 1) / 2, size=(32, 32), mode="bicubic", align_corners=False)
    mean = torch.tensor(clip_embed.OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(clip_embed.OPENAI_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = torch.nn.functional.normalize(enc.model.encode_image((x - mean) / std).float(), dim=-1)
    torch.testing.assert_close(rows, want)
    got = clip_embed.clip_mean_of(enc, images, batch_size=2)
    assert got.shape == (1, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, rows.double().mean(0, keepdim=True).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match=r"^expected \(B, 1, H, W\) images, got \(2, 3, 4, 4\)$"):
        enc.encode(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="no embedding was added"):
        clip_embed.MeanAccumulator().mean()


def test_clip_encoder_errors_and_weight_kinds(tmp_path, tiny_clip):
    from robustmedseg.data import clip_embed

    assert message(clip_embed.load_clip_encoder, "no-such-model", None) == \
        "unknown CLIP model 'no-such-model' (see open_clip.list_models()), or use --clip-model none"
    missing = str(tmp_path / "w.pt")
    assert message(clip_embed.load_clip_encoder, TINY_CLIP, missing) == \
        f"{missing}: CLIP weights file not found (--clip-pretrained)"
    assert message(clip_embed.load_clip_encoder, TINY_CLIP, "some_tag", "cpu") == \
        f"cannot load CLIP weights 'some_tag' for {TINY_CLIP} (offline?): pass a local file with " \
        "--clip-pretrained PATH, or --clip-model none"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torch")
    assert message(clip_embed.load_clip_encoder, TINY_CLIP, str(bad), "cpu").startswith(
        f"{bad}: cannot load CLIP weights for {TINY_CLIP}: ")
    assert clip_embed._is_tag("openai") and clip_embed._is_tag("laion2b_s34b_b79k")
    for path in ("w.pt", "w.pth", "w.bin", "w.safetensors", f"dir{__import__('os').sep}w", str(bad)):
        assert not clip_embed._is_tag(path), path
    assert clip_embed._default_quick_gelu("ViT-B-32", str(bad)) is True  # local files: OpenAI weights
    assert clip_embed._default_quick_gelu("ViT-B-32", "openai") is True
    assert clip_embed._default_quick_gelu("ViT-B-32", "laion2b_s34b_b79k") is False
    enc = clip_embed.load_clip_encoder(TINY_CLIP, None, "cpu")  # random weights: plain GELU
    assert enc.info["quick_gelu"] is False and enc.info["pretrained"] is None
