"""Phase-2 training and inference: the ensemble, the favoured channels, the loss values of one training step
against their formulas, the checkpoint index, options, and the pretrain -> adapt -> inference pipeline on the
embedded phantom (32 px, tiny encoder and generator, a few steps: resume, metrics.csv, one-line errors).
The training data (dataset, sampler, transforms) is in tests/test_mms_data.py, the metrics in tests/test_metrics.py.
"""
from __future__ import annotations

import dataclasses
import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import nibabel as nib
import numpy as np
import pytest
import torch
from pytorch_msssim import ssim as ms_ssim

from MultiMedSeg import inference as inference_cli
from MultiMedSeg import pretrain as pretrain_cli
from MultiMedSeg import train as train_cli
from MultiMedSeg import checkpoints as ck
from MultiMedSeg.ensemble import label_volumes
from MultiMedSeg.training.coach import Coach, LossBundle
from MultiMedSeg.options import parse_inference_options, parse_training_options
from builders import MMS_TINY, exit_message, tiny_generator_file
from robustmedseg.errors import InputError

REPO = Path(__file__).resolve().parents[1]
TINY = MMS_TINY


# ------------------------------------------------------------------------------------ helpers
def write_generator(path: Path, **overrides) -> Path:
    """A tiny phase-1 generator file, initialised locally (:func:`builders.tiny_generator_file`)."""
    return tiny_generator_file(path, **overrides)


def write_alexnet(folder: Path) -> tuple:
    """Random AlexNet features + LPIPS heads (real weights cannot be downloaded in tests)."""
    from torchvision.models import alexnet

    torch.manual_seed(0)
    feats = folder / "alex_pretr.pth"
    heads = folder / "alex.pth"
    torch.save(alexnet(weights=None).features.state_dict(), feats)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) / c for i, c in enumerate((64, 192, 384, 256, 256))},
               heads)
    return heads, feats


# ------------------------------------------------------------------------------------ ensemble, favoured channels
def test_ensemble_weights_are_honoured():
    intra = torch.zeros(1, 3, 2, 2)
    inter = torch.zeros(1, 3, 2, 2)
    intra[:, 1] = 1.0
    inter[:, 2] = 0.8
    pred = {"intra": intra, "inter": inter, "weight": torch.ones(1, 1, 2, 2)}
    out = label_volumes(pred, (0.6, 0.4))
    assert (out["intra"] == 1).all() and (out["inter"] == 2).all() and (out["pred"] == 2).all()
    assert (label_volumes(pred, (0.3, 0.7))["pred"] == 1).all()
    pred["weight"][0, 0, 0, 0] = 0
    # as the original, the weight map is not applied at inference; --mask_outside_weight applies it
    assert label_volumes(pred, (0.6, 0.4))["pred"][0, 0, 0] == 2
    assert label_volumes(pred, (0.6, 0.4), mask_outside_weight=True)["pred"][0, 0, 0] == 0


def test_translation_volume_and_invert_intensity_undo():
    from MultiMedSeg.ensemble import translation_volume

    pred = {"trans": torch.full((1, 1, 2, 2), 0.5), "weight": torch.ones(1, 1, 2, 2)}
    pred["weight"][0, 0, 1, 1] = 0
    assert np.allclose(translation_volume(pred), 0.5)
    masked = translation_volume(pred, mask_outside_weight=True)
    assert masked[0, 1, 1] == -1.0 and masked[0, 0, 0] == 0.5


def test_invert_intensity_translation_is_negated_back_on_background():
    """As the original: with invert_intensity the interpreter negates the translated image where it predicts
    background; inference negates it again there, which gives back the generator's intensities."""
    from types import SimpleNamespace

    from MultiMedSeg.ensemble import Ensemble, Member

    seg = torch.zeros(1, 3, 4, 4)
    seg[:, 0, :2] = 1.0   # background on the top half
    seg[:, 2, 2:] = 1.0

    class Stub:
        def __init__(self, invert):
            self.config = SimpleNamespace(invert_intensity=invert)

        def __call__(self, x, label, resize=False, feature_scale=1.0):
            image = torch.full((x.shape[0], 1, 4, 4), 0.5)
            if self.config.invert_intensity:  # what the interpreter does
                image = torch.where(seg.argmax(1, keepdim=True) == 0, -image, image)
            return torch.cat([image, seg.expand(x.shape[0], -1, -1, -1)], 1)

    batch = {"data": torch.zeros(2, 1, 4, 4), "domain": torch.tensor([[0.0, 1.0]] * 2),
             "weight": torch.ones(2, 1, 4, 4)}
    out = Ensemble([Member(Stub(True), 1.0, None)], torch.device("cpu")).predict_volume([batch], inter=True)
    assert torch.allclose(out["trans"], torch.full((2, 1, 4, 4), 0.5))
    plain = Ensemble([Member(Stub(False), 1.0, None)], torch.device("cpu")).predict_volume([batch], inter=True)
    assert torch.allclose(plain["trans"], torch.full((2, 1, 4, 4), 0.5))


