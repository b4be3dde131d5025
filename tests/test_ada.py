"""ADA (robustmedseg/factory/ada.py): how often each elementary transform is applied, and what p = 0 / p = 1
mean; the distributions of the draws; the geometric and colour passes (alignment, turns about the centre,
the grey colour rule, double backward); the adaptation of p.

The rates are measured on many samples and compared with p within a tolerance derived from the
sample size (5 binomial standard deviations: a false alarm has probability < 1e-6 per check).
"""
from __future__ import annotations

import math

import pytest
import torch

from robustmedseg.factory import ada as ada_mod

CPU = torch.device("cpu")
N = 20000
SENTINEL = 12345.0
# the gates of one augment() call, in the order the code draws them (8 geometric, then 5 colour)
GATES = (*ada_mod.GEOMETRIC_STEPS, "brightness", "contrast", "luma_flip", "hue", "saturation")
ROTATIONS = ("pre_rotate", "post_rotate")


def tolerance(p: float, n: int = N, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(max(p * (1 - p), 1e-12) / n)


@pytest.fixture()
def gate_spy(monkeypatch):
    """Wrap ``ada._gate``: record, per call, the probability passed and the fraction of samples whose
    gate opened (measured with a sentinel value, so transforms whose draw can be neutral count too)."""
    calls = []
    real = ada_mod._gate

    def spy(value, prob, neutral):
        opened = real(torch.full_like(value, SENTINEL), prob, neutral) == SENTINEL
        rows = opened.reshape(opened.shape[0], -1)
        assert torch.all(rows.all(1) | ~rows.any(1)), "a gate must open or close a whole sample"
        calls.append((prob, float(rows[:, 0].float().mean())))
        return torch.where(opened, value, torch.full_like(value, neutral))

    monkeypatch.setattr(ada_mod, "_gate", spy)
    return calls


@pytest.mark.parametrize("p", [0.0, 0.3, 0.8, 1.0])
def test_each_transform_is_applied_with_its_probability(gate_spy, p):
    torch.manual_seed(int(p * 10))
    ada_mod.sample_geometric(N, (64, 64), p, CPU)
    ada_mod.colour_matrix(N, p, CPU)
    assert len(gate_spy) == len(GATES)
    p_rot = 1 - math.sqrt(1 - p)
    for name, (prob, rate) in zip(GATES, gate_spy):
        want = p_rot if name in ROTATIONS else p
        assert prob == pytest.approx(want), name
        assert abs(rate - want) <= tolerance(want), (name, rate, want)
    # the two arbitrary rotations together: P(at least one) = 1 - (1 - p_rot)^2 = p
    assert 1 - (1 - p_rot) ** 2 == pytest.approx(p)


def test_p_one_applies_every_continuous_transform_to_every_sample():
    torch.manual_seed(0)
    n = 2000
    g = ada_mod.sample_geometric(n, (1024, 1024), 1.0, CPU)
    for key, neutral in (("iso_scale", 1.0), ("aniso_scale", 1.0), ("pre_rotate", 0.0), ("post_rotate", 0.0)):
        assert bool((g[key] != neutral).all()), key
    assert bool((g["frac_translate"] != 0).all())
    # whole-pixel translation: round(U(-0.125, 0.125) * 1024) is 0 with probability 1/256 per axis
    assert float((g["int_translate"] != 0).any(1).float().mean()) > 0.99
    # flips and quarter turns: the drawn value itself is uniform ({0, 1} and {0, 1, 2, 3})
    assert abs(float(g["xflip"].mean()) - 0.5) < tolerance(0.5, n)
    assert abs(float((g["rot90"] != 0).float().mean()) - 0.75) < tolerance(0.75, n)
    c = ada_mod.colour_matrix(n, 1.0, CPU)
    gain = c[:, 0:3, 0:3].sum(2).mean(1)
    offset = c[:, 0:3, 3].mean(1)
    assert bool((offset != 0).all()) and bool((gain.abs() != 1).all())  # brightness and contrast everywhere
    # the luma flip negates the gain of half of the samples
    assert abs(float((gain < 0).float().mean()) - 0.5) < tolerance(0.5, n)


def test_p_zero_draws_only_neutral_values():
    torch.manual_seed(0)
    g = ada_mod.sample_geometric(500, (64, 64), 0.0, CPU)
    assert torch.equal(ada_mod.matrix_from_params(g), torch.eye(3).expand(500, 3, 3))
    assert torch.equal(ada_mod.colour_matrix(500, 0.0, CPU), torch.eye(4).expand(500, 4, 4))


def test_augment_at_p_one_changes_every_image_and_p_zero_none():
    torch.manual_seed(1)
    x = torch.tanh(torch.randn(64, 1, 16, 16))
    out = ada_mod.augment(x, 1.0)
    assert out.shape == x.shape
    changed = (out - x).flatten(1).abs().amax(1) > 1e-3
    assert bool(changed.all())
    assert torch.equal(ada_mod.augment(x, 0.0), x)


def test_augment_rate_of_untouched_images_follows_p():
    """With only the colour pass able to leave a sample exactly as it was (the geometric pass filters
    the whole batch once any sample moves), a sample keeps its exact grey levels iff none of its five
    colour gates opened *and* its brightness/contrast draws are neutral: probability (1 - p)^2 for the
    two gates that always change grey values (brightness, contrast), times (1 - p/2) for the luma flip.
    Hue and saturation never change a grey image."""
    torch.manual_seed(2)
    p, n = 0.4, 20000
    c = ada_mod.colour_matrix(n, p, CPU)
    x = torch.linspace(-1, 1, 7).reshape(1, 1, 1, 7).expand(n, 1, 1, 7)
    out = ada_mod.apply_colour(x, c)
    same = float((out - x).flatten(1).abs().amax(1).lt(1e-6).float().mean())
    want = (1 - p) ** 2 * (1 - p / 2)
    assert abs(same - want) < tolerance(want, n), (same, want)


# --------------------------------------------------------------------------- distributions of the draws
def close(value: float, want: float, tol: float) -> bool:
    return abs(value - want) <= tol


def test_geometric_draws_follow_the_ada_distributions():
    """At p = 1: whole-pixel translation uniform in +-0.125 of the size, isotropic and anisotropic scales
    lognormal with std 0.2 ln 2, rotations uniform in +-pi, fractional translation normal, std 0.125 of the
    size (in pixels); the standard errors of these estimates are below 1 % of the values checked."""
    torch.manual_seed(0)
    size = (64, 128)  # (height, width): translations scale with their own axis
    g = ada_mod.sample_geometric(N, size, 1.0, CPU)
    t = g["int_translate"]
    assert t[:, 0].abs().max() == round(0.125 * 128) and t[:, 1].abs().max() == round(0.125 * 64)
    assert close(float(t[:, 0].float().std()), 0.125 * 128 / math.sqrt(3), 0.3)  # uniform: std = half-width / sqrt 3
    assert close(float(t.float().mean()), 0.0, 0.2)
    for key in ("iso_scale", "aniso_scale"):
        assert close(float(torch.log2(g[key]).std()), 0.2, 0.01) and close(float(torch.log2(g[key]).mean()), 0, 0.01)
    for key in ("pre_rotate", "post_rotate"):
        r = g[key]
        assert float(r.min()) >= -math.pi and float(r.max()) <= math.pi
        assert close(float(r.std()), math.pi / math.sqrt(3), 0.05) and close(float(r.mean()), 0, 0.05)
    f = g["frac_translate"]
    assert close(float(f[:, 0].std()), 0.125 * 128, 0.3) and close(float(f[:, 1].std()), 0.125 * 64, 0.15)


def test_colour_draws_follow_the_ada_distributions():
    """Brightness normal std 0.2, contrast lognormal std 0.5 ln 2, luma flip 1/2, hue uniform +-pi,
    saturation lognormal std ln 2: read back from the composed matrices of single transforms."""
    torch.manual_seed(1)
    calls = []
    real = ada_mod._gate

    def record(value, prob, neutral):
        out = real(value, prob, neutral)
        calls.append(out.clone())
        return out

    ada_mod._gate = record
    try:
        ada_mod.colour_matrix(N, 1.0, CPU)
    finally:
        ada_mod._gate = real
    brightness, contrast, flip, hue, saturation = calls
    assert close(float(brightness.std()), 0.2, 0.005) and close(float(brightness.mean()), 0, 0.005)
    assert close(float(torch.log2(contrast).std()), 0.5, 0.01)
    assert close(float(flip.mean()), 0.5, 0.02) and set(flip.unique().tolist()) == {0.0, 1.0}
    assert float(hue.abs().max()) <= math.pi and close(float(hue.std()), math.pi / math.sqrt(3), 0.05)
    assert close(float(torch.log2(saturation).std()), 1.0, 0.02)


# --------------------------------------------------------------------------- the passes, per-sample gates, p's adaptation
def test_augment_with_p_zero_is_the_exact_identity():
    x = torch.randn(4, 1, 16, 16)
    assert ada_mod.augment(x, 0.0) is x


def test_grey_colour_transform_uses_the_row_sum():
    x = torch.randn(2, 1, 8, 8)
    eye = torch.eye(4).expand(2, 4, 4)
    assert torch.equal(ada_mod.apply_colour(x, eye), x)  # the reference scaled by 1/3 here
    m = eye.clone()
    m[:, 0:3, 0:3] *= 1.5
    m[:, 0:3, 3] = 0.25
    assert torch.allclose(ada_mod.apply_colour(x, m), 1.5 * x + 0.25)
    torch.manual_seed(0)
    c = ada_mod.colour_matrix(64, 1.0, torch.device("cpu"))  # hue/saturation keep the grey axis
    eye4 = torch.eye(4).expand_as(c)
    assert bool(((c - eye4).flatten(1).abs().amax(1) > 1e-3).all())  # p = 1: no sample is left alone
    grey = torch.tensor([1.0, 1.0, 1.0, 0.0])
    out = c @ grey
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)
    # the grey axis is an eigenvector: M (1,1,1) = rowsum * (1,1,1), the gain apply_colour uses
    gain = c[:, 0:3, 0:3].sum(2).mean(1)
    assert torch.allclose(out[:, 0], gain, atol=1e-5) and bool((gain.abs() - 1).abs().gt(1e-3).all())
    x = torch.randn(64, 1, 4, 4)
    rgb = torch.cat([x.expand(64, 3, 4, 4), torch.ones(64, 1, 4, 4)], 1)  # grey image as (x, x, x, 1)
    full = torch.einsum("bij,bjhw->bihw", c, rgb)
    assert torch.allclose(full[:, 0:1], ada_mod.apply_colour(x, c), atol=1e-4)  # = the full RGB transform


