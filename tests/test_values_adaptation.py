"""Loss values of one phase-2 training step (MultiMedSeg.training.coach, MultiMedSeg.losses) against
their formulas (docs/method.md#coach), on a fixed batch whose network outputs are known.

The network is replaced by a stand-in that returns fixed tensors (one for each call of the step) and
records how it was called, so every term of the intra and inter losses can be recomputed here from its
definition: the reconstruction terms (MSE, 1 - SSIM, LPIPS) of the image channel against the input, the
cross-entropy and soft Dice of the segmentation (weight map applied, only the rows with ground truth), and
the inter branch's extra CE + Dice of the *translated* segmentation. LPIPS is a stand-in too (a weighted
mean square that remembers its arguments); SSIM is pytorch_msssim's, the library the loss is defined with.
"""
from __future__ import annotations

import argparse
from typing import List

import pytest
import torch
from pytorch_msssim import ssim as ms_ssim

from MultiMedSeg.training.coach import Coach, LossBundle

B, L, S = 4, 3, 16
EPS_CE, SMOOTH, EPS_DICE = 1e-6, 1e-5, 1e-8


class StandInNet:
    """Returns ``outputs[i]`` at its i-th call and records the call."""

    def __init__(self, outputs: List[torch.Tensor]):
        self.outputs = list(outputs)
        self.calls: List[dict] = []

    def __call__(self, x, label, feature_scale=1.0, ex_seg=False, is_semi=None, **kw):
        self.calls.append(dict(x=x.detach().clone(), label=label.clone(), fs=feature_scale, ex_seg=ex_seg,
                               is_semi=None if is_semi is None else is_semi.clone(), x_requires_grad=x.requires_grad))
        return self.outputs[len(self.calls) - 1]


class StandInLPIPS(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, a, b):
        self.calls.append((a.detach().clone(), b.detach().clone()))
        return 3.0 * ((a - b) ** 2).mean()


def _opts(**over) -> argparse.Namespace:
    base = dict(l2_lambda=1.3, ssim_lambda=0.7, lpips_lambda=0.0, ce_lambda=1.1, dice_lambda=0.9, ce_weights=None,
                dice_weights=None, optimize_mode="foreground", alex_model=None, alex_pretr_model=None)
    base.update(over)
    return argparse.Namespace(**base)


def _coach(outputs, lpips_lambda=0.8, **over):
    coach = Coach.__new__(Coach)  # only the loss methods are exercised: no data, no model, no run folder
    coach.net = StandInNet(outputs)
    coach.losses = LossBundle(_opts(**over), torch.device("cpu"))  # LPIPS off at construction (no files)...
    coach.losses.cfg.lpips_lambda = lpips_lambda
    coach.losses.lpips = StandInLPIPS()  # ... and replaced by the stand-in
    return coach


def _output(gen: torch.Generator) -> torch.Tensor:
    """A network output (B, 1+L, S, S): image in (-1, 1), class probabilities summing to 1."""
    image = torch.tanh(torch.randn(B, 1, S, S, generator=gen))
    probs = torch.softmax(2 * torch.randn(B, L, S, S, generator=gen), dim=1)
    return torch.cat([image, probs], 1).requires_grad_(True)


def _batch(gen: torch.Generator, domains=(0, 1, 0, 1), has_gt=(True, True, True, False), weight=True):
    labels = torch.randint(0, L, (B, S, S), generator=gen)
    y = torch.nn.functional.one_hot(labels, L).permute(0, 3, 1, 2).float()
    w = (torch.rand(B, 1, S, S, generator=gen) > 0.2).float() if weight else None
    return {"data": torch.tanh(torch.randn(B, 1, S, S, generator=gen)), "mask": y,
            "domain": torch.nn.functional.one_hot(torch.tensor(domains), 2).float(),
            "has_gt": torch.tensor(has_gt), "weight": w}


# ------------------------------------------------------------------------------ the formulas
def mse(a, b):
    return ((a - b) ** 2).mean()


def one_minus_ssim(a, b):
    return 1 - ms_ssim((a + 1) / 2, (b + 1) / 2, data_range=1.0, size_average=True, win_size=11)


def cross_entropy(p, y, weights=None):
    w = torch.full((L,), 1 / L) if weights is None else torch.tensor(weights)
    return -(w.view(1, -1, 1, 1) * y * torch.log(p + EPS_CE)).sum(1).mean()


def soft_dice(p, y, weights=None):
    w = torch.full((L,), 1 / L) if weights is None else torch.tensor(weights)
    tp = (p * y).sum((0, 2, 3))
    fp = (p * (1 - y)).sum((0, 2, 3))
    fn = ((1 - p) * y).sum((0, 2, 3))
    d = (2 * tp + SMOOTH) / (2 * tp + fp + fn + SMOOTH + EPS_DICE)
    return (w * -d).mean()


