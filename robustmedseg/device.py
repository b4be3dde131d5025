"""Device selection and seeding shared by every script (``--device auto|cpu|cuda``, ``--seed``)."""
from __future__ import annotations

import random

import numpy as np
import torch

from robustmedseg.errors import InputError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda``/``cuda:N`` without a GPU is an input error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} was asked for but no CUDA device is available")
    return torch.device(device)


def seed_everything(seed: int, deterministic_cudnn: bool = True) -> None:
    """Seed python's ``random``, numpy and torch (CPU and every GPU) with ``seed``.

    ``deterministic_cudnn`` also asks cuDNN for deterministic kernels without autotuning
    (phase 2, as the reference's global setup); the data-factory nodes leave cuDNN as it is.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic_cudnn:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def configure_backends(allow_tf32: bool = False, cudnn_benchmark: bool = False) -> None:
    """Process-wide GPU precision/speed switches shared by every training and inference entry point.

    ``allow_tf32``: let float32 matrix products and cuDNN convolutions use TF32 tensor cores
    (Ampere and newer GPUs): inputs rounded to a 10-bit mantissa, accumulation in float32,
    typically 2-6x faster convolutions but about 1e-3 relative error per product. ``False`` (our
    default, as NVlabs' StyleGAN2-ADA keeps it for GAN training) sets both
    ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32`` to False;
    note that PyTorch's own default allows TF32 for cuDNN convolutions, which is what the original
    code ran with. ``cudnn_benchmark``: let cuDNN time the candidate convolution algorithms for each
    new input shape and keep the fastest (a one-off cost per shape; worth it when shapes are fixed,
    as in training; results are no longer bit-reproducible from run to run). No effect on CPU.
    """
    torch.backends.cuda.matmul.allow_tf32 = bool(allow_tf32)
    torch.backends.cudnn.allow_tf32 = bool(allow_tf32)
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    if cudnn_benchmark:
        torch.backends.cudnn.deterministic = False
