"""Phase-2 datasets (docs/method.md#datasets ``ImagesDataset``) over folders of ``<vol>_slice<NNN>.npz`` files.

:class:`ImagesDataset` -- the training set.  Source slices (domain 0) and target slices
(domain 1: the ``labeled`` folder, then the optional ``unlabeled`` folder) are interleaved:
with both domains, even index ``i`` is source ``(i//2) mod n_src`` and odd index ``i`` is
target ``(i//2) mod n_tgt``; the length is ``2*max(n_src, n_tgt)`` (minus one when
``n_src > n_tgt``), at least ``min_length``, indices taken modulo the natural length.

* ``has_gt`` is True for source slices and for *labeled target* slices: labeled-folder
  slices whose weight is not all zero and whose mask is not all background.  With
  ``one_target_slice`` only the middle one (``len//2`` of the sorted filtered list) of each
  target volume stays labeled.  Other target slices get an all-False mask.
* ``invert_intensity``: target images are negated; source images are negated where the
  mask's argmax is background.
* A missing weight is all ones.

:class:`VolumeDataset` -- validation / inference: every slice of a folder, grouped by
volume (sorted ids, slices sorted by index), one domain, true masks (or all-False when a
slice has none).  :class:`SliceArrayDataset` -- the same items from one scan's slices held in
memory (``predict``).

Both check every slice file when they are built (format, finite values in [-1, 1], mask
channels; :func:`check_slices`), so a bad file stops the run before any work, with a one-line
error naming it, rather than hours into training.

Items are dicts (the default collate stacks them): ``data`` (1, E, E), ``mask`` (C, ., .),
``weight`` (1, ., .), ``domain`` one-hot (2,) float32 ``[src, tgt]``, ``has_gt`` bool and
``index`` (position in the dataset; see :meth:`ImagesDataset.path`).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from robustmedseg.data import slices as slice_files
from robustmedseg.data.slices import load_slice, slice_index, volume_id
from robustmedseg.errors import InputError


def flag_folder_slices(folder: Path, flag: str) -> List[Path]:
    """:func:`robustmedseg.data.slices.list_slices` of ``folder``; :class:`InputError` naming ``flag``
    (the option that gave the folder) when it is missing or empty."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"slice folder not found (given by {flag})", folder)
    paths = slice_files.list_slices(folder)
    if not paths:
        raise InputError(f"no '<volume>_slice<NNN>.npz' files in this folder (given by {flag})", folder)
    return paths


def read_slice(path: Path, label_nc: Optional[int]) -> Dict[str, np.ndarray]:
    """Load one slice with a default all-ones weight and an all-False mask when it has none
    (``has_mask`` tells which); check the mask's channel count."""
    item = load_slice(path)
    data = np.asarray(item["data"], dtype=np.float32)
    if data.ndim == 2:
        data = data[..., None]
    mask = item.get("mask")
    has_mask = mask is not None
    if mask is None:
        mask = np.zeros(data.shape[:2] + (label_nc or 1,), dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if label_nc is not None and mask.shape[-1] != label_nc:
        raise InputError(f"mask has {mask.shape[-1]} channels but --label_nc is {label_nc}", path)
    weight = item.get("weight")
    weight = np.ones(data.shape[:2] + (1,), dtype=bool) if weight is None else np.asarray(weight, dtype=bool)
    if weight.ndim == 2:
        weight = weight[..., None]
    return {"data": data, "mask": mask, "weight": weight, "has_mask": np.asarray(has_mask)}


def check_slices(paths: Sequence[Path], label_nc: Optional[int]) -> None:
    """Read every slice once (:func:`read_slice`): the first bad file is an :class:`InputError` naming it."""
    for path in paths:
        read_slice(path, label_nc)


def is_informative(sample: Dict[str, np.ndarray]) -> bool:
    """A labeled slice counts when its weight is not all 0 and its mask is not all background."""
    return bool(sample["weight"].any()) and bool(sample["mask"][..., 1:].any())


def middle_per_volume(paths: Sequence[Path]) -> List[Path]:
    """For each volume keep element ``len//2`` of its sorted slice list (``--one_target_slice``)."""
    groups: "OrderedDict[str, List[Path]]" = OrderedDict()
    for p in sorted(paths, key=lambda p: (volume_id(p), slice_index(p))):
        groups.setdefault(volume_id(p), []).append(p)
    return [group[len(group) // 2] for group in groups.values()]


def domain_vector(domain: int) -> torch.Tensor:
    """One-hot ``[src, tgt]`` float32 vector."""
    vec = torch.zeros(2, dtype=torch.float32)
    vec[domain] = 1.0
    return vec


def invert_image(sample: Dict[str, np.ndarray], domain: int) -> Dict[str, np.ndarray]:
    """``invert_intensity``: negate target images; negate source images on background pixels."""
    out = dict(sample)
    if domain == 1:
        out["data"] = -sample["data"]
    else:
        background = sample["mask"].argmax(axis=2) == 0
        out["data"] = np.where(background[..., None], -sample["data"], sample["data"])
    return out


def item_rng(transform) -> np.random.Generator:
    """Per-item augmentation RNG seeded from torch's RNG (follows ``--seed``, distinct per worker)."""
    if getattr(transform, "is_random", False):
        return np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)).item()))
    return np.random.default_rng(0)


