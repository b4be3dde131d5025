"""Tests of the custom ops in ``op/`` (docs/method.md#ops).

The reference path is compared with a literal, naive definition written here
(zero insertion, pad/crop, full convolution with the flipped kernel,
subsampling); gradients are checked numerically in float64 (first and second
order). CUDA tests run only when a GPU is present; the nvcc compile test runs
only when nvcc is installed (marked ``slow``: about 2-3 minutes on 2 cores).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import op
import op.fused_act as fused_act_mod
import op.upfirdn as upfirdn_mod
from op import FusedLeakyReLU, conv2d_gradfix, fused_leaky_relu, upfirdn2d
from op import _backend
from op.upfirdn import backward_params, output_size, parse_params, upfirdn2d_ref

REPO = Path(__file__).resolve().parents[1]
DT = torch.float64
HAS_CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------- naive definitions


def naive_upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up, down, pad: Sequence[int]) -> torch.Tensor:
    """Literal docs/method.md#ops: zero insertion, pad (negative = crop), conv with flipped kernel, subsample."""
    (ux, uy), (dx, dy), (px0, px1, py0, py1) = parse_params(up, down, pad)
    if kernel.ndim == 1:
        kernel = torch.outer(kernel, kernel)
    b, c, h, w = x.shape
    u = torch.zeros(b, c, h * uy, w * ux, dtype=x.dtype)
    u[:, :, ::uy, ::ux] = x
    u = F.pad(u, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    u = u[:, :, max(-py0, 0): u.shape[2] - max(-py1, 0), max(-px0, 0): u.shape[3] - max(-px1, 0)]
    weight = kernel.flip((0, 1)).to(x.dtype).expand(c, 1, *kernel.shape)
    return F.conv2d(u, weight, groups=c)[:, :, ::dy, ::dx]


def naive_fused_leaky_relu(x: torch.Tensor, bias, slope: float, scale: float) -> torch.Tensor:
    if bias is not None:
        x = x + bias.to(x.dtype).view(1, -1, *([1] * (x.ndim - 2)))
    return torch.where(x >= 0, x, x * slope) * scale


def blur_kernel(gain: float = 1.0) -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=DT)
    k = torch.outer(k, k)
    return k / k.sum() * gain


def down_blur_pad(k: int) -> Tuple[int, int]:
    p = 4 - 2 + (k - 1)
    return ((p + 1) // 2, p // 2)


# (kernel name, up, down, pad) -- the first four are the model's uses (docs/method.md#building-blocks).
MODEL_CASES = [
    ("blur_x4", 1, 1, (1, 1)),  # Blur after the upsampling transposed conv
    ("blur_x4", 2, 1, (2, 1)),  # Upsample of the ToRGB skip
    ("blur", 1, 1, down_blur_pad(3)),  # Blur before a 3x3 stride-2 conv
    ("blur", 1, 1, down_blur_pad(1)),  # Blur before the 1x1 stride-2 skip conv
]
OTHER_CASES = [
    ("blur", 1, 2, (1, 1)),
    ("blur", 2, 2, (1, 2)),
    ("random", 1, 1, (-1, 2)),
    ("random", 2, 1, (0, -2, 1, 1)),
    ("random", (2, 1), (1, 3), (1, -1, 2, 0)),
    ("random", (1, 3), (2, 1), (3, 0, -2, 4)),
    ("random1d", 3, 2, (-2, -1)),
    ("rank1_3x2", 2, 1, (1, 0, 2, 1)),
    ("blur", 1, 1, (-1, -1)),
    ("one", 1, 3, (0, 0)),
]


def make_kernel(name: str, gen: torch.Generator) -> torch.Tensor:
    if name == "blur":
        return blur_kernel()
    if name == "blur_x4":
        return blur_kernel(4.0)
    if name == "random":  # non-separable, non-square
        return torch.randn(3, 4, dtype=DT, generator=gen)
    if name == "random1d":
        return torch.randn(3, dtype=DT, generator=gen)
    if name == "rank1_3x2":
        return torch.outer(torch.randn(3, dtype=DT, generator=gen), torch.randn(2, dtype=DT, generator=gen))
    if name == "one":
        return torch.ones(1, 1, dtype=DT)
    raise KeyError(name)


# --------------------------------------------------------------------------- upfirdn2d (ref)


@pytest.mark.parametrize("kname,up,down,pad", MODEL_CASES + OTHER_CASES)
def test_upfirdn2d_ref_matches_naive(kname, up, down, pad) -> None:
    gen = torch.Generator().manual_seed(0)
    kernel = make_kernel(kname, gen)
    x = torch.randn(2, 3, 7, 9, dtype=DT, generator=gen)
    expected = naive_upfirdn2d(x, kernel, up, down, pad)
    for separable in (None, True, False):
        (u, d, p) = parse_params(up, down, pad)
        got = upfirdn2d_ref(x, kernel, u, d, p, separable=separable)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(upfirdn2d(x, kernel, up, down, pad), expected, rtol=1e-10, atol=1e-10)


def test_upfirdn2d_random_params_match_naive() -> None:
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(1)
    checked = 0
    while checked < 60:
        kh, kw = rng.randint(1, 5), rng.randint(1, 5)
        if rng.random() < 0.5:
            kernel = torch.outer(torch.randn(kh, dtype=DT, generator=gen), torch.randn(kw, dtype=DT, generator=gen))
        else:
            kernel = torch.randn(kh, kw, dtype=DT, generator=gen)
        up = (rng.randint(1, 3), rng.randint(1, 3))
        down = (rng.randint(1, 3), rng.randint(1, 3))
        pad = tuple(rng.randint(-3, 4) for _ in range(4))
        x = torch.randn(1, 2, rng.randint(3, 7), rng.randint(3, 7), dtype=DT, generator=gen)
        if min(output_size(x.shape[2], kh, up[1], down[1], pad[2], pad[3]),
               output_size(x.shape[3], kw, up[0], down[0], pad[0], pad[1])) < 1:
            continue
        torch.testing.assert_close(upfirdn2d(x, kernel, up, down, pad), naive_upfirdn2d(x, kernel, up, down, pad),
                                   rtol=1e-10, atol=1e-10)
        checked += 1


def test_upfirdn2d_output_size_and_blur_preserves_constant() -> None:
    x = torch.ones(1, 2, 8, 8, dtype=DT)
    up = upfirdn2d(x, blur_kernel(4.0), up=2, pad=(2, 1))
    assert up.shape == (1, 2, 16, 16)
    # Interior of an upsampled constant is the constant (kernel x4 compensates the zeros).
    torch.testing.assert_close(up[..., 3:-3, 3:-3], torch.ones_like(up[..., 3:-3, 3:-3]))
    down = upfirdn2d(x, blur_kernel(), down=2, pad=(1, 1))
    assert down.shape == (1, 2, 4, 4)


def test_upfirdn2d_rejects_bad_arguments() -> None:
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError):
        upfirdn2d(x, blur_kernel().float(), pad=(-4, -4))  # empty output
    with pytest.raises(ValueError):
        upfirdn2d(x, blur_kernel().float(), pad=(1, 2, 3))
    with pytest.raises(ValueError):
        upfirdn2d(x[0], blur_kernel().float())
    with pytest.raises(ValueError):
        upfirdn2d(x, blur_kernel().float(), up=0)


