"""Tests of the shared StyleGAN2 module ``model.py`` (docs/method.md#building-blocks, #generator, #discriminator,
#state-dict, #phase2-generator)."""
from __future__ import annotations

import math
from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F

import model as M
from op import conv2d_gradfix

SD = 32        # small style_dim for the tests that are not about the docs/method.md#state-dict layout
CLIP = 24      # small CLIP width
CAP = 16       # channel cap


def tiny_g(size: int = 16, **kw) -> M.Generator:
    args = dict(style_dim=SD, n_mlp=2, clip_dim=CLIP, channel_cap=CAP)
    args.update(kw)
    return perturb(M.Generator(size, **args))


def tiny_d(size: int = 16, **kw) -> M.Discriminator:
    args = dict(style_dim=SD, clip_dim=CLIP, channel_cap=CAP)
    args.update(kw)
    return perturb(M.Discriminator(size, **args))


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised parameters (noise weights, biases) random values so that every path matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return module


def fixed_noise(g: M.Generator, batch: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, *getattr(g.noises, f"noise_{j}").shape[-2:], generator=gen)
            for j in range(g.num_layers)]


# ----------------------------------------------------------------------------------------------
# state-dict layout (docs/method.md#state-dict), written out by hand from the original layout table (size 512, n_domains 3, cm 2)
# ----------------------------------------------------------------------------------------------
def spec_generator_shapes() -> Dict[str, Tuple[int, ...]]:
    s: Dict[str, Tuple[int, ...]] = {
        "label_embed.weight": (512, 32), "label_embed.bias": (512,),
        "encoding_embed.0.weight": (32, 768), "encoding_embed.0.bias": (32,),
        "encoding_embed.1.weight": (512, 32), "encoding_embed.1.bias": (512,),
        "style.0.weight": (512, 1024),
        "input.input": (1, 512, 4, 4),
        "conv1.conv.weight": (1, 512, 512, 3, 3), "conv1.conv.modulation.weight": (512, 512),
        "conv1.conv.modulation.bias": (512,), "conv1.noise.weight": (1,), "conv1.activate.bias": (512,),
        "to_rgb1.conv.weight": (1, 1, 512, 1, 1), "to_rgb1.conv.modulation.weight": (512, 512),
        "to_rgb1.conv.modulation.bias": (512,), "to_rgb1.bias": (1, 1, 1, 1),
    }
    for i in range(8):
        s[f"style.{i}.bias"] = (512,)
        if i:
            s[f"style.{i}.weight"] = (512, 512)
    cin_cout = [(512, 512), (512, 512), (512, 512), (512, 512), (512, 256), (256, 128), (128, 64)]
    for t, (cin, cout) in enumerate(cin_cout):
        up, nxt = f"convs.{2 * t}", f"convs.{2 * t + 1}"
        s[f"{up}.conv.weight"] = (1, cout, cin, 3, 3)
        s[f"{up}.conv.modulation.weight"] = (cin, 512)
        s[f"{up}.conv.modulation.bias"] = (cin,)
        s[f"{up}.conv.blur.kernel"] = (4, 4)
        s[f"{up}.noise.weight"] = (1,)
        s[f"{up}.activate.bias"] = (cout,)
        s[f"{nxt}.conv.weight"] = (1, cout, cout, 3, 3)
        s[f"{nxt}.conv.modulation.weight"] = (cout, 512)
        s[f"{nxt}.conv.modulation.bias"] = (cout,)
        s[f"{nxt}.noise.weight"] = (1,)
        s[f"{nxt}.activate.bias"] = (cout,)
        s[f"to_rgbs.{t}.conv.weight"] = (1, 1, cout, 1, 1)
        s[f"to_rgbs.{t}.conv.modulation.weight"] = (cout, 512)
        s[f"to_rgbs.{t}.conv.modulation.bias"] = (cout,)
        s[f"to_rgbs.{t}.bias"] = (1, 1, 1, 1)
        s[f"to_rgbs.{t}.upsample.kernel"] = (4, 4)
    for j in range(15):
        r = 2 ** ((j + 5) // 2)
        s[f"noises.noise_{j}"] = (1, 1, r, r)
    return s


def spec_discriminator_shapes() -> Dict[str, Tuple[int, ...]]:
    s: Dict[str, Tuple[int, ...]] = {
        "label_embed.weight": (512, 32), "label_embed.bias": (512,),
        "encoding_embed.weight": (512, 768), "encoding_embed.bias": (512,),
        "convs.0.0.weight": (64, 1, 1, 1), "convs.0.1.bias": (64,),
        "final_conv.0.weight": (512, 513, 3, 3), "final_conv.1.bias": (512,),
        "final_linear.0.weight": (512, 8192), "final_linear.0.bias": (512,),
        "final_linear.1.weight": (512, 512), "final_linear.1.bias": (512,),
    }
    in_out = [(64, 128), (128, 256), (256, 512)] + [(512, 512)] * 4
    for b, (cin, cout) in enumerate(in_out, start=1):
        p = f"convs.{b}"
        s[f"{p}.conv1.0.weight"] = (cin, cin, 3, 3)
        s[f"{p}.conv1.1.bias"] = (cin,)
        s[f"{p}.conv2.0.kernel"] = (4, 4)
        s[f"{p}.conv2.1.weight"] = (cout, cin, 3, 3)
        s[f"{p}.conv2.2.bias"] = (cout,)
        s[f"{p}.skip.0.kernel"] = (4, 4)
        s[f"{p}.skip.1.weight"] = (cout, cin, 1, 1)
    return s


@pytest.mark.parametrize("which", ["generator", "discriminator"])
def test_state_dict_matches_spec_table_and_loads_strictly(which):
    if which == "generator":
        net, expected = M.Generator(512, n_domains=3, channel_multiplier=2), spec_generator_shapes()
    else:
        net, expected = M.Discriminator(512, n_domains=3, channel_multiplier=2), spec_discriminator_shapes()
    actual = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert sorted(set(expected) - set(actual)) == []
    assert sorted(set(actual) - set(expected)) == []
    assert {k: v for k, v in actual.items() if expected[k] != v} == {}
    ckpt = {k: torch.full(shape, 0.5) for k, shape in expected.items()}
    net.load_state_dict(ckpt, strict=True)
    assert all(bool((v == 0.5).all()) for v in net.state_dict().values())
    if which == "generator":
        assert net.n_latent == 16 and net.num_layers == 15


def test_blur_and_upsample_buffers_are_normalised_kernels():
    g = M.Generator(16, style_dim=SD, n_mlp=1, channel_cap=8)
    k = torch.tensor([1.0, 3, 3, 1])
    base = torch.outer(k, k) / 64
    assert torch.allclose(g.convs[0].conv.blur.kernel, base * 4)
    assert torch.allclose(g.to_rgbs[0].upsample.kernel, base * 4)
    d = M.Discriminator(16, channel_cap=8, style_dim=SD)
    assert torch.allclose(d.convs[1].conv2[0].kernel, base)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
def test_upsample_and_blur_preserve_a_constant_field():
    x = torch.full((1, 2, 8, 8), 3.0)
    up = M.Upsample((1, 3, 3, 1))(x)
    assert up.shape == (1, 2, 16, 16)
    assert torch.allclose(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 3.0))
    blur = M.Blur((1, 3, 3, 1), (1, 2))(x)
    assert blur.shape == (1, 2, 8, 8)
    assert torch.allclose(blur[..., 2:-2, 2:-2], torch.full_like(blur[..., 2:-2, 2:-2], 3.0))