class ImagesDataset(Dataset):
    """Interleaved source/target training slices (see the module docstring)."""

    def __init__(self, source_root: Optional[Path] = None, target_labeled: Optional[Path] = None,
                 target_unlabeled: Optional[Path] = None, transform=None, one_target_slice: bool = False,
                 invert_intensity: bool = False, label_nc: Optional[int] = None, min_length: int = 0,
                 flags: Tuple[str, str, str] = ("--source_root", "--target_labeled", "--target_unlabeled")):
        self.transform = transform
        self.invert_intensity = invert_intensity
        self.label_nc = label_nc
        self.source = flag_folder_slices(source_root, flags[0]) if source_root is not None else []
        labeled = flag_folder_slices(target_labeled, flags[1]) if target_labeled is not None else []
        unlabeled = flag_folder_slices(target_unlabeled, flags[2]) if target_unlabeled is not None else []
        self.target = labeled + unlabeled
        if not self.source and not self.target:
            raise InputError("no training slices: give a source folder and/or a target folder")
        if target_unlabeled is not None and target_labeled is None:
            raise InputError(f"an unlabeled target folder needs a labeled one ({flags[1]})", target_unlabeled)
        check_slices(self.source + unlabeled, label_nc)  # fail before any work on a bad file
        kept = [p for p in labeled if is_informative(read_slice(p, label_nc))]
        if one_target_slice:
            kept = middle_per_volume(kept)
        if labeled and not kept:
            raise InputError("no labeled target slice with foreground inside its weight map", target_labeled)
        self.labeled_target = set(kept)
        self.target_has_gt = [p in self.labeled_target for p in self.target]
        self.natural_length = self._natural_length()
        self.length = max(self.natural_length, int(min_length))

    # -- indexing -----------------------------------------------------------------------
    @property
    def both_domains(self) -> bool:
        return bool(self.source) and bool(self.target)

    def _natural_length(self) -> int:
        n_src, n_tgt = len(self.source), len(self.target)
        if self.both_domains:
            return 2 * max(n_src, n_tgt) - (1 if n_src > n_tgt else 0)
        return n_src or n_tgt

    def __len__(self) -> int:
        return self.length

    def locate(self, index: int) -> Tuple[int, int]:
        """``index`` -> (domain, position in the source or target list)."""
        i = index % self.natural_length
        if self.both_domains:
            if i % 2 == 0:
                return 0, (i // 2) % len(self.source)
            return 1, (i // 2) % len(self.target)
        return (0, i) if self.source else (1, i)

    def path(self, index: int) -> Path:
        domain, pos = self.locate(index)
        return self.source[pos] if domain == 0 else self.target[pos]

    def has_gt(self, index: int) -> bool:
        domain, pos = self.locate(index)
        return True if domain == 0 else self.target_has_gt[pos]

    def labeled_target_indices(self) -> List[int]:
        """One dataset index per labeled target slice (the first that gives it), in target-list order.

        The sampler draws its replacement uniformly from these, i.e. uniformly over the labeled target
        slices, as the original (its ``lucky_paths``); listing every index below the natural length
        would favour the slices the wrapped target list repeats."""
        first: Dict[int, int] = {}
        for i in range(self.natural_length):
            domain, pos = self.locate(i)
            if domain == 1 and self.has_gt(i):
                first.setdefault(pos, i)
        return [first[pos] for pos in sorted(first)]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        domain, _ = self.locate(index)
        path = self.path(index)
        sample = read_slice(path, self.label_nc)
        has_gt = self.has_gt(index) and bool(sample.pop("has_mask"))  # a source slice without mask: no GT
        if not has_gt:
            sample["mask"] = np.zeros_like(sample["mask"])
        if self.invert_intensity:
            sample = invert_image(sample, domain)
        out = self.transform(sample, item_rng(self.transform)) if self.transform else sample
        out = dict(out)
        out.update(domain=domain_vector(domain), has_gt=torch.tensor(has_gt), index=torch.tensor(index))
        return out


def eval_item(sample: Dict[str, np.ndarray], domain: int, transform, invert_intensity: bool,
              index: int) -> Dict[str, torch.Tensor]:
    """A validation/inference item (:class:`VolumeDataset`, :class:`SliceArrayDataset`): the optional
    intensity inversion, the (deterministic) transform, the domain vector, ``has_gt`` and ``index``."""
    if invert_intensity:
        sample = invert_image(sample, domain)
    out = dict(transform(sample, np.random.default_rng(0)) if transform else sample)
    out.update(domain=domain_vector(domain), has_gt=torch.tensor(bool(sample["has_mask"])), index=torch.tensor(index))
    return out


class SliceArrayDataset(Dataset):
    """The slices of one scan held in memory, (Z, S, S) float32 in [-1, 1], without labels: items
    exactly as :class:`VolumeDataset` makes them from the same slices written to files."""

    def __init__(self, slices: np.ndarray, domain: int, transform=None, label_nc: int = 1,
                 invert_intensity: bool = False):
        self.slices = np.asarray(slices, dtype=np.float32)
        self.domain = domain
        self.transform = transform
        self.label_nc = label_nc
        self.invert_intensity = invert_intensity

    def __len__(self) -> int:
        return int(self.slices.shape[0])

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        data = self.slices[index][..., None]
        sample = {"data": data, "mask": np.zeros(data.shape[:2] + (self.label_nc,), dtype=bool),
                  "weight": np.ones(data.shape[:2] + (1,), dtype=bool), "has_mask": np.asarray(False)}
        return eval_item(sample, self.domain, self.transform, self.invert_intensity, index)


class VolumeDataset(Dataset):
    """Every slice of ``folder`` in volume order, all of one ``domain`` (0 source, 1 target)."""

    def __init__(self, folder: Path, domain: int, transform=None, label_nc: Optional[int] = None,
                 invert_intensity: bool = False, flag: str = "--val_root"):
        self.paths = flag_folder_slices(folder, flag)
        check_slices(self.paths, label_nc)  # fail before any work on a bad file
        self.domain = domain
        self.transform = transform
        self.label_nc = label_nc
        self.invert_intensity = invert_intensity
        self.volumes: "OrderedDict[str, List[int]]" = OrderedDict()
        for i, p in enumerate(self.paths):
            self.volumes.setdefault(volume_id(p), []).append(i)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return eval_item(read_slice(self.paths[index], self.label_nc), self.domain, self.transform,
                         self.invert_intensity, index)

    def volume_batches(self, batch_size: int) -> List[Tuple[str, List[int]]]:
        """(volume id, slice indices) chunks of at most ``batch_size``, never mixing volumes."""
        out = []
        for vid, idx in self.volumes.items():
            for start in range(0, len(idx), batch_size):
                out.append((vid, idx[start:start + batch_size]))
        return out