@pytest.mark.parametrize("kname,up,down,pad", MODEL_CASES + OTHER_CASES[:6])
def test_upfirdn2d_backward_params_give_input_gradient(kname, up, down, pad) -> None:
    """The CUDA backward formula (flipped kernel, swapped factors, derived pads), checked on the ref op."""
    gen = torch.Generator().manual_seed(2)
    kernel = make_kernel(kname, gen)
    k2 = torch.outer(kernel, kernel) if kernel.ndim == 1 else kernel
    x = torch.randn(2, 2, 6, 5, dtype=DT, generator=gen, requires_grad=True)
    (ux, uy), (dx, dy), (px0, px1, py0, py1) = parse_params(up, down, pad)
    y = upfirdn2d(x, kernel, up, down, pad, impl="ref")
    g = torch.randn(y.shape, dtype=DT, generator=gen)
    (expected,) = torch.autograd.grad(y, x, g)
    bx = backward_params(x.shape[3], k2.shape[1], ux, dx, px0, px1)
    by = backward_params(x.shape[2], k2.shape[0], uy, dy, py0, py1)
    got = upfirdn2d_ref(g, k2.flip((0, 1)), (bx[0], by[0]), (bx[1], by[1]), (bx[2], bx[3], by[2], by[3]))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kname,up,down,pad", MODEL_CASES + [OTHER_CASES[0], OTHER_CASES[4], OTHER_CASES[6]])
def test_upfirdn2d_gradcheck(kname, up, down, pad) -> None:
    gen = torch.Generator().manual_seed(3)
    kernel = make_kernel(kname, gen)
    x = torch.randn(1, 2, 5, 4, dtype=DT, generator=gen, requires_grad=True)
    fn = lambda t: upfirdn2d(t, kernel, up, down, pad)  # noqa: E731
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


def test_upfirdn2d_gradcheck_wrt_kernel() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 4, 5, dtype=DT, generator=gen, requires_grad=True)
    k = torch.randn(3, 2, dtype=DT, generator=gen, requires_grad=True)
    fn = lambda a, b: upfirdn2d(a, b, up=2, down=1, pad=(1, 0, 2, 1))  # noqa: E731
    assert gradcheck(fn, (x, k))
    assert gradgradcheck(fn, (x, k))


# --------------------------------------------------------------------------- fused_leaky_relu (ref)


@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 5), (2, 4, 3, 5)])
@pytest.mark.parametrize("slope,scale", [(0.2, 2 ** 0.5), (0.0, 1.0), (-0.5, 2.0), (0.2, -1.5)])
def test_fused_leaky_relu_matches_naive(shape, slope, scale) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, dtype=DT, generator=gen)
    b = torch.randn(shape[1], dtype=DT, generator=gen)
    torch.testing.assert_close(fused_leaky_relu(x, b, slope, scale), naive_fused_leaky_relu(x, b, slope, scale))
    torch.testing.assert_close(fused_leaky_relu(x, None, slope, scale), naive_fused_leaky_relu(x, None, slope, scale))


