"""Phase-2 model side: IResNet/DSBN encoder, interpreter, PSP wrapper, checkpoints, losses, Ranger.

Everything runs on tiny CPU configurations (32 px generator, channel cap 16, style_dim 32).
"""
from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F

from builders import tiny_psp_config
from model import Generator
from MultiMedSeg.losses import (LPIPS, LossConfig, build_lpips, calc_loss, ce_loss, dice_loss, favoured_channels,
                                favoured_weight, ssim_loss)
from MultiMedSeg.models import (PSP, DomainBatchNorm1d, DomainBatchNorm2d, DynamicSkipLayer, GeneratorLayout,
                                IResNet, ListedLinear, PSPConfig, flip_label, head_features, load_arcface_weights)
from MultiMedSeg.models.encoder import FeatureStyleEncoder
from MultiMedSeg.optim import Ranger
from robustmedseg.errors import InputError

torch.set_num_threads(1)

LABELS = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])


tiny_config = tiny_psp_config


def tiny_psp(seed: int = 0, **kw) -> PSP:
    torch.manual_seed(seed)
    net = PSP(tiny_config(**kw))
    with torch.no_grad():  # make the synthesis noise matter (NoiseInjection weights start at 0)
        for name, p in net.decoder.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.5)
    net.compute_latent_avg(256, seed=0)
    return net


def warm_bn(net: PSP, x: torch.Tensor, steps: int = 3) -> None:
    """A few train-mode forwards so running BN statistics are non-trivial."""
    net.train()
    with torch.no_grad():
        for i in range(steps):
            net(x + 0.1 * i, LABELS)
    net.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(4, 1, 32, 32) * 2 - 1


# ------------------------------------------------------------------------------------------ backbone
def test_iresnet_stage_shapes():
    net = IResNet([1, 1, 1, 1], base_channels=8)
    outs = net(torch.randn(2, 1, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]


def _fake_arcface(base: int = 8) -> dict:
    """ArcFace-like file: 3-channel stem, plain BN names (``bn1.weight``), extra head keys."""
    src = IResNet([1, 1, 1, 1], base_channels=base, in_channels=3)
    state = {}
    for k, v in src.state_dict().items():
        state[k.replace(".bns.0", "")] = v.clone() if ".bns.1" not in k else None
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in state.items() if v is not None}
    state["fc.weight"] = torch.randn(4, 4)
    return state


def test_arcface_loading_keeps_convs_and_fresh_bn(tmp_path):
    state = _fake_arcface()
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    net = IResNet([1, 1, 1, 1], base_channels=8)
    stem_before = net.conv1.weight.clone()
    assert load_arcface_weights(net, path)
    assert torch.equal(net.layer2[0].conv2.weight, state["layer2.0.conv2.weight"])
    assert torch.equal(net.layer3[0].downsample[0].weight, state["layer3.0.downsample.0.weight"])
    assert torch.equal(net.prelu.weight, state["prelu.weight"])
    assert torch.equal(net.conv1.weight, stem_before)  # 1-channel stem stays new
    bn = net.layer1[0].bn2.bns[0]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert not load_arcface_weights(net, None)


def test_arcface_loading_errors(tmp_path):
    net = IResNet([1, 1, 1, 1], base_channels=8)
    with pytest.raises(InputError, match="not found"):
        load_arcface_weights(net, tmp_path / "missing.pth")
    torch.save(_fake_arcface(base=4), tmp_path / "other.pth")
    with pytest.raises(InputError) as err:
        load_arcface_weights(net, tmp_path / "other.pth")
    assert "other.pth" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ DSBN
