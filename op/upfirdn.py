"""upfirdn2d: upsample (zero insertion), pad/crop, FIR-filter (true convolution), downsample.

Semantics, per channel and per axis (docs/method.md#ops): insert ``up - 1`` zeros after
every sample, pad by ``(pad0, pad1)`` (negative values crop), take the *true*
convolution with the kernel (cross-correlation with the kernel flipped on both
axes, "valid" extent) and keep every ``down``-th sample starting at 0. The
output length is ``(n * up + pad0 + pad1 - k + down) // down``.

The reference path never materialises the zero-inserted signal and never
filters at full resolution before subsampling:

* upsampling is one depthwise ``conv_transpose2d`` with ``stride=up`` whose
  ``padding``/``output_padding`` perform the crop (a view / ``F.pad`` for the
  asymmetric rest);
* filtering and downsampling are one depthwise strided ``conv2d`` whose
  ``padding`` holds the symmetric part of the pads;
* negative pads are slicing;
* a large rank-1 kernel (area >= ``SEPARABLE_MIN_AREA``) or a 1-D kernel is
  applied as two 1-D passes; for the 4x4 blur one 2-D pass is faster on CPU
  (measured, the passes are memory bound).

Everything is written in differentiable torch ops, so autograd gives first and
second order gradients (also w.r.t. the kernel). The CUDA path runs one kernel
forward and its backward is ``upfirdn2d`` of the gradient with the flipped
kernel, ``up``/``down`` swapped and derived pads, itself differentiable.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._backend import SelfCheckCase, load_extension, register_selfcheck, resolve_impl

_EXT = "rms_upfirdn2d"

IntOrPair = Union[int, Sequence[int]]

__all__ = ["upfirdn2d", "parse_params", "output_size", "backward_params", "fir_matrix"]


# --------------------------------------------------------------------------- parameters


def _pair(v: IntOrPair, name: str) -> Tuple[int, int]:
    """``int`` -> ``(v, v)``; ``(x, y)`` -> ``(x, y)``; validates positivity."""
    if isinstance(v, int):
        out = (v, v)
    else:
        vals = tuple(int(a) for a in v)
        if len(vals) != 2:
            raise ValueError(f"{name} must be an int or an (x, y) pair, got {v!r}")
        out = (vals[0], vals[1])
    if min(out) < 1:
        raise ValueError(f"{name} factors must be >= 1, got {v!r}")
    return out


def parse_params(
    up: IntOrPair, down: IntOrPair, pad: Sequence[int]
) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int, int, int]]:
    """Normalise to ``(ux, uy), (dx, dy), (px0, px1, py0, py1)``."""
    pads = tuple(int(p) for p in pad)
    if len(pads) == 2:
        pads = (pads[0], pads[1], pads[0], pads[1])
    if len(pads) != 4:
        raise ValueError(f"pad must be (p0, p1) or (x0, x1, y0, y1), got {pad!r}")
    return _pair(up, "up"), _pair(down, "down"), pads  # type: ignore[return-value]


def output_size(n: int, k: int, up: int, down: int, p0: int, p1: int) -> int:
    """Output length along one axis."""
    return (n * up + p0 + p1 - k + down) // down


def backward_params(
    n: int, k: int, up: int, down: int, p0: int, p1: int
) -> Tuple[int, int, int, int]:
    """Along one axis, ``(up', down', p0', p1')`` such that the gradient w.r.t. the
    input equals ``upfirdn(grad, flipped kernel, up', down', (p0', p1'))``."""
    out = output_size(n, k, up, down, p0, p1)
    return down, up, k - 1 - p0, n * up - out * down + p0 - up + 1


# --------------------------------------------------------------------------- reference path


def fir_matrix(n_in: int, taps: torch.Tensor, up: int = 1, down: int = 1, pad: Tuple[int, int] = (0, 0)) -> torch.Tensor:
    """(n_out, n_in) matrix ``M`` of :func:`upfirdn2d` along one axis: ``M @ x`` inserts ``up - 1`` zeros
    after every sample, pads by ``pad``, takes the true convolution with the 1-D ``taps`` and keeps every
    ``down``-th sample (``M[o, i] = taps[o * down + K - 1 - pad0 - i * up]`` where that index is valid).

    For a separable 2-D kernel ``outer(ky, kx)``, ``fir_matrix(H, ky, ...) @ x @ fir_matrix(W, kx, ...).T``
    equals ``upfirdn2d(x, outer(ky, kx), ...)``: on few-channel images (1-channel skips, ADA) two small
    matrix products are much faster on CPU than a depthwise (transposed) convolution (issue 23).
    """
    k = taps.shape[0]
    n_out = (n_in * up + pad[0] + pad[1] - k + down) // down
    o = torch.arange(n_out, device=taps.device).view(-1, 1)
    i = torch.arange(n_in, device=taps.device).view(1, -1)
    t = o * down + (k - 1 - pad[0]) - i * up
    valid = (t >= 0) & (t < k)
    return torch.where(valid, taps[t.clamp(0, k - 1)], torch.zeros((), dtype=taps.dtype, device=taps.device))


def _rank1_factors(kernel: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(col, row)`` with ``outer(col, row) == kernel`` if the 2-D kernel has rank 1."""
    kc = kernel.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(kc).all()):
        return None
    flat = int(kc.abs().argmax())
    i, j = divmod(flat, kc.shape[1])
    pivot = kc[i, j]
    if float(pivot) == 0.0:
        return None
    col, row = kc[:, j], kc[i, :] / pivot
    if not torch.allclose(torch.outer(col, row), kc, rtol=1e-6, atol=1e-9 * float(pivot.abs())):
        return None
    return (kernel[:, j].detach(), (kernel[i, :] / kernel[i, j]).detach())


