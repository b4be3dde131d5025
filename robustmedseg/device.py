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
