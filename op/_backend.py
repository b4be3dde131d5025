"""Backend selection and lazy CUDA-extension loading shared by the ops.

Nothing is compiled at import time. The first time an op is asked to run on a
CUDA tensor (automatically or with ``impl='cuda'``) the matching extension is
JIT-built with :func:`torch.utils.cpp_extension.load` into torch's extension
cache. A build failure emits one warning per extension and the automatic mode
falls back to the pure-PyTorch reference path.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch

CUDA_DIR = Path(__file__).resolve().parent / "cuda"

#: extension name -> source file names under ``op/cuda``.
EXTENSIONS: Dict[str, Tuple[str, ...]] = {
    "rms_fused_bias_act": ("fused_bias_act.cpp", "fused_bias_act.cu"),
    "rms_upfirdn2d": ("upfirdn2d.cpp", "upfirdn2d.cu"),
}

_lock = threading.Lock()
_loaded: Dict[str, Optional[ModuleType]] = {}
_errors: Dict[str, str] = {}

VALID_IMPLS = (None, "cuda", "ref")


def source_paths(name: str) -> Tuple[Path, ...]:
    """Absolute paths of the sources of extension ``name``."""
    return tuple(CUDA_DIR / f for f in EXTENSIONS[name])


def load_extension(name: str) -> Optional[ModuleType]:
    """Build (once) and return extension ``name``, or ``None`` if unavailable.

    Returns ``None`` without trying when CUDA is not available. A failed build
    is remembered (see :func:`build_error`) and warned about only once.
    """
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name in _loaded:
            return _loaded[name]
        module: Optional[ModuleType] = None
        if not torch.cuda.is_available():
            _errors[name] = "torch.cuda.is_available() is False"
        else:
            try:
                from torch.utils.cpp_extension import load

                module = load(
                    name=name,
                    sources=[str(p) for p in source_paths(name)],
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3", "--use_fast_math"],
                    verbose=False,
                )
            except Exception as exc:  # noqa: BLE001 - any build problem -> fallback
                _errors[name] = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"op: building CUDA extension {name!r} failed; using the "
                    f"pure-PyTorch reference path instead ({_errors[name][:500]})",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _loaded[name] = module
        return module


def build_error(name: str) -> Optional[str]:
    """Reason why extension ``name`` is unavailable (after a load attempt)."""
    return _errors.get(name)


def is_loaded(name: str) -> bool:
    """Whether extension ``name`` has been built/loaded in this process."""
    return _loaded.get(name) is not None


def resolve_impl(impl: Optional[str], tensor: torch.Tensor, ext_name: str) -> str:
    """Choose ``'cuda'`` or ``'ref'`` for an op call.

    ``None`` picks ``'cuda'`` only when ``tensor`` is on a CUDA device and the
    extension builds, else ``'ref'``. ``'cuda'`` requires a CUDA tensor and a
    working extension and raises otherwise (no silent fallback when asked
    explicitly).
    """
    if impl not in VALID_IMPLS:
        raise ValueError(f"impl must be one of None, 'cuda', 'ref'; got {impl!r}")
    if impl == "ref":
        return "ref"
    if impl is None:
        if tensor.is_cuda and load_extension(ext_name) is not None:
            return "cuda"
        return "ref"
    if not tensor.is_cuda:
        raise ValueError(
            f"impl='cuda' needs CUDA tensors, got a tensor on {tensor.device}; "
            "use impl=None or impl='ref'"
        )
    if load_extension(ext_name) is None:
        raise RuntimeError(
            f"impl='cuda' requested but CUDA extension {ext_name!r} is unavailable: "
            f"{build_error(ext_name)}"
        )
    return "cuda"