def test_favoured_mode_selects_channels_as_the_original():
    from types import SimpleNamespace

    from MultiMedSeg.losses import LossConfig
    from MultiMedSeg.training.coach import Coach

    def selected(**kw):
        opts = SimpleNamespace(label_nc=3, optimize_mode="favoured")
        coach = SimpleNamespace(opts=opts, losses=SimpleNamespace(
            favoured_channels=LossConfig.from_options(optimize_mode="favoured", **kw).favoured))
        return Coach.selected_channels(coach)

    assert selected() == ["0", "1", "2"]                         # no weights: every class, background too
    assert selected(ce_weights=[1, 1, 3]) == ["2"]
    assert selected(ce_weights=[1, 2, 1], dice_weights=[1, 1, 5]) == ["2"]  # Dice has the larger maximum
    assert selected(ce_weights=[1, 5, 1], dice_weights=[1, 1, 5]) == ["1"]  # tie of maxima: CE
    assert selected(dice_weights=[2, 1, 2]) == ["0", "2"]
    foreground = SimpleNamespace(opts=SimpleNamespace(label_nc=3, optimize_mode="foreground"),
                                 losses=SimpleNamespace(favoured_channels=lambda: []))
    assert Coach.selected_channels(foreground) == ["1", "2"]


# ------------------------------------------------------------------------------------ loss values of one step
# Loss values of one phase-2 training step (MultiMedSeg.training.coach, MultiMedSeg.losses) against
# their formulas (docs/method.md#coach), on a fixed batch whose network outputs are known.
#
# The network is replaced by a stand-in that returns fixed tensors (one for each call of the step) and
# records how it was called, so every term of the intra and inter losses can be recomputed here from its
# definition: the reconstruction terms (MSE, 1 - SSIM, LPIPS) of the image channel against the input, the
# cross-entropy and soft Dice of the segmentation (weight map applied, only the rows with ground truth), and
# the inter branch's extra CE + Dice of the *translated* segmentation. LPIPS is a stand-in too (a weighted
# mean square that remembers its arguments); SSIM is pytorch_msssim's, the library the loss is defined with.

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
    coach.losses.cfg = dataclasses.replace(coach.losses.cfg, lpips_lambda=lpips_lambda)
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


# ------------------------------------------------------------------------------------ checkpoints / options
def test_best_index_keeps_k_best_as_json(tmp_path):
    index = ck.BestIndex(tmp_path, k=2)
    assert index.add(0.3, 10, {"dice_1": 0.3}, {"x": torch.ones(1)}) == "best_step0000010.pt"
    assert index.add(0.0, 15, {}, {}) is None  # a zero score never enters (slots start at 0)
    index.add(0.5, 20, {"hd": math.inf}, {"x": torch.ones(1)})
    index.add(0.4, 30, {}, {"x": torch.ones(1)})
    assert [e.step for e in index.entries] == [20, 30]
    assert not (tmp_path / "best_step0000010.pt").exists()  # evicted file deleted
    raw = json.loads((tmp_path / "best.json").read_text())
    assert [r["file"] for r in raw] == ["best_step0000020.pt", "best_step0000030.pt"]
    assert raw[0]["metrics"]["hd"] == "inf"
    again = ck.BestIndex.load(tmp_path)
    assert [e.score for e in again.entries] == [0.5, 0.4] and math.isinf(again.entries[0].metrics["hd"])
    assert not index.qualifies(0.35) and index.qualifies(0.45)
    (tmp_path / "best.json").write_text("[{\"file\": 1}]")
    with pytest.raises(InputError, match="malformed"):
        ck.BestIndex.load(tmp_path)