@pytest.mark.parametrize("slope,scale", [(0.2, 2 ** 0.5), (-0.5, 2.0)])
def test_fused_leaky_relu_gradcheck(slope, scale) -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 4, 4, dtype=DT, generator=gen)
    x = (x + 0.05 * torch.sign(x)).requires_grad_()  # keep away from the kink
    b = torch.zeros(3, dtype=DT, requires_grad=True)
    fn = lambda a, c: fused_leaky_relu(a, c, slope, scale)  # noqa: E731
    assert gradcheck(fn, (x, b))
    assert gradgradcheck(fn, (x, b))


def test_fused_leaky_relu_does_not_modify_input_and_casts_bias() -> None:
    x = torch.randn(2, 3, 4, dtype=DT)
    before = x.clone()
    out = fused_leaky_relu(x, torch.ones(3, dtype=torch.float32))
    assert out.dtype == DT
    torch.testing.assert_close(x, before)
    with pytest.raises(ValueError):
        fused_leaky_relu(x, torch.ones(4))


def test_fused_leaky_relu_module() -> None:
    m = FusedLeakyReLU(5)
    assert list(m.state_dict()) == ["bias"] and m.bias.shape == (5,) and bool((m.bias == 0).all())
    x = torch.randn(2, 5, 3, 3)
    with torch.no_grad():
        m.bias.copy_(torch.randn(5))
    torch.testing.assert_close(m(x), naive_fused_leaky_relu(x, m.bias, 0.2, 2 ** 0.5))
    assert FusedLeakyReLU(5, bias=False).bias is None
    assert list(FusedLeakyReLU(5, bias=False).state_dict()) == []


# --------------------------------------------------------------------------- conv2d_gradfix


def test_conv2d_gradfix_matches_torch_and_double_backward() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 6, 6, dtype=DT, generator=gen, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=DT, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=DT, generator=gen, requires_grad=True)
    torch.testing.assert_close(conv2d_gradfix.conv2d(x, w, b, 2, 1, 1, 2), F.conv2d(x, w, b, 2, 1, 1, 2))
    fn = lambda a, c, d: conv2d_gradfix.conv2d(a, c, d, stride=2, padding=1, groups=2)  # noqa: E731
    assert gradcheck(fn, (x, w, b))
    assert gradgradcheck(fn, (x, w, b))


def test_conv_transpose2d_gradfix_matches_torch_and_double_backward() -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 4, 4, dtype=DT, generator=gen, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=DT, generator=gen, requires_grad=True)
    b = torch.randn(3, dtype=DT, generator=gen, requires_grad=True)
    torch.testing.assert_close(conv2d_gradfix.conv_transpose2d(x, w, b, 2, 1, 1), F.conv_transpose2d(x, w, b, 2, 1, 1))
    fn = lambda a, c, d: conv2d_gradfix.conv_transpose2d(a, c, d, stride=2, padding=0)  # noqa: E731
    assert gradcheck(fn, (x, w, b))
    assert gradgradcheck(fn, (x, w, b))


def test_no_weight_gradients_skips_weight_grad_only() -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 5, 5, dtype=DT, generator=gen, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=DT, generator=gen, requires_grad=True)
    (gx_ref, gw_ref) = torch.autograd.grad(F.conv2d(x, w).square().sum(), (x, w))
    # forward outside, backward inside (how R1 uses it)
    y = conv2d_gradfix.conv2d(x, w).square().sum()
    with conv2d_gradfix.no_weight_gradients():
        y.backward()
    assert w.grad is None
    torch.testing.assert_close(x.grad, gx_ref)
    # forward and backward inside
    x.grad = None
    with conv2d_gradfix.no_weight_gradients():
        conv2d_gradfix.conv_transpose2d(x, w.transpose(0, 1)).sum().backward()
    assert w.grad is None and x.grad is not None
    # disable=False is a no-op; outside the context weight grads come back
    with conv2d_gradfix.no_weight_gradients(disable=False):
        conv2d_gradfix.conv2d(x, w).square().sum().backward()
    torch.testing.assert_close(w.grad, gw_ref)
    assert not conv2d_gradfix.weight_gradients_disabled()