def _crop_or_pad(x: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    """``x[start:stop]`` along ``dim`` where out-of-range indices read zeros."""
    length = x.shape[dim]
    a = min(max(start, 0), length)
    b = max(min(stop, length), a)
    left = min(max(0, a - start), stop - start)
    right = (stop - start) - left - (b - a)
    if a != 0 or b != length:
        x = x.narrow(dim, a, b - a)
    if left or right:
        spec = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [left, right]
        x = F.pad(x, spec)
    return x


def _take_every(x: torch.Tensor, dim: int, step: int) -> torch.Tensor:
    if step == 1:
        return x
    index = [slice(None)] * x.ndim
    index[dim] = slice(None, None, step)
    return x[tuple(index)]


def _depthwise_weight(k: torch.Tensor, channels: int) -> torch.Tensor:
    """(kh, kw) kernel -> (C, 1, kh, kw) view for a depthwise convolution."""
    return k.unsqueeze(0).unsqueeze(0).expand(channels, 1, *k.shape)


def _split_pad(p0: int, p1: int) -> Tuple[int, int, int]:
    """Split pads into (symmetric conv padding, extra before, extra after); extras may be < 0."""
    sym = max(0, min(p0, p1))
    return sym, p0 - sym, p1 - sym


def _filter_down(x: torch.Tensor, k: torch.Tensor, down: Tuple[int, int],
                 pad: Tuple[int, int, int, int]) -> torch.Tensor:
    """``up == 1``: depthwise correlation with the flipped kernel, strided by ``down``.

    The symmetric part of the pads is the convolution's own zero padding (no
    copy); the asymmetric rest is an ``F.pad`` (negative values: a view).
    """
    (dx, dy), (px0, px1, py0, py1) = down, pad
    sy, ey0, ey1 = _split_pad(py0, py1)
    sx, ex0, ex1 = _split_pad(px0, px1)
    h, w = x.shape[2], x.shape[3]
    if ey0 or ey1:
        x = _crop_or_pad(x, 2, -ey0, h + ey1)
    if ex0 or ex1:
        x = _crop_or_pad(x, 3, -ex0, w + ex1)
    weight = _depthwise_weight(k.flip((0, 1)), x.shape[1])
    return F.conv2d(x, weight, stride=(dy, dx), padding=(sy, sx), groups=x.shape[1])


def _upsample_filter(x: torch.Tensor, k: torch.Tensor, up: Tuple[int, int], down: Tuple[int, int],
                     pad: Tuple[int, int, int, int]) -> torch.Tensor:
    """``up > 1`` on some axis: depthwise ``conv_transpose2d`` with ``stride=up``.

    With ``full[m] = sum_i x[i] k[m - i*up]`` (the true convolution of the
    zero-inserted signal), ``out[o] = full[o*down + K - 1 - p0]``. The crop is
    done by the transposed convolution's ``padding``/``output_padding`` when
    possible, otherwise by a view / ``F.pad``.
    """
    (ux, uy), (dx, dy), (px0, px1, py0, py1) = up, down, pad
    kh, kw = k.shape
    h, w = x.shape[2], x.shape[3]
    plan = []
    for n, taps, u, d, p0, p1 in ((h, kh, uy, dy, py0, py1), (w, kw, ux, dx, px0, px1)):
        full = (n - 1) * u + taps
        start = taps - 1 - p0
        stop = start + (output_size(n, taps, u, d, p0, p1) - 1) * d + 1
        crop = max(0, min(start, full - stop))  # symmetric crop done by `padding`
        extra = (stop - start) - (full - 2 * crop)  # >0: values needed past the end
        out_pad = extra if 0 < extra < max(u, 1) else 0
        plan.append((crop, out_pad, start - crop, stop - crop))
    (cy, oy, sy0, sy1), (cx, ox, sx0, sx1) = plan
    weight = _depthwise_weight(k, x.shape[1])
    y = F.conv_transpose2d(x, weight, stride=(uy, ux), padding=(cy, cx), output_padding=(oy, ox),
                           groups=x.shape[1])
    if sy0 != 0 or sy1 != y.shape[2]:
        y = _crop_or_pad(y, 2, sy0, sy1)
    if sx0 != 0 or sx1 != y.shape[3]:
        y = _crop_or_pad(y, 3, sx0, sx1)
    return _take_every(_take_every(y, 2, dy), 3, dx)


def _upfirdn_2d_kernel(x: torch.Tensor, k: torch.Tensor, up: Tuple[int, int], down: Tuple[int, int],
                       pad: Tuple[int, int, int, int]) -> torch.Tensor:
    """One depthwise (transposed) convolution with the full 2-D kernel."""
    if up == (1, 1):
        return _filter_down(x, k, down, pad)
    return _upsample_filter(x, k, up, down, pad)


#: Minimum kernel area for which two 1-D passes beat one 2-D depthwise pass.
#: Measured on this CPU (1 thread, 4x64x64x64 fwd+bwd): for a 4x4 kernel one
#: depthwise 2-D pass is ~1.1-1.8x faster than two 1-D passes (the passes are
#: memory bound), 8x8 is about even and 12x12 favours the 1-D passes.
SEPARABLE_MIN_AREA = 64


def upfirdn2d_ref(x: torch.Tensor, kernel: torch.Tensor, up: Tuple[int, int], down: Tuple[int, int],
                  pad: Tuple[int, int, int, int], separable: Optional[bool] = None) -> torch.Tensor:
    """Pure-PyTorch upfirdn2d with normalised parameters (see :func:`upfirdn2d`).

    ``separable`` forces (True) or forbids (False) two 1-D passes for a rank-1
    kernel; ``None`` uses them when the 2-D kernel area is at least
    :data:`SEPARABLE_MIN_AREA`.
    """
    k = kernel.to(device=x.device, dtype=x.dtype)
    if k.ndim == 1:
        if separable is False:
            return _upfirdn_2d_kernel(x, torch.outer(k, k), up, down, pad)
        factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = (k, k)
    else:
        want = separable if separable is not None else k.numel() >= SEPARABLE_MIN_AREA
        factors = _rank1_factors(k) if want and not k.requires_grad else None
        if factors is None:
            return _upfirdn_2d_kernel(x, k, up, down, pad)
    (ux, uy), (dx, dy), (px0, px1, py0, py1) = up, down, pad
    ky, kx = factors
    x = _upfirdn_2d_kernel(x, ky.view(-1, 1), (1, uy), (1, dy), (0, 0, py0, py1))
    return _upfirdn_2d_kernel(x, kx.view(1, -1), (ux, 1), (dx, 1), (px0, px1, 0, 0))


# --------------------------------------------------------------------------- CUDA path


class _UpFirDn2dCuda(torch.autograd.Function):
    """CUDA forward; backward = the same op on the gradient (linear), so any order works."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, kernel: torch.Tensor, up: Tuple[int, int], down: Tuple[int, int],
                pad: Tuple[int, int, int, int]) -> torch.Tensor:
        ext = load_extension(_EXT)
        (ux, uy), (dx, dy), (px0, px1, py0, py1) = up, down, pad
        kh, kw = kernel.shape
        _, _, h, w = x.shape
        bx = backward_params(w, kw, ux, dx, px0, px1)
        by = backward_params(h, kh, uy, dy, py0, py1)
        ctx.back = ((bx[0], by[0]), (bx[1], by[1]), (bx[2], bx[3], by[2], by[3]))
        ctx.save_for_backward(kernel)
        return ext.upfirdn2d(x.contiguous(), kernel.contiguous(), ux, uy, dx, dy, px0, px1, py0, py1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        (kernel,) = ctx.saved_tensors
        up, down, pad = ctx.back
        grad_x = _UpFirDn2dCuda.apply(grad, kernel.flip((0, 1)), up, down, pad)
        return grad_x, None, None, None, None


def _run_kernel(x: torch.Tensor, kernel2d: torch.Tensor, up: Tuple[int, int], down: Tuple[int, int],
                pad: Tuple[int, int, int, int]) -> torch.Tensor:
    """The CUDA path with normalised parameters and a 2-D kernel of ``x``'s dtype and device.

    Both the dispatch below and the self-check call this module attribute, so a
    test can replace it to exercise the self-check and fallback on any device.
    """
    return _UpFirDn2dCuda.apply(x, kernel2d, up, down, pad)


# --------------------------------------------------------------------------- self-check


def _blur(gain: float) -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    k = torch.outer(k, k)
    return k / k.sum() * gain


#: (name, kernel (None: random non-separable 3x4), up, down, pad): the model's uses first (model.py
#: Blur/Upsample with the [1, 3, 3, 1] kernel), then plain down 2 and an asymmetric general case.
SELFCHECK_CASES: Tuple[Tuple[str, Optional[torch.Tensor], IntOrPair, IntOrPair, Tuple[int, ...]], ...] = (
    ("up 2, pad (2, 1), ToRGB skip", _blur(4.0), 2, 1, (2, 1)),
    ("blur pad (1, 1), after the transposed conv", _blur(4.0), 1, 1, (1, 1)),
    ("blur pad (2, 2), before a 3x3 stride-2 conv", _blur(1.0), 1, 1, (2, 2)),
    ("blur pad (1, 1), before the 1x1 stride-2 skip", _blur(1.0), 1, 1, (1, 1)),
    ("down 2, pad (1, 1)", _blur(1.0), 1, 2, (1, 1)),
    ("up (2, 1), down (1, 3), pad (1, -1, 2, 0), 3x4 kernel", None, (2, 1), (1, 3), (1, -1, 2, 0)),
)


def _selfcheck_cases() -> List[SelfCheckCase]:
    """The cases of the upfirdn2d self-check: input of shape (2, 3, 9, 8), gradients w.r.t. it."""
    cases = []
    for name, kernel, up, down, pad in SELFCHECK_CASES:
        u, d, p = parse_params(up, down, pad)
        if kernel is None:  # multiples of 1/16: exact in every float dtype, so all paths see the same taps
            kernel = torch.randint(-16, 17, (3, 4), generator=torch.Generator().manual_seed(5)).double() / 16

        def run(x: torch.Tensor, k: torch.Tensor = kernel, u=u, d=d, p=p) -> torch.Tensor:
            return _run_kernel(x, k.to(device=x.device, dtype=x.dtype), u, d, p)

        def ref(x: torch.Tensor, k: torch.Tensor = kernel, u=u, d=d, p=p) -> torch.Tensor:
            return upfirdn2d_ref(x, k.to(device=x.device, dtype=x.dtype), u, d, p)

        def make(device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Tuple[torch.Tensor, ...]:
            return (torch.randn(2, 3, 9, 8, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype),)

        cases.append(SelfCheckCase(name, make, kernel=run, reference=ref))
    return cases


register_selfcheck("upfirdn2d", _selfcheck_cases)


# --------------------------------------------------------------------------- entry point


def upfirdn2d(
    input: torch.Tensor,
    kernel: torch.Tensor,
    up: IntOrPair = 1,
    down: IntOrPair = 1,
    pad: Sequence[int] = (0, 0),
    impl: Optional[str] = None,
) -> torch.Tensor:
    """Upsample, pad, FIR-filter and downsample each channel of ``input``.

    Args:
        input: (B, C, H, W) tensor.
        kernel: (kh, kw) FIR kernel applied as a true convolution; a 1-D kernel
            ``k`` means the separable kernel ``outer(k, k)``. Cast to input dtype.
        up: zero-insertion factor, int or ``(x, y)``.
        down: decimation factor, int or ``(x, y)``.
        pad: ``(p0, p1)`` for both axes or ``(x0, x1, y0, y1)``; negative crops.
        impl: ``'cuda'``, ``'ref'`` or ``None`` (automatic: CUDA kernel only for
            CUDA tensors when the extension builds and passed its self-check at
            first use, else the reference path; see :mod:`op._backend`).
            The CUDA path needs a kernel that does not require grad.

    Returns:
        (B, C, OH, OW) with ``O = (n*up + p0 + p1 - k + down) // down`` per axis.
    """
    if input.ndim != 4:
        raise ValueError(f"upfirdn2d expects a (B, C, H, W) input, got shape {tuple(input.shape)}")
    if kernel.ndim not in (1, 2) or kernel.numel() == 0:
        raise ValueError(f"kernel must be a non-empty 1-D or 2-D tensor, got shape {tuple(kernel.shape)}")
    up_p, down_p, pads = parse_params(up, down, pad)
    kh, kw = (kernel.shape[0], kernel.shape[0]) if kernel.ndim == 1 else tuple(kernel.shape)
    oh = output_size(input.shape[2], kh, up_p[1], down_p[1], pads[2], pads[3])
    ow = output_size(input.shape[3], kw, up_p[0], down_p[0], pads[0], pads[1])
    if oh < 1 or ow < 1:
        raise ValueError(
            f"upfirdn2d output would be empty ({oh}x{ow}) for input {tuple(input.shape)}, "
            f"kernel {tuple(kernel.shape)}, up={up}, down={down}, pad={tuple(pad)}"
        )
    cuda_ok = not kernel.requires_grad and input.dtype in (torch.float16, torch.float32, torch.float64)
    if impl == "cuda" and not cuda_ok:
        raise ValueError("impl='cuda' needs a float input and a kernel that does not require grad")
    chosen = resolve_impl(impl if cuda_ok else "ref", input, _EXT, op="upfirdn2d")
    if chosen == "cuda":
        k2 = torch.outer(kernel, kernel) if kernel.ndim == 1 else kernel
        return _run_kernel(input, k2.to(device=input.device, dtype=input.dtype), up_p, down_p, pads)
    return upfirdn2d_ref(input, kernel, up_p, down_p, pads)
