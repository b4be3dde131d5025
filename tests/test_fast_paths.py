"""The CPU fast paths of issue 23 compute what the plain paths compute (BENCHMARKS.md "Training-step speed").

Every optimised path is compared with the plain path (``model.plain_paths``): the modulated convolution on
modulated activations vs the grouped convolution, the channels-last networks, the paired D(real)+D(fake) pass,
the 1-channel upsampling and the ADA resampling as matrix products, the foreach optimisers, one full node
update of the data factory and the phase-2 encoder.  float64 where the networks allow it (tight tolerances),
float32 with float tolerances otherwise.  No timing is asserted here (bench/bench_steps.py measures speed).
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, List, Sequence

import pytest
import torch

import model as M
from op import upfirdn2d
from op.upfirdn import fir_matrix

SD = 16


def _perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def _both(fn: Callable[[], Sequence[torch.Tensor]], seed: int = 0) -> List[List[torch.Tensor]]:
    """``fn()`` on the plain paths, then on the fast paths, from the same random state."""
    out = []
    for plain in (True, False):
        torch.manual_seed(seed)
        with M.plain_paths(plain):
            out.append([t.detach().clone() for t in fn()])
    return out


def _close(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], rtol: float, atol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        scale = float(x.abs().max()) or 1.0
        assert float((x - y).abs().max()) <= atol + rtol * scale, (float((x - y).abs().max()), scale)


def test_switch_and_env_default(monkeypatch):
    assert M.fast_paths_enabled()  # the test process runs without RMS_PLAIN_PATHS
    with M.plain_paths():
        assert not M.fast_paths_enabled()
        with M.plain_paths(False):
            assert M.fast_paths_enabled()
        assert not M.fast_paths_enabled()
    assert M.fast_paths_enabled()
    x = torch.randn(2, 3, 4, 4)
    assert M.channels_last(x).is_contiguous(memory_format=torch.channels_last)
    with M.plain_paths():
        assert M.channels_last(x) is x


@pytest.mark.parametrize("kind", ["plain", "up", "down", "torgb"])
def test_modulated_conv_fast_equals_grouped(kind):
    torch.manual_seed(0)
    conv = {"plain": lambda: M.ModulatedConv2d(5, 7, 3, SD),
            "up": lambda: M.ModulatedConv2d(5, 7, 3, SD, upsample=True),
            "down": lambda: M.ModulatedConv2d(5, 7, 3, SD, downsample=True),
            "torgb": lambda: M.ModulatedConv2d(5, 1, 1, SD, demodulate=False)}[kind]().double()
    x = torch.randn(3, 5, 8, 8, dtype=torch.float64, requires_grad=True)
    style = torch.randn(3, SD, dtype=torch.float64, requires_grad=True)

    def run():
        out = conv(x, style)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                    [x, style] + list(conv.parameters()))
        return [out, *grads]

    plain, fast = _both(run)
    _close(plain, fast, rtol=1e-12, atol=1e-12)


def test_generator_and_discriminator_fast_equal_plain_float64():
    torch.manual_seed(0)
    g = _perturb(M.Generator(32, style_dim=SD, n_mlp=2, clip_dim=8, channel_cap=8)).double()
    d = _perturb(M.Discriminator(32, style_dim=SD, clip_dim=8, channel_cap=8), seed=1).double()
    c = g.condition([0, 1, 2, 0], [3, 14, 20, 28]).double()
    z = torch.randn(4, SD, dtype=torch.float64)
    noise = [torch.randn_like(getattr(g.noises, f"noise_{j}")).expand(4, -1, -1, -1) for j in range(g.num_layers)]

    def run():
        image, latent = g([z], c, noise=noise, return_latents=True)
        score = d(image, c)
        params = list(g.parameters()) + list(d.parameters())
        grads = torch.autograd.grad(score.sum() + image.pow(2).mean(), params, allow_unused=True)
        return [image, score] + [t for t in grads if t is not None]

    plain, fast = _both(run)
    _close(plain, fast, rtol=1e-10, atol=1e-12)


def test_discriminator_batches_equal_separate_calls():
    torch.manual_seed(0)
    d = _perturb(M.Discriminator(16, style_dim=SD, clip_dim=8, channel_cap=8))
    a, b = torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)
    c = d.condition([0] * 8, list(range(8)))
    e = torch.randn(8, 8)
    e[2] = 0  # an absent encoding row
    separate = torch.cat([d(a, (c, e)), d(b, (c, e))])
    paired = d(torch.cat([a, b]), (torch.cat([c, c]), torch.cat([e, e])), batches=2)
    torch.testing.assert_close(paired, separate, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="batches=3"):
        d(torch.cat([a, b]), (torch.cat([c, c]), None), batches=3)


@pytest.mark.parametrize("up,down,pad,k", [(2, 1, (2, 1), 4), (1, 2, (1, 1), 4), (2, 1, (6, 5), 12),
                                            (1, 2, (5, 5), 12), (1, 1, (2, 2), 4), (3, 2, (0, -1), 5)])
def test_fir_matrix_equals_upfirdn2d(up, down, pad, k):
    gen = torch.Generator().manual_seed(k)
    taps_y, taps_x = torch.randn(k, generator=gen, dtype=torch.float64), torch.randn(k, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 1, 9, 11, generator=gen, dtype=torch.float64)
    ref = upfirdn2d(x, torch.outer(taps_y, taps_x), up=up, down=down, pad=pad)
    out = fir_matrix(9, taps_y, up, down, pad) @ x @ fir_matrix(11, taps_x, up, down, pad).t()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_upsample_and_first_conv_fast_paths():
    up = M.Upsample((1, 3, 3, 1))
    x = torch.randn(3, 1, 8, 8, requires_grad=True)

    def run_up():
        out = up(x)
        return [out, *torch.autograd.grad(out.pow(2).sum(), x)]

    _close(*_both(run_up), rtol=1e-6, atol=1e-6)
    conv = _perturb(M.EqualConv2d(1, 6, 1))
    img = torch.randn(3, 1, 8, 8, requires_grad=True)

    def run_conv():
        out = conv(img)
        return [out, *torch.autograd.grad(out.pow(2).sum(), [img, *conv.parameters()])]

    plain, fast = _both(run_conv)
    _close(plain, fast, rtol=1e-6, atol=1e-6)
    with M.plain_paths(False):
        assert conv(img).is_contiguous(memory_format=torch.channels_last)


def test_state_dict_layout_unchanged():
    keys = {k for k in M.Generator(32, style_dim=SD, n_mlp=2, clip_dim=8, channel_cap=8).state_dict()}
    with M.plain_paths():
        plain_keys = {k for k in M.Generator(32, style_dim=SD, n_mlp=2, clip_dim=8, channel_cap=8).state_dict()}
    assert keys == plain_keys
    assert not any("_taps" in k or "_matrices" in k for k in keys)


def test_ada_geometric_fast_equals_plain_with_double_backward():
    from robustmedseg.factory.ada import apply_geometric, geometric_matrix

    torch.manual_seed(0)
    g_inv = geometric_matrix(4, (16, 16), 0.8, torch.device("cpu")).double()
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 16, 16, dtype=torch.float64, requires_grad=True)

    def run():  # R1-like: gradient w.r.t. the input with create_graph, then differentiate its norm
        out = apply_geometric(x, g_inv)
        (grad,) = torch.autograd.grad((out * w).pow(2).sum(), x, create_graph=True)
        second = torch.autograd.grad(grad.pow(2).sum(), [x, w])
        return [out, grad, *second]

    plain, fast = _both(run)
    _close(plain, fast, rtol=1e-10, atol=1e-10)


def _trainer(ada_p: float):
    from bench.bench_steps import make_trainer

    return make_trainer(argparse.Namespace(ada_p=ada_p))


@pytest.mark.parametrize("step", [0, 1, 2, 3])  # D + R1, G + path length, regular D, regular G
def test_node_update_gradients_fast_equal_plain(step):
    from bench.bench_steps import phase1_batch

    real, target = phase1_batch(8)

    def run():
        trainer = _trainer(0.3)
        trainer.step = step
        trainer.opt.inner_step = lambda: None  # keep the regular loss's gradients (no inner step)
        trainer.opt.zero_grad()
        loss = trainer.training_step(real, target)
        loss.backward()
        return [loss] + [p.grad for p in trainer.model.parameters() if p.grad is not None]

    plain, fast = _both(run, seed=11)
    _close(plain, fast, rtol=2e-4, atol=1e-6)


def test_node_updates_fast_reproducible_and_close_to_plain():
    from bench.bench_steps import node_updates, phase1_batch

    real, target = phase1_batch(8)

    def run():
        trainer = _trainer(0.3)
        losses = node_updates(trainer, real, target, 6)
        return [torch.tensor(losses)] + [p for p in trainer.model.parameters()]

    fast_a = _both(run, seed=5)[1]
    torch.manual_seed(5)
    again = [t.detach().clone() for t in run()]
    for x, y in zip(fast_a, again):
        assert torch.equal(x, y)  # same seed, same numbers on the fast path
    plain, fast = _both(run, seed=5)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-3, atol=1e-4)  # the losses of 6 updates


def test_foreach_optimisers_match_single_tensor():
    from MultiMedSeg.optim import Ranger

    shapes = [(8, 4, 3, 3), (8,), (5, 7)]
    results = []
    for foreach in (False, True):
        params = [torch.randn(s, generator=torch.Generator().manual_seed(i)).requires_grad_() for i, s in enumerate(shapes)]
        opt = Ranger(params, lr=1e-2, k=2, foreach=foreach)
        for step in range(5):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
            opt.step()
        results.append([p.detach() for p in params])
    _close(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_iresnet_channels_last_equals_plain():
    from MultiMedSeg.models.iresnet import IResNet

    torch.manual_seed(0)
    net = IResNet([1, 1, 1, 1], base_channels=8).double()
    x = torch.randn(4, 1, 32, 32, dtype=torch.float64)

    def run():
        outs = net(x)
        grads = torch.autograd.grad(sum(o.pow(2).mean() for o in outs), list(net.parameters()), allow_unused=True)
        return list(outs) + [g for g in grads if g is not None]

    plain, fast = _both(run)
    _close(plain, fast, rtol=1e-10, atol=1e-12)
    assert math.isfinite(float(fast[0].sum()))
