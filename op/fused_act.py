"""Fused bias + leaky ReLU + scale: ``y = scale * leaky_relu(x + b, slope)``.

The bias is broadcast over dimension 1 of an input of any rank >= 2. The
reference path is two memory passes (one fused ``add`` with ``alpha`` and an
in-place leaky ReLU, using ``scale*lrelu(v) == lrelu(scale*v)`` for
``scale > 0``); autograd provides first and second order gradients. The CUDA
path runs one kernel forward and expresses its backward through a second
kernel that is itself differentiable, so second order gradients work too.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._backend import SelfCheckCase, load_extension, register_selfcheck, resolve_impl

_EXT = "rms_fused_bias_act"

__all__ = ["fused_leaky_relu", "FusedLeakyReLU"]


def _bias_view(bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a (C,) bias to broadcast over dim 1 of ``x`` and cast its dtype."""
    if bias.ndim != 1 or bias.shape[0] != x.shape[1]:
        raise ValueError(
            f"bias must have shape ({x.shape[1]},) to match input dim 1, got {tuple(bias.shape)}"
        )
    return bias.to(x.dtype).view(1, -1, *([1] * (x.ndim - 2)))


def _fused_leaky_relu_ref(
    x: torch.Tensor, bias: Optional[torch.Tensor], slope: float, scale: float
) -> torch.Tensor:
    """Differentiable pure-PyTorch implementation (any device, any order)."""
    b = None if bias is None else _bias_view(bias, x)
    if scale > 0 and slope >= 0:
        # scale * lrelu(x + b) == lrelu(scale * x + scale * b): 1 fused pass + in-place lrelu.
        v = x * scale if b is None else torch.add(b * scale, x, alpha=scale)
        return F.leaky_relu(v, slope, inplace=True)
    v = x if b is None else x + b
    return F.leaky_relu(v, slope) * scale