def test_no_weight_gradients_r1_style_penalty_keeps_second_order_weight_grad() -> None:
    """R1: grad wrt the input inside the context, penalty backward outside reaches the weight."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 5, 5, dtype=DT, generator=gen, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=DT, generator=gen, requires_grad=True)

    def penalty(conv) -> torch.Tensor:
        out = F.leaky_relu(conv(x, w), 0.2).sum()
        (g,) = torch.autograd.grad(out, x, create_graph=True)
        return g.square().sum()

    (expected,) = torch.autograd.grad(penalty(F.conv2d), w)
    with conv2d_gradfix.no_weight_gradients():
        pred = F.leaky_relu(conv2d_gradfix.conv2d(x, w), 0.2).sum()
        (g,) = torch.autograd.grad(pred, x, create_graph=True)
    g.square().sum().backward()
    torch.testing.assert_close(w.grad, expected)


# --------------------------------------------------------------------------- backend selection


def test_import_compiles_nothing() -> None:
    code = (
        "import torch.utils.cpp_extension as ce\n"
        "def boom(*a, **k): raise SystemExit('cpp_extension.load called')\n"
        "ce.load = boom\n"
        "import op, torch\n"
        "x = torch.randn(1, 2, 8, 8)\n"
        "op.upfirdn2d(x, torch.ones(2, 2), up=2); op.fused_leaky_relu(x, torch.zeros(2))\n"
        "from op import _backend\n"
        "assert _backend._loaded == {}, _backend._loaded\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_automatic_impl_is_ref_on_cpu(monkeypatch) -> None:
    def fail(name: str):
        raise AssertionError("extension must not be loaded for CPU tensors")

    monkeypatch.setattr(_backend, "load_extension", fail)
    x = torch.randn(1, 2, 4, 4)
    assert _backend.resolve_impl(None, x, "rms_upfirdn2d") == "ref"
    assert _backend.resolve_impl("ref", x, "rms_upfirdn2d") == "ref"
    upfirdn2d(x, torch.ones(2, 2))
    fused_leaky_relu(x, torch.zeros(2))


def test_cuda_impl_on_cpu_tensor_raises() -> None:
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="CUDA"):
        upfirdn2d(x, torch.ones(2, 2), impl="cuda")
    with pytest.raises(ValueError, match="CUDA"):
        fused_leaky_relu(x, torch.zeros(2), impl="cuda")
    with pytest.raises(ValueError):
        upfirdn2d(x, torch.ones(2, 2), impl="triton")


# --------------------------------------------------------------------------- CUDA wrappers on the CPU
# The CUDA wrappers of ``op`` (argument order, backward parameters, second order) on the CPU.
#
# The compiled kernels cannot run here, so ``load_extension`` is replaced by a stand-in computing, in
# plain torch, what the kernels are specified to compute (op/cuda/*.cu): ``upfirdn2d(x, k, ux, uy, dx,
# dy, px0, px1, py0, py1)`` and ``fused_bias_act(x, bias, ref, mode, slope, scale)`` (mode 0: scale *
# leaky(x + bias), the bias on dim 1; mode 1: the gradient g * scale * (1 where ref > 0 else slope)).
# Everything else is the wrappers' real code, checked against the reference path with gradcheck and
# gradgradcheck (found unreached by mutation testing).

class FakeExtension:
    calls = 0

    def upfirdn2d(self, x, k, ux, uy, dx, dy, px0, px1, py0, py1):
        FakeExtension.calls += 1
        return upfirdn2d_ref(x, k, (ux, uy), (dx, dy), (px0, px1, py0, py1))

    def fused_bias_act(self, x, bias, ref, mode, slope, scale):
        FakeExtension.calls += 1
        if mode == 0:
            v = x if bias.numel() == 0 else x + bias.view(1, -1, *([1] * (x.ndim - 2)))
            return torch.where(v > 0, v, v * slope) * scale
        assert mode == 1 and bias.numel() == 0
        return x * torch.where(ref > 0, torch.full_like(ref, scale), torch.full_like(ref, scale * slope))


@pytest.fixture()
def fake_ext(monkeypatch):
    ext = FakeExtension()
    monkeypatch.setattr(upfirdn_mod, "load_extension", lambda name: ext)
    monkeypatch.setattr(fused_act_mod, "load_extension", lambda name: ext)
    FakeExtension.calls = 0
    return ext


@pytest.mark.parametrize("up,down,pad", [((1, 1), (1, 1), (1, 1, 1, 1)), ((2, 1), (1, 2), (2, 1, 0, 3)),
                                         ((1, 2), (2, 1), (-1, 2, 1, -1))])
def test_upfirdn2d_cuda_wrapper_forward_and_gradients(fake_ext, up, down, pad):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    out = upfirdn_mod._run_kernel(x, k, up, down, pad)
    torch.testing.assert_close(out, upfirdn2d_ref(x, k, up, down, pad))
    assert FakeExtension.calls == 1
    assert gradcheck(lambda t: upfirdn_mod._run_kernel(t, k, up, down, pad), (x,))
    assert gradgradcheck(lambda t: upfirdn_mod._run_kernel(t, k, up, down, pad), (x,))


@pytest.mark.parametrize("bias", [True, False])
def test_fused_act_cuda_wrapper_forward_and_gradients(fake_ext, bias):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen)
    x = (x + 0.1 * torch.sign(x)).requires_grad_(True)  # away from the kink
    b = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True) * 0.01 if bias else None
    b = b.detach().requires_grad_(True) if bias else None
    slope, scale = 0.2, 1.7
    out = fused_act_mod._run_kernel(x, b, slope, scale)
    torch.testing.assert_close(out, fused_act_mod._fused_leaky_relu_ref(x, b, slope, scale))
    inputs = (x, b) if bias else (x,)
    fn = (lambda t, c: fused_act_mod._run_kernel(t, c, slope, scale)) if bias else \
        (lambda t: fused_act_mod._run_kernel(t, None, slope, scale))
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(gx, g * torch.where(out > 0, scale, scale * slope))


# ------------------------------------------------------------------------------------------- self-check cases
def _blur_definition(gain: float) -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    return torch.outer(k, k) / 64 * gain


def test_upfirdn2d_selfcheck_cases_are_the_models_calls(monkeypatch):
    """Each case feeds a (2, 3, 9, 8) input in the requested dtype to the kernel path and the reference
    with the same kernel and parameters: the StyleGAN2 blur ([1, 3, 3, 1] outer, sum = gain) in the
    model's configurations, plus a generic 3x4 kernel of 1/16 multiples (exact in float16)."""
    monkeypatch.setattr(upfirdn_mod, "_run_kernel", lambda x, k, u, d, p: upfirdn2d_ref(x, k, u, d, p))
    cases = upfirdn_mod._selfcheck_cases()
    assert [c.name for c in cases] == [c[0] for c in upfirdn_mod.SELFCHECK_CASES]
    gains = (4.0, 4.0, 1.0, 1.0, 1.0)
    for i, (case, (_, kernel, up, down, pad)) in enumerate(zip(cases, upfirdn_mod.SELFCHECK_CASES)):
        (x,) = case.make_inputs(torch.device("cpu"), torch.float32, torch.Generator().manual_seed(i))
        assert x.shape == (2, 3, 9, 8) and x.dtype == torch.float32 and x.std() > 0.5
        if i < len(gains):
            torch.testing.assert_close(kernel, _blur_definition(gains[i]))
            k = kernel
        else:
            k = torch.randint(-16, 17, (3, 4), generator=torch.Generator().manual_seed(5)).double() / 16
        want = upfirdn2d_ref(x, k.float(), *upfirdn_mod.parse_params(up, down, pad))
        torch.testing.assert_close(case.reference(x), want)
        torch.testing.assert_close(case.kernel(x), want)
    (x16,) = cases[0].make_inputs(torch.device("cpu"), torch.float16, torch.Generator().manual_seed(0))
    assert x16.dtype == torch.float16