def expected_loss(x, y, out, rows, w, lambdas, omega=None):
    """λ_l2·MSE + λ_ssim·(1 − SSIM) + λ_lpips·LPIPS of the image channel vs x (times ω when given),
    + λ_ce·CE + λ_dice·Dice of the segmentation vs y on ``rows``, times the weight map."""
    img = out[:, :1]
    xi, img = (x * omega, img * omega) if omega is not None else (x, img)
    total = lambdas["l2"] * mse(img, xi) + lambdas["ssim"] * one_minus_ssim(img, xi) \
        + lambdas["lpips"] * 3.0 * mse(img, xi)
    seg, ys = out[:, 1:][rows], y[rows]
    if w is not None:
        seg, ys = seg * w[rows], ys * w[rows]
    return total + lambdas["ce"] * cross_entropy(seg, ys) + lambdas["dice"] * soft_dice(seg, ys)


def num(t: torch.Tensor) -> float:
    return float(t.detach())


LAMBDAS = {"l2": 1.3, "ssim": 0.7, "lpips": 0.8, "ce": 1.1, "dice": 0.9}


# ------------------------------------------------------------------------------ intra branch
def test_intra_loss_terms_match_their_formulas():
    gen = torch.Generator().manual_seed(0)
    b, out = _batch(gen), _output(gen)
    coach = _coach([out])
    loss, logs, returned = coach.intra_loss(b, 0.25)
    (call,) = coach.net.calls
    assert torch.equal(call["x"], b["data"]) and torch.equal(call["label"], b["domain"])  # own domain
    assert call["ex_seg"] and call["is_semi"] is None and call["fs"] == 0.25
    assert returned is out
    x, y, w, rows = b["data"], b["mask"], b["weight"], b["has_gt"]
    img = out[:, :1]
    assert logs["loss_l2"] == pytest.approx(num(mse(img, x)), rel=1e-6)
    assert logs["loss_ssim"] == pytest.approx(num(one_minus_ssim(img, x)), rel=1e-6)
    assert logs["loss_lpips"] == pytest.approx(num(3.0 * mse(img, x)), rel=1e-6)
    seg, ys = out[:, 1:][rows] * w[rows], y[rows] * w[rows]
    assert logs["loss_ce"] == pytest.approx(num(cross_entropy(seg, ys)), rel=1e-6)
    assert logs["loss_dice"] == pytest.approx(num(soft_dice(seg, ys)), rel=1e-6)
    assert num(loss) == pytest.approx(num(expected_loss(x, y, out, rows, w, LAMBDAS)), rel=1e-6)
    for a, bb in coach.losses.lpips.calls:  # LPIPS(reconstruction, input)
        assert torch.equal(a, img.detach()) and torch.equal(bb, x)


# ------------------------------------------------------------------------------ inter branch
@pytest.mark.parametrize("semi", [True, False], ids=["labeled-target", "no-labeled-target"])
def test_inter_loss_terms_match_their_formulas(semi):
    """Translation pass (other domain), cycle pass on the detached translated image (own domain), the
    reconstruction and mask terms of the *cycle* output against the input and its mask, plus CE + Dice of
    the *translated* segmentation on the same rows (no weight map)."""
    gen = torch.Generator().manual_seed(1)
    has_gt = (True, True, True, False) if semi else (True, False, True, False)  # target rows 1 and 3
    b = _batch(gen, has_gt=has_gt)
    trans, cycle = _output(gen), _output(gen)
    coach = _coach([trans, cycle])
    loss, logs, returned = coach.inter_loss(b, 0.5)
    first, second = coach.net.calls
    x, y, w, label = b["data"], b["mask"], b["weight"], b["domain"]
    is_tgt = label[:, 1] > label[:, 0]
    # the two passes
    assert torch.equal(first["x"], x) and torch.equal(first["label"], label.flip(1)) and not first["ex_seg"]
    assert torch.equal(second["x"], trans[:, :1].detach()) and not second["x_requires_grad"]
    assert torch.equal(second["label"], label) and second["ex_seg"]
    semi_rows = is_tgt & b["has_gt"]
    if semi:
        assert torch.equal(first["is_semi"], semi_rows) and torch.equal(second["is_semi"], semi_rows)
        rows = b["has_gt"]  # every row with ground truth, source and labeled target
    else:
        assert first["is_semi"] is None and second["is_semi"] is None
        rows = ~is_tgt  # source rows only
    assert returned is cycle
    # reconstruction: the cycle image against the input (not the translated image)
    img = cycle[:, :1]
    assert logs["loss_l2"] == pytest.approx(num(mse(img, x)), rel=1e-6)
    assert logs["loss_ssim"] == pytest.approx(num(one_minus_ssim(img, x)), rel=1e-6)
    assert logs["loss_lpips"] == pytest.approx(num(3.0 * mse(img, x)), rel=1e-6)
    for a, bb in coach.losses.lpips.calls:
        assert torch.equal(a, img.detach()) and torch.equal(bb, x)
    # cycle segmentation: weight map, rows with ground truth
    seg, ys = cycle[:, 1:][rows] * w[rows], y[rows] * w[rows]
    assert logs["loss_ce"] == pytest.approx(num(cross_entropy(seg, ys)), rel=1e-6)
    assert logs["loss_dice"] == pytest.approx(num(soft_dice(seg, ys)), rel=1e-6)
    # translated segmentation: same rows, no weight map
    t_ce, t_dice = cross_entropy(trans[:, 1:][rows], y[rows]), soft_dice(trans[:, 1:][rows], y[rows])
    assert logs["trans_loss_ce"] == pytest.approx(num(t_ce), rel=1e-6)
    assert logs["trans_loss_dice"] == pytest.approx(num(t_dice), rel=1e-6)
    want = expected_loss(x, y, cycle, rows, w, LAMBDAS) + LAMBDAS["ce"] * t_ce + LAMBDAS["dice"] * t_dice
    assert num(loss) == pytest.approx(num(want), rel=1e-6)
    # gradients: the translated image gets none through the cycle pass (it is detached), the translated
    # segmentation gets them from its own CE + Dice only, on the selected rows
    loss.backward()
    assert trans.grad[:, :1].abs().sum() == 0
    assert trans.grad[:, 1:][rows].abs().sum() > 0 and trans.grad[:, 1:][~rows].abs().sum() == 0


