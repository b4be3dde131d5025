"""Resampling of images and masks: the ONE home of the mask resizing rule.

Masks (integer label maps, one-hot masks, weight maps) are resized with the rule of the original
code's batchgenerators 0.24 ``resize_segmentation(order=1)``, implemented here so that results do not
depend on the installed batchgenerators version (0.25 changed it to an argmax winner):

* each class indicator is resized on its own with linear interpolation in float64 (skimage ``resize``
  order 1, ``mode='edge'``, no anti-aliasing) and the class is kept where the interpolated indicator is
  ``>= 0.5`` (:func:`resize_indicator`);
* integer label map (:func:`resize_labels`): the classes are written in increasing order, so where
  two classes both reach 0.5 the larger label wins; pixels no class reaches stay 0;
* one-hot (or multi-hot) mask (:func:`resize_onehot`): every channel is thresholded on its own, as the
  original did by passing the (H, W, C) bool mask to ``resize_segmentation``; a pixel may end with
  two channels (both >= 0.5) or none (all < 0.5, e.g. where three classes meet). Thin structures
  survive downsampling better than with an argmax winner (a 1-px line keeps its pixels where its
  indicator reaches 0.5, whatever the neighbours).

Images: cubic spline (skimage ``resize`` order 3, ``mode='edge'``, no anti-aliasing), as the original.
Class probabilities (``predict --save_probabilities``): linear (:func:`resize_linear`), so that they stay in [0, 1].
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np


def resize_image(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Cubic-spline resampling to ``shape`` (float32); unchanged (as float32) when the shape matches."""
    if tuple(volume.shape) == tuple(shape):
        return volume.astype(np.float32, copy=False)
    from skimage.transform import resize

    return resize(volume.astype(np.float32), tuple(shape), order=3, mode="edge", cval=0, clip=True,
                  preserve_range=True, anti_aliasing=False).astype(np.float32)


def resize_linear(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear resampling to ``shape`` (float32, values stay within the input's range): class
    probabilities; unchanged (as float32) when the shape matches."""
    if tuple(volume.shape) == tuple(shape):
        return volume.astype(np.float32, copy=False)
    from skimage.transform import resize

    return resize(volume.astype(np.float32), tuple(shape), order=1, mode="edge", clip=True, preserve_range=True,
                  anti_aliasing=False).astype(np.float32)


def resize_indicator(indicator: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """bool array of ``shape``: linear interpolation of a 0/1 indicator, kept where >= 0.5.

    Interpolated in float64, as batchgenerators 0.24 (``astype(float)``): where the exact value is a
    0.5 tie (non-integer ratios), float64 rounding decides, and a float32 output would round values
    just below 0.5 up to 0.5 and keep pixels the original drops.
    """
    from skimage.transform import resize

    values = resize(np.asarray(indicator, dtype=np.float64), tuple(shape), order=1, mode="edge", clip=True,
                    preserve_range=True, anti_aliasing=False)
    return values >= 0.5


def resize_labels(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Integer label map to ``shape`` (same dtype; the input itself when the shape matches)."""
    if tuple(labels.shape) == tuple(shape):
        return labels
    out = np.zeros(tuple(shape), dtype=labels.dtype)
    for value in np.unique(labels):
        if value == 0:
            continue
        out[resize_indicator(labels == value, shape)] = value
    return out


def resize_onehot(mask: np.ndarray, spatial_shape: Tuple[int, ...]) -> np.ndarray:
    """bool (..., C) mask to ``spatial_shape + (C,)``, every channel thresholded on its own."""
    spatial_shape = tuple(int(n) for n in spatial_shape)
    if tuple(mask.shape[:-1]) == spatial_shape:
        return mask.astype(bool, copy=False)
    out = np.zeros(spatial_shape + (mask.shape[-1],), dtype=bool)
    for c in range(mask.shape[-1]):
        channel = mask[..., c]
        if channel.any():
            out[..., c] = resize_indicator(channel, spatial_shape)
    return out