def test_fused_act_selfcheck_cases_stay_away_from_the_kink(monkeypatch):
    monkeypatch.setattr(fused_act_mod, "_run_kernel", lambda x, b, slope, scale:
                        fused_act_mod._fused_leaky_relu_ref(x, b, slope, scale))
    cases = fused_act_mod._selfcheck_cases()
    assert [c.name for c in cases] == [c[0] for c in fused_act_mod.SELFCHECK_CASES]
    for i, (case, (_, shape, with_bias)) in enumerate(zip(cases, fused_act_mod.SELFCHECK_CASES)):
        inputs = case.make_inputs(torch.device("cpu"), torch.float64, torch.Generator().manual_seed(i))
        assert len(inputs) == (2 if with_bias else 1) and inputs[0].shape == shape
        x = inputs[0]
        pre = x + inputs[1].view(1, -1, *([1] * (len(shape) - 2))) if with_bias else x
        assert float(pre.abs().min()) >= 0.1 - 1e-12 and x.std() > 0.5
        if with_bias:
            b = inputs[1]
            assert b.shape == (shape[1],) and torch.equal(b * 8, (b * 8).round()) and float(b.abs().max()) <= 1
        want = torch.where(pre > 0, pre, 0.2 * pre) * 2 ** 0.5
        torch.testing.assert_close(case.reference(*inputs), want)
        torch.testing.assert_close(case.kernel(*inputs), want)


# ------------------------------------------------------------------------------------------- dispatch
@pytest.fixture()
def kernel_dispatch(fake_ext, monkeypatch):
    """The automatic mode takes the (stand-in) kernel for any tensor, without a self-check."""
    from op import _backend

    monkeypatch.setattr(_backend, "kernel_available", lambda tensor, name: True)
    monkeypatch.setattr(_backend, "kernel_trusted", lambda op, tensor: True)
    return fake_ext


def test_dispatch_to_the_kernel_with_a_1d_double_kernel_and_float_input(kernel_dispatch):
    from op import upfirdn2d

    x = torch.randn(1, 2, 5, 6)
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    out = upfirdn2d(x, k, up=2, pad=(2, 1))
    assert FakeExtension.calls == 1 and out.dtype == torch.float32
    torch.testing.assert_close(out, upfirdn2d_ref(x, torch.outer(k, k).float(), (2, 2), (1, 1), (2, 1, 2, 1)))
    k.requires_grad_(True)  # a trainable kernel always takes the reference path
    upfirdn2d(x, k, up=2, pad=(2, 1))
    assert FakeExtension.calls == 1
    upfirdn2d(x.long(), k.detach().long(), pad=(1, 1))  # integer input: reference path
    assert FakeExtension.calls == 1


def test_fused_act_dispatch_casts_the_bias(kernel_dispatch):
    from op import fused_leaky_relu

    x = torch.randn(2, 3, 4)
    b = torch.randn(3, dtype=torch.float64)
    out = fused_leaky_relu(x, b, 0.2, 2 ** 0.5)
    assert FakeExtension.calls == 1 and out.dtype == torch.float32
    torch.testing.assert_close(out, fused_act_mod._fused_leaky_relu_ref(x, b.float(), 0.2, 2 ** 0.5))
    out = fused_leaky_relu(x, None, 0.2, 2 ** 0.5)
    torch.testing.assert_close(out, torch.where(x > 0, x, 0.2 * x) * 2 ** 0.5)