def test_dsbn_routes_per_domain():
    torch.manual_seed(0)
    bn = DomainBatchNorm2d(3)
    src_only = torch.randn(4, 3, 5, 5) + 2
    bn(src_only, torch.zeros(4, dtype=torch.bool))
    assert not torch.equal(bn.bns[0].running_mean, torch.zeros(3))
    assert torch.equal(bn.bns[1].running_mean, torch.zeros(3))  # target statistics untouched
    assert int(bn.bns[1].num_batches_tracked) == 0

    mixed = torch.cat([torch.randn(2, 3, 5, 5) + 5, torch.randn(2, 3, 5, 5) - 5])
    is_tgt = torch.tensor([False, False, True, True])
    out = bn(mixed, is_tgt)
    for rows in (~is_tgt, is_tgt):  # each subset normalised by its own batch statistics
        assert out[rows].mean((0, 2, 3)).abs().max() < 1e-4
    bn.eval()
    single = bn(mixed[2:3], is_tgt[2:3])
    assert torch.allclose(single, bn.bns[1](mixed[2:3]))


def test_dsbn_disable_and_1d():
    bn = DomainBatchNorm2d(2, disable=True)
    bn(torch.randn(4, 2, 3, 3), torch.ones(4, dtype=torch.bool))
    assert int(bn.bns[1].num_batches_tracked) == 0 and int(bn.bns[0].num_batches_tracked) == 1
    bn1 = DomainBatchNorm1d(5)
    out = bn1(torch.randn(6, 5), torch.tensor([0, 1, 0, 1, 0, 1], dtype=torch.bool))
    assert out.shape == (6, 5) and int(bn1.bns[1].num_batches_tracked) == 1


