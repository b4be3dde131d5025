"""The CUDA wrappers of ``op`` (argument order, backward parameters, second order) on the CPU.

The compiled kernels cannot run here, so ``load_extension`` is replaced by a stand-in computing, in
plain torch, what the kernels are specified to compute (op/cuda/*.cu): ``upfirdn2d(x, k, ux, uy, dx,
dy, px0, px1, py0, py1)`` and ``fused_bias_act(x, bias, ref, mode, slope, scale)`` (mode 0: scale *
leaky(x + bias), the bias on dim 1; mode 1: the gradient g * scale * (1 where ref > 0 else slope)).
Everything else is the wrappers' real code, checked against the reference path with gradcheck and
gradgradcheck (found unreached by mutation testing).
"""
from __future__ import annotations

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