def test_options_config_file_and_dash_aliases(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"source_root": "data/src", "val_root": "data/val", "src_label": 1,
                               "stylegan_weights": "g.pt", "batch_size": 2, "ce_weights": [1, 2, 3]}))
    opts = parse_training_options(["--config", str(cfg), "--exp-dir", "x", "--batch_size", "6"], "pretrain")
    assert opts.source_root == tmp_path / "data" / "src" and opts.batch_size == 6 and opts.src_label == 1
    assert opts.ce_weights == [1.0, 2.0, 3.0] and opts.only_intra and opts.save_interval is None
    assert opts.checkpoint_interval == opts.max_steps  # derived, not written into the options
    cfg.write_text(json.dumps({"learn_in_w": True}))
    with pytest.raises(InputError, match="cfg.json.*learn_in_w"):
        parse_training_options(["--config", str(cfg)], "pretrain")
    with pytest.raises(InputError, match="--ce_weights has 2 values"):
        parse_training_options(["--exp_dir", "x", "--source_root", "s", "--val_root", "v", "--src_label", "0",
                                "--stylegan_weights", "g", "--ce_weights", "1,2"], "pretrain")
    opts = parse_inference_options(["--exp_dir", "o", "--checkpoint_dir", "c", "--target_data", "d"])
    assert opts.test_root == Path("d/test") and opts.metadata == Path("d/metadata.json")
    assert opts.ensemble_weights is None and opts.ensemble_size is None  # the run's evaluation.json decides
    assert not opts.mask_outside_weight
    assert parse_inference_options(["--exp_dir", "o", "--checkpoint_dir", "c", "--target_data", "d",
                                    "--mask-outside-weight"]).mask_outside_weight
    train = ["--exp_dir", "x", "--source_root", "s", "--target_labeled", "t", "--val_root", "v", "--src_label", "0",
             "--tgt_label", "1", "--checkpoint_dir", "c"]
    assert not parse_training_options(train, "train").reinit_encoder
    assert parse_training_options(train + ["--reinit-encoder"], "train").reinit_encoder


def test_options_are_typed_frozen_and_read_back_with_their_type(tmp_path):
    """One configuration style: a frozen dataclass per command, its flags generated from its fields, stored
    in the run (opt.json) and read back with the same type; older opt.json files still load."""
    import dataclasses

    from MultiMedSeg import options as O

    base = ["--exp_dir", "x", "--source_root", "s", "--val_root", "v", "--src_label", "0", "--stylegan_weights", "g"]
    pre = parse_training_options(base + ["--no_amp", "--ce_weights", "1,2,3"], "pretrain")
    assert type(pre) is O.PretrainOptions and pre.mode == "pretrain" and pre.only_intra
    with pytest.raises(dataclasses.FrozenInstanceError):
        pre.save_interval = 3  # no attribute changes after parsing
    stored = json.loads(json.dumps(pre.to_dict()))  # as opt.json holds it
    assert stored["mode"] == "pretrain" and stored["only_intra"] is True and stored["amp"] == "fp16"
    back = O.stored_training_options(stored)
    assert back == pre and type(back) is O.PretrainOptions
    (tmp_path / "opt.json").write_text(json.dumps(stored))
    assert O.load_run_options(tmp_path) == pre and O.load_run_options(tmp_path / "none") is None
    # an opt.json of the earlier Namespace options: derived values written in, keys of older versions
    old = dict(stored, save_interval=15000, amp="off", mode="train", only_intra=False, tgt_label=2,
               target_labeled="t", checkpoint_dir="c", some_removed_option=1)
    adapt = O.stored_training_options(old)
    assert type(adapt) is O.AdaptOptions and adapt.target_labeled == Path("t") and adapt.checkpoint_interval == 15000
    assert adapt.amp_mode == "off" and not adapt.only_intra
    assert type(O.stored_training_options({"only_intra": True})) is O.PretrainOptions  # before "mode" was stored
    with pytest.raises(InputError, match="unknown mode"):
        O.stored_training_options({"mode": "other"})
    # the flags are the fields: each flag's type and default is its field's
    for parser, cls, not_flags in ((O.training_parser("pretrain"), O.PretrainOptions,
                                    {"target_data", "target_labeled", "target_unlabeled", "checkpoint_dir",
                                     "one_target_slice", "reinit_encoder", "tgt_label", "ensemble_selection"}),
                                   (O.training_parser("train"), O.AdaptOptions, {"stylegan_weights"}),
                                   (O.inference_parser(), O.InferenceOptions, set()),
                                   (O.predict_parser(), O.PredictOptions, set()),
                                   (O.select_evaluation_parser(), O.SelectEvaluationOptions, set()),
                                   (O.plan_parser(), O.PlanOptions, set())):
        dests = {a.dest: a for a in parser._actions if a.dest not in ("help", "paper_only_intra")}
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(dests) == names - not_flags, (cls.__name__, set(dests) ^ (names - not_flags))
        defaults = cls()
        assert all(a.default == getattr(defaults, name) for name, a in dests.items()), cls.__name__
    assert O.PretrainOptions().batch_size == 8 and O.AdaptOptions().batch_size == 4
    assert O.training_parser("pretrain").parse_args([]).max_steps == 15000
    # a checkpoint's feature scale reads its stored options with the same type (older payloads too)
    from MultiMedSeg.ensemble import feature_scale_of

    assert feature_scale_of({"opts": dict(old, feature_scale_rate=0.1), "global_step": 3}) == pytest.approx(0.3)
    assert feature_scale_of({"opts": {"only_intra": True}, "global_step": 5000}) == pytest.approx(0.5)  # default rate
    assert feature_scale_of({"global_step": 20000}) == 1.0