# ------------------------------------------------------------------------------------------ encoder
@pytest.mark.parametrize("gen_size,input_size", [(32, 32), (64, 64), (64, 32)])
def test_encoder_codes_and_content_align_with_generator(gen_size, input_size):
    torch.manual_seed(0)
    g = Generator(gen_size, style_dim=16, n_mlp=1, channel_cap=16)
    layout = GeneratorLayout.from_generator(g)
    enc = FeatureStyleEncoder(layout, 16, input_size, depth=10, base_channels=4)
    xin = torch.randn(4, 1, input_size, input_size)
    codes, content = enc(xin, LABELS)
    assert codes.shape == (4, g.n_latent, 16)
    features_in = enc.convert_content(content)
    _, feats = g.g_synthesis(codes, randomize_noise=False)
    used = [k for k, e in enumerate(features_in) if e is not None]
    sizes = sorted({input_size // 2 ** (k + 1) for k in range(4)} & set(range(4, gen_size // 2 + 1)))
    assert len(used) == len(sizes)
    for k in used:
        f, gate = features_in[k]
        assert f.shape == feats[k].shape, k  # index k is where the generator holds that tensor
    image, _ = g.g_synthesis(codes, randomize_noise=False, features_in=features_in)
    assert image.shape == (4, 1, gen_size, gen_size)


def test_label_modulation_pairs_styles():
    g = Generator(32, style_dim=8, n_mlp=1, channel_cap=8)
    enc = FeatureStyleEncoder(GeneratorLayout.from_generator(g), 8, 32, depth=10, base_channels=4)
    m = enc.modulation(LABELS)
    assert m.shape == (4, g.n_latent, 8)
    assert torch.equal(m[:, 0::2], m[:, 1::2])
    assert not torch.allclose(m[0], m[2])  # source and target labels modulate differently


def test_dynamic_skip_layer():
    layer = DynamicSkipLayer(6, 4)
    m, f_hat, h = layer(torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4))
    assert m.shape == f_hat.shape == h.shape == (2, 4, 8, 8)
    assert float(m.detach().min()) >= 0 and float(m.detach().max()) < 1


# ------------------------------------------------------------------------------------------ interpreter
def test_listed_linear_equals_upsample_then_linear():
    torch.manual_seed(0)
    feats = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4), torch.randn(2, 2, 8, 8), torch.randn(2, 4, 16, 16)]
    ll = ListedLinear([3, 5, 2, 4], 6)
    ref = 0
    for f, lin in zip(feats, ll.linear_layers):
        up = F.interpolate(f, size=(16, 16), mode="bilinear", align_corners=True)
        ref = ref + lin(up.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(ll(feats, 16), ref, atol=1e-5)


@pytest.mark.parametrize("detach,is_semi,live", [
    (True, None, [False, False, False]), (False, None, [True, True, True]),
    (True, [True, False, False], [True, False, False]), (False, [True, False, False], [False, True, True])])
def test_head_features_detach_rules(detach, is_semi, live):
    f = torch.randn(3, 2, 4, 4, requires_grad=True)
    semi = None if is_semi is None else torch.tensor(is_semi)
    out = head_features([f * 1.0], detach, semi)[0]
    if out.requires_grad:
        out.sum().backward()
    got = [] if f.grad is None else [bool(f.grad[i].abs().sum() > 0) for i in range(3)]
    assert (got or [False] * 3) == live


# ------------------------------------------------------------------------------------------ PSP
def test_psp_forward_shapes(x):
    net = tiny_psp()
    out, codes = net(x, LABELS, return_latents=True)
    assert out.shape == (4, 4, 32, 32) and codes.shape == (4, net.n_styles, 32)
    assert torch.allclose(out[:, 1:].sum(1), torch.ones(4, 32, 32), atol=1e-5)
    net16 = tiny_psp(encoder_input_size=16)
    x16 = F.avg_pool2d(x, 2)
    assert net16(x16, LABELS).shape == (4, 4, 16, 16)
    assert net16(x16, LABELS, resize=False).shape == (4, 4, 32, 32)
    assert net16(x16, LABELS, return_mask=False).shape == (4, 1, 16, 16)
    out[:, 1:].mean().backward()
    assert net.encoder.styles.weight.grad is not None


def test_translation_uses_other_head(x):
    net = tiny_psp()
    warm_bn(net, x)
    src_lab = LABELS[:2]
    with torch.no_grad():
        intra = net(x[:2], src_lab)
        trans = net(x[:2], flip_label(src_lab))
        assert not torch.allclose(intra, trans)
        net.interpreter.classifiers["target"].fc3.bias.add_(torch.tensor([3.0, -3.0, 0.0]))
        assert torch.equal(net(x[:2], src_lab), intra)  # the source head is untouched
        assert not torch.allclose(net(x[:2], flip_label(src_lab))[:, 1:], trans[:, 1:])


def test_feature_scale(x):
    net = tiny_psp()
    warm_bn(net, x)
    with torch.no_grad():
        full, zero = net(x, LABELS, feature_scale=1.0), net(x, LABELS, feature_scale=0.0)
        assert not torch.allclose(full, zero)
        for skip in net.encoder.skips:  # W_E only shapes the injected f̂, ignored when feature_scale = 0
            skip.update.weight.mul_(3.0)
        assert torch.allclose(net(x, LABELS, feature_scale=0.0), zero, atol=1e-6)
        assert not torch.allclose(net(x, LABELS, feature_scale=1.0), full)


def test_eval_is_deterministic_and_batch_independent(x):
    net = tiny_psp()
    warm_bn(net, x)
    with torch.no_grad():
        a, b = net(x, LABELS), net(x, LABELS)
        assert torch.equal(a, b)
        assert torch.allclose(net(x[1:3], LABELS[1:3]), a[1:3], atol=1e-5)
        assert not torch.allclose(net(x, LABELS, noise="random"), a)  # noise does matter
        net.train()
        assert not torch.allclose(net(x, LABELS), net(x, LABELS))
    seed_like = tiny_psp(bn_mode="batch")  # the original behaviour: batch statistics in eval
    seed_like.eval()
    with torch.no_grad():
        assert not torch.allclose(seed_like(x[1:3], LABELS[1:3]), seed_like(x, LABELS)[1:3], atol=1e-3)


def test_latent_avg_rows_follow_domains(x):
    net = tiny_psp(src_tgt_domains=[2, 0])
    ref = net.decoder.mean_latent(256, [2, 0], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(net.latent_avg, ref)
    fresh = PSP(tiny_config())
    with pytest.raises(RuntimeError, match="compute_latent_avg"):
        fresh(x, LABELS)
    single = tiny_psp(src_tgt_domains=[0])
    with pytest.raises(ValueError, match="single"):
        single(x, LABELS)


def test_checkpoint_round_trip(tmp_path, x):
    net = tiny_psp()
    warm_bn(net, x)
    path = net.save_checkpoint(tmp_path / "ck.pt", 7, {"lr": 1e-4, "exp_dir": tmp_path, "ce_weights": (1, 2, 3)})
    payload = torch.load(path, weights_only=True)
    assert payload["global_step"] == 7 and payload["config"] == net.config.to_dict()
    assert payload["opts"]["exp_dir"] == str(tmp_path) and payload["opts"]["src_tgt_domains"] == [0, 1]
    assert not any(k.startswith("module.") for k in payload["state_dict"])
    json.dumps(payload["config"]), json.dumps(payload["opts"])
    back = PSP.from_checkpoint(path)
    back.eval()
    with torch.no_grad():
        assert torch.equal(back(x, LABELS), net(x, LABELS))
    assert back.load_info["latent_avg_missing"] == [] and not back.load_info["bn_stats_missing"]
    # DataParallel-style prefix is accepted
    payload["state_dict"] = {f"module.{k}": v for k, v in payload["state_dict"].items()}
    torch.save(payload, tmp_path / "dp.pt")
    dp = PSP.from_checkpoint(tmp_path / "dp.pt")
    assert torch.equal(dp.encoder.styles.weight, net.encoder.styles.weight)


def test_checkpoint_incompatible_architecture(tmp_path):
    net = tiny_psp()
    net.save_checkpoint(tmp_path / "ck.pt", 1)
    other = tiny_psp(encoder_base_channels=4)
    with pytest.raises(InputError) as err:
        other.load_checkpoint(tmp_path / "ck.pt")
    assert "ck.pt" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="not found"):
        PSP.from_checkpoint(tmp_path / "nope.pt")


def test_pretrain_to_adaptation_keeps_encoder(tmp_path, x):
    pre = tiny_psp(src_tgt_domains=[0])
    pre.train()
    with torch.no_grad():
        for i in range(3):
            pre(x + 0.1 * i, LABELS[:1].repeat(4, 1))
        pre.encoder.backbone.layer1[0].bn1.bns[0].weight.fill_(1.7)
    pre.save_checkpoint(tmp_path / "pre.pt", 100)
    ada = PSP.from_checkpoint(tmp_path / "pre.pt", src_tgt_domains=[0, 1])
    assert ada.load_info["dsbn_target_from_source"]
    assert ada.load_info["latent_avg_kept"] == [0] and ada.load_info["latent_avg_missing"] == [1]
    assert torch.equal(ada.encoder.backbone.layer2[0].conv1.weight, pre.encoder.backbone.layer2[0].conv1.weight)
    assert torch.equal(ada.encoder.styles.weight, pre.encoder.styles.weight)
    bn_pre = pre.encoder.backbone.layer1[0].bn1.bns[0]
    bn_ada = ada.encoder.backbone.layer1[0].bn1.bns
    for branch in bn_ada:  # both branches start from the pretrained source branch
        assert torch.equal(branch.weight, bn_pre.weight) and torch.equal(branch.running_mean, bn_pre.running_mean)
    assert torch.equal(ada.latent_avg[0], pre.latent_avg[0]) and not bool(ada.latent_avg_valid[1])
    assert ada.compute_latent_avg(128, seed=0) == [1]
    assert torch.equal(ada.latent_avg[0], pre.latent_avg[0])
    ada.freeze_source_classifier()
    names = {id(p) for p in ada.interpreter.classifiers["source"].parameters()}
    assert not any(id(p) in names for p in ada.classifier_parameters())
    assert ada(x, LABELS).shape == (4, 4, 32, 32)


def test_reinit_encoder_at_adaptation_restores_the_original(tmp_path, x):
    """--reinit_encoder: the original's adaptation keeps only the generator and the classifiers; the
    encoder starts again from ArcFace (random elsewhere) and both mean latents are recomputed."""
    pre = tiny_psp(src_tgt_domains=[0])
    pre.save_checkpoint(tmp_path / "pre.pt", 100)
    base = pre.config.encoder_base_channels
    torch.save(_fake_arcface(base=base), tmp_path / "backbone.pth")
    ada = PSP.from_checkpoint(tmp_path / "pre.pt", src_tgt_domains=[0, 1])
    ada.reinitialise_encoder(tmp_path / "backbone.pth")
    arc = torch.load(tmp_path / "backbone.pth", weights_only=True)
    assert torch.equal(ada.encoder.backbone.layer2[0].conv2.weight, arc["layer2.0.conv2.weight"])
    assert not torch.equal(ada.encoder.styles.weight, pre.encoder.styles.weight)
    assert not bool(ada.latent_avg_valid.any()) and ada.load_info["latent_avg_missing"] == [0, 1]
    assert ada.compute_latent_avg(128, seed=0) == [0, 1]
    for name, value in pre.decoder.state_dict().items():
        assert torch.equal(ada.decoder.state_dict()[name], value), name
    for name, value in pre.interpreter.state_dict().items():
        assert torch.equal(ada.interpreter.state_dict()[name], value), name
    assert ada(x, LABELS).shape == (4, 4, 32, 32)


def test_load_generator(tmp_path):
    net = tiny_psp()
    torch.manual_seed(5)
    g = Generator(32, style_dim=32, n_mlp=2, n_domains=3, channel_cap=16)
    torch.save({"g": g.state_dict(), "d": {}, "g_ema": g.state_dict(), "args": {"size": 32}}, tmp_path / "ok.pt")
    args = net.load_generator(tmp_path / "ok.pt")  # the file's args, completed from its tensors
    assert (args["size"], args["style_dim"], args["n_mlp"], args["n_domains"], args["n_zbins"]) == (32, 32, 2, 3, 29)
    assert torch.equal(net.decoder.input.input, g.input.input)
    assert not bool(net.latent_avg_valid.any())  # recomputed for the new generator
    big = Generator(64, style_dim=32, n_mlp=2, n_domains=3, channel_cap=16)
    torch.save({"g_ema": big.state_dict(), "args": {}}, tmp_path / "final_global_model.pt")
    with pytest.raises(InputError) as err:
        net.load_generator(tmp_path / "final_global_model.pt")
    msg = str(err.value)
    assert "final_global_model.pt" in msg and "64 px" in msg and "\n" not in msg
    other_dom = Generator(32, style_dim=32, n_mlp=2, n_domains=2, channel_cap=16)
    torch.save({"g_ema": other_dom.state_dict()}, tmp_path / "dom.pt")
    with pytest.raises(InputError, match="condition width 31"):
        net.load_generator(tmp_path / "dom.pt")


def test_config_json_round_trip_and_validation():
    cfg = tiny_config(channel_cap=None)
    assert PSPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError):
        PSPConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError):
        tiny_config(src_tgt_domains=[0, 5])
    with pytest.raises(ValueError):
        tiny_config(encoder_input_size=64)