def test_upfirdn2d_argument_errors_are_explicit():
    from op import upfirdn2d

    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"^upfirdn2d expects a \(B, C, H, W\) input, got shape \(4, 4\)$"):
        upfirdn2d(x[0, 0], torch.ones(2, 2))
    for k in (torch.ones(0), torch.ones(2, 2, 2)):
        with pytest.raises(ValueError, match=rf"^kernel must be a non-empty 1-D or 2-D tensor, got shape "
                                             rf"{re.escape(str(tuple(k.shape)))}$"):
            upfirdn2d(x, k)
    with pytest.raises(ValueError, match=r"^upfirdn2d output would be empty \(4x0\) for input \(1, 1, 4, 4\), "
                                         r"kernel \(1, 1\), up=1, down=1, pad=\(0, -4, 0, 0\)$"):
        upfirdn2d(x, torch.ones(1, 1), pad=(0, -4, 0, 0))  # x0, x1, y0, y1: only the width is empty
    with pytest.raises(ValueError, match=r"^impl='cuda' needs a float input and a kernel that does not require grad$"):
        upfirdn2d(x, torch.ones(2, 2, requires_grad=True), impl="cuda")
    # per-axis factors: the width uses the x factors
    out = upfirdn2d(torch.randn(1, 1, 4, 6), torch.ones(1, 1), up=(1, 2), down=(3, 1))
    assert out.shape == (1, 1, 8, 2)


# --------------------------------------------------------------------------- self-check at first use
#
# A CUDA kernel is checked against the reference path the first time the automatic mode would
# use it (per op and dtype). On CPU the kernels cannot run, so these tests make the automatic
# mode see a "kernel" (``kernel_available`` -> True) and inject the kernel function the dispatch
# and the self-check both call (``op.upfirdn._run_kernel`` / ``op.fused_act._run_kernel``):
# everything else is the real code path.

@pytest.fixture
def fake_cuda(monkeypatch):
    """Automatic mode believes a kernel exists for any tensor; self-check on; clean state."""
    monkeypatch.setattr(_backend, "kernel_available", lambda tensor, name: True)
    monkeypatch.delenv(_backend.SELFCHECK_ENV, raising=False)
    _backend.set_selfcheck(None)
    _backend.reset_selfcheck()
    yield
    _backend.reset_selfcheck()


class Counting:
    """A kernel function that counts its calls and delegates to ``fn``."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def good_upfirdn(x, k, up, down, pad):
    return upfirdn2d_ref(x, k, up, down, pad)


def good_act(x, b, slope, scale):
    return fused_act_mod._fused_leaky_relu_ref(x, b, slope, scale)


class _WrongBackward(torch.autograd.Function):
    """Identity forward; backward scales the gradient by 1.5 (a wrong first-order gradient)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return 1.5 * g


class _DetachedBackward(torch.autograd.Function):
    """Identity with a correct but non-differentiable backward (breaks second order only)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g.detach().clone()


def _model_like_calls() -> None:
    x = torch.randn(2, 4, 8, 8)
    upfirdn2d(x, blur_kernel(4.0).float(), up=2, pad=(2, 1))
    upfirdn2d(x, blur_kernel().float(), pad=(2, 2))


def test_selfcheck_passes_and_kernel_is_used(fake_cuda, monkeypatch) -> None:
    up_k, act_k = Counting(good_upfirdn), Counting(good_act)
    monkeypatch.setattr(upfirdn_mod, "_run_kernel", up_k)
    monkeypatch.setattr(fused_act_mod, "_run_kernel", act_k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _model_like_calls()
        fused_leaky_relu(torch.randn(2, 4, 3, 3), torch.zeros(4))
    results = {(r.op, r.dtype): r for r in _backend.selfcheck_results()}
    assert set(results) == {("upfirdn2d", torch.float32), ("fused_leaky_relu", torch.float32)}
    assert all(r.ok and r.max_error <= r.tolerance for r in results.values())
    # the check ran the kernel once per case (autograd does the gradients), then the 2 calls used it
    assert up_k.calls == len(upfirdn_mod.SELFCHECK_CASES) + 2
    assert act_k.calls == len(fused_act_mod.SELFCHECK_CASES) + 1
    calls = up_k.calls
    _model_like_calls()
    assert up_k.calls == calls + 2  # no second check for the same dtype
    upfirdn2d(torch.randn(1, 2, 6, 6, dtype=DT), blur_kernel())
    assert ("upfirdn2d", DT) in {(r.op, r.dtype) for r in _backend.selfcheck_results()}  # per dtype


@pytest.mark.parametrize("fault", ["forward", "gradient", "second order", "raises"])
def test_faulty_upfirdn2d_kernel_warns_once_and_falls_back(fake_cuda, monkeypatch, fault) -> None:
    def bad(x, k, up, down, pad):
        y = upfirdn2d_ref(x, k, up, down, pad)
        if fault == "forward":
            return y + 0.01 * (y.shape[-1] > 3)  # small offset everywhere
        if fault == "gradient":
            return _WrongBackward.apply(y)
        if fault == "second order":
            return _DetachedBackward.apply(y)
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    kernel, act_k = Counting(bad), Counting(good_act)
    monkeypatch.setattr(upfirdn_mod, "_run_kernel", kernel)
    monkeypatch.setattr(fused_act_mod, "_run_kernel", act_k)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 8, 8, generator=gen, requires_grad=True)
    with pytest.warns(RuntimeWarning) as record:
        y = upfirdn2d(x, blur_kernel(4.0).float(), up=2, pad=(2, 1))
    messages = [str(w.message) for w in record if "failed its self-check" in str(w.message)]
    assert len(messages) == 1, messages
    assert "upfirdn2d" in messages[0] and "float32" in messages[0] and "RMS_CUDA_SELFCHECK=0" in messages[0]
    assert ("raised RuntimeError" if fault == "raises" else "max error") in messages[0]
    # the call that triggered the check already used the reference path
    torch.testing.assert_close(y, upfirdn2d(x, blur_kernel(4.0).float(), up=2, pad=(2, 1), impl="ref"))
    calls = kernel.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        _model_like_calls()
        upfirdn2d(torch.randn(1, 2, 5, 5, dtype=DT), blur_kernel())  # another dtype: op stays on ref
        fused_leaky_relu(torch.randn(2, 3, 4), torch.zeros(3))  # the other op keeps its kernel
    assert kernel.calls == calls
    assert act_k.calls > 0
    [failed] = [r for r in _backend.selfcheck_results() if r.op == "upfirdn2d"]
    assert not failed.ok and failed.max_error > failed.tolerance


class _DoubleGrad(torch.autograd.Function):
    """Identity forward; doubled gradient."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return 2 * g