def test_geometric_pass_is_aligned():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    img = (torch.sin(2 * xx) * torch.cos(3 * yy))[None, None]
    ident = torch.eye(3)[None]
    out = ada_mod.apply_geometric(img, ident)
    assert (out - img)[..., 4:-4, 4:-4].abs().max() < 0.02
    shift = ada_mod._translate2d(torch.tensor([-2.0]), torch.tensor([0.0]))  # content moves +2 px in x
    moved = ada_mod.apply_geometric(img, shift)
    assert (moved[..., 4:-4, 6:-4] - img[..., 4:-4, 4:-6]).abs().max() < 0.02


@pytest.mark.parametrize("name", ["xflip", "rot90", "rot180"])
def test_geometric_pass_turns_about_the_image_centre(name):
    """Flips and quarter turns must equal torch's exact index flips (a centre off by 1/4 px, as before
    the fix, shifts a flip by 1/2 px: an error of 0.29 on this image instead of 0.05)."""
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    img = (torch.sin(2 * math.pi * xx / 9 + 0.3) * torch.cos(2 * math.pi * yy / 11 + 0.7))[None, None]
    fwd = {"xflip": ada_mod._scale2d(torch.tensor([-1.0]), torch.tensor([1.0])),
           "rot90": ada_mod._rotate2d(torch.tensor([math.pi / 2])),
           "rot180": ada_mod._rotate2d(torch.tensor([math.pi]))}[name]
    exact = {"xflip": torch.flip(img, [3]), "rot90": torch.rot90(img, -1, [2, 3]),
             "rot180": torch.flip(img, [2, 3])}[name]
    out = ada_mod.apply_geometric(img, torch.linalg.inv(fwd))
    err = (out - exact)[..., 6:-6, 6:-6].abs().max()
    assert err < 0.1, float(err)