def test_invert_intensity(x):
    plain, inv = tiny_psp(), tiny_psp(invert_intensity=True)
    for net in (plain, inv):
        torch.manual_seed(3)  # same synthesis noise -> same head BN statistics
        warm_bn(net, x)
    with torch.no_grad():
        a, b = plain(x, LABELS, resize=False), inv(x, LABELS, resize=False)
    bg = a[:, 1:].argmax(1, keepdim=True) == 0
    assert torch.allclose(b[:, :1], torch.where(bg, -a[:, :1], a[:, :1]), atol=1e-5), (b[:, :1] - torch.where(bg, -a[:, :1], a[:, :1])).abs().max()
    assert bool(bg.any())


# ------------------------------------------------------------------------------------------ losses
def test_dice_and_ce_formulas():
    y = F.one_hot(torch.randint(0, 3, (2, 8, 8)), 3).permute(0, 3, 1, 2).float()
    assert torch.isclose(dice_loss(y, y), torch.tensor(-1 / 3), atol=1e-6)
    w = [0.2, 0.3, 0.5]
    assert torch.isclose(dice_loss(y, y, w), torch.tensor(-sum(w) / 3), atol=1e-6)
    half = torch.full_like(y, 0.5)
    tp = (0.5 * y).sum((0, 2, 3))
    d = (2 * tp + 1e-5) / (2 * tp + 0.5 * (1 - y).sum((0, 2, 3)) + 0.5 * y.sum((0, 2, 3)) + 1e-5 + 1e-8)
    assert torch.isclose(dice_loss(half, y), -d.mean() / 3, atol=1e-6)
    assert float(ce_loss(y, y)) < 1e-5
    uniform = torch.full_like(y, 1 / 3)
    assert torch.isclose(ce_loss(uniform, y), torch.log(torch.tensor(3.0)) / 3, atol=1e-5)
    assert torch.isclose(ce_loss(uniform, y, [0, 0, 3]), 3 * torch.log(torch.tensor(3.0)) * y[:, 2].mean(), atol=1e-5)