@pytest.mark.parametrize("fault", ["bias gradient", "negative slope"])
def test_faulty_fused_act_kernel_falls_back(fake_cuda, monkeypatch, fault) -> None:
    def bad(x, b, slope, scale):
        if fault == "negative slope":
            return fused_act_mod._fused_leaky_relu_ref(x, b, 0.25, scale)
        # right values and input gradient, doubled bias gradient
        return fused_act_mod._fused_leaky_relu_ref(x, None if b is None else _DoubleGrad.apply(b), slope, scale)

    monkeypatch.setattr(fused_act_mod, "_run_kernel", Counting(bad))
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(RuntimeWarning, match="fused_leaky_relu") as record:
        out = fused_leaky_relu(x, torch.ones(3))
    [message] = [str(w.message) for w in record if "failed its self-check" in str(w.message)]
    assert ("gradient of input 1" if fault == "bias gradient" else "forward") in message
    torch.testing.assert_close(out, naive_fused_leaky_relu(x, torch.ones(3), 0.2, 2 ** 0.5))


def test_selfcheck_can_be_skipped(fake_cuda, monkeypatch) -> None:
    """RMS_CUDA_SELFCHECK=0 (or set_selfcheck(False)): the kernel is trusted, even a wrong one."""
    wrong = Counting(lambda x, k, up, down, pad: upfirdn2d_ref(x, k, up, down, pad) + 1.0)
    monkeypatch.setattr(upfirdn_mod, "_run_kernel", wrong)
    x = torch.randn(1, 2, 6, 6)
    monkeypatch.setenv(_backend.SELFCHECK_ENV, "0")
    assert not _backend.selfcheck_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = upfirdn2d(x, blur_kernel().float(), pad=(1, 1))
    assert wrong.calls == 1 and _backend.selfcheck_results() == []
    torch.testing.assert_close(y, upfirdn2d(x, blur_kernel().float(), pad=(1, 1), impl="ref") + 1.0)
    monkeypatch.delenv(_backend.SELFCHECK_ENV)
    _backend.set_selfcheck(False)
    try:
        upfirdn2d(x, blur_kernel().float(), pad=(1, 1))
        assert wrong.calls == 2 and _backend.selfcheck_results() == []
    finally:
        _backend.set_selfcheck(None)


def test_forced_ref_bypasses_kernel(fake_cuda, monkeypatch) -> None:
    kernel = Counting(good_upfirdn)
    monkeypatch.setattr(upfirdn_mod, "_run_kernel", kernel)
    with _backend.forced_impl("ref"):
        _model_like_calls()
    assert kernel.calls == 0
    _model_like_calls()
    assert kernel.calls > 0
    with pytest.raises(ValueError):
        with _backend.forced_impl("cuda"):
            pass


def test_selfcheck_runs_under_no_grad_and_keeps_global_rng(fake_cuda, monkeypatch) -> None:
    """The first use may be inside torch.no_grad()/inference_mode (sampling): the check still
    differentiates, and it draws its inputs from its own generator."""
    monkeypatch.setattr(upfirdn_mod, "_run_kernel", Counting(lambda *a: _DetachedBackward.apply(upfirdn2d_ref(*a))))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="second order"):
        upfirdn2d(torch.ones(1, 1, 6, 6), blur_kernel().float(), pad=(1, 1))
    torch.testing.assert_close(torch.rand(3), expected)


def test_model_forward_backward_with_faulty_kernel_matches_reference(fake_cuda, monkeypatch) -> None:
    """End to end: a model step with a broken upfirdn2d kernel gives the reference path's gradients."""
    import model as M

    monkeypatch.setattr(upfirdn_mod, "_run_kernel", lambda x, k, up, down, pad: 0 * upfirdn2d_ref(x, k, up, down, pad))
    monkeypatch.setattr(fused_act_mod, "_run_kernel", good_act)
    torch.manual_seed(0)
    d = M.Discriminator(16, channel_cap=8, n_domains=2, n_zbins=3, clip_dim=4, style_dim=8)
    img = torch.randn(2, 1, 16, 16)
    labels = (d.condition([0, 1], [0, 2]), torch.randn(2, 4))

    def grads():
        d.zero_grad()
        d(img, labels).sum().backward()
        return [p.grad.clone() for p in d.parameters() if p.grad is not None]

    with pytest.warns(RuntimeWarning, match="upfirdn2d"):
        got = grads()
    with _backend.forced_impl("ref"):
        want = grads()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- CUDA vs ref


cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("kname,up,down,pad", MODEL_CASES + OTHER_CASES)
def test_upfirdn2d_cuda_matches_ref(kname, up, down, pad) -> None:
    gen = torch.Generator().manual_seed(11)
    kernel = make_kernel(kname, gen).cuda()
    x = torch.randn(2, 3, 7, 9, dtype=DT, generator=gen).cuda().requires_grad_()
    y_cuda = upfirdn2d(x, kernel, up, down, pad, impl="cuda")
    y_ref = upfirdn2d(x, kernel, up, down, pad, impl="ref")
    torch.testing.assert_close(y_cuda, y_ref)
    g = torch.randn_like(y_ref).requires_grad_()
    (gc,) = torch.autograd.grad(y_cuda, x, g, create_graph=True)
    (gr,) = torch.autograd.grad(y_ref, x, g, create_graph=True)
    torch.testing.assert_close(gc, gr)
    h = torch.randn_like(gr)
    (ggc,) = torch.autograd.grad((gc * h).sum(), g)
    (ggr,) = torch.autograd.grad((gr * h).sum(), g)
    torch.testing.assert_close(ggc, ggr)
    fn = lambda t: upfirdn2d(t, kernel, up, down, pad, impl="cuda")  # noqa: E731
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))
    y32 = upfirdn2d(x.detach().float(), kernel.float(), up, down, pad, impl="cuda")
    torch.testing.assert_close(y32, y_ref.detach().float(), rtol=1e-4, atol=1e-5)


@cuda_only
@pytest.mark.cuda
def test_fused_leaky_relu_cuda_matches_ref() -> None:
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 4, 5, dtype=DT, generator=gen)
    x = (x + 0.05 * torch.sign(x)).cuda().requires_grad_()
    b = torch.randn(3, dtype=DT, generator=gen).cuda().requires_grad_()
    y_cuda = fused_leaky_relu(x, b, impl="cuda")
    y_ref = fused_leaky_relu(x, b, impl="ref")
    torch.testing.assert_close(y_cuda, y_ref)
    fn = lambda a, c: fused_leaky_relu(a, c, impl="cuda")  # noqa: E731
    assert gradcheck(fn, (x, b))
    assert gradgradcheck(fn, (x, b))
    x2 = torch.randn(3, 7, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(fused_leaky_relu(x2, None, impl="cuda"), fused_leaky_relu(x2, None, impl="ref"),
                               rtol=2e-3, atol=2e-3)
    assert fused_leaky_relu(x.detach(), b.detach()).device.type == "cuda"


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ["upfirdn2d", "fused_leaky_relu"])
def test_selfcheck_passes_on_cuda(name, dtype) -> None:
    """The first-use self-check of the real kernels passes (else the model would run on the ref path)."""
    result = _backend.run_selfcheck(name, torch.device("cuda"), dtype)
    assert result.ok, result.detail


# --------------------------------------------------------------------------- CUDA sources compile


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in sorted(Path("/usr/local").glob("cuda*/bin/nvcc"), reverse=True):
        return str(cand)
    return None


def _include_flags() -> list:
    torch_inc = Path(torch.__file__).resolve().parent / "include"
    dirs = [torch_inc, torch_inc / "torch" / "csrc" / "api" / "include", Path(sysconfig.get_paths()["include"])]
    nvidia = Path(torch.__file__).resolve().parent.parent / "nvidia"
    dirs += sorted(nvidia.glob("*/include"))
    return [f"-I{d}" for d in dirs if d.is_dir()]


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None or shutil.which("g++") is None, reason="nvcc or g++ not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path) -> None:
    """SLOW (about 2-3 min on 2 cores): nvcc-compile each .cu and syntax-check each .cpp binding."""
    inc = _include_flags()
    cuda_dir = REPO / "op" / "cuda"
    common = ["-std=c++20", "-DTORCH_EXTENSION_NAME=op_compile_test", *inc]
    jobs = []
    for cu in sorted(cuda_dir.glob("*.cu")):
        jobs.append([_nvcc(), "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o")), "-arch=sm_80",
                     "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                     *common])
    for cpp in sorted(cuda_dir.glob("*.cpp")):
        jobs.append(["g++", "-fsyntax-only", str(cpp), *common])
    assert len(jobs) == 4
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in jobs[:2]]
    pending = jobs[2:]
    failures = []
    while procs:
        proc = procs.pop(0)
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures.append(f"{' '.join(proc.args[:3])}\n{out[-3000:]}")
        if pending:
            cmd = pending.pop(0)
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    assert not failures, "\n\n".join(failures)


def test_extension_sources_exist() -> None:
    for name in _backend.EXTENSIONS:
        for path in _backend.source_paths(name):
            assert path.is_file(), path
    assert {p.name for p in (REPO / "op" / "cuda").iterdir() if p.suffix in (".cu", ".cpp")} == {
        "fused_bias_act.cpp", "fused_bias_act.cu", "upfirdn2d.cpp", "upfirdn2d.cu"}
    assert op.__all__ == ["FusedLeakyReLU", "fused_leaky_relu", "upfirdn2d", "conv2d_gradfix"]