def _binomial_tolerance(p: float, n: int, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


def test_translations_are_gated_per_sample_not_per_axis():
    """ADA paper / original: one gate per sample moves both axes (at p = 0.5: both axes 0.5, one axis 0)."""
    torch.manual_seed(0)
    n, p = 20000, 0.5
    params = ada_mod.sample_geometric(n, (1024, 1024), p, torch.device("cpu"))
    for key in ("int_translate", "frac_translate"):
        moved = params[key] != 0
        both = float((moved[:, 0] & moved[:, 1]).float().mean())
        one = float((moved[:, 0] ^ moved[:, 1]).float().mean())
        assert abs(both - p) < _binomial_tolerance(p, n), (key, both)
        # an integer translation rounds to 0 px on one axis with probability 1/(0.25 * 1024) only
        assert one < 0.02, (key, one)


def test_every_transform_has_probability_p_per_sample():
    torch.manual_seed(1)
    n, p = 20000, 0.3
    p_rot = 1 - math.sqrt(1 - p)
    params = ada_mod.sample_geometric(n, (1024, 1024), p, torch.device("cpu"))
    neutral = {"xflip": 0.0, "rot90": 0.0, "iso_scale": 1.0, "aniso_scale": 1.0, "pre_rotate": 0.0,
               "post_rotate": 0.0}
    # a drawn flip / quarter turn can be the identity (value 0): P(moved) = p * 1/2 and p * 3/4
    expected = {"xflip": p / 2, "rot90": p * 3 / 4, "iso_scale": p, "aniso_scale": p, "pre_rotate": p_rot,
                "post_rotate": p_rot}
    for key, value in neutral.items():
        rate = float((params[key] != value).float().mean())
        assert abs(rate - expected[key]) < _binomial_tolerance(expected[key], n), (key, rate)


@pytest.mark.parametrize("rot90, turns", [("uniform", (0, 1, 2, 3)), ("original", (0, 3))])
def test_rotation_by_quarter_turns_draws_its_set_uniformly(rot90, turns):
    """Default: k uniform in {0, 1, 2, 3} as in the ADA paper; ``ada_rot90 = "original"``: uniform in
    {0, 3}, the original code's draw (docs/differences.md#ada-rotation-set)."""
    torch.manual_seed(2)
    n = 20000
    k = ada_mod.sample_geometric(n, (64, 64), 1.0, torch.device("cpu"), rot90)["rot90"]
    assert set(k.unique().tolist()) == {float(t) for t in turns}
    for value in turns:
        share = 1 / len(turns)
        assert abs(float((k == value).float().mean()) - share) < _binomial_tolerance(share, n)
    with pytest.raises(ValueError):
        ada_mod.sample_geometric(2, (8, 8), 1.0, torch.device("cpu"), "0,3")


def test_augmentation_is_twice_differentiable():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8, dtype=torch.double, requires_grad=True)
    g_inv = ada_mod.geometric_matrix(2, (8, 8), 1.0, torch.device("cpu")).double()
    assert bool(((g_inv - torch.eye(3, dtype=g_inv.dtype)).flatten(1).abs().amax(1) > 1e-3).all())  # not identity
    assert torch.autograd.gradgradcheck(lambda t: ada_mod.apply_geometric(t, g_inv), (x,))


def test_ada_probability_adapts_in_the_right_direction():
    ada = ada_mod.AdaptiveAugment(target=0.6, length=100, update_every=2)
    for _ in range(4):
        ada.tune(torch.ones(10))  # D confident on reals: overfitting -> more augmentation
    assert ada.p == pytest.approx(2 * 20 / 100)
    for _ in range(20):
        ada.tune(-torch.ones(10))
    assert ada.p == 0.0  # clamped
    ada.p = 0.995
    for _ in range(2):
        ada.tune(torch.ones(10))
    assert ada.p == 1.0
    ada.target = 0.0  # r_t == target (balanced signs) moves p down, as the original
    ada.tune(torch.tensor([1.0, -1.0]))
    ada.tune(torch.tensor([1.0, -1.0]))
    assert ada.p == pytest.approx(1.0 - 4 / 100)
    with pytest.raises(ValueError):
        ada_mod.AdaptiveAugment(0.6, 100, 0)