def test_favoured_mode_weights_the_images_by_omega():
    """``--optimize_mode favoured``: ω = 1 on pixels of rows with ground truth where a favoured class
    (largest CE/Dice weight) is present, 0.3 elsewhere; both the input and the reconstruction are multiplied."""
    gen = torch.Generator().manual_seed(2)
    b, out = _batch(gen), _output(gen)
    weights = [0.1, 0.2, 0.7]
    coach = _coach([out], optimize_mode="favoured", ce_weights=weights, dice_weights=weights)
    loss, logs, _ = coach.intra_loss(b, 1.0)
    x, y, w, rows = b["data"], b["mask"], b["weight"], b["has_gt"]
    hit = (y[:, 2:3] > 0.5) & rows.view(-1, 1, 1, 1)
    omega = torch.where(hit, torch.tensor(1.0), torch.tensor(0.3))
    assert logs["loss_l2"] == pytest.approx(num(mse(out[:, :1] * omega, x * omega)), rel=1e-6)
    seg, ys = out[:, 1:][rows] * w[rows], y[rows] * w[rows]
    want = LAMBDAS["l2"] * mse(out[:, :1] * omega, x * omega) \
        + LAMBDAS["ssim"] * one_minus_ssim(out[:, :1] * omega, x * omega) \
        + LAMBDAS["lpips"] * 3.0 * mse(out[:, :1] * omega, x * omega) \
        + LAMBDAS["ce"] * cross_entropy(seg, ys, weights) + LAMBDAS["dice"] * soft_dice(seg, ys, weights)
    assert num(loss) == pytest.approx(num(want), rel=1e-6)


# ------------------------------------------------------------------------------ validation losses
def test_validation_losses_use_pooled_masks_and_the_translated_segmentation():
    """As the original's validation: mask and weight map average-pooled to the encoder size (soft), the
    intra losses on the pooled output, the inter losses on the cycle image and the translated segmentation."""
    import types

    gen = torch.Generator().manual_seed(3)
    big = _batch(gen)
    # the slice grid is twice the encoder size: masks and weights at 2S, the image at S (eval transform)
    labels = torch.randint(0, L, (B, 2 * S, 2 * S), generator=gen)
    mask = torch.nn.functional.one_hot(labels, L).permute(0, 3, 1, 2).float()
    weight = (torch.rand(B, 1, 2 * S, 2 * S, generator=gen) > 0.2).float()
    b = {"data": big["data"], "mask": mask, "weight": weight, "domain": big["domain"]}
    intra, trans, cycle = _output(gen), _output(gen), _output(gen)
    coach = _coach([intra, trans, cycle])
    coach.net.config = types.SimpleNamespace(encoder_input_size=S)
    coach.opts = argparse.Namespace(only_intra=False)
    logs = coach._val_losses(b, 1.0)
    y = mask.view(B, L, S, 2, S, 2).mean((3, 5))  # 2x2 average pooling, written out
    w = weight.view(B, 1, S, 2, S, 2).mean((3, 5))
    rows = torch.ones(B, dtype=torch.bool)
    x = b["data"]
    assert logs["loss"] == pytest.approx(num(expected_loss(x, y, intra, rows, w, LAMBDAS)), rel=1e-6)
    mixed = torch.cat([cycle[:, :1], trans[:, 1:]], 1)
    assert logs["inter_loss"] == pytest.approx(num(expected_loss(x, y, mixed, rows, w, LAMBDAS)), rel=1e-6)
    assert logs["inter_loss_ce"] == pytest.approx(num(cross_entropy(trans[:, 1:] * w, y * w)), rel=1e-6)
    third = coach.net.calls[2]
    assert torch.equal(third["x"], trans[:, :1].detach()) and torch.equal(third["label"], b["domain"])