class _FusedActGrad(torch.autograd.Function):
    """``g -> g * scale * (1 if ref > 0 else slope)``; linear in ``g``, so its own backward."""

    @staticmethod
    def forward(ctx: Any, grad: torch.Tensor, out: torch.Tensor, slope: float, scale: float) -> torch.Tensor:
        ctx.save_for_backward(out)
        ctx.slope, ctx.scale = slope, scale
        ext = load_extension(_EXT)
        return ext.fused_bias_act(grad.contiguous(), torch.empty(0, device=grad.device, dtype=grad.dtype),
                                  out.contiguous(), 1, slope, scale)

    @staticmethod
    def backward(ctx: Any, gg: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        (out,) = ctx.saved_tensors
        # d/d(out) is zero almost everywhere (piecewise-constant mask).
        return _FusedActGrad.apply(gg, out, ctx.slope, ctx.scale), None, None, None


class _FusedActCuda(torch.autograd.Function):
    """CUDA forward; the backward uses the output's sign as the pre-activation sign."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: Optional[torch.Tensor], slope: float, scale: float) -> torch.Tensor:
        ext = load_extension(_EXT)
        b = torch.empty(0, device=x.device, dtype=x.dtype) if bias is None else bias.to(x.dtype).contiguous()
        out = ext.fused_bias_act(x.contiguous(), b, torch.empty(0, device=x.device, dtype=x.dtype), 0, slope, scale)
        ctx.save_for_backward(out)
        ctx.slope, ctx.scale = slope, scale
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        (out,) = ctx.saved_tensors
        grad_x = _FusedActGrad.apply(grad, out, ctx.slope, ctx.scale)
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            dims = [0] + list(range(2, grad_x.ndim))
            grad_b = grad_x.sum(dims).to(ctx.bias_dtype)
        return grad_x, grad_b, None, None


def _run_kernel(x: torch.Tensor, bias: Optional[torch.Tensor], slope: float, scale: float) -> torch.Tensor:
    """The CUDA path (shapes already checked). Both the dispatch and the self-check call this
    module attribute, so a test can replace it to exercise the self-check on any device."""
    return _FusedActCuda.apply(x, bias, slope, scale)


# --------------------------------------------------------------------------- self-check

#: (name, input shape, with bias): the model's uses (FusedLeakyReLU on feature maps with a bias,
#: EqualLinear's activation on (B, C) style vectors) and the no-bias form; slope 0.2, gain sqrt(2).
SELFCHECK_CASES: Tuple[Tuple[str, Tuple[int, ...], bool], ...] = (
    ("feature map (2, 5, 6, 7) with bias", (2, 5, 6, 7), True),
    ("feature map (2, 5, 6, 7) without bias", (2, 5, 6, 7), False),
    ("linear (4, 9) with bias", (4, 9), True),
)


def _selfcheck_cases() -> List[SelfCheckCase]:
    """Cases of the fused_leaky_relu self-check: gradients w.r.t. the input and the bias.

    Pre-activations are kept at least 0.1 away from the kink so that rounding to
    float16 cannot flip a sign between the two paths.
    """
    cases = []
    for name, shape, with_bias in SELFCHECK_CASES:
        def make(device: torch.device, dtype: torch.dtype, gen: torch.Generator, shape=shape,
                 with_bias=with_bias) -> Tuple[torch.Tensor, ...]:
            v = torch.randn(shape, generator=gen, dtype=torch.float64)
            v = v + 0.1 * torch.where(v >= 0, 1.0, -1.0).to(v.dtype)
            b = torch.randint(-8, 9, (shape[1],), generator=gen).double() / 8  # exact in float16
            x = v - b.view(1, -1, *([1] * (len(shape) - 2))) if with_bias else v
            out = (x.to(device=device, dtype=dtype),)
            return out + (b.to(device=device, dtype=dtype),) if with_bias else out

        def run(x: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
            return _run_kernel(x, b, 0.2, 2 ** 0.5)

        def ref(x: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
            return _fused_leaky_relu_ref(x, b, 0.2, 2 ** 0.5)

        cases.append(SelfCheckCase(name, make, kernel=run, reference=ref))
    return cases


register_selfcheck("fused_leaky_relu", _selfcheck_cases)


def fused_leaky_relu(
    input: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    negative_slope: float = 0.2,
    scale: float = 2 ** 0.5,
    impl: Optional[str] = None,
) -> torch.Tensor:
    """Return ``scale * leaky_relu(input + bias, negative_slope)``.

    Args:
        input: tensor of rank >= 2; the bias is added along dim 1.
        bias: optional (C,) tensor, cast to ``input.dtype``.
        negative_slope: leaky ReLU slope for negative pre-activations.
        scale: output gain (sqrt(2) keeps the variance for slope 0.2).
        impl: ``'cuda'``, ``'ref'`` or ``None`` (automatic: CUDA kernel only for
            CUDA tensors when the extension builds and passed its self-check at
            first use, else the reference path; see :mod:`op._backend`).

    First and second order gradients are supported by both paths.
    """
    if input.ndim < 2:
        raise ValueError(f"input must have rank >= 2, got shape {tuple(input.shape)}")
    slope, gain = float(negative_slope), float(scale)
    cuda_ok = gain > 0 and slope >= 0 and input.dtype in (torch.float16, torch.float32, torch.float64)
    if impl == "cuda" and not cuda_ok:
        raise ValueError("impl='cuda' supports scale > 0, negative_slope >= 0 and float dtypes only")
    chosen = resolve_impl(impl if cuda_ok else "ref", input, _EXT, op="fused_leaky_relu")
    if chosen == "cuda":
        if bias is not None:
            _bias_view(bias, input)  # shape check only
        return _run_kernel(input, bias, slope, gain)
    return _fused_leaky_relu_ref(input, bias, slope, gain)


class FusedLeakyReLU(nn.Module):
    """Module form of :func:`fused_leaky_relu` with a learned per-channel ``bias`` (init 0)."""

    def __init__(
        self, channel: int, bias: bool = True, negative_slope: float = 0.2, scale: float = 2 ** 0.5
    ) -> None:
        super().__init__()
        self.bias: Optional[nn.Parameter]
        if bias:
            self.bias = nn.Parameter(torch.zeros(channel))
        else:
            self.register_parameter("bias", None)
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(input, self.bias, self.negative_slope, self.scale)

    def extra_repr(self) -> str:
        c = None if self.bias is None else self.bias.shape[0]
        return f"channel={c}, negative_slope={self.negative_slope}, scale={self.scale:.4g}"

