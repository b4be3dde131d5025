"""ADA values: how often each elementary transform is applied, and what p = 0 / p = 1 mean.

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
