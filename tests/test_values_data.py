"""robustmedseg.data: the exact one-line errors of the slice and LMDB formats, and the option checks
(each message names the file or flag and the offending value; found missing by mutation testing)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from robustmedseg.data import lmdb_store
from robustmedseg.data.slices import group_slices_by_volume, list_slices, load_slice, save_slice, validate_slice
from robustmedseg.errors import InputError


def message(fn, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def good(h=4, w=4, c=3):
    data = np.zeros((h, w, 1), np.float32)
    mask = np.zeros((h, w, c), bool)
    mask[..., 0] = True
    return data, mask


def test_validate_slice_messages():
    data, mask = good()
    p = "s.npz"
    assert message(validate_slice, {"data": data, "extra": data}, p) == "s.npz: unexpected keys ['extra'] in slice file"
    assert message(validate_slice, {"mask": mask}, p) == "s.npz: slice file has no 'data' array"
    assert message(validate_slice, {"data": data[..., 0]}, p) == "s.npz: 'data' must be float32 (H, W, 1), got float32 (4, 4)"
    assert message(validate_slice, {"data": data.astype(np.float64)}, p).endswith("got float64 (4, 4, 1)")
    assert message(validate_slice, {"data": data}, p, require_mask=True) == \
        "s.npz: slice file has no 'mask' array (unlabeled volume?)"
    assert message(validate_slice, {"data": data, "mask": mask[..., :1]}, p) == \
        "s.npz: 'mask' must be bool (H, W, C>=2) matching 'data' (4, 4, 1), got bool (4, 4, 1)"
    assert "got uint8 (4, 4, 3)" in message(validate_slice, {"data": data, "mask": mask.astype(np.uint8)}, p)
    assert "got bool (4, 5, 3)" in message(validate_slice, {"data": data, "mask": np.ones((4, 5, 3), bool)}, p)
    two = mask.copy()
    two[0, 0, 1] = True
    assert message(validate_slice, {"data": data, "mask": two}, p) == \
        "s.npz: 'mask' is not one-hot (each pixel needs exactly one True channel)"
    assert message(validate_slice, {"data": data, "weight": np.ones((4, 4), bool)}, p) == \
        "s.npz: 'weight' must be bool (H, W, 1), got bool (4, 4)"
    assert "got float32 (4, 4, 1)" in message(validate_slice, {"data": data, "weight": data}, p)
    validate_slice({"data": data, "mask": mask, "weight": np.ones((4, 4, 1), bool)}, p, require_mask=True)


def test_slice_files_round_trip_and_errors(tmp_path):
    data, mask = good()
    weight = np.ones((4, 4, 1), bool)
    weight[0, 0, 0] = False
    path = save_slice(tmp_path / "v_slice003.npz", data, mask, weight)
    got = load_slice(path)
    np.testing.assert_array_equal(got["data"], data)
    np.testing.assert_array_equal(got["mask"], mask)
    np.testing.assert_array_equal(got["weight"], weight)
    assert load_slice(save_slice(tmp_path / "v_slice004.npz", data))["weight"] is None
    assert message(load_slice, tmp_path / "v_slice009.npz") == f"{tmp_path / 'v_slice009.npz'}: slice file does not exist"
    (tmp_path / "bad_slice001.npz").write_bytes(b"junk")
    assert "cannot read slice file (corrupt, truncated or not an .npz archive)" in \
        message(load_slice, tmp_path / "bad_slice001.npz")
    assert message(list_slices, tmp_path / "nope") == f"{tmp_path / 'nope'}: slice folder does not exist"


def test_grouping_by_volume_and_duplicate_indices(tmp_path):
    data, _ = good()
    for rel in ("a/v_slice002.npz", "a/v_slice010.npz", "a/w_slice001.npz", "b/v_slice1.npz", "b/v_slice010.npz"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        save_slice(tmp_path / rel, data)
    groups = group_slices_by_volume(tmp_path / "a")
    assert list(groups) == ["v", "w"] and [p.name for p in groups["v"]] == ["v_slice002.npz", "v_slice010.npz"]
    assert [p.name for p in list_slices(tmp_path, recursive=True)] == \
        ["v_slice1.npz", "v_slice002.npz", "v_slice010.npz", "v_slice010.npz", "w_slice001.npz"]
    assert message(group_slices_by_volume, tmp_path, recursive=True) == \
        f"{tmp_path}: volume 'v' has several slice files with the same index"


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
    opts.overwrite = True
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


def test_lmdb_reader_index_and_resolution_errors(tmp_path):
    from robustmedseg.data.dataset import LMDBSlices

    src = tmp_path / "src"
    src.mkdir()
    data, _ = good(16, 16)
    for i in range(3):
        save_slice(src / f"v_slice{i:03d}.npz", data)
    out = tmp_path / "lmdb"
    lmdb_store.prepare_lmdb(lmdb_store.PrepareOptions(source=src, out=out, label=1, sizes=(16,), clip_model=None,
                                                      progress=False))
    meta = lmdb_store.load_meta(out)
    assert meta["format"] == "robustmedseg-slices-lmdb" and meta["length"] == 3 and meta["sizes"] == [16]
    assert meta["image_shape"] == "(size, size, 1)" and meta["dtype"] == "<f4"
    reader = LMDBSlices(out, 16)
    assert len(reader) == 3
    with pytest.raises(IndexError, match=r"^slice index 3 out of range 0\.\.2$"):
        reader.image(3)
    assert message(LMDBSlices, out, 32) == f"{out}: resolution 32 not in the LMDB (sizes [16])"
    assert message(LMDBSlices, tmp_path / "none", 16) == f"{tmp_path / 'none'}: LMDB folder not found"
    assert lmdb_store.load_int_array(out / "labels.npy", 3).tolist() == [1, 1, 1]  # the domain of every slice


def test_side_files_are_never_unpickled(tmp_path):
    """A pickled (object) array is refused with the reader's error, never loaded."""
    path = tmp_path / "labels.npy"
    np.save(path, np.array([1, "x", None], dtype=object), allow_pickle=True)
    text = message(lmdb_store.load_int_array, path, 3)
    assert text.startswith(f"{path}: cannot read (ValueError: ") and "pickle" in text
    clip = tmp_path / lmdb_store.CLIP_MEAN_FILE
    np.save(clip, np.array([[0.5, None]], dtype=object), allow_pickle=True)
    text = message(lmdb_store.load_clip_mean, tmp_path)
    assert text.startswith(f"{clip}: cannot read (ValueError: ") and "pickle" in text