def test_ssim_loss():
    torch.manual_seed(0)
    a = torch.rand(2, 1, 16, 16) * 2 - 1
    assert float(ssim_loss(a, a)) == pytest.approx(0.0, abs=1e-5)
    assert float(ssim_loss(a, -a)) > 0.5
    small = torch.rand(2, 1, 8, 8)
    assert float(ssim_loss(small, small)) == pytest.approx(0.0, abs=1e-5)


def _fake_lpips_files(tmp_path):
    from torchvision.models import alexnet

    torch.manual_seed(0)
    torch.save(alexnet(weights=None).state_dict(), tmp_path / "alex_pretr.pth")
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(heads, tmp_path / "alex.pth")
    return tmp_path / "alex.pth", tmp_path / "alex_pretr.pth"


def test_lpips_offline_weights(tmp_path):
    with pytest.raises(InputError, match="--alex-model"):
        build_lpips(None, None)
    lin, pretr = _fake_lpips_files(tmp_path)
    with pytest.raises(InputError, match="not found"):
        build_lpips(lin, tmp_path / "missing.pth")
    lp = build_lpips(lin, pretr)
    assert not any(p.requires_grad for p in lp.parameters())
    a = (torch.rand(2, 1, 32, 32) * 2 - 1).requires_grad_()
    b = torch.rand(2, 1, 32, 32) * 2 - 1
    assert float(lp(a.detach(), a.detach())) == pytest.approx(0.0, abs=1e-7)
    d = lp(a, b)
    assert float(d.detach()) > 0
    d.backward()
    assert a.grad is not None and float(a.grad.abs().sum()) > 0
    torch.save({"lin0.model.1.weight": torch.rand(1, 3, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="bad.pth"):
        LPIPS(tmp_path / "bad.pth", pretr)


def test_calc_loss_and_favoured():
    torch.manual_seed(0)
    y = F.one_hot(torch.randint(0, 3, (4, 16, 16)), 3).permute(0, 3, 1, 2).float()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    where = torch.tensor([True, False, True, False])
    perfect = torch.cat([x, y], 1)
    cfg = LossConfig.from_options(lpips_lambda=0.0)
    total, logs = calc_loss(x, y, perfect, where, cfg)
    assert total.item() == pytest.approx(-1 / 3, abs=1e-4) and logs["loss_ssim"] == pytest.approx(0, abs=1e-5)
    with pytest.raises(InputError):
        calc_loss(x, y, perfect, where, LossConfig.from_options())  # LPIPS on but no module given
    noisy = torch.cat([x + 0.3, torch.softmax(torch.randn(4, 3, 16, 16), 1)], 1).requires_grad_()
    total, logs = calc_loss(x, y, noisy, where, cfg, weight=torch.ones(4, 1, 16, 16))
    total.backward()
    assert noisy.grad[1, 1:].abs().sum() == 0 and noisy.grad[0, 1:].abs().sum() > 0  # masks only where GT
    assert set(logs) == {"loss", "loss_l2", "loss_ssim", "loss_ce", "loss_dice"}
    assert favoured_channels([1, 3, 3]) == [1, 2]
    omega = favoured_weight(y, where, [2])
    assert torch.isin(omega, torch.tensor([0.3, 1.0])).all()
    assert torch.equal(omega[0, 0] == 1.0, y[0, 2] > 0.5) and bool((omega[1] == 0.3).all())


# ------------------------------------------------------------------------------------------ Ranger
def _quadratic_run(opt_factory, steps, p0):
    p = torch.nn.Parameter(p0.clone())
    opt = opt_factory([p])
    target = torch.arange(6.0).view(2, 3)
    for _ in range(steps):
        opt.zero_grad()
        ((p - target) ** 2).sum().backward()
        opt.step()
    return p, opt


def test_ranger_decreases_quadratic_and_resumes():
    p0 = torch.zeros(2, 3)
    target = torch.arange(6.0).view(2, 3)
    p, _ = _quadratic_run(lambda ps: Ranger(ps, lr=0.1, use_gc=False), 300, p0)
    assert float(((p.detach() - target) ** 2).sum()) < 0.05 * float(((p0 - target) ** 2).sum())

    target_fn = lambda q: ((q - target) ** 2).sum()  # noqa: E731
    p_a, opt_a = _quadratic_run(lambda ps: Ranger(ps, lr=0.05), 4, p0)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)  # as a resume from disk would (no shared tensors)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert "slow_buffer" in state["state"][0]
    p_b = torch.nn.Parameter(p_a.detach().clone())
    opt_b = Ranger([p_b], lr=0.05)
    opt_b.load_state_dict(state)
    for q, opt in ((p_a, opt_a), (p_b, opt_b)):
        for _ in range(5):  # crosses a lookahead sync (k = 6)
            opt.zero_grad()
            target_fn(q).backward()
            opt.step()
    assert torch.equal(p_a, p_b)


def test_ranger_gradient_centralisation():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    opt = Ranger([p], lr=0.1, k=100)
    p.grad = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    opt.step()
    assert torch.allclose(p.grad.mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(p.detach().sum(1), torch.zeros(2), atol=1e-6)  # centred update


def test_training_steps_reduce_loss(x):
    """Ranger on the encoder + Adam on the heads fit a fixed batch (intra branch, ex_seg=True)."""
    net = tiny_psp()
    net.set_decoder_trainable(False)
    y = F.one_hot((x[:, 0] > 0).long() + (x[:, 0] > 0.5).long(), 3).permute(0, 3, 1, 2).float()
    has_gt = torch.tensor([True, True, True, False])
    opt = Ranger(net.encoder_parameters(), lr=1e-3)
    opt_seg = torch.optim.Adam(net.classifier_parameters(), lr=1e-2)
    cfg = LossConfig.from_options(lpips_lambda=0.0)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        opt_seg.zero_grad()
        loss, _ = calc_loss(x, y, net(x, LABELS, ex_seg=True, noise="fixed"), has_gt, cfg)
        loss.backward()
        opt.step()
        opt_seg.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is None for p in net.decoder.parameters())


def test_factory_file_writer_and_reader_round_trip_and_old_spellings(tmp_path):
    """The one writer (robustmedseg.factory_file) writes what the one reader loads strictly; files of the
    original code (``latent``/``output_size`` instead of ``style_dim``/``size``, a ``module.`` prefix) still load."""
    from model import GeneratorArgs
    from robustmedseg.factory_file import ARG_ALIASES, load_factory_file, write_factory_file

    args = GeneratorArgs(size=32, style_dim=16, n_mlp=2, n_domains=2, n_zbins=5, clip_dim=8, channel_cap=16)
    torch.manual_seed(3)
    g = Generator.from_args(args)
    path = write_factory_file(tmp_path / "new.pt", g, args, meta={"round": 2})
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"g", "d", "g_ema", "args", "meta"} and payload["args"] == args.as_dict()
    loaded, read = load_factory_file(path)
    assert GeneratorArgs.from_mapping(read) == args
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in g.state_dict().items())
    assert ARG_ALIASES == {"size": ("output_size",), "style_dim": ("latent",)}
    old = {k: v for k, v in args.as_dict().items() if k not in ("size", "style_dim")}
    torch.save({"g_ema": {f"module.{k}": v for k, v in g.state_dict().items()},
                "args": {**old, "output_size": 32, "latent": 16}}, tmp_path / "old.pt")
    loaded, read = load_factory_file(tmp_path / "old.pt")
    assert GeneratorArgs.from_mapping(read) == args and read["latent"] == 16
    assert torch.equal(loaded.state_dict()["input.input"], g.state_dict()["input.input"])
