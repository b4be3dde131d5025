"""Readers of a prepare_data.py LMDB folder: LMDBSlices and the Fed-BioMed FedSliceDataset."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Dict

import lmdb
import numpy as np
import pytest
import torch

from builders import input_error_message as message, one_hot_slice as good
from robustmedseg.data import lmdb_store
from robustmedseg.data.dataset import FedSliceDataset, LMDBSlices, fed_slice_dataset
from robustmedseg.data.lmdb_store import PrepareOptions, prepare_lmdb
from robustmedseg.data.slices import save_slice
from robustmedseg.errors import InputError

LABEL = 2


def _make_slices(folder: Path) -> Dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for vol, numbers in {"p": [0, 2, 4, 6, 8], "q": range(3, 9)}.items():
        for n in numbers:
            data = rng.uniform(-1, 1, (32, 32, 1)).astype(np.float32)
            mask = np.eye(2, dtype=bool)[(data[..., 0] > 0).astype(int)]
            name = f"{vol}_slice{n:03d}.npz"
            with open(folder / name, "wb") as handle:
                np.savez(handle, data=data, mask=mask)
            written[name] = data
    return written


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    written = _make_slices(root / "slices")
    out = root / "lmdb"
    prepare_lmdb(PrepareOptions(source=root / "slices", out=out, label=LABEL, sizes=(32, 16), resample="area",
                                clip_model=None, progress=False))
    clip_mean = np.linspace(-0.1, 0.1, 12, dtype=np.float32)[None]
    np.save(out / "clip_mean.npy", clip_mean)          # stands in for a CLIP run (tested elsewhere)
    return out, [written[k] for k in sorted(written)], clip_mean


def _copy(out: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def test_items_match_inputs_and_targets(prepared):
    out, images, clip_mean = prepared
    ds = LMDBSlices(out)                                # default resolution = first size in meta.json
    assert ds.resolution == 32 and len(ds) == len(images) == 11
    zaxes = np.load(out / "zaxes.npy")
    for i, data in enumerate(images):
        img, target = ds[i]
        assert img.dtype == torch.float32 and img.shape == (1, 32, 32)
        assert torch.equal(img[0], torch.from_numpy(data[..., 0]))
        assert target.dtype == torch.long and target.tolist() == [LABEL, int(zaxes[i])]
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds[len(ds)]
    # volume p: 5 slices -> bins floor(r*29/5); volume q: 6 slices -> floor(r*29/6)
    assert [int(ds[i][1][1]) for i in range(11)] == [0, 5, 11, 17, 23, 0, 4, 9, 14, 19, 24]
    np.testing.assert_array_equal(ds.clip_mean(), clip_mean)


def test_other_resolution_and_bad_resolution(prepared):
    out, images, _ = prepared
    ds = LMDBSlices(out, resolution=16)
    img, _ = ds[3]
    assert img.shape == (1, 16, 16)
    np.testing.assert_allclose(img[0].numpy(), images[3][..., 0].reshape(16, 2, 16, 2).mean(axis=(1, 3)),
                               atol=1e-6)
    with pytest.raises(InputError, match=r"resolution 64 not in the LMDB \(sizes \[32, 16\]\)"):
        LMDBSlices(out, resolution=64)


def test_dataloader_workers_and_pickling(prepared):
    out, images, _ = prepared
    ds = LMDBSlices(out)
    ds[0]                                                   # environment opened in the parent first
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, shuffle=False)
    batches = list(loader)
    imgs = torch.cat([b[0] for b in batches])
    assert imgs.shape == (11, 1, 32, 32)
    assert torch.equal(imgs[:, 0], torch.from_numpy(np.stack(images)[..., 0]))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._env is None and torch.equal(clone[5][0], ds[5][0])


def _delete_key(folder: Path, key: bytes) -> None:
    env = lmdb.open(str(folder), lock=False)
    with env.begin(write=True) as txn:
        assert txn.delete(key)
    env.close()


@pytest.mark.parametrize("damage, match", [
    ("length", r"copy: LMDB has no 'length' key"),
    ("image", r"copy: LMDB has no image key '16-00004-2-23'"),
    ("labels.npy", r"copy/labels\.npy: missing LMDB side file"),
    ("zaxes.npy", r"copy/zaxes\.npy: missing LMDB side file"),
    ("meta.json", r"copy: missing meta\.json"),
    ("data.mdb", r"copy: cannot open LMDB"),
])
def test_damaged_lmdb_is_a_clear_error(prepared, tmp_path, damage, match):
    out, _, _ = prepared
    folder = _copy(out, tmp_path)
    if damage == "length":
        _delete_key(folder, b"length")
    elif damage == "image":
        _delete_key(folder, b"16-00004-2-23")
    else:
        (folder / damage).unlink()
    with pytest.raises(InputError, match=match):
        LMDBSlices(folder, resolution=16)


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="nowhere: LMDB folder not found"):
        LMDBSlices(tmp_path / "nowhere")


def test_fed_dataset_through_the_node_code_path(prepared):
    """Mimic fedbiomed.node.round.Round._split_train_and_test_data without starting a node."""
    from fedbiomed.common.constants import TrainingPlans
    from fedbiomed.common.datamanager import DataManager

    out, images, clip_mean = prepared
    dm = DataManager(dataset=fed_slice_dataset(16), shuffle=False)     # what the plan's training_data() returns
    dm.extend_loader_args({"batch_size": 4})                          # training_args["loader_args"]
    dm.load(tp_type=TrainingPlans.TorchTrainingPlan)
    dm.load_dataset(root=str(out))                                    # registered path = the LMDB folder
    dm.load_state({"testing_index": [], "training_index": [], "test_ratio": None})
    train_loader, test_loader = dm.split(test_ratio=0.0, test_batch_size=None, is_shuffled_testing_dataset=False)
    data, target = next(iter(train_loader))
    assert data.shape == (4, 1, 16, 16) and data.dtype == torch.get_default_dtype()
    assert target.shape == (4, 2) and target.dtype == torch.long and (target[:, 0] == LABEL).all()
    assert sum(len(b[0]) for b in train_loader) == len(images)
    dataset = dm._dataset
    assert isinstance(dataset, FedSliceDataset) and dataset.resolution == 16 and str(dataset.path) == str(out)
    np.testing.assert_array_equal(dataset.clip_mean(), clip_mean)


def test_fed_dataset_default_resolution_and_errors(prepared, tmp_path):
    from fedbiomed.common.dataset_types import DataReturnFormat
    from fedbiomed.common.exceptions import FedbiomedError

    out, images, _ = prepared
    ds = FedSliceDataset()
    ds.load(root=str(out), to_format=DataReturnFormat.TORCH)
    assert ds.resolution == 32 and len(ds) == len(images)
    img, target = ds[0]
    assert torch.equal(img[0], torch.from_numpy(images[0][..., 0]))
    with pytest.raises(FedbiomedError, match="nowhere: LMDB folder not found"):
        fed_slice_dataset(32).load(root=str(tmp_path / "nowhere"), to_format=DataReturnFormat.TORCH)


def test_several_readers_of_one_folder_and_a_replaced_folder(prepared, tmp_path):
    out, images, _ = prepared
    a, b = LMDBSlices(out, 32), LMDBSlices(out, 16)             # one environment per process, shared
    assert a[1][0].shape == (1, 32, 32) and b[1][0].shape == (1, 16, 16)
    folder = _copy(out, tmp_path)
    old = LMDBSlices(folder)
    first = old[0][0].clone()
    shutil.rmtree(folder)
    shutil.copytree(out, folder)                                # replaced on disk (new data.mdb inode)
    _delete_key(folder, b"32-00000-2-00")
    with pytest.raises(InputError, match="no image key '32-00000-2-00'"):
        LMDBSlices(folder)
    assert torch.equal(old[0][0], first)                        # the old reader still works


# --------------------------------------------------------------------------- format, errors, side files
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
