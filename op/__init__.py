"""Custom ops of the StyleGAN2 model (docs/method.md#ops).

* :func:`fused_leaky_relu` / :class:`FusedLeakyReLU`: ``scale * leaky_relu(x + b)``;
* :func:`upfirdn2d`: upsample, pad, FIR-filter, downsample;
* :mod:`conv2d_gradfix`: convolutions with second order gradients and a
  ``no_weight_gradients()`` context.

Each op has an ``impl`` argument: ``'ref'`` (fast pure PyTorch, any device),
``'cuda'`` (custom kernel) or ``None`` (automatic: CUDA only for CUDA tensors
when the lazily built extension is available and the kernel passed its
self-check against the reference path at first use, per op and dtype; a
kernel that fails it is reported by one warning and replaced by the
reference path for the rest of the process; ``RMS_CUDA_SELFCHECK=0`` skips
the check, see :mod:`op._backend`). Importing this package compiles nothing.
"""

from . import conv2d_gradfix
from .fused_act import FusedLeakyReLU, fused_leaky_relu
from .upfirdn import upfirdn2d

__all__ = ["FusedLeakyReLU", "fused_leaky_relu", "upfirdn2d", "conv2d_gradfix"]
