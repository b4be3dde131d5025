"""Conditional single-channel StyleGAN2 generator and discriminator (shared by phase 1 and phase 2).

This is the ONE model module of the project (docs/method.md#building-blocks, #generator, #discriminator,
#state-dict, #phase2-generator).  The state-dict
layout for ``size=512, n_domains=3, channel_multiplier=2`` matches docs/method.md#state-dict key for key, so the
original checkpoints load with ``strict=True``.

Conditioning
------------
A condition is ``c = [one-hot(domain, n_domains); one-hot(zbin, n_zbins)]`` (see :func:`make_condition`)
plus an optional CLIP-space encoding ``e`` of width ``clip_dim``.  Every module that takes labels
accepts either a tensor ``c`` or a pair ``(c, e)`` with ``e`` possibly ``None``.  Both must have one
row per sample (a mismatch raises :class:`ValueError`; callers repeat rows themselves).

A row of ``e`` that is entirely zero means "no encoding for this sample": the generator then uses
``ε = ℓ`` for that row (exactly the original rule "e is None or all zero → ε = ℓ", applied per row)
and the discriminator uses the factor 1 for that row (as if ``e`` were ``None``).

Defects fixed relative to the original code (docs/differences.md)
-----------------------------------------------------------------
* d9-5: every noise vector is paired with its condition, so style mixing with two ``z`` really
  mixes.
* d9-13: the number of z-bins (29, :data:`N_ZBINS`), the CLIP width (768) and the middle bins used by
  :meth:`Generator.mean_latent` are constructor arguments / derived from them.
* d9-35: there is no broken ``truncation()`` method; truncation is done through ``forward``'s
  ``truncation``/``truncation_latent`` arguments, and :meth:`Generator.mean_latent` is computed in chunks.

Feature injection (phase 2)
---------------------------
:meth:`Generator.g_synthesis` returns the ``n_latent``-entry feature list ``F``: ``F[0]`` the constant
input, ``F[1]`` the output of ``conv1`` (both 4 px), then for each resolution step ``t`` (8·2^t px)
``F[2+2t]`` the output of the upsampling conv and ``F[3+2t]`` the output of the second conv.  Features are
recorded as produced by the layer, i.e. before any injection.

``features_in[k] = (f, gate)`` (or a bare tensor ``f`` meaning ``gate = 1``, or ``None``) replaces the
tensor ``x`` that equals ``F[k]`` just before it enters the next conv:
``x ← (1 − s)·x·gate + s·f`` with ``s = feature_scale``; ``f`` must have ``F[k]``'s shape.  Valid
insertion indices are ``1 … n_latent − 2`` (``1+2t`` before the upsampling conv of step ``t``,
``2+2t`` before its second conv).  For ``size=512`` the encoder's indices 5, 7, 9, 11 are the 16, 32,
64 and 128 px inputs of the upsampling convs.  The list may be longer than needed (e.g. 17 entries);
entries past its end count as ``None``, and a non-``None`` entry at an invalid index raises ``ValueError``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from op import FusedLeakyReLU, conv2d_gradfix, fused_leaky_relu, upfirdn2d
from op.upfirdn import fir_matrix

__all__ = [
    "MIN_SIZE", "MAX_SIZE", "N_ZBINS", "check_image_size", "GeneratorArgs", "GENERATOR_KEYS",
    "PixelNorm", "EqualLinear", "EqualConv2d", "ModulatedConv2d", "Blur", "Upsample", "NoiseInjection",
    "ConstantInput", "StyledConv", "ToRGB", "ConvLayer", "ResBlock", "Generator", "Discriminator",
    "channel_table", "make_condition", "middle_zbins", "split_labels", "minibatch_stddev",
]

Labels = Union[Tensor, Tuple[Tensor, Optional[Tensor]], Sequence[Optional[Tensor]]]
FeatureEntry = Optional[Union[Tensor, Tuple[Tensor, Union[Tensor, float]]]]

# ----------------------------------------------------------------------------------------------
# The generator's arguments and the image-size rule (owned here; phase 1, phase 2, the factory
# file and the benches derive from them)
# ----------------------------------------------------------------------------------------------
MIN_SIZE, MAX_SIZE = 16, 1024  # image sizes the generator/discriminator pyramid supports
N_ZBINS = 29  # z-bins of the paper's conditioning (docs/method.md#conditioning)


def check_image_size(size: int) -> None:
    """The one image-size rule (ValueError): a power of two in [MIN_SIZE, MAX_SIZE] = [16, 1024].

    Used by :class:`Generator`/:class:`Discriminator`, :class:`GeneratorArgs` (``train.py --size``,
    phase 2's ``PSPConfig``) and ``prepare_data.py --size``, so a size training would refuse is
    refused at preparation.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_SIZE or size > MAX_SIZE \
            or size & (size - 1):
        raise ValueError(f"size must be a power of two in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")


@dataclass(frozen=True)
class GeneratorArgs:
    """The generator's architecture arguments (defaults = the paper's), by name: what
    ``final_global_model.pt`` stores as ``args``, what phase 1 ships in ``model_args`` and what
    phase 2 rebuilds its decoder from.  :class:`Generator` takes them all, :class:`Discriminator`
    those it uses (``n_mlp`` and ``lr_mlp`` are the generator's mapping network)."""

    size: int = 512
    style_dim: int = 512
    n_mlp: int = 8
    n_domains: int = 3
    channel_multiplier: int = 2
    n_zbins: int = N_ZBINS
    clip_dim: int = 768
    channel_cap: Optional[int] = None
    lr_mlp: float = 0.01

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ValueError on arguments no generator can be built from."""
        check_image_size(self.size)
        if not float(self.lr_mlp) > 0:
            raise ValueError(f"lr_mlp must be > 0, got {self.lr_mlp}")
        if self.channel_cap is not None and int(self.channel_cap) < 1:
            raise ValueError(f"channel_cap must be >= 1, got {self.channel_cap}")
        for name in ("style_dim", "n_mlp", "n_domains", "channel_multiplier", "n_zbins", "clip_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_mapping(cls, args: Mapping[str, Any]) -> "GeneratorArgs":
        """The entries of ``args`` named like a field (others are ignored; missing ones default)."""
        return cls(**{k: args[k] for k in GENERATOR_KEYS if k in args})

    def as_dict(self) -> Dict[str, Any]:
        """``{name: value}`` in field order (the ``args`` of a factory file)."""
        return dataclasses.asdict(self)

    @property
    def n_cond(self) -> int:
        """Width of a condition vector: n_domains + n_zbins."""
        return self.n_domains + self.n_zbins


GENERATOR_KEYS: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(GeneratorArgs))
_DEFAULT = GeneratorArgs()

# ----------------------------------------------------------------------------------------------
# CPU fast paths (issue 23; BENCHMARKS.md "Training-step speed (issue 23)")
# ----------------------------------------------------------------------------------------------
#: ``RMS_PLAIN_PATHS=1`` in the environment turns the CPU fast paths off for the whole process.
PLAIN_PATHS_ENV = "RMS_PLAIN_PATHS"
_fast_state = {"enabled": os.environ.get(PLAIN_PATHS_ENV, "").strip().lower() not in ("1", "true", "yes")}


def fast_paths_enabled() -> bool:
    """Whether the CPU fast paths are on (default; off under ``RMS_PLAIN_PATHS=1`` or :func:`plain_paths`)."""
    return _fast_state["enabled"]


@contextlib.contextmanager
def plain_paths(plain: bool = True):
    """Run the block on the plain paths (``plain=False``: the fast paths), then restore the setting.

    The fast paths compute the same functions with other kernels (float rounding differs, nothing else;
    tests/test_fast_paths.py): on CPU tensors the networks run in the channels-last memory layout and
    the modulated convolution modulates the activations (one plain convolution with the shared weight,
    then the demodulation as a per-sample output scale, as the StyleGAN2-ADA reference trains) instead of
    one grouped convolution with per-sample weights.  CUDA tensors always take the plain paths.
    """
    previous = _fast_state["enabled"]
    _fast_state["enabled"] = not plain
    try:
        yield
    finally:
        _fast_state["enabled"] = previous


def _fast_cpu(x: Tensor) -> bool:
    return _fast_state["enabled"] and x.device.type == "cpu"


def channels_last(x: Tensor) -> Tensor:
    """``x`` in the channels-last layout when the CPU fast paths apply to it (else ``x`` unchanged)."""
    if x.ndim == 4 and _fast_cpu(x):
        return x.contiguous(memory_format=torch.channels_last)
    return x

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def pixel_norm(x: Tensor) -> Tensor:
    """Normalise every row to unit root-mean-square over dim 1: ``x · rsqrt(mean(x²) + 1e-8)``."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


def make_blur_kernel(taps: Sequence[float]) -> Tensor:
    """2-D FIR kernel: outer product of ``taps`` with itself, normalised to sum 1."""
    k = torch.tensor(list(taps), dtype=torch.float32)
    if k.ndim != 1 or k.numel() < 1:
        raise ValueError(f"blur kernel must be a non-empty 1-D sequence, got {taps!r}")
    k2 = torch.outer(k, k)
    return k2 / k2.sum()


def channel_table(size: int, channel_multiplier: int = 2, channel_cap: Optional[int] = None) -> Dict[int, int]:
    """Channels per resolution 4…``size`` (StyleGAN2 table), optionally capped at ``channel_cap``."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    if channel_cap is not None and channel_cap < 1:
        raise ValueError(f"channel_cap must be a positive int or None, got {channel_cap}")
    table = {}
    for res, ch in base.items():
        if res > size:
            break
        table[res] = ch if channel_cap is None else min(ch, channel_cap)
    return table


def _constructor_args(cls: type, args: Mapping[str, Any]) -> Dict[str, Any]:
    """The entries of ``args`` that are parameters of ``cls.__init__`` (others are ignored)."""
    if isinstance(args, GeneratorArgs):
        args = {k: getattr(args, k) for k in GENERATOR_KEYS}
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in args.items() if k in params and k != "self"}


def _log2_size(size: int) -> int:
    """log2 of a power-of-two ``size`` in [MIN_SIZE, MAX_SIZE]; ValueError otherwise (the one rule,
    :func:`check_image_size`)."""
    check_image_size(size)
    return int(math.log2(size))


def middle_zbins(n_zbins: int) -> Tuple[int, ...]:
    """The three middle z-bins (13, 14, 15 for 29 bins), clipped to the valid range."""
    mid = n_zbins // 2
    return tuple(b for b in (mid - 1, mid, mid + 1) if 0 <= b < n_zbins)


def make_condition(domains: Union[int, Sequence[int], Tensor], zbins: Union[int, Sequence[int], Tensor],
                   n_domains: int, n_zbins: int, device: Optional[torch.device] = None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot conditions ``[one-hot(domain); one-hot(zbin)]`` of shape (B, n_domains + n_zbins).

    ``domains`` and ``zbins`` are ints or 1-D sequences; a single value is broadcast to the other's length.
    """
    d = torch.as_tensor(domains, dtype=torch.long).reshape(-1).cpu()
    b = torch.as_tensor(zbins, dtype=torch.long).reshape(-1).cpu()
    if d.numel() == 1 and b.numel() > 1:
        d = d.expand(b.numel())
    elif b.numel() == 1 and d.numel() > 1:
        b = b.expand(d.numel())
    if d.numel() != b.numel() or d.numel() == 0:
        raise ValueError(f"domains ({d.numel()}) and zbins ({b.numel()}) must have the same non-zero length")
    if d.min() < 0 or d.max() >= n_domains:
        raise ValueError(f"domain indices must be in [0, {n_domains - 1}], got {d.tolist()}")
    if b.min() < 0 or b.max() >= n_zbins:
        raise ValueError(f"z-bin indices must be in [0, {n_zbins - 1}], got {b.tolist()}")
    c = torch.zeros(d.numel(), n_domains + n_zbins, dtype=dtype)
    rows = torch.arange(d.numel())
    c[rows, d] = 1
    c[rows, n_domains + b] = 1
    return c.to(device) if device is not None else c


def split_labels(labels: Labels, batch: int, n_cond: int, clip_dim: int,
                 dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
    """Parse ``labels`` (tensor ``c`` or pair ``(c, e)``), check shapes against the batch, cast to ``dtype``."""
    if isinstance(labels, Tensor):
        c, e = labels, None
    elif isinstance(labels, (tuple, list)) and 1 <= len(labels) <= 2:
        c = labels[0]
        e = labels[1] if len(labels) == 2 else None
    else:
        raise ValueError("labels must be a condition tensor c or a pair (c, e)")
    if not isinstance(c, Tensor) or c.ndim != 2 or c.shape[1] != n_cond:
        raise ValueError(f"condition c must have shape (B, {n_cond}), got "
                         f"{tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__}")
    if c.shape[0] != batch:
        raise ValueError(f"condition c has {c.shape[0]} rows but the batch has {batch}; repeat it to the batch size")
    if e is not None:
        if not isinstance(e, Tensor) or e.ndim != 2 or e.shape[1] != clip_dim:
            raise ValueError(f"encoding e must have shape (B, {clip_dim}), got "
                             f"{tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__}")
        if e.shape[0] != batch:
            raise ValueError(f"encoding e has {e.shape[0]} rows but the batch has {batch}; repeat it to the batch size")
        e = e.to(dtype)
    return c.to(dtype), e


def _present_rows(e: Tensor) -> Tensor:
    """(B, 1) bool mask of the rows of ``e`` that are not entirely zero."""
    return e.ne(0).any(dim=1, keepdim=True)


def minibatch_stddev(x: Tensor, group_max: int = 4) -> Tensor:
    """Append the minibatch-stddev feature map (one channel) to ``x``.

    The group size G is the largest divisor of B that is ≤ ``group_max`` (so = min(B, 4) whenever B is
    divisible, as in StyleGAN2; e.g. B=6 gives G=3 instead of failing).  The population std over each
    group (+1e-8, sqrt) is averaged over (C, H, W); sample n gets the statistic of subgroup n mod B/G.
    """
    b, _, h, w = x.shape
    group = max(g for g in range(1, min(b, group_max) + 1) if b % g == 0)
    y = x.reshape(group, b // group, -1)
    std = torch.sqrt(y.var(dim=0, unbiased=False) + 1e-8).mean(dim=1)  # (B/G,)
    std = std.repeat(group).view(b, 1, 1, 1).expand(b, 1, h, w)
    return torch.cat([x, std.to(x.dtype)], dim=1)


# ----------------------------------------------------------------------------------------------
# Building blocks (docs/method.md#building-blocks)
# ----------------------------------------------------------------------------------------------
class PixelNorm(nn.Module):
    """``x · rsqrt(mean over dim 1 of x² + 1e-8)``."""

    def forward(self, x: Tensor) -> Tensor:
        return pixel_norm(x)


class Blur(nn.Module):
    """FIR low-pass filter (true convolution) with a persistent ``kernel`` buffer."""

    def __init__(self, taps: Sequence[float], pad: Tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_blur_kernel(taps) * upsample_factor ** 2)
        self.pad = (int(pad[0]), int(pad[1]))

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel.to(x.dtype), pad=self.pad)


class Upsample(nn.Module):
    """2× FIR upsampling used on the ToRGB skip path: up=2, pad (2, 1) for a 4-tap kernel, kernel × 4."""

    def __init__(self, taps: Sequence[float], factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_blur_kernel(taps) * factor ** 2)
        p = len(taps) - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)
        k = torch.tensor(list(taps), dtype=torch.float64)
        self._taps = k / k.sum() * factor  # 1-D factor of ``kernel`` (not state: rebuilt from ``taps``)
        self._matrices: Dict[Tuple[int, int, torch.dtype], Tuple[Tensor, Tensor]] = {}

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1 and _fast_cpu(x):  # the 1-channel ToRGB skip: U_y @ x @ U_x^T (op.upfirdn.fir_matrix)
            uy, ux = self._axis_matrices(x.shape[2], x.shape[3], x.dtype)
            return uy @ x @ ux.t()
        return upfirdn2d(x, self.kernel.to(x.dtype), up=self.factor, down=1, pad=self.pad)

    def _axis_matrices(self, h: int, w: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        key = (h, w, dtype)
        if key not in self._matrices:
            self._matrices[key] = tuple(fir_matrix(n, self._taps, up=self.factor, pad=self.pad).to(dtype)
                                        for n in (h, w))
        return self._matrices[key]


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate.

    The weight is drawn N(0, 1)/lr_mul and scaled at run time by lr_mul/√in; the bias starts at
    ``bias_init`` and is scaled by lr_mul.  ``activation="fused_lrelu"`` applies the fused bias + leaky ReLU.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: Optional[str] = None):
        super().__init__()
        if activation not in (None, "fused_lrelu"):
            raise ValueError(f"unknown activation {activation!r} (use None or 'fused_lrelu')")
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.activation = activation
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias * self.lr_mul
        if self.activation is None:
            return F.linear(x, self.weight * self.scale, bias)
        out = F.linear(x, self.weight * self.scale)
        if bias is None:
            bias = out.new_zeros(out.shape[1])
        return fused_leaky_relu(out, bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, lr_mul={self.lr_mul}, activation={self.activation}"


class EqualConv2d(nn.Module):
    """Conv2d with equalised learning rate: weight N(0, 1) scaled by 1/√(in·k²) at run time."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale = 1.0 / math.sqrt(in_ch * kernel_size ** 2)
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.shape[1] == 1 and self.weight.shape[2:] == (1, 1) and self.stride == 1 and self.padding == 0 \
                and _fast_cpu(x):
            # 1x1 conv of a 1-channel image (D's first layer): an outer product, written channels-last
            w = (self.weight * self.scale).to(x.dtype).view(1, 1, 1, -1)
            out = (x.permute(0, 2, 3, 1) * w).permute(0, 3, 1, 2)
            return out if bias is None else out + bias.view(1, -1, 1, 1)
        return conv2d_gradfix.conv2d(x, (self.weight * self.scale).to(x.dtype), bias=bias,
                                     stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, {k}, stride={self.stride}, padding={self.padding}"


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution run as one grouped convolution over the batch (on CPU tensors with the
    fast paths on, :func:`plain_paths`: as one plain convolution of the modulated activations, the same function).

    Upsampling: stride-2 transposed conv then Blur(pad (1, 1) for k=3, kernel × 4).
    Downsampling: Blur(pad ((p+1)//2, p//2), p = len(taps) − 2 + k − 1) then stride-2 conv.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False, downsample: bool = False,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        if upsample and downsample:
            raise ValueError("ModulatedConv2d cannot both upsample and downsample")
        self.in_ch, self.out_ch, self.kernel_size = in_ch, out_ch, kernel_size
        self.upsample, self.downsample, self.demodulate = upsample, downsample, demodulate
        factor = 2
        if upsample:
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, ((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        elif downsample:
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            self.blur = Blur(blur_kernel, ((p + 1) // 2, p // 2))
        self.scale = 1.0 / math.sqrt(in_ch * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1.0)

    def _batch_weight(self, style: Tensor, batch: int) -> Tensor:
        """Per-sample weights (B, out, in, k, k): modulated and, if enabled, demodulated."""
        s = self.modulation(style).view(batch, 1, self.in_ch, 1, 1)
        w = self.scale * self.weight * s
        if self.demodulate:
            w = w * torch.rsqrt(w.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        return w

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        b, c, h, w_ = x.shape
        if c != self.in_ch:
            raise ValueError(f"ModulatedConv2d expects {self.in_ch} input channels, got {c}")
        if _fast_cpu(x):
            return self._forward_modulated_input(x, style)
        k = self.kernel_size
        weight = self._batch_weight(style, b).to(x.dtype)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(b * self.in_ch, self.out_ch, k, k)
            out = conv2d_gradfix.conv_transpose2d(x.reshape(1, b * c, h, w_), weight, padding=0, stride=2, groups=b)
            out = self.blur(out.view(b, self.out_ch, out.shape[-2], out.shape[-1]))
        else:
            weight = weight.reshape(b * self.out_ch, self.in_ch, k, k)
            stride, padding = 1, self.padding
            if self.downsample:
                x = self.blur(x)
                stride, padding = 2, 0
            out = conv2d_gradfix.conv2d(x.reshape(1, b * c, x.shape[-2], x.shape[-1]), weight,
                                        padding=padding, stride=stride, groups=b)
            out = out.view(b, self.out_ch, out.shape[-2], out.shape[-1])
        return out

    def _forward_modulated_input(self, x: Tensor, style: Tensor) -> Tensor:
        """The same function as the grouped form: ``conv(x * (scale * s), W) * d`` with the demodulation
        ``d[b, o] = rsqrt(sum_i (scale * s[b, i])^2 * sum_kk W[o, i]^2 + 1e-8)`` (one plain convolution
        over the batch; the per-channel scales commute with the convolution and with the blur)."""
        b = x.shape[0]
        s = self.modulation(style) * self.scale  # the equalised-lr scale rides on s: W is used as stored
        weight = self.weight[0]
        x = x * s.to(x.dtype).view(b, self.in_ch, 1, 1)
        w = weight.to(x.dtype)
        if self.upsample:
            out = conv2d_gradfix.conv_transpose2d(x, w.transpose(0, 1), padding=0, stride=2)
        elif self.downsample:
            out = conv2d_gradfix.conv2d(self.blur(x), w, padding=0, stride=2)
        else:
            out = conv2d_gradfix.conv2d(x, w, padding=self.padding)
        if self.demodulate:
            d = torch.rsqrt(s.pow(2) @ weight.pow(2).sum(dim=(2, 3)).t() + 1e-8)
            out = out * d.to(out.dtype).view(b, self.out_ch, 1, 1)
        if self.upsample:
            out = self.blur(out)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_ch}, {self.out_ch}, {self.kernel_size}, upsample={self.upsample}, "
                f"downsample={self.downsample}, demodulate={self.demodulate}")


class NoiseInjection(nn.Module):
    """``x + w·n`` with a learned scalar ``w`` (init 0) and per-pixel noise ``n`` (B, 1, H, W)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        if noise is None:
            b, _, h, w = x.shape
            noise = x.new_empty(b, 1, h, w).normal_()
        return x + (self.weight * noise).to(x.dtype)


class ConstantInput(nn.Module):
    """A learned (1, C, size, size) tensor repeated over the batch."""

    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> Tensor:
        return self.input.repeat(batch, 1, 1, 1)


class StyledConv(nn.Module):
    """ModulatedConv2d → NoiseInjection → FusedLeakyReLU (per-channel bias)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, upsample: bool = False,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1), demodulate: bool = True):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, kernel_size, style_dim, demodulate=demodulate,
                                    upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_ch)

    def forward(self, x: Tensor, style: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        return self.activate(self.noise(self.conv(x, style), noise=noise))


class ToRGB(nn.Module):
    """Single-channel output layer: 1×1 modulated conv (no demodulation) + bias, plus the upsampled skip."""

    def __init__(self, in_ch: int, style_dim: int, upsample: bool = True,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_ch, 1, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, 1))

    def forward(self, x: Tensor, style: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        out = self.conv(x, style) + self.bias.to(x.dtype)
        if skip is not None:
            if hasattr(self, "upsample"):
                skip = self.upsample(skip)
            out = out + skip
        return out


class ConvLayer(nn.Sequential):
    """Discriminator conv: [Blur if downsampling] → EqualConv2d → [FusedLeakyReLU].

    The conv has a bias only when ``bias`` is set and there is no activation (the activation holds it).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, downsample: bool = False,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1), bias: bool = True, activate: bool = True):
        layers: List[nn.Module] = []
        if downsample:
            p = (len(blur_kernel) - 2) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, ((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                                  bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_ch))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Residual downsampling block: (conv2(conv1(x)) + skip(x)) / √2."""

    def __init__(self, in_ch: int, out_ch: int, blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.conv1 = ConvLayer(in_ch, in_ch, 3, blur_kernel=blur_kernel)
        self.conv2 = ConvLayer(in_ch, out_ch, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(in_ch, out_ch, 1, downsample=True, blur_kernel=blur_kernel, bias=False,
                              activate=False)

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


# ----------------------------------------------------------------------------------------------
# Generator (docs/method.md#generator, #phase2-generator)
# ----------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """Conditional single-channel StyleGAN2 generator.

    Attributes: ``n_latent`` (= 2·log2(size) − 2, number of W+ rows and of returned features),
    ``num_layers`` (= n_latent − 1, number of noise inputs), ``n_cond`` (= n_domains + n_zbins),
    ``channels`` (resolution → channels).
    """

    def __init__(self, size: int, style_dim: int = _DEFAULT.style_dim, n_mlp: int = _DEFAULT.n_mlp,
                 n_domains: int = _DEFAULT.n_domains, channel_multiplier: int = _DEFAULT.channel_multiplier,
                 lr_mlp: float = _DEFAULT.lr_mlp, n_zbins: int = _DEFAULT.n_zbins, clip_dim: int = _DEFAULT.clip_dim,
                 channel_cap: Optional[int] = _DEFAULT.channel_cap, blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.log_size = _log2_size(size)
        if n_domains < 1 or n_zbins < 1 or n_mlp < 1 or style_dim < 1 or clip_dim < 1:
            raise ValueError("n_domains, n_zbins, n_mlp, style_dim and clip_dim must be positive")
        self.size, self.style_dim = size, style_dim
        self.n_domains, self.n_zbins, self.clip_dim = n_domains, n_zbins, clip_dim
        self.n_cond = n_domains + n_zbins
        self.channels = channel_table(size, channel_multiplier, channel_cap)
        self.n_latent = 2 * self.log_size - 2
        self.num_layers = 2 * (self.log_size - 2) + 1

        self.label_embed = EqualLinear(self.n_cond, style_dim)
        self.encoding_embed = nn.Sequential(EqualLinear(clip_dim, self.n_cond), EqualLinear(self.n_cond, style_dim))
        self.style = nn.Sequential(*[
            EqualLinear(2 * style_dim if i == 0 else style_dim, style_dim, lr_mul=lr_mlp, activation="fused_lrelu")
            for i in range(n_mlp)])

        ch = self.channels
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(ch[4], style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for j in range(self.num_layers):
            res = 2 ** ((j + 5) // 2)
            self.noises.register_buffer(f"noise_{j}", torch.randn(1, 1, res, res))
        in_ch = ch[4]
        for i in range(3, self.log_size + 1):
            out_ch = ch[2 ** i]
            self.convs.append(StyledConv(in_ch, out_ch, 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_ch, out_ch, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_ch, style_dim, blur_kernel=blur_kernel))
            in_ch = out_ch

    @classmethod
    def from_args(cls, args: Union[GeneratorArgs, Mapping[str, Any]]) -> "Generator":
        """Build from a :class:`GeneratorArgs` or constructor arguments given by name (the ``args`` of
        ``final_global_model.pt``, ``FactoryConfig.model_kwargs()``).  Keys that are not parameters are
        ignored, missing ones take their defaults (``size`` is required)."""
        return cls(**_constructor_args(cls, args))

    # -- conditioning / mapping ---------------------------------------------------------------
    @property
    def _device(self) -> torch.device:
        return self.input.input.device

    @property
    def _dtype(self) -> torch.dtype:
        return self.input.input.dtype

    def condition(self, domains: Union[int, Sequence[int], Tensor],
                  zbins: Union[int, Sequence[int], Tensor]) -> Tensor:
        """One-hot conditions (B, n_cond) on this model's device (see :func:`make_condition`)."""
        return make_condition(domains, zbins, self.n_domains, self.n_zbins, device=self._device, dtype=self._dtype)

    def _cond_embedding(self, c: Tensor, e: Optional[Tensor]) -> Tensor:
        """``0.8·ε + 0.2·ℓ`` per row, with ε = ℓ for rows whose encoding is absent (None or all zero)."""
        ell = pixel_norm(self.label_embed(c))
        if e is None:
            return ell
        eps = pixel_norm(self.encoding_embed(e))
        return torch.where(_present_rows(e), 0.8 * eps + 0.2 * ell, ell)

    def _check_z(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[1] != self.style_dim:
            raise ValueError(f"noise z must have shape (B, {self.style_dim}), got "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")

    def get_latent(self, z: Tensor, c: Tensor, e: Optional[Tensor] = None) -> Tensor:
        """Map noise ``z`` (B, style_dim) under condition ``c`` (and encoding ``e``) to W (B, style_dim)."""
        self._check_z(z)
        c, e = split_labels((c, e), z.shape[0], self.n_cond, self.clip_dim, z.dtype)
        return self.style(torch.cat([pixel_norm(z), self._cond_embedding(c, e)], dim=1))

    @torch.no_grad()
    def mean_latent(self, n: Union[int, float], domains: Union[int, Sequence[int]], n_domains: Optional[int] = None,
                    zbins: Optional[Sequence[int]] = None, chunk: int = 8192,
                    generator: Optional[torch.Generator] = None) -> Tensor:
        """Mean W per domain: (len(domains), style_dim), rows in ``domains`` order.

        For each domain and each z-bin of ``zbins`` (default :func:`middle_zbins`, i.e. 13, 14, 15 for
        29 bins) ``n`` noise vectors are mapped without encoding, in chunks of ``chunk``; the mean is
        accumulated in float64.  ``n_domains``, if given, must equal the model's (compatibility check).
        """
        n = int(n)
        if n < 1 or chunk < 1:
            raise ValueError(f"n and chunk must be positive, got n={n}, chunk={chunk}")
        if n_domains is not None and int(n_domains) != self.n_domains:
            raise ValueError(f"n_domains={n_domains} does not match the generator's {self.n_domains}")
        domain_list = [int(domains)] if isinstance(domains, int) else [int(d) for d in domains]
        bins = middle_zbins(self.n_zbins) if zbins is None else tuple(int(b) for b in zbins)
        if not domain_list or not bins:
            raise ValueError("mean_latent needs at least one domain and one z-bin")
        rows = []
        for d in domain_list:
            total = torch.zeros(self.style_dim, dtype=torch.float64, device=self._device)
            for b in bins:
                cond = self.condition(d, b)
                for start in range(0, n, chunk):
                    m = min(chunk, n - start)
                    z = torch.randn(m, self.style_dim, device=self._device, dtype=self._dtype, generator=generator)
                    total += self.get_latent(z, cond.expand(m, -1)).double().sum(dim=0)
            rows.append(total / (n * len(bins)))
        return torch.stack(rows).to(self._dtype)

    def make_noise(self) -> List[Tensor]:
        """Fresh noise tensors, one per layer, shaped like the ``noises.noise_j`` buffers."""
        return [torch.randn_like(getattr(self.noises, f"noise_{j}")) for j in range(self.num_layers)]

    # -- synthesis ----------------------------------------------------------------------------
    def _noise_list(self, noise: Optional[Sequence[Optional[Tensor]]], randomize_noise: bool) -> List[Optional[Tensor]]:
        if noise is None:
            if randomize_noise:
                return [None] * self.num_layers
            return [getattr(self.noises, f"noise_{j}") for j in range(self.num_layers)]
        noise = list(noise)
        if len(noise) != self.num_layers:
            raise ValueError(f"noise must be a list of {self.num_layers} tensors (or None), got {len(noise)}")
        return noise

    def _check_features_in(self, features_in: Optional[Sequence[FeatureEntry]]) -> None:
        if features_in is None:
            return
        valid = range(1, self.n_latent - 1)
        for k, entry in enumerate(features_in):
            if entry is not None and k not in valid:
                raise ValueError(f"features_in[{k}] is set but injection indices must be in "
                                 f"[1, {self.n_latent - 2}] for size {self.size}")

    @staticmethod
    def _inject(x: Tensor, features_in: Optional[Sequence[FeatureEntry]], k: int, scale: float) -> Tensor:
        """``x ← (1 − s)·x·gate + s·f`` if ``features_in[k]`` is set."""
        if features_in is None or k >= len(features_in) or features_in[k] is None:
            return x
        entry = features_in[k]
        f, gate = (entry, 1.0) if isinstance(entry, Tensor) else entry
        if f.shape != x.shape:
            raise ValueError(f"features_in[{k}] has shape {tuple(f.shape)}, expected {tuple(x.shape)}")
        return (1 - scale) * x * gate + scale * f.to(x.dtype)

    def _synthesize(self, latent: Tensor, noise: Optional[Sequence[Optional[Tensor]]], randomize_noise: bool,
                    features_in: Optional[Sequence[FeatureEntry]], feature_scale: float,
                    collect: bool) -> Tuple[Tensor, List[Tensor]]:
        if latent.ndim != 3 or latent.shape[1] != self.n_latent or latent.shape[2] != self.style_dim:
            raise ValueError(f"W+ latent must have shape (B, {self.n_latent}, {self.style_dim}), "
                             f"got {tuple(latent.shape)}")
        noise = self._noise_list(noise, randomize_noise)
        self._check_features_in(features_in)
        feats: List[Tensor] = []
        x = channels_last(self.input(latent.shape[0]).to(latent.dtype))
        if collect:
            feats.append(x)
        x = self.conv1(x, latent[:, 0], noise=noise[0])
        if collect:
            feats.append(x)
        skip = self.to_rgb1(x, latent[:, 1])
        i = 1
        for conv_up, conv, to_rgb in zip(self.convs[::2], self.convs[1::2], self.to_rgbs):
            x = conv_up(self._inject(x, features_in, i, feature_scale), latent[:, i], noise=noise[i])
            if collect:
                feats.append(x)
            x = conv(self._inject(x, features_in, i + 1, feature_scale), latent[:, i + 1], noise=noise[i + 1])
            if collect:
                feats.append(x)
            skip = to_rgb(x, latent[:, i + 2], skip)
            i += 2
        return skip, feats

    def g_synthesis(self, latent: Tensor, noise: Optional[Sequence[Optional[Tensor]]] = None,
                    randomize_noise: bool = True, features_in: Optional[Sequence[FeatureEntry]] = None,
                    feature_scale: float = 1.0) -> Tuple[Tensor, List[Tensor]]:
        """Synthesise from W+ ``latent`` (B, n_latent, style_dim) → (image (B, 1, S, S), n_latent features).

        ``noise``: list of ``num_layers`` tensors (entries may be None = random); if None, random noise
        when ``randomize_noise`` else the fixed ``noises`` buffers.  See the module doc for features.
        """
        return self._synthesize(latent, noise, randomize_noise, features_in, feature_scale, collect=True)

    def _to_wplus(self, styles: List[Tensor], inject_index: Optional[int]) -> Tensor:
        if len(styles) == 1:
            s = styles[0]
            if s.ndim == 2:
                return s.unsqueeze(1).repeat(1, self.n_latent, 1)
            return s
        if any(s.ndim != 2 for s in styles):
            raise ValueError("style mixing needs two (B, style_dim) latents")
        if inject_index is None:
            inject_index = int(torch.randint(1, self.n_latent, ()).item())
        if not 1 <= inject_index <= self.n_latent - 1:
            raise ValueError(f"inject_index must be in [1, {self.n_latent - 1}], got {inject_index}")
        first = styles[0].unsqueeze(1).repeat(1, inject_index, 1)
        second = styles[1].unsqueeze(1).repeat(1, self.n_latent - inject_index, 1)
        return torch.cat([first, second], dim=1)

    def forward(self, styles: Union[Tensor, Sequence[Tensor]], labels: Optional[Labels] = None,
                return_latents: bool = False, inject_index: Optional[int] = None, truncation: float = 1.0,
                truncation_latent: Optional[Tensor] = None, input_is_latent: bool = False,
                noise: Optional[Sequence[Optional[Tensor]]] = None, randomize_noise: bool = True,
                return_features: bool = False, features_in: Optional[Sequence[FeatureEntry]] = None,
                feature_scale: float = 1.0):
        """Generate images.

        ``styles``: a list of one or two z tensors (B, style_dim) (two = style mixing, crossover
        ``inject_index`` drawn uniformly from [1, n_latent − 1] if None), or W tensors (B, style_dim) /
        W+ (B, n_latent, style_dim) when ``input_is_latent``.  ``labels``: ``c`` or ``(c, e)`` (required
        unless ``input_is_latent``); every z gets the condition.  ``truncation < 1`` moves each W toward
        ``truncation_latent`` ((style_dim,), (1, style_dim) or (B, style_dim)).

        Returns ``(image (B, 1, S, S), W+ (B, n_latent, style_dim) or None)``, plus the feature list as a
        third element when ``return_features``.
        """
        style_list = [styles] if isinstance(styles, Tensor) else list(styles)
        if not 1 <= len(style_list) <= 2:
            raise ValueError(f"styles must hold one or two tensors, got {len(style_list)}")
        if not input_is_latent:
            if labels is None:
                raise ValueError("labels (c or (c, e)) are required unless input_is_latent=True")
            for z in style_list:
                self._check_z(z)
            c, e = split_labels(labels, style_list[0].shape[0], self.n_cond, self.clip_dim, style_list[0].dtype)
            if any(z.shape[0] != c.shape[0] for z in style_list):
                raise ValueError("all noise tensors must have the same batch size")
            cond = self._cond_embedding(c, e)
            style_list = [self.style(torch.cat([pixel_norm(z), cond], dim=1)) for z in style_list]
        if truncation < 1:
            if truncation_latent is None:
                raise ValueError("truncation < 1 needs truncation_latent")
            style_list = [self._truncate(s, truncation, truncation_latent) for s in style_list]
        latent = self._to_wplus(style_list, inject_index)
        image, feats = self._synthesize(latent, noise, randomize_noise, features_in, feature_scale,
                                        collect=return_features)
        out_latent = latent if return_latents else None
        if return_features:
            return image, out_latent, feats
        return image, out_latent

    @staticmethod
    def _truncate(w: Tensor, psi: float, center: Tensor) -> Tensor:
        center = center.to(w.dtype)
        if w.ndim == 3 and center.ndim == 2:
            center = center.unsqueeze(1)
        return center + psi * (w - center)


# ----------------------------------------------------------------------------------------------
# Discriminator (docs/method.md#discriminator)
# ----------------------------------------------------------------------------------------------
class Discriminator(nn.Module):
    """Conditional projection discriminator returning scores of shape (B, 1).

    ``D = Σ_k φ_k·ℓ_k·(ε_k or 1)/√style_dim`` with φ the ``final_linear`` output,
    ℓ = PixelNorm(label_embed(c)) and ε = encoding_embed(e) (no PixelNorm); rows of ``e`` that are all
    zero (or ``e=None``) use the factor 1.  There is no unconditional term.
    """

    def __init__(self, size: int, n_domains: int = _DEFAULT.n_domains,
                 channel_multiplier: int = _DEFAULT.channel_multiplier, n_zbins: int = _DEFAULT.n_zbins,
                 clip_dim: int = _DEFAULT.clip_dim, channel_cap: Optional[int] = _DEFAULT.channel_cap,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1), stddev_group: int = 4,
                 style_dim: int = _DEFAULT.style_dim):
        super().__init__()
        log_size = _log2_size(size)
        if stddev_group < 1:
            raise ValueError(f"stddev_group must be positive, got {stddev_group}")
        self.size, self.style_dim, self.stddev_group = size, style_dim, stddev_group
        self.n_domains, self.n_zbins, self.clip_dim = n_domains, n_zbins, clip_dim
        self.n_cond = n_domains + n_zbins
        ch = channel_table(size, channel_multiplier, channel_cap)
        self.channels = ch

        self.label_embed = EqualLinear(self.n_cond, style_dim)
        self.encoding_embed = EqualLinear(clip_dim, style_dim)
        layers: List[nn.Module] = [ConvLayer(1, ch[size], 1)]
        in_ch = ch[size]
        for i in range(log_size, 2, -1):
            out_ch = ch[2 ** (i - 1)]
            layers.append(ResBlock(in_ch, out_ch, blur_kernel))
            in_ch = out_ch
        self.convs = nn.Sequential(*layers)
        self.final_conv = ConvLayer(in_ch + 1, ch[4], 3)
        self.final_linear = nn.Sequential(EqualLinear(ch[4] * 4 * 4, ch[4], activation="fused_lrelu"),
                                          EqualLinear(ch[4], style_dim))

    @classmethod
    def from_args(cls, args: Union[GeneratorArgs, Mapping[str, Any]]) -> "Discriminator":
        """Build from constructor arguments given by name (as :meth:`Generator.from_args`)."""
        return cls(**_constructor_args(cls, args))

    def condition(self, domains: Union[int, Sequence[int], Tensor],
                  zbins: Union[int, Sequence[int], Tensor]) -> Tensor:
        """One-hot conditions (B, n_cond) on this model's device (see :func:`make_condition`)."""
        w = self.label_embed.weight
        return make_condition(domains, zbins, self.n_domains, self.n_zbins, device=w.device, dtype=w.dtype)

    def forward(self, input: Tensor, labels: Labels, batches: int = 1) -> Tensor:
        """Score images ``input`` (B, 1, size, size) under ``labels`` (``c`` or ``(c, e)``) → (B, 1).

        ``batches`` > 1: ``input`` is that many equal batches stacked along dim 0 (e.g. reals and fakes);
        every layer is per sample except the minibatch-stddev statistic, which is taken within each of
        them, so the scores equal those of separate calls (one pass through the convolutions instead of
        several)."""
        if input.ndim != 4 or input.shape[1] != 1 or input.shape[2] != self.size or input.shape[3] != self.size:
            raise ValueError(f"Discriminator expects images of shape (B, 1, {self.size}, {self.size}), "
                             f"got {tuple(input.shape)}")
        if batches < 1 or input.shape[0] % batches:
            raise ValueError(f"batches={batches} does not divide the batch of {input.shape[0]} images")
        c, e = split_labels(labels, input.shape[0], self.n_cond, self.clip_dim, input.dtype)
        x = channels_last(self.convs[0](input))  # the 1-channel input has no layout to inherit
        for layer in self.convs[1:]:
            x = layer(x)
        if batches == 1:
            x = minibatch_stddev(x, self.stddev_group)
        else:
            x = torch.cat([minibatch_stddev(part, self.stddev_group) for part in x.chunk(batches)])
        phi = self.final_linear(self.final_conv(x).flatten(1))
        proj = phi * pixel_norm(self.label_embed(c))
        if e is not None:
            eps = self.encoding_embed(e)
            proj = proj * torch.where(_present_rows(e), eps, torch.ones_like(eps))
        return proj.sum(dim=1, keepdim=True) / math.sqrt(self.style_dim)
