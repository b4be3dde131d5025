"""Readers of a ``prepare_data.py`` LMDB folder (layout: :mod:`robustmedseg.data.lmdb_store`).

- :class:`LMDBSlices`: plain torch-style dataset, ``ds[i] -> (img, target)`` with ``img``
  float32 (1, R, R) in [-1, 1] and ``target`` int64 ``[domain, zbin]``.
- :class:`FedSliceDataset`: the same behind Fed-BioMed 6.4.1's ``CustomDataset`` API, for
  the node side of the training plan.  The registered dataset path is the LMDB FOLDER itself
  (no CSV indirection; docs/differences.md#d9-12).  Build it with :func:`fed_slice_dataset` in the plan's
  ``training_data()``; the node then calls ``load(root=<registered path>)``, which calls
  :meth:`FedSliceDataset.read`.

The LMDB environment is opened lazily and re-opened in every process that reads (DataLoader
workers, forked or spawned), read-only, without locks, readahead or meminit.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from fedbiomed.common.dataset import CustomDataset

from robustmedseg.errors import InputError

from .lmdb_store import (LABELS_FILE, LENGTH_KEY, ZAXES_FILE, image_key, load_clip_mean, load_int_array,
                         load_meta, open_readonly_env)

PathLike = Union[str, Path]


class LMDBSlices:
    """Slices of one LMDB folder at one resolution.

    ``resolution`` None picks the first size listed in ``meta.json``.  Everything is
    validated at construction (side files, ``length``, presence of every image key at that
    resolution); problems are one-line :class:`InputError` naming the folder/file and key.
    """

    def __init__(self, path: PathLike, resolution: Optional[int] = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError("LMDB folder not found", self.path)
        self.meta: Dict[str, Any] = load_meta(self.path)
        sizes = [int(s) for s in self.meta["sizes"]]
        self.resolution = int(resolution) if resolution is not None else sizes[0]
        if self.resolution not in sizes:
            raise InputError(f"resolution {self.resolution} not in the LMDB (sizes {sizes})", self.path)
        self._env: Any = None
        self._pid: Optional[int] = None
        self._length = self._read_length()
        self.labels = load_int_array(self.path / LABELS_FILE, self._length)
        self.zbins = load_int_array(self.path / ZAXES_FILE, self._length)
        self._keys = [image_key(self.resolution, i, int(lab), int(z))
                      for i, (lab, z) in enumerate(zip(self.labels, self.zbins))]
        self._check_keys()

    # -- LMDB access -------------------------------------------------------------------
    def _txn(self) -> Any:
        """A read transaction on this process's environment (re-opened after fork/spawn)."""
        if self._env is None or self._pid != os.getpid():
            self._env = open_readonly_env(self.path)  # shared per process, re-opened after fork
            self._pid = os.getpid()
        return self._env.begin(write=False, buffers=False)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_env"], state["_pid"] = None, None  # environments do not cross processes
        return state

    def _read_length(self) -> int:
        with self._txn() as txn:
            raw = txn.get(LENGTH_KEY)
        if raw is None:
            raise InputError("LMDB has no 'length' key", self.path)
        try:
            length = int(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError) as err:
            raise InputError(f"LMDB 'length' is not a decimal number: {raw[:20]!r}", self.path) from err
        if length < 0:
            raise InputError(f"LMDB 'length' is negative ({length})", self.path)
        return length

    def _check_keys(self) -> None:
        """Every image key exists (keys are scanned without reading the images)."""
        with self._txn() as txn:
            present = set(txn.cursor().iternext(keys=True, values=False))
        for key in self._keys:
            if key not in present:
                raise InputError(f"LMDB has no image key '{key.decode()}'", self.path)

    # -- dataset protocol ----------------------------------------------------------------
    def __len__(self) -> int:
        return self._length

    def image(self, index: int) -> np.ndarray:
        """Slice ``index`` as float32 (1, R, R) numpy array (a fresh, writable copy)."""
        if not -self._length <= index < self._length:
            raise IndexError(f"slice index {index} out of range 0..{self._length - 1}")
        index %= self._length
        key = self._keys[index]
        with self._txn() as txn:
            raw = txn.get(key)
        r = self.resolution
        if raw is None:
            raise InputError(f"LMDB has no image key '{key.decode()}'", self.path)
        if len(raw) != r * r * 4:
            raise InputError(f"LMDB value of '{key.decode()}' has {len(raw)} bytes, expected {r * r * 4}",
                             self.path)
        # (R, R, 1) C-order == (1, R, R) C-order: no transpose needed
        return np.frombuffer(raw, dtype="<f4").reshape(1, r, r).astype(np.float32, copy=True)

    def target(self, index: int) -> torch.Tensor:
        """int64 tensor ``[domain, zbin]`` of slice ``index``."""
        index %= self._length
        return torch.tensor([int(self.labels[index]), int(self.zbins[index])], dtype=torch.long)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.image(index)), self.target(index)

    def clip_mean(self) -> Optional[np.ndarray]:
        """float32 (1, D) mean CLIP embedding of this domain, or None (``--clip-model none``)."""
        return load_clip_mean(self.path)


class FedSliceDataset(CustomDataset):
    """Fed-BioMed 6.4.1 dataset over an LMDB folder (the registered path is the folder).

    Fed-BioMed forbids ``__init__``: the resolution is the attribute ``resolution`` (None:
    first size in meta.json), set before the node calls ``load`` -> :meth:`read`.  Use
    :func:`fed_slice_dataset` to create one.
    """

    resolution: Optional[int] = None
    _slices: Optional[LMDBSlices] = None

    def read(self) -> None:
        self._slices = LMDBSlices(self.path, self.resolution)
        self.resolution = self._slices.resolution

    def get_item(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.slices[index]

    def __len__(self) -> int:
        return 0 if self._slices is None else len(self._slices)

    @property
    def slices(self) -> LMDBSlices:
        if self._slices is None:
            raise RuntimeError("FedSliceDataset.read() has not run yet (the node calls load(root=...))")
        return self._slices

    def clip_mean(self) -> Optional[np.ndarray]:
        """float32 (1, D) ``clip_mean.npy`` of the registered folder, or None."""
        return self.slices.clip_mean()

    @classmethod
    def at_resolution(cls, resolution: Optional[int] = None) -> "FedSliceDataset":
        dataset = cls()
        dataset.resolution = None if resolution is None else int(resolution)
        return dataset


def fed_slice_dataset(resolution: Optional[int] = None) -> FedSliceDataset:
    """A :class:`FedSliceDataset` that will read its node's LMDB at ``resolution``.

    In a training plan: ``return DataManager(dataset=fed_slice_dataset(size), shuffle=True,
    drop_last=True)``.
    """
    return FedSliceDataset.at_resolution(resolution)
