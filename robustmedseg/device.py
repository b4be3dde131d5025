"""Device selection shared by every script with a ``--device auto|cpu|cuda`` flag."""
from __future__ import annotations

import torch

from robustmedseg.errors import InputError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda``/``cuda:N`` without a GPU is an input error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} was asked for but no CUDA device is available")
    return torch.device(device)