# ------------------------------------------------------------------------------------------- CLIP encoder
from builders import TINY_CLIP  # noqa: E402  (the tiny local open_clip model of the tiny_clip fixture)


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


# ------------------------------------------------------------------------------------------- legacy slices
def test_legacy_slices_convert_exactly(tmp_path):
    from robustmedseg.data.slices import convert_legacy_folder, convert_legacy_slice

    src = tmp_path / "legacy"
    (src / "sub").mkdir(parents=True)
    labels = np.zeros((4, 5), np.int64)
    labels[1:3, 1:4] = 2
    mask = (labels[..., None] == np.arange(3)).astype(np.uint8)
    weight = np.ones((4, 5, 1))
    weight[0, 0, 0] = 0
    data = np.linspace(-1, 1, 20).reshape(4, 5)
    np.save(src / "v_slice7.npy", {"data": data, "mask": mask, "weight": weight}, allow_pickle=True)
    np.save(src / "sub" / "w_slice012.npy", {"data": data[..., None], "mask": None, "weight": np.ones((4, 5, 1))},
            allow_pickle=True)
    out = convert_legacy_slice(src / "v_slice7.npy", tmp_path / "one")
    assert out == tmp_path / "one" / "v_slice007.npz"
    got = load_slice(out)
    assert got["data"].dtype == np.float32 and got["data"].shape == (4, 5, 1)
    np.testing.assert_allclose(got["data"][..., 0], data.astype(np.float32))
    np.testing.assert_array_equal(got["mask"], mask.astype(bool))
    np.testing.assert_array_equal(got["weight"], weight.astype(bool))
    assert convert_legacy_folder(src, tmp_path / "all") == 2
    nested = load_slice(tmp_path / "all" / "sub" / "w_slice012.npz")
    assert nested["mask"] is None and nested["weight"] is None  # an all-ones weight is not stored
    assert message(convert_legacy_folder, src, tmp_path / "all") == \
        f"{tmp_path / 'all'}: output already exists (pass --overwrite to replace it)"
    assert convert_legacy_folder(src, tmp_path / "all", overwrite=True) == 2
    assert message(convert_legacy_folder, tmp_path / "one", tmp_path / "x") == \
        f"{tmp_path / 'one'}: no legacy <volume>_slice<NNN>.npy files found"
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "a_slice1.npy", {"mask": mask}, allow_pickle=True)
    np.save(bad / "b_slice1.npy", np.zeros(3), allow_pickle=True)
    (bad / "c_slice1.npy").write_bytes(b"junk")
    np.save(bad / "notaslice.npy", np.zeros(3))
    assert message(convert_legacy_slice, bad / "a_slice1.npy", tmp_path) == \
        f"{bad / 'a_slice1.npy'}: legacy slice is not a dict with a 'data' key"
    assert message(convert_legacy_slice, bad / "b_slice1.npy", tmp_path).startswith(
        f"{bad / 'b_slice1.npy'}: cannot read legacy slice: ")
    assert message(convert_legacy_slice, bad / "c_slice1.npy", tmp_path).startswith(
        f"{bad / 'c_slice1.npy'}: cannot read legacy slice: ")
    assert message(convert_legacy_slice, bad / "notaslice.npy", tmp_path) == \
        f"{bad / 'notaslice.npy'}: not a legacy slice file name (expected <volume>_slice<NNN>.npy)"
