"""Slice transforms for phase 2 (docs/method.md#datasets "Transforms").

A *sample* is a dict of numpy arrays in the slice layout of docs/method.md#slice-format:

* ``data``   float32 (H, W, 1) in [-1, 1] (padding -1),
* ``mask``   bool (H, W, C) one-hot,
* ``weight`` bool (H, W, 1) (1 where losses and metrics count).

Three pipelines, as in the reference:

* :func:`train_transform` -- resize the three arrays to the encoder input size;
  with ``use_da`` also mirror and rotate/scale them (see :class:`RandomMirror` and
  :class:`RandomRotateScale`);
* :func:`eval_transform` -- resize the image only; mask and weight keep the slice
  size so that metrics are computed on the preprocessed grid.

Resizing: the image with skimage ``resize`` (order 3, ``mode='edge'``, no anti-aliasing);
mask and weight channel by channel with the mask rule of :mod:`MultiMedSeg.data.resample`
(linear interpolation of each channel kept where >= 0.5: batchgenerators 0.24
``resize_segmentation(order=1)`` on the one-hot array, as the original), whatever batchgenerators
version is installed. A resized mask may have pixels with two channels or none, as the original's.

Augmentation choice (documented decision): the spatial augmentation is a torch affine
warp (``affine_grid`` + ``grid_sample``) instead of batchgenerators ``augment_spatial``.
It has the reference's parameters and laws -- rotation always applied with an angle uniform in
[-pi/6, pi/6], isotropic scaling of the sampling coordinates always applied with batchgenerators'
law (factor from U(0.7, 1) or U(1, 1.4), 50/50), centred, no elastic deformation -- bicubic for
the image with border value -1, nearest for the mask (label map) and weight with border 0.  All
three arrays are warped by the *same* transform in one call (the reference warps the data twice
under a re-seeded RNG).
Mirroring flips the weight along the same axes as data and mask (FIX docs/differences.md#d9-33).

Randomness comes from a ``numpy.random.Generator`` passed at call time; the dataset
draws its seed from torch's RNG, so results follow ``--seed`` and differ between
DataLoader workers.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from skimage.transform import resize as sk_resize

from robustmedseg.data.slices import one_hot

from .resample import resize_onehot

Sample = Dict[str, np.ndarray]
Transform = Callable[[Sample, np.random.Generator], Dict[str, torch.Tensor]]


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W, 1) image to (size, size, 1): cubic, edge mode, no anti-aliasing."""
    if image.shape[0] == size and image.shape[1] == size:
        return image.astype(np.float32, copy=False)
    out = sk_resize(image.astype(np.float64), (size, size, image.shape[2]), order=3, mode="edge",
                    anti_aliasing=False, preserve_range=True)
    return out.astype(np.float32)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a bool (H, W, C) mask with the mask rule of :mod:`MultiMedSeg.data.resample` (every
    channel kept where its linearly interpolated indicator is >= 0.5, as the original); an all-False
    (unlabeled) mask stays all-False."""
    return resize_onehot(mask, (size, size))


def resize_weight(weight: np.ndarray, size: int) -> np.ndarray:
    """Resize a bool (H, W, 1) weight map with the same rule."""
    return resize_onehot(weight, (size, size))


class Resize:
    """Resize data, and optionally mask and weight, to ``size`` x ``size``."""

    def __init__(self, size: int, image_only: bool = False):
        self.size = int(size)
        self.image_only = image_only

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        out = dict(sample)
        out["data"] = resize_image(sample["data"], self.size)
        if not self.image_only:
            out["mask"] = resize_mask(sample["mask"], self.size)
            out["weight"] = resize_weight(sample["weight"], self.size)
        return out


class RandomMirror:
    """With probability ``p`` flip axis 0, independently with ``p`` flip axis 1 (all three arrays)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        out = dict(sample)
        for axis in (0, 1):
            if rng.random() < self.p:
                for key in ("data", "mask", "weight"):
                    out[key] = np.flip(out[key], axis=axis)  # same axis for the weight (FIX docs/differences.md#d9-33)
        return {k: np.ascontiguousarray(v) for k, v in out.items()}


def rotation_scale_matrix(angle: float, coord_scale: float) -> torch.Tensor:
    """2x3 ``affine_grid`` matrix mapping output to input coordinates: rotate by ``angle``, then
    multiply the coordinates by ``coord_scale`` (> 1 shows more of the input: the content shrinks)."""
    c, s = math.cos(angle) * coord_scale, math.sin(angle) * coord_scale
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=torch.float32)


