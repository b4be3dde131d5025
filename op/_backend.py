"""Backend selection and lazy CUDA-extension loading shared by the ops.

Nothing is compiled at import time. The first time an op is asked to run on a
CUDA tensor (automatically or with ``impl='cuda'``) the matching extension is
JIT-built with :func:`torch.utils.cpp_extension.load` into torch's extension
cache. A build failure emits one warning per extension and the automatic mode
falls back to the pure-PyTorch reference path.

Self-check at first use (automatic mode only). Before an op first runs its
CUDA kernel for a given dtype in a process, the kernel and the reference path
are compared on small random inputs covering the configurations the model
uses (see :data:`op.upfirdn.SELFCHECK_CASES` and
:data:`op.fused_act.SELFCHECK_CASES`): forward values, first order gradients
and second order gradients. If they disagree beyond :data:`TOLERANCE` (or the
kernel raises, e.g. "no kernel image is available for this device"), one
``RuntimeWarning`` names the op and the error, and that op uses the reference
path for the rest of the process (every dtype). The check costs a few
milliseconds once per op and dtype. ``RMS_CUDA_SELFCHECK=0`` in the
environment (or :func:`set_selfcheck(False) <set_selfcheck>`) skips it. An
explicit ``impl='cuda'`` is never checked nor replaced: it runs the kernel.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

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


def kernel_available(tensor: torch.Tensor, ext_name: str) -> bool:
    """Whether the automatic mode may run extension ``ext_name`` on ``tensor`` (CUDA tensor, built)."""
    return tensor.is_cuda and load_extension(ext_name) is not None


def resolve_impl(impl: Optional[str], tensor: torch.Tensor, ext_name: str, op: Optional[str] = None) -> str:
    """Choose ``'cuda'`` or ``'ref'`` for an op call.

    ``None`` picks ``'cuda'`` only when ``tensor`` is on a CUDA device, the
    extension builds and (for a named ``op`` with a registered self-check)
    the kernel passed its self-check for ``tensor.dtype``; else ``'ref'``.
    Inside :func:`forced_impl` ``('ref')`` the automatic mode always picks
    ``'ref'``. ``'cuda'`` requires a CUDA tensor and a working extension and
    raises otherwise (no silent fallback when asked explicitly).
    """
    if impl not in VALID_IMPLS:
        raise ValueError(f"impl must be one of None, 'cuda', 'ref'; got {impl!r}")
    if impl == "ref":
        return "ref"
    if impl is None:
        if _forced == "ref":
            return "ref"
        if kernel_available(tensor, ext_name) and (op is None or kernel_trusted(op, tensor)):
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


# --------------------------------------------------------------------------- forcing the reference path

_forced: Optional[str] = None


@contextlib.contextmanager
def forced_impl(impl: Optional[str]) -> Iterator[None]:
    """Inside the block, ``impl=None`` calls use ``impl`` (``'ref'``) instead of choosing.

    Process-wide (not thread-local). ``None`` restores automatic selection.
    Used by benchmarks to time the reference path on the same card.
    """
    global _forced
    if impl not in (None, "ref"):
        raise ValueError(f"forced_impl accepts None or 'ref', got {impl!r}")
    previous, _forced = _forced, impl
    try:
        yield
    finally:
        _forced = previous


# --------------------------------------------------------------------------- self-check at first use

SELFCHECK_ENV = "RMS_CUDA_SELFCHECK"

#: Largest accepted error, relative to ``max(1, max |reference|)`` of each compared tensor.
#: float64 is not exact because the kernels take ``slope``/``scale`` as float32.
TOLERANCE: Dict[torch.dtype, float] = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2}

Tensors = Tuple[torch.Tensor, ...]


@dataclass
class SelfCheckCase:
    """One comparison: ``kernel(*inputs)`` vs ``reference(*inputs)`` on the check's device and dtype.

    ``make_inputs(device, dtype, generator)`` returns the inputs; those with a
    floating dtype are differentiated (first and second order).
    """

    name: str
    make_inputs: Callable[[torch.device, torch.dtype, torch.Generator], Tensors]
    kernel: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]


@dataclass
class SelfCheckResult:
    """Outcome of the self-check of one op and dtype."""

    op: str
    dtype: torch.dtype
    ok: bool
    max_error: float
    tolerance: float
    detail: str  # worst (or failing) comparison, or the exception


_selfcheck_override: Optional[bool] = None
_check_lock = threading.Lock()
#: op name -> function returning its cases; registered by the op modules at import.
_check_cases: Dict[str, Callable[[], List[SelfCheckCase]]] = {}
#: (op, dtype) -> result of the check run in this process.
_results: Dict[Tuple[str, torch.dtype], SelfCheckResult] = {}
#: ops that failed a check: they use the reference path for the rest of the process.
_distrusted: Dict[str, SelfCheckResult] = {}


def register_selfcheck(op: str, cases: Callable[[], List[SelfCheckCase]]) -> None:
    """Register the self-check cases of ``op`` (called once by each op module)."""
    _check_cases[op] = cases


def set_selfcheck(enabled: Optional[bool]) -> None:
    """Force the self-check on (True) or off (False); ``None``: follow ``RMS_CUDA_SELFCHECK``."""
    global _selfcheck_override
    _selfcheck_override = enabled


def selfcheck_enabled() -> bool:
    """Whether kernels are checked at first use (default yes; ``RMS_CUDA_SELFCHECK=0`` turns it off)."""
    if _selfcheck_override is not None:
        return _selfcheck_override
    return os.environ.get(SELFCHECK_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def selfcheck_results() -> List[SelfCheckResult]:
    """Results of the checks run so far in this process."""
    return list(_results.values())


def reset_selfcheck() -> None:
    """Forget every check result and fallback (tests, benchmarks)."""
    with _check_lock:
        _results.clear()
        _distrusted.clear()


def kernel_trusted(op: str, tensor: torch.Tensor) -> bool:
    """Whether the automatic mode may use ``op``'s kernel for ``tensor``'s dtype (checks on first use)."""
    if op in _distrusted:
        return False
    if op not in _check_cases or not selfcheck_enabled():
        return True
    key = (op, tensor.dtype)
    result = _results.get(key)
    if result is None:
        with _check_lock:
            if op in _distrusted:
                return False
            result = _results.get(key)
            if result is None:
                result = run_selfcheck(op, tensor.device, tensor.dtype)
                _results[key] = result
                if not result.ok:
                    _distrusted[op] = result
                    warnings.warn(
                        f"op: the CUDA kernel of {op} failed its self-check against the reference path on "
                        f"{str(tensor.dtype).replace('torch.', '')} ({result.detail}); {op} uses the "
                        f"pure-PyTorch reference path for the rest of this process "
                        f"(set {SELFCHECK_ENV}=0 to skip this check)",
                        RuntimeWarning,
                        stacklevel=4,
                    )
    return result.ok


def _max_error(got: Optional[torch.Tensor], want: Optional[torch.Tensor]) -> float:
    """``max |got - want| / max(1, max |want|)``; ``None`` counts as zeros; shape mismatch is infinite."""
    if got is None and want is None:
        return 0.0
    if got is None or want is None:
        other = got if want is None else want
        return float(other.detach().abs().max()) if other.numel() else 0.0
    if got.shape != want.shape:
        return float("inf")
    if got.numel() == 0:
        return 0.0
    diff = (got.detach().double() - want.detach().double()).abs().max()
    if not bool(torch.isfinite(diff)):
        return float("inf")
    return float(diff) / max(1.0, float(want.detach().double().abs().max()))


def _run_path(fn: Callable[..., torch.Tensor], inputs: Tensors, cotangent: torch.Tensor,
              probe: Sequence[torch.Tensor], dtype: torch.dtype) -> Dict[str, Optional[torch.Tensor]]:
    """Forward, gradients for ``cotangent`` and second order gradients along ``probe``, in ``dtype``."""
    xs = [t.detach().to(dtype).requires_grad_(t.is_floating_point()) for t in inputs]
    diff = [x for x in xs if x.requires_grad]
    g = cotangent.detach().to(dtype).requires_grad_(True)
    y = fn(*xs)
    grads = torch.autograd.grad(y, diff, g, create_graph=True, allow_unused=True)
    total = sum(((gr * p.to(dtype)).sum() for gr, p in zip(grads, probe) if gr is not None and gr.requires_grad),
                torch.zeros((), device=y.device, dtype=dtype))
    if total.requires_grad:
        second = torch.autograd.grad(total, [g] + diff, allow_unused=True)
    else:
        second = (None,) * (1 + len(diff))
    out: Dict[str, Optional[torch.Tensor]] = {"forward": y}
    for i, gr in enumerate(grads):
        out[f"gradient of input {i}"] = gr
    out["second order, d/d(upstream gradient)"] = second[0]
    for i, s in enumerate(second[1:]):
        out[f"second order, d/d(input {i})"] = s
    return out


def _compare_case(case: SelfCheckCase, device: torch.device, dtype: torch.dtype, tol: float) -> Tuple[float, str]:
    """Largest error of one case and where; the first comparison over ``tol`` (forward, gradients,
    second order, in this order) when there is one."""
    gen = torch.Generator().manual_seed(20240607)
    inputs = case.make_inputs(device, dtype, gen)
    with torch.no_grad():
        shape = case.reference(*[t.detach().double() if t.is_floating_point() else t for t in inputs]).shape
    cotangent = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    diff = [t for t in inputs if t.is_floating_point()]
    probe = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for t in diff]
    # The reference runs in float64 on the same (dtype-rounded) values: the most accurate answer.
    want = _run_path(case.reference, inputs, cotangent, probe, torch.float64)
    got = _run_path(case.kernel, inputs, cotangent, probe, dtype)
    worst, where = 0.0, "forward"
    for key, value in want.items():
        err = _max_error(got.get(key), value)
        if err > tol:
            return err, key
        if err > worst:
            worst, where = err, key
    return worst, where


def run_selfcheck(op: str, device: torch.device, dtype: torch.dtype) -> SelfCheckResult:
    """Compare ``op``'s kernel with its reference path on ``device``/``dtype`` (never raises)."""
    tol = TOLERANCE.get(dtype, 1e-2)
    worst, detail = 0.0, "no case"
    try:
        cases = _check_cases[op]()
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
            for case in cases:
                err, where = _compare_case(case, device, dtype, tol)
                if err > tol:  # _max_error maps NaN to inf
                    return SelfCheckResult(op, dtype, False, err, tol,
                                           f"case '{case.name}', {where}: max error {err:.3g} > tolerance {tol:g}")
                if err >= worst:
                    worst, detail = err, f"worst: case '{case.name}', {where}: max error {err:.3g}"
    except Exception as exc:  # noqa: BLE001 - a kernel that raises is a failed check
        message = " ".join(str(exc).split())[:300]
        return SelfCheckResult(op, dtype, False, float("inf"), tol, f"the kernel raised {type(exc).__name__}: {message}")
    return SelfCheckResult(op, dtype, True, worst, tol, detail)