def test_modulated_conv_equals_per_sample_convolution():
    torch.manual_seed(0)
    conv = perturb(M.ModulatedConv2d(3, 5, 3, SD))
    x, w = torch.randn(4, 3, 6, 6), torch.randn(4, SD)
    out = conv(x, w)
    for b in range(4):
        s = conv.modulation(w[b:b + 1])[0]
        weight = conv.weight[0] * s.view(1, 3, 1, 1) / math.sqrt(3 * 9)
        weight = weight / weight.pow(2).sum(dim=(1, 2, 3), keepdim=True).add(1e-8).sqrt()
        ref = F.conv2d(x[b:b + 1], weight, padding=1)
        assert torch.allclose(out[b:b + 1], ref, atol=1e-5)


def test_modulated_conv_up_and_down_sampling_shapes_and_demodulation():
    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 8, 8), torch.randn(2, SD)
    up = M.ModulatedConv2d(4, 6, 3, SD, upsample=True)
    down = M.ModulatedConv2d(4, 6, 3, SD, downsample=True)
    assert up(x, w).shape == (2, 6, 16, 16)
    assert down(x, w).shape == (2, 6, 4, 4)
    wts = up._batch_weight(w, 2)
    assert torch.allclose(wts.pow(2).sum(dim=(2, 3, 4)), torch.ones(2, 6), atol=1e-4)
    torgb = M.ModulatedConv2d(4, 1, 1, SD, demodulate=False)
    assert not torch.allclose(torgb._batch_weight(w, 2).pow(2).sum(dim=(2, 3, 4)), torch.ones(2, 1))


