"""The CUDA wrappers of ``op`` (argument order, backward parameters, second order) on the CPU.

The compiled kernels cannot run here, so ``load_extension`` is replaced by a stand-in computing, in
plain torch, what the kernels are specified to compute (op/cuda/*.cu): ``upfirdn2d(x, k, ux, uy, dx,
dy, px0, px1, py0, py1)`` and ``fused_bias_act(x, bias, ref, mode, slope, scale)`` (mode 0: scale *
leaky(x + bias), the bias on dim 1; mode 1: the gradient g * scale * (1 where ref > 0 else slope)).
Everything else is the wrappers' real code, checked against the reference path with gradcheck and
gradgradcheck (found unreached by mutation testing).
"""
from __future__ import annotations

import re

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import op.fused_act as fused_act_mod
import op.upfirdn as upfirdn_mod
from op.upfirdn import upfirdn2d_ref


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