def test_gpu_options_amp_tf32_cudnn_benchmark(monkeypatch):
    """--amp fp16|bf16|off (fp16 default, as the reference; --no_amp = off), --allow_tf32, --cudnn_benchmark."""
    from MultiMedSeg.training.coach import amp_dtype

    base = ["--exp_dir", "x", "--source_root", "s", "--val_root", "v", "--src_label", "0", "--stylegan_weights", "g"]
    opts = parse_training_options(base, "pretrain")
    assert opts.amp_mode == "fp16" and not opts.allow_tf32 and not opts.cudnn_benchmark
    assert parse_training_options(base + ["--no-amp"], "pretrain").amp_mode == "off"
    opts = parse_training_options(base + ["--amp", "bf16", "--allow-tf32", "--cudnn_benchmark"], "pretrain")
    assert opts.amp_mode == "bf16" and opts.allow_tf32 and opts.cudnn_benchmark
    assert parse_inference_options(["--exp_dir", "o", "--checkpoint_dir", "c", "--target_data", "d",
                                    "--allow_tf32"]).allow_tf32
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype("fp16", cpu) is None and amp_dtype("bf16", cpu) is None  # never on CPU
    assert amp_dtype("fp16", cuda) == torch.float16 and amp_dtype("off", cuda) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype("bf16", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(InputError, match="--amp bf16: Tesla V100"):
        amp_dtype("bf16", cuda)


@pytest.mark.parametrize("script, flag", [("MultiMedSeg/pretrain.py", "--stylegan_weights"),
                                          ("-m MultiMedSeg.train", "--one_target_slice"),
                                          ("MultiMedSeg/inference.py", "--ensemble_weights")])
def test_help(script, flag):
    res = subprocess.run([sys.executable, *script.split(), "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for text in ("--exp_dir", "--device", "--config", flag):
        assert text in res.stdout


# ------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def pipeline(preprocessed_sites, tmp_path_factory):
    """pretrain on site 0 -> adapt to site 2 (one labeled slice per volume) -> inference on site 2."""
    root = tmp_path_factory.mktemp("mms_pipeline")
    gen = write_generator(root / "final_global_model.pt")
    heads, feats = write_alexnet(root)
    pre = root / "pretrain"
    pretrain_cli.main(["--exp_dir", str(pre), "--source_data", str(preprocessed_sites[0]), "--stylegan_weights",
                       str(gen), "--src_label", "0", "--lpips_lambda", "0", "--max_steps", "6", "--val_interval", "3",
                       *TINY])
    ada = root / "adapt"
    train_cli.main(["--exp_dir", str(ada), "--source_data", str(preprocessed_sites[0]), "--target_data",
                    str(preprocessed_sites[2]), "--checkpoint_dir", str(pre), "--src_label", "0", "--tgt_label", "2",
                    "--one_target_slice", "--max_steps", "6", "--val_interval", "3", "--use_da",
                    "--alex_model", str(heads), "--alex_pretr_model", str(feats), *TINY])
    out = root / "inference"
    inference_cli.main(["--exp_dir", str(out), "--checkpoint_dir", str(ada), "--target_data",
                        str(preprocessed_sites[2]), "--ensemble_size", "5", "--device", "cpu"])
    return {"root": root, "gen": gen, "pretrain": pre, "adapt": ada, "inference": out}


def test_pipeline_checkpoints_and_index(pipeline):
    for run in ("pretrain", "adapt"):
        folder = pipeline[run] / "checkpoints"
        index = json.loads((folder / "best.json").read_text())
        assert 1 <= len(index) <= 5 and all(set(e) == {"file", "score", "step", "metrics"} for e in index)
        assert [e["score"] for e in index] == sorted((e["score"] for e in index), reverse=True)
        for e in index:
            payload = torch.load(folder / e["file"], weights_only=True)
            assert payload["global_step"] == e["step"] and "optimizer" not in payload
        last = torch.load(folder / "last.pt", weights_only=True)
        assert last["global_step"] == 6 and "optimizer" in last and "optimizer_seg" in last
        assert (folder / "iteration_6.pt").is_file()
        assert list((pipeline[run] / "logs").glob("events.out.tfevents.*"))
    pre_cfg = torch.load(pipeline["pretrain"] / "checkpoints" / "last.pt", weights_only=True)["config"]
    ada_cfg = torch.load(pipeline["adapt"] / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert pre_cfg["src_tgt_domains"] == [0] and ada_cfg["src_tgt_domains"] == [0, 2]
    keys = json.loads((pipeline["adapt"] / "checkpoints" / "best.json").read_text())[0]["metrics"]
    assert {"dice_1", "inter_dice_2", "intra_hausdorff_foreground", "inter_loss"} <= set(keys)


def test_pipeline_inference_writes_nifti_on_original_grid(pipeline, preprocessed_sites, phantom_dir):
    out = pipeline["inference"]
    meta = json.loads((preprocessed_sites[2] / "metadata.json").read_text())
    test_ids = meta["splits"]["test"]
    assert test_ids
    for vid in test_ids:
        ref = nib.load(str(phantom_dir / "site2" / "images" / f"{vid}.nii.gz"))
        for kind in ("intra", "inter", "pred", "trans"):
            img = nib.load(str(out / f"{vid}_{kind}.nii.gz"))
            assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
            arr = np.asarray(img.dataobj)
            if kind == "trans":
                assert img.get_data_dtype() == np.float32 and arr.min() >= -1 and arr.max() <= 1
            else:
                assert set(np.unique(arr)) <= {0, 1, 2}
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "volume,prediction,class,dice,hd95,hd,unit" and all(r.endswith(",mm") for r in rows[1:])
    assert len(rows) == 1 + len(test_ids) * 3 * 3  # volumes x (intra, inter, pred) x (1, 2, foreground)
    info = json.loads((out / "inference.json").read_text())
    n_best = len(json.loads((pipeline["adapt"] / "checkpoints" / "best.json").read_text()))
    assert len(info["checkpoints"]) == n_best  # averaged over the checkpoints actually used


def test_pipeline_metrics_csv_recomputed_from_the_written_files(pipeline, preprocessed_sites, phantom_dir):
    """Every metrics.csv row equals MedPy on the written NIfTI prediction and the ground-truth file, with
    the voxel spacing read from the written file's header (mm), not from the slice grid."""
    import csv

    from medpy.metric.binary import dc, hd, hd95

    out = pipeline["inference"]
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    cache = {}
    for row in rows:
        vid, branch, cls = row["volume"], row["prediction"], row["class"]
        if (vid, branch) not in cache:
            img = nib.load(str(out / f"{vid}_{branch}.nii.gz"))
            gt = np.asarray(nib.load(str(phantom_dir / "site2" / "labels" / f"{vid}.nii.gz")).dataobj)
            cache[vid, branch] = (np.asarray(img.dataobj), gt, tuple(float(z) for z in img.header.get_zooms()[:3]))
        pred, gt, spacing = cache[vid, branch]
        assert spacing == (6.0, 6.0, 6.0)  # the phantom's grid, not the 32 px slices
        p, g = (pred > 0, gt > 0) if cls == "foreground" else (pred == int(cls), gt == int(cls))
        if not p.any() or not g.any():
            want = {"dice": 1.0 if p.any() == g.any() else 0.0}
            want["hd95"] = want["hd"] = 0.0 if p.any() == g.any() else math.inf
        else:
            want = {"dice": dc(p, g), "hd95": hd95(p, g, voxelspacing=spacing), "hd": hd(p, g, voxelspacing=spacing)}
        for key, value in want.items():
            assert float(row[key]) == pytest.approx(value, abs=1e-6), (vid, branch, cls, key)


def test_inference_is_deterministic_and_source_only_writes_intra(pipeline, preprocessed_sites):
    again = pipeline["root"] / "inference_again"
    inference_cli.main(["--exp_dir", str(again), "--checkpoint_dir", str(pipeline["adapt"]), "--target_data",
                        str(preprocessed_sites[2]), "--ensemble_size", "5", "--device", "cpu",
                        "--test_batch_size", "3"])  # other batch composition: same result (running BN stats)
    for f in sorted(pipeline["inference"].glob("*.nii.gz")):
        a = np.asarray(nib.load(str(f)).dataobj)
        b = np.asarray(nib.load(str(again / f.name)).dataobj)
        assert np.allclose(a, b, atol=1e-5), f.name
    src = pipeline["root"] / "inference_source_only"
    inference_cli.main(["--exp_dir", str(src), "--checkpoint_dir", str(pipeline["pretrain"]), "--target_data",
                        str(preprocessed_sites[2]), "--ensemble_size", "1", "--device", "cpu"])
    names = sorted(p.name for p in src.glob("*.nii.gz"))
    assert names and all(n.endswith("_intra.nii.gz") for n in names)


def test_resume_continues_steps_and_keeps_best_index(pipeline, preprocessed_sites, capsys):
    run = pipeline["root"] / "pretrain_resumed"
    shutil.copytree(pipeline["pretrain"], run)
    before = json.loads((run / "checkpoints" / "best.json").read_text())
    args = ["--exp_dir", str(run), "--source_data", str(preprocessed_sites[0]), "--stylegan_weights",
            str(pipeline["gen"]), "--src_label", "0", "--lpips_lambda", "0", "--val_interval", "3", *TINY]
    err = exit_message(capsys, pretrain_cli.main, args + ["--max_steps", "9"])
    assert str(run) in err and "--resume" in err  # an existing run is never silently reused
    err = exit_message(capsys, pretrain_cli.main, ["--resume", *args, "--max_steps", "6"])
    assert "step 6" in err and "--max_steps" in err
    pretrain_cli.main(["--resume", *args, "--max_steps", "9"])
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["global_step"] == 9 and (run / "checkpoints" / "iteration_9.pt").is_file()
    after = json.loads((run / "checkpoints" / "best.json").read_text())
    assert {e["file"] for e in before} <= {e["file"] for e in after}  # k = 5 > validations: nothing evicted
    assert {e["step"] for e in after} - {e["step"] for e in before} <= {9}  # only the new validation can join
    assert all((run / "checkpoints" / e["file"]).is_file() for e in after)


def test_resume_adaptation(pipeline, preprocessed_sites):
    run = pipeline["root"] / "adapt_resumed"
    shutil.copytree(pipeline["adapt"], run)
    before = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    train_cli.main(["--resume", "--exp_dir", str(run), "--source_data", str(preprocessed_sites[0]), "--target_data",
                    str(preprocessed_sites[2]), "--checkpoint_dir", str(pipeline["pretrain"]), "--src_label", "0",
                    "--tgt_label", "2", "--one_target_slice", "--max_steps", "8", "--val_interval", "3",
                    "--lpips_lambda", "0", *TINY])
    after = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert after["global_step"] == 8
    src_head = [k for k in before["state_dict"] if k.startswith("interpreter.classifiers.source.")
                and before["state_dict"][k].is_floating_point() and "running" not in k]
    assert src_head and all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in src_head)
    tgt_head = [k for k in before["state_dict"] if k.startswith("interpreter.classifiers.target.") and
                k.endswith("weight")]
    assert any(not torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in tgt_head)


def test_inference_refuses_the_metadata_of_another_site(pipeline, preprocessed_sites, tmp_path, capsys):
    """Same volume ids and slice counts at two sites: only the fingerprint tells the metadata apart."""
    site1, site2 = preprocessed_sites[1], preprocessed_sites[2]
    out = tmp_path / "out"
    meta1 = json.loads((site1 / "metadata.json").read_text())
    meta2 = json.loads((site2 / "metadata.json").read_text())
    vid = meta2["splits"]["test"][0]
    assert vid in meta1["volumes"]
    err = exit_message(capsys, inference_cli.main, ["--exp_dir", str(out), "--checkpoint_dir", str(pipeline["adapt"]),
                                                    "--target_data", str(site2), "--metadata",
                                                    str(site1 / "metadata.json"), "--device", "cpu"])
    assert err.startswith(f"error: {site1 / 'metadata.json'}: volume {vid!r}")
    other = tmp_path / "other" / "metadata.json"  # site 1's metadata made to list this volume's slice files
    other.parent.mkdir()
    for key in ("slices", "shape_before_padding"):
        meta1["volumes"][vid][key] = meta2["volumes"][vid][key]
    meta1["volumes"][vid]["fingerprint"]["slice"] = meta2["volumes"][vid]["fingerprint"]["slice"]
    other.write_text(json.dumps(meta1))
    err = exit_message(capsys, inference_cli.main, ["--exp_dir", str(out), "--checkpoint_dir", str(pipeline["adapt"]),
                                                    "--target_data", str(site2), "--metadata", str(other),
                                                    "--device", "cpu"])
    assert err.startswith(f"error: {other}: volume {vid!r}") and "fingerprint differs" in err
    assert not out.exists()


def test_inference_refuses_metadata_whose_shape_differs_from_its_slices(pipeline, preprocessed_sites, tmp_path,
                                                                          capsys):
    """Issue 22: a test volume whose metadata names another shape than its slices restore to was a
    ``ValueError: array shape ... differs from the original shape`` traceback after the first volumes were
    segmented. Now one line naming the volume and both shapes, before any work, nothing written."""
    site2 = preprocessed_sites[2]
    meta = json.loads((site2 / "metadata.json").read_text())
    vid = meta["splits"]["test"][-1]
    true_shape = tuple(meta["volumes"][vid]["shape"])
    meta["volumes"][vid]["shape"] = [5, 5, 5]
    edited = tmp_path / "edited" / "metadata.json"
    edited.parent.mkdir()
    edited.write_text(json.dumps(meta))
    out = tmp_path / "out"
    err = exit_message(capsys, inference_cli.main, ["--exp_dir", str(out), "--checkpoint_dir", str(pipeline["adapt"]),
                                                    "--target_data", str(site2), "--metadata", str(edited),
                                                    "--device", "cpu"])
    assert err.startswith(f"error: {edited}: volume {vid!r}: the metadata names shape (5, 5, 5) but its slices "
                          f"restore to shape {true_shape}")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_inference_without_some_ground_truth_writes_predictions_and_the_other_metrics(
        pipeline, preprocessed_sites, tmp_path, capsys):
    site2 = preprocessed_sites[2]
    meta = json.loads((site2 / "metadata.json").read_text())
    test_root = tmp_path / "slices"  # the val and the test volume of site 2
    for split in ("val", "test"):
        shutil.copytree(site2 / split, test_root, dirs_exist_ok=True)
    scored, missing = meta["splits"]["test"][0], meta["splits"]["val"][0]
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(meta["volumes"][scored]["label"], labels / f"{scored}.nii.gz")
    out = tmp_path / "out"
    capsys.readouterr()
    inference_cli.main(["--exp_dir", str(out), "--checkpoint_dir", str(pipeline["adapt"]), "--test_root",
                        str(test_root), "--metadata", str(site2 / "metadata.json"), "--labels", str(labels),
                        "--device", "cpu"])
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warning == [f"warning: {out}: no ground truth for 1 of 2 test volume(s) ({missing}: no {missing}.nii.gz "
                       f"in {labels}): predictions written, metrics.csv covers the other 1"]
    assert all((out / f"{vid}_pred.nii.gz").is_file() for vid in (scored, missing))
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert rows and {r.split(",")[0] for r in rows} == {scored}
    assert json.loads((out / "inference.json").read_text())["no_ground_truth"] == {
        missing: f"no {missing}.nii.gz in {labels}"}


# ------------------------------------------------------------------------------------ one-line errors
def test_errors_are_one_line_and_name_the_culprit(pipeline, preprocessed_sites, tmp_path, capsys):
    site0, site2 = preprocessed_sites[0], preprocessed_sites[2]
    gen = pipeline["gen"]
    base_pre = ["--source_data", str(site0), "--src_label", "0", "--lpips_lambda", "0", "--max_steps", "1", *TINY]
    # label_nc mismatch with the data's mask channels
    err = exit_message(capsys, pretrain_cli.main, ["--exp_dir", str(tmp_path / "a"), "--stylegan_weights", str(gen),
                                                   *base_pre, "--label_nc", "4"])
    assert "_slice" in err and "--label_nc is 4" in err
    # source label outside the generator's domains
    err = exit_message(capsys, pretrain_cli.main, ["--exp_dir", str(tmp_path / "b"), "--stylegan_weights", str(gen),
                                                   *base_pre, "--src_label", "3"])
    assert str(gen) in err and "--src_label 3" in err
    # a generator file with another n_domains
    gen2 = write_generator(tmp_path / "gen2.pt", n_domains=2)
    err = exit_message(capsys, pretrain_cli.main, ["--exp_dir", str(tmp_path / "c"), "--stylegan_weights", str(gen2),
                                                   *base_pre, "--n_domains", "3"])
    assert str(gen2) in err and "n_domains" in err
    # generator of another size
    err = exit_message(capsys, pretrain_cli.main, ["--exp_dir", str(tmp_path / "d"), "--stylegan_weights", str(gen),
                                                   *base_pre, "--output_size", "64"])
    assert str(gen) in err and "64" in err
    base_train = ["--source_data", str(site0), "--checkpoint_dir", str(pipeline["pretrain"]), "--src_label", "0",
                  "--lpips_lambda", "0", "--max_steps", "1", *TINY]
    # missing target labeled folder
    missing = tmp_path / "nope" / "labeled"
    err = exit_message(capsys, train_cli.main, ["--exp_dir", str(tmp_path / "e"), *base_train, "--tgt_label", "2",
                                                "--target_labeled", str(missing), "--val_root", str(site2 / "val")])
    assert str(missing) in err and "--target_labeled" in err
    # pretraining checkpoint of another size
    err = exit_message(capsys, train_cli.main, ["--exp_dir", str(tmp_path / "f"), *base_train, "--tgt_label", "2",
                                                "--target_data", str(site2), "--output_size", "64"])
    assert "best_step" in err and "checkpoint" in err
    # target label outside the checkpoint's domains
    err = exit_message(capsys, train_cli.main, ["--exp_dir", str(tmp_path / "g"), *base_train, "--tgt_label", "5",
                                                "--target_data", str(site2)])
    assert "--tgt_label 5" in err and "best_step" in err
    # existing exp_dir without --resume/--overwrite
    err = exit_message(capsys, train_cli.main, ["--exp_dir", str(pipeline["adapt"]), *base_train, "--tgt_label",
                                                "2", "--target_data", str(site2)])
    assert str(pipeline["adapt"]) in err and "--resume" in err
    if not torch.cuda.is_available():
        err = exit_message(capsys, pretrain_cli.main, ["--exp_dir", str(tmp_path / "j"), "--stylegan_weights",
                                                       str(gen), *base_pre, "--device", "cuda"])
        assert "--device cuda" in err
    # inference: label_nc check and a checkpoint folder without index
    err = exit_message(capsys, inference_cli.main, ["--exp_dir", str(tmp_path / "h"), "--checkpoint_dir",
                                                    str(pipeline["adapt"]), "--target_data", str(site2),
                                                    "--label_nc", "4", "--device", "cpu"])
    assert "--label_nc is 4" in err
    (tmp_path / "empty").mkdir()
    err = exit_message(capsys, inference_cli.main, ["--exp_dir", str(tmp_path / "i"), "--checkpoint_dir",
                                                    str(tmp_path / "empty"), "--target_data", str(site2)])
    assert "best.json" in err