def test_equal_linear_fused_lrelu_and_lr_mul():
    torch.manual_seed(0)
    lin = perturb(M.EqualLinear(8, 4, lr_mul=0.01, activation="fused_lrelu"))
    x = torch.randn(3, 8)
    eff = lin.weight * lin.scale
    # at init the effective weight N(0,1)/lr_mul · lr_mul/√in has std 1/√in whatever lr_mul is
    big = M.EqualLinear(256, 256, lr_mul=0.01)
    assert abs(float((big.weight * big.scale).detach().std()) * 16 - 1) < 0.05
    ref = math.sqrt(2) * F.leaky_relu(x @ eff.t() + lin.bias * 0.01, 0.2)
    assert torch.allclose(lin(x), ref, atol=1e-6)
    with pytest.raises(ValueError):
        M.EqualLinear(2, 2, activation="relu")


def test_minibatch_stddev_matches_direct_computation_and_handles_odd_batches():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    out = M.minibatch_stddev(x, 4)
    assert out.shape == (8, 4, 4, 4)
    for n in range(8):
        members = x[[m for m in range(8) if m % 2 == n % 2]]  # G=4 groups of stride B/G=2
        expected = members.var(dim=0, unbiased=False).add(1e-8).sqrt().mean()
        assert torch.allclose(out[n, 3], expected.expand(4, 4), atol=1e-6)
    out6 = M.minibatch_stddev(torch.randn(6, 3, 4, 4), 4)   # G = 3
    assert out6.shape == (6, 4, 4, 4)
    out1 = M.minibatch_stddev(torch.randn(1, 3, 4, 4), 4)   # G = 1: std of one sample is sqrt(1e-8)
    assert torch.allclose(out1[:, 3], torch.full((1, 4, 4), 1e-4))


def test_make_condition_one_hot_and_validation():
    c = M.make_condition([0, 2], [5, 28], n_domains=3, n_zbins=29)
    assert c.shape == (2, 32)
    assert c.sum(1).tolist() == [2.0, 2.0]
    assert c[0, 0] == 1 and c[0, 3 + 5] == 1 and c[1, 2] == 1 and c[1, 31] == 1
    assert torch.equal(M.make_condition(1, [0, 1, 2], 3, 29)[:, :3].argmax(1), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError):
        M.make_condition([3], [0], 3, 29)
    with pytest.raises(ValueError):
        M.make_condition([0], [29], 3, 29)
    with pytest.raises(ValueError):
        M.make_condition([0, 1], [0, 1, 2], 3, 29)
    assert M.middle_zbins(29) == (13, 14, 15)
    assert M.middle_zbins(1) == (0,)