def draw_coordinate_scale(rng: np.random.Generator, scale_range: Tuple[float, float]) -> float:
    """batchgenerators' ``augment_spatial`` law: with probability 1/2 (when the range starts below 1)
    a factor from U(low, 1), otherwise from U(max(low, 1), high); it multiplies the coordinates."""
    low, high = scale_range
    if rng.random() < 0.5 and low < 1:
        return float(rng.uniform(low, 1.0))
    return float(rng.uniform(max(low, 1.0), high))


class RandomRotateScale:
    """Centred rotation (angle uniform in ``angle_range``) and isotropic scaling of the sampling
    coordinates (:func:`draw_coordinate_scale` over ``scale_range``), as the original's
    batchgenerators ``SpatialTransform`` (rotation and scaling always applied, no elastic deformation)."""

    def __init__(self, angle_range: Tuple[float, float] = (-math.pi / 6, math.pi / 6),
                 scale_range: Tuple[float, float] = (0.7, 1.4)):
        self.angle_range = angle_range
        self.scale_range = scale_range

    def draw(self, rng: np.random.Generator) -> Tuple[float, float]:
        """(angle, coordinate scale) of one sample."""
        angle = float(rng.uniform(*self.angle_range))
        return angle, draw_coordinate_scale(rng, self.scale_range)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        angle, scale = self.draw(rng)
        data, mask, weight = sample["data"], sample["mask"], sample["weight"]
        h, w = data.shape[:2]
        theta = rotation_scale_matrix(angle, scale)[None]
        grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
        # image: bicubic, border value -1 (grid_sample pads zeros, so shift by +1 first)
        img = torch.from_numpy(np.ascontiguousarray(data[..., 0], dtype=np.float32))[None, None] + 1.0
        img = F.grid_sample(img, grid, mode="bicubic", padding_mode="zeros", align_corners=False) - 1.0
        n = mask.shape[2]
        # the mask is warped as its argmax label map (a pixel without any channel is background), as the
        # original; an unlabeled slice (no channel anywhere) stays unlabeled
        labeled = bool(mask.any())
        labels = (mask.argmax(axis=2) if labeled else np.full(mask.shape[:2], n)).astype(np.float32)
        lab = torch.from_numpy(labels)[None, None] + 1.0  # shifted so that the zero padding reads as -1
        lab = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0, 0]
        lab = lab.numpy().astype(np.int64) - 1
        lab[lab < 0] = 0 if labeled else n  # border: background (constant 0 as in the reference)
        wt = torch.from_numpy(weight[..., 0].astype(np.float32))[None, None]
        wt = F.grid_sample(wt, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0, 0]
        out = dict(sample)
        # not clamped: the cubic kernel overshoots at sharp edges, as the original's order-3 spline does
        # (docs/differences.md#unclamped-images)
        out["data"] = img[0, 0].numpy()[..., None]
        out["mask"] = one_hot(lab, n + 1)[..., :n]
        out["weight"] = (wt.numpy() > 0.5)[..., None]
        return out


class ToTensor:
    """numpy (H, W, C) -> float32 torch (C, H, W) for data, mask and weight (bools become 0/1)."""

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(np.moveaxis(v, -1, 0), dtype=np.float32))
                for k, v in sample.items() if k in ("data", "mask", "weight")}


class Compose:
    """Apply transforms in order, passing the same RNG to each."""

    def __init__(self, steps: Sequence[Callable]):
        self.steps = list(steps)

    def __call__(self, sample: Sample, rng: Optional[np.random.Generator] = None):
        rng = rng if rng is not None else np.random.default_rng(0)
        for step in self.steps:
            sample = step(sample, rng)
        return sample

    @property
    def is_random(self) -> bool:
        return any(isinstance(s, (RandomMirror, RandomRotateScale)) for s in self.steps)


def train_transform(size: int, use_da: bool = False) -> Compose:
    """Training pipeline: resize all arrays to ``size``; with ``use_da`` mirror + rotate/scale."""
    steps: list = [Resize(size)]
    if use_da:
        steps += [RandomMirror(0.5), RandomRotateScale()]
    return Compose(steps + [ToTensor()])


def eval_transform(size: int) -> Compose:
    """Validation/inference pipeline: resize the image only (mask and weight keep the slice size)."""
    return Compose([Resize(size, image_only=True), ToTensor()])