def test_channel_table_and_cap():
    assert M.channel_table(512) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64}
    assert M.channel_table(1024, 1)[1024] == 16
    assert set(M.channel_table(64, 2, 16).values()) == {16}
    for bad in (8, 2048, 48):
        with pytest.raises(ValueError):
            M.Generator(bad)


# ----------------------------------------------------------------------------------------------
# Generator / Discriminator end to end
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [16, 32, 64, 128, 256, 512])
def test_shapes_at_all_sizes(size):
    g = M.Generator(size, style_dim=16, n_mlp=1, clip_dim=CLIP, channel_cap=4)
    d = M.Discriminator(size, clip_dim=CLIP, channel_cap=4, style_dim=16)
    log = int(math.log2(size))
    assert g.n_latent == 2 * log - 2 and g.num_layers == 2 * log - 3
    c = g.condition([0, 1], [3, 20])
    with torch.no_grad():
        img, lat, feats = g([torch.randn(2, 16)], (c, torch.randn(2, CLIP)), return_latents=True,
                            return_features=True)
        score = d(img, (c, None))
    assert img.shape == (2, 1, size, size)
    assert lat.shape == (2, g.n_latent, 16)
    assert score.shape == (2, 1)
    assert len(feats) == g.n_latent
    assert [f.shape[-1] for f in feats] == [4, 4] + [2 ** (3 + i // 2) for i in range(2 * (log - 2))]
    noise = g.make_noise()
    assert [n.shape for n in noise] == [getattr(g.noises, f"noise_{j}").shape for j in range(g.num_layers)]
    if size == 512:   # phase-2 encoder insertion points 5, 7, 9, 11 are the 16/32/64/128 px conv inputs
        assert [feats[k].shape[-1] for k in (5, 7, 9, 11)] == [16, 32, 64, 128]


def test_fixed_noise_is_deterministic_and_random_noise_is_not():
    torch.manual_seed(0)
    g = tiny_g()
    c = g.condition([0, 1], [3, 4])
    z = torch.randn(2, SD)
    with torch.no_grad():
        a, _ = g([z], c, randomize_noise=False)
        b, _ = g([z], c, randomize_noise=False)
        r1, _ = g([z], c)
        r2, _ = g([z], c)
    assert torch.equal(a, b)
    assert not torch.allclose(r1, r2)


def test_style_mixing_mixes_both_noise_vectors():
    torch.manual_seed(0)
    g = tiny_g(32)
    c, e = g.condition([0, 2], [1, 27]), torch.randn(2, CLIP)
    z1, z2 = torch.randn(2, SD), torch.randn(2, SD)
    noise = fixed_noise(g, 2)
    with torch.no_grad():
        mixed, lat = g([z1, z2], (c, e), inject_index=3, noise=noise, return_latents=True)
        only1, _ = g([z1], (c, e), noise=noise)
        only2, _ = g([z2], (c, e), noise=noise)
        w1, w2 = g.get_latent(z1, c, e), g.get_latent(z2, c, e)
    assert torch.allclose(lat[:, :3], w1.unsqueeze(1).expand(-1, 3, -1), atol=1e-6)
    assert torch.allclose(lat[:, 3:], w2.unsqueeze(1).expand(-1, g.n_latent - 3, -1), atol=1e-6)
    assert (mixed - only1).abs().max() > 1e-3 and (mixed - only2).abs().max() > 1e-3


def test_random_crossover_index_covers_the_whole_range():
    torch.manual_seed(0)
    g = tiny_g(16)   # n_latent = 6
    c = g.condition([0], [0])
    seen = set()
    with torch.no_grad():
        z1, z2 = torch.randn(1, SD), torch.randn(1, SD)
        w1 = g.get_latent(z1, c)
        for _ in range(60):
            _, lat = g([z1, z2], c, return_latents=True)
            seen.add(int((lat[0] - w1).abs().amax(dim=1).gt(1e-6).int().argmax()))
    assert seen == {1, 2, 3, 4, 5}


def test_conditioning_changes_the_output():
    torch.manual_seed(0)
    g = tiny_g()
    z = torch.randn(1, SD)
    e = torch.randn(1, CLIP)

    def run(dom, zb, enc=None):
        with torch.no_grad():
            return g([z], (g.condition(dom, zb), enc), randomize_noise=False)[0]

    base = run(0, 10)
    assert (run(1, 10) - base).abs().max() > 1e-3
    assert (run(0, 11) - base).abs().max() > 1e-3
    assert (run(0, 10, e) - base).abs().max() > 1e-3
    assert torch.equal(run(0, 10, torch.zeros(1, CLIP)), base)   # all-zero encoding = no encoding


def test_all_zero_encoding_rows_are_treated_per_row():
    torch.manual_seed(0)
    g, d = tiny_g(), tiny_d()
    c = g.condition([0, 1], [3, 4])
    e = torch.randn(2, CLIP)
    e[0] = 0
    z = torch.randn(2, SD)
    with torch.no_grad():
        w_mixed = g.get_latent(z, c, e)
        w_none = g.get_latent(z, c)
        w_full = g.get_latent(z, c, torch.cat([torch.randn(1, CLIP), e[1:]]))
        x = torch.randn(2, 1, 16, 16)
        d_mixed, d_none, d_full = d(x, (c, e)), d(x, (c, None)), d(x, (c, torch.cat([torch.ones(1, CLIP), e[1:]])))
    assert torch.allclose(w_mixed[0], w_none[0]) and torch.allclose(w_mixed[1], w_full[1])
    assert not torch.allclose(w_mixed[1], w_none[1])
    assert torch.allclose(d_mixed[0], d_none[0]) and torch.allclose(d_mixed[1], d_full[1])
    assert not torch.allclose(d_mixed[1], d_none[1])


def test_discriminator_output_depends_on_the_condition():
    torch.manual_seed(0)
    d = tiny_d()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        base = d(x, d.condition(0, 10))
        others = [d(x, d.condition(1, 10)), d(x, d.condition(0, 11)), d(x, (d.condition(0, 10), torch.randn(1, CLIP)))]
    for o in others:
        assert (o - base).abs().max() > 1e-5
    # projection: the score is linear in the encoding embedding, so doubling ε doubles the score
    e = torch.randn(1, CLIP)
    with torch.no_grad():
        d.encoding_embed.bias.zero_()
        s1, s2 = d(x, (d.condition(0, 10), e)), d(x, (d.condition(0, 10), 2 * e))
    assert torch.allclose(s2, 2 * s1, rtol=1e-4, atol=1e-6)


def test_input_validation_errors():
    g, d = tiny_g(), tiny_d()
    z = torch.randn(2, SD)
    with pytest.raises(ValueError, match="rows"):
        g([z], g.condition([0], [0]))
    with pytest.raises(ValueError, match="rows"):
        g([z], (g.condition([0, 0], [0, 0]), torch.randn(1, CLIP)))
    with pytest.raises(ValueError):
        g([z], torch.zeros(2, 7))
    with pytest.raises(ValueError):
        g([z])
    with pytest.raises(ValueError):
        g([z, z, z], g.condition([0, 0], [0, 0]))
    with pytest.raises(ValueError):
        g([z, z], g.condition([0, 0], [0, 0]), inject_index=g.n_latent)
    with pytest.raises(ValueError):
        d(torch.randn(2, 1, 32, 32), d.condition([0, 0], [0, 0]))
    with pytest.raises(ValueError, match="rows"):
        d(torch.randn(2, 1, 16, 16), d.condition([0, 0, 0], [0, 0, 0]))
    with pytest.raises(ValueError):
        g.mean_latent(10, [0], n_domains=2)


def test_truncation_moves_latents_toward_the_centre():
    torch.manual_seed(0)
    g = tiny_g()
    c = g.condition([0, 1], [3, 4])
    z = torch.randn(2, SD)
    centre = torch.randn(2, SD)
    with torch.no_grad():
        _, lat = g([z], c, truncation=0.25, truncation_latent=centre, return_latents=True)
        w = g.get_latent(z, c)
    assert torch.allclose(lat[:, 0], centre + 0.25 * (w - centre), atol=1e-6)
    with pytest.raises(ValueError):
        g([z], c, truncation=0.5)


# ----------------------------------------------------------------------------------------------
# Phase-2 synthesis API
# ----------------------------------------------------------------------------------------------
def test_g_synthesis_reproduces_forward():
    torch.manual_seed(0)
    g = tiny_g(32)
    c, z = g.condition([0, 1], [3, 4]), torch.randn(2, SD)
    noise = fixed_noise(g, 2)
    with torch.no_grad():
        img, lat, feats = g([z], c, noise=noise, return_latents=True, return_features=True)
        img2, feats2 = g.g_synthesis(lat, noise=noise)
        img3, _ = g([lat], input_is_latent=True, noise=noise)
        img4, _ = g.g_synthesis(lat, randomize_noise=False)
        img5, _ = g([z], c, randomize_noise=False)
    assert torch.equal(img, img2) and torch.equal(img, img3)
    assert len(feats2) == g.n_latent and all(torch.equal(a, b) for a, b in zip(feats, feats2))
    assert torch.equal(img4, img5)
    assert (img4 - img).abs().max() > 1e-4


def test_feature_injection_rules():
    torch.manual_seed(0)
    g = tiny_g(64)   # n_latent = 10, insertion indices 1..8
    lat = torch.randn(2, g.n_latent, SD)
    noise = fixed_noise(g, 2)
    with torch.no_grad():
        ref, feats = g.g_synthesis(lat, noise=noise)
        k = 5
        fk = torch.randn_like(feats[k])
        gate = torch.rand_like(feats[k])
        fin = [None] * (g.n_latent + 1)            # longer lists are fine (phase 2 passes 17 entries)
        fin[k] = (fk, gate)
        fin_gate1 = [None] * g.n_latent
        fin_gate1[k] = (fk, 1.0)
        same, _ = g.g_synthesis(lat, noise=noise, features_in=fin_gate1, feature_scale=0.0)   # s=0, gate 1
        fin_self = [None] * g.n_latent
        fin_self[k] = feats[k]                       # bare tensor = gate 1; replacing x by itself
        self_inj, _ = g.g_synthesis(lat, noise=noise, features_in=fin_self, feature_scale=1.0)
        changed, feats_c = g.g_synthesis(lat, noise=noise, features_in=fin, feature_scale=1.0)
        half, feats_h = g.g_synthesis(lat, noise=noise, features_in=fin, feature_scale=0.5)
        # the layer after the insertion point sees (1 - s)·x·gate + s·f
        expect_next = g.convs[k - 1](0.5 * feats[k] * gate + 0.5 * fk, lat[:, k], noise=noise[k])
    assert torch.allclose(same, ref, atol=1e-6)
    assert torch.allclose(self_inj, ref, atol=1e-6)
    assert (changed - ref).abs().max() > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(feats[:k + 1], feats_c[:k + 1]))   # recorded before injection
    assert not torch.allclose(feats_c[k + 1], feats[k + 1])
    assert torch.allclose(feats_h[k + 1], expect_next, atol=1e-5)
    with pytest.raises(ValueError):
        bad = [None] * g.n_latent
        bad[0] = feats[0]
        g.g_synthesis(lat, noise=noise, features_in=bad)
    with pytest.raises(ValueError):
        bad = [None] * g.n_latent
        bad[g.n_latent - 1] = feats[g.n_latent - 1]
        g.g_synthesis(lat, noise=noise, features_in=bad)
    with pytest.raises(ValueError):
        bad = [None] * g.n_latent
        bad[3] = (feats[4], 1.0)
        g.g_synthesis(lat, noise=noise, features_in=bad)


def test_forward_features_in_matches_g_synthesis():
    torch.manual_seed(0)
    g = tiny_g(32)
    c, z = g.condition([0], [3]), torch.randn(1, SD)
    noise = fixed_noise(g, 1)
    with torch.no_grad():
        _, lat = g([z], c, noise=noise, return_latents=True)
        _, feats = g.g_synthesis(lat, noise=noise)
        fin = [None] * g.n_latent
        fin[2] = (torch.randn_like(feats[2]), 0.5)
        a, _ = g([z], c, noise=noise, features_in=fin, feature_scale=0.7)
        b, _ = g.g_synthesis(lat, noise=noise, features_in=fin, feature_scale=0.7)
    assert torch.equal(a, b)


def test_mean_latent_shape_semantics_and_determinism():
    g = tiny_g(16, n_zbins=29)
    torch.manual_seed(3)
    m1 = g.mean_latent(100, [2, 0], n_domains=3, chunk=33)
    torch.manual_seed(3)
    m2 = g.mean_latent(100, [2, 0], n_domains=3, chunk=33)
    assert m1.shape == (2, SD) and torch.equal(m1, m2)
    assert not torch.allclose(m1[0], m1[1])
    # definition: average over the default bins 13, 14, 15 of the mean W of n draws per bin
    gen = torch.Generator().manual_seed(7)
    got = g.mean_latent(40, [1], chunk=40, generator=gen)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        per_bin = [g.get_latent(torch.randn(40, SD, generator=gen), g.condition([1] * 40, [b] * 40)).mean(0)
                   for b in (13, 14, 15)]
    assert torch.allclose(got[0], torch.stack(per_bin).mean(0), atol=1e-5)
    assert not got.requires_grad


# ----------------------------------------------------------------------------------------------
# Second-order gradients (R1, path length)
# ----------------------------------------------------------------------------------------------
def test_r1_penalty_double_backward():
    torch.manual_seed(0)
    d = tiny_d()
    real = torch.randn(4, 1, 16, 16, requires_grad=True)
    c = d.condition([0, 1, 2, 0], [1, 2, 3, 4])
    with conv2d_gradfix.no_weight_gradients():
        score = d(real, (c, torch.randn(4, CLIP)))
        (grad,) = torch.autograd.grad(score.sum(), real, create_graph=True)
    penalty = grad.pow(2).flatten(1).sum(1).mean()
    penalty.backward()
    grads = [p.grad for p in d.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert d.final_linear[0].weight.grad.abs().sum() > 0
    assert d.convs[1].conv1[1].bias.grad.abs().sum() > 0


def test_path_length_double_backward():
    torch.manual_seed(0)
    g = tiny_g(16)
    c, z = g.condition([0, 1], [3, 4]), torch.randn(2, SD)
    img, lat = g([z], c, return_latents=True)
    noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
    (grad,) = torch.autograd.grad((img * noise).sum(), lat, create_graph=True)
    path = grad.pow(2).sum(2).mean(1).sqrt()
    path.mean().backward()
    assert torch.isfinite(g.style[0].weight.grad).all() and g.style[0].weight.grad.abs().sum() > 0
    assert g.convs[0].conv.weight.grad.abs().sum() > 0


def test_mapping_input_follows_the_spec_formula():
    """w = style([PN(z); 0.8·PN(encoding_embed(e)) + 0.2·PN(label_embed(c))]) (docs/method.md#generator)."""
    torch.manual_seed(0)
    g = tiny_g()
    c, z, e = g.condition([0, 2], [5, 6]), torch.randn(2, SD), torch.randn(2, CLIP)

    def pn(v):
        return v / v.pow(2).mean(1, keepdim=True).add(1e-8).sqrt()

    with torch.no_grad():
        cond = 0.8 * pn(g.encoding_embed(e)) + 0.2 * pn(g.label_embed(c))
        expected = g.style(torch.cat([pn(z), cond], 1))
        got = g.get_latent(z, c, e)
        _, lat = g([z], (c, e), return_latents=True)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(lat[:, 0], expected, atol=1e-5)


def test_noise_j_feeds_the_layer_that_produces_feature_j_plus_1():
    torch.manual_seed(0)
    g = tiny_g(32)
    lat = torch.randn(1, g.n_latent, SD)
    noise = fixed_noise(g, 1)
    with torch.no_grad():
        _, ref = g.g_synthesis(lat, noise=noise)
        for j in range(g.num_layers):
            changed = list(noise)
            changed[j] = noise[j] + 1.0
            _, feats = g.g_synthesis(lat, noise=changed)
            assert all(torch.equal(a, b) for a, b in zip(ref[:j + 1], feats[:j + 1])), j
            assert not torch.allclose(ref[j + 1], feats[j + 1]), j


def test_skip_upsample_geometry_matches_zero_insertion_and_pad_2_1():
    """An impulse at p lands on 2p-1 … 2p+2 with weights [1,3,3,1]/4 per axis (up=2, pad (2,1), true conv)."""
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 5] = 1.0
    out = M.Upsample((1, 3, 3, 1))(x)
    expected = torch.zeros(16, 16)
    taps = torch.tensor([1.0, 3, 3, 1]) / 4
    expected[5:9, 9:13] = torch.outer(taps, taps)
    assert torch.allclose(out[0, 0], expected, atol=1e-6)


# ------------------------------------------------------------------ the generator's arguments have one owner
def test_generator_args_own_the_architecture_arguments():
    """GeneratorArgs holds the nine arguments and their defaults; the networks' signatures, the phase-1
    config and phase 2's PSPConfig take theirs from it."""
    import dataclasses
    import inspect

    from MultiMedSeg.models.psp import PSPConfig
    from robustmedseg.factory.config import MODEL_KEYS, FactoryConfig

    fields = {f.name: f.default for f in dataclasses.fields(M.GeneratorArgs)}
    assert tuple(fields) == M.GENERATOR_KEYS == MODEL_KEYS and fields["n_zbins"] == M.N_ZBINS == 29
    for net, unused in ((M.Generator, set()), (M.Discriminator, {"n_mlp", "lr_mlp"})):
        params = inspect.signature(net.__init__).parameters
        for name, default in fields.items():
            if name in unused:
                assert name not in params
            elif name != "size":
                assert params[name].default == default, (net.__name__, name)
    assert issubclass(FactoryConfig, M.GeneratorArgs) and FactoryConfig().generator_args() == M.GeneratorArgs()
    assert PSPConfig().generator_args() == M.GeneratorArgs()
    gen = M.GeneratorArgs(size=64, style_dim=16, n_zbins=5, channel_cap=8, lr_mlp=1.0)
    psp = PSPConfig.from_generator_args(gen, encoder_input_size=32)
    assert psp.output_size == 64 and psp.generator_args() == gen
    assert PSPConfig.from_generator_args(gen.as_dict(), encoder_input_size=32) == psp


@pytest.mark.parametrize("size", [8, 24, 2048, True])
def test_the_one_image_size_rule_with_its_cap(size):
    from MultiMedSeg.models.psp import PSPConfig
    from robustmedseg.factory.config import FactoryConfig

    with pytest.raises(ValueError, match=r"size must be a power of two in \[16, 1024\]"):
        M.check_image_size(size)
    for build in (M.GeneratorArgs, FactoryConfig, M.Generator):
        with pytest.raises(ValueError, match=r"size must be a power of two in \[16, 1024\]"):
            build(size=size)
    with pytest.raises(ValueError, match=r"^output_size must be a power of two in \[16, 1024\]"):
        PSPConfig(output_size=size, encoder_input_size=16)


def test_generator_args_refuse_what_no_generator_is_built_from():
    for bad, msg in ((dict(n_zbins=0), "n_zbins must be >= 1"), (dict(channel_cap=0), "channel_cap must be >= 1"),
                     (dict(lr_mlp=0.0), "lr_mlp must be > 0"), (dict(style_dim=0), "style_dim must be >= 1")):
        with pytest.raises(ValueError, match=msg):
            M.GeneratorArgs(**bad)
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        M.GeneratorArgs().size = 32  # type: ignore[misc]
