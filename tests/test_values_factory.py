"""Phase-1 factory values: the ADA draw distributions, the GAN losses against their formulas, node-state
locations and seeds, and the one-line errors (found missing by mutation testing)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from robustmedseg.factory import ada as ada_mod
from robustmedseg.factory import losses, samples, state
from robustmedseg.factory.config import FactoryConfig

CPU = torch.device("cpu")
N = 20000


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


def test_gan_losses_follow_their_formulas():
    torch.manual_seed(2)
    real, fake = torch.randn(7, 1), torch.randn(7, 1)
    want = torch.log1p(torch.exp(-real)).mean() + torch.log1p(torch.exp(fake)).mean()
    torch.testing.assert_close(losses.d_logistic_loss(real, fake), want)
    torch.testing.assert_close(losses.g_nonsaturating_loss(fake), torch.log1p(torch.exp(-fake)).mean())
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    pred = (x ** 2).sum((1, 2, 3)) * 0.5  # gradient = x
    torch.testing.assert_close(losses.r1_penalty(pred, x), x.detach().pow(2).sum((1, 2, 3)).mean())


def test_node_state_locations_and_seeds(tmp_path, monkeypatch):
    monkeypatch.delenv("ROBUSTMEDSEG_NODE_STATE_DIR", raising=False)
    monkeypatch.setenv("FBM_NODE_COMPONENT_ROOT", str(tmp_path / "node"))
    assert state.node_state_root() == tmp_path / "node" / "var" / "robustmedseg"
    monkeypatch.setenv("ROBUSTMEDSEG_NODE_STATE_DIR", str(tmp_path / "explicit"))
    assert state.node_state_root() == tmp_path / "explicit"
    monkeypatch.delenv("ROBUSTMEDSEG_NODE_STATE_DIR")
    monkeypatch.delenv("FBM_NODE_COMPONENT_ROOT")
    monkeypatch.chdir(tmp_path)
    assert state.node_state_root() == tmp_path / "robustmedseg-node-state"
    assert state.run_dir("", None, Path("r")) == Path("r") / "default" / "local"
    assert state.run_dir("a/b c", "NODE:1", Path("r")) == Path("r") / "a_b_c" / "NODE_1"
    seeds = {state.node_seed(3, n) for n in ("NODE_a", "NODE_b", "NODE_ab", None)}
    assert len(seeds) == 4 and state.node_seed(3, None) == state.node_seed(3, "local")
    assert state.node_seed(3, "NODE_a") == state.node_seed(3, "NODE_a") != state.node_seed(4, "NODE_a")
    assert all(0 <= s < 2 ** 31 for s in seeds)


def test_old_node_state_without_counts_loads(tmp_path):
    from builders import factory_trainer as _trainer

    cfg = FactoryConfig.from_model_args({"size": 16, "style_dim": 32, "n_mlp": 2, "channel_cap": 16, "clip_dim": 16})
    trainer = _trainer(cfg)
    trainer.load_state_dict({"step": 5, "mean_path_length": 0.5, "ada": None, "optimizer": None})
    assert trainer.step == 5 and dict(trainer.counts) == {}


def test_factory_config_and_trainer_errors():
    for name in ("mixing", "augment_p", "clip_prob"):
        with pytest.raises(ValueError, match=rf"^{name} must be in \[0, 1\], got 1.5$"):
            FactoryConfig.from_model_args({name: 1.5})
    with pytest.raises(ValueError, match=r"^clip_weight must be >= 0, got -1$"):
        FactoryConfig.from_model_args({"clip_weight": -1})
    from builders import factory_trainer as _trainer

    cfg = FactoryConfig.from_model_args({"size": 16, "style_dim": 32, "n_mlp": 2, "channel_cap": 16, "clip_dim": 16,
                                         "clip_weight": 1.0})
    with pytest.raises(ValueError, match=r"^clip_weight > 0 needs a CLIP model for the loss$"):
        from robustmedseg.factory.trainer import FactoryTrainer

        t = _trainer(FactoryConfig.from_model_args({"size": 16, "style_dim": 32, "n_mlp": 2, "channel_cap": 16,
                                                    "clip_dim": 16}))
        FactoryTrainer(t.model, t.opt, cfg, clip_mean=torch.zeros(1, 16))


def test_sample_grid_clamps_to_the_image_range():
    images = torch.tensor([-3.0, -1.0, 0.0, 1.0, 4.0]).reshape(5, 1, 1, 1)
    grid = samples.to_grid(images, nrow=5, pad=0)
    assert grid.tolist() == [[0, 0, 128, 255, 255]]


def test_no_clip_warning_without_clip_weight(caplog, tmp_path, monkeypatch):
    """The 'CLIP loss disabled' warning is for clip_weight > 0 on a node without clip_mean only."""
    from robustmedseg.factory import session

    monkeypatch.setenv("ROBUSTMEDSEG_NODE_STATE_DIR", str(tmp_path))

    class Plan:
        def __init__(self, weight):
            self.args = {"size": 16, "style_dim": 32, "n_mlp": 2, "channel_cap": 16, "clip_dim": 16,
                         "clip_weight": weight, "run_id": "w"}
            from robustmedseg.factory.network import FactoryModel
            from robustmedseg.factory.optim import AlternatingAdam

            cfg = FactoryConfig.from_model_args(self.args)
            self.net = FactoryModel(cfg)
            self.opt = type("O", (), {"optimizer": AlternatingAdam(self.net.discriminator.parameters(),
                                                                    self.net.generator.parameters(), lr=0.002)})()

        def model_args(self):
            return self.args

        def node_id(self):
            return "NODE_w"

        def round(self):
            return 0

        def loader_args(self):
            return {"batch_size": 2}

        def training_args(self):
            return {"num_updates": 1}

        def model(self):
            return self.net

        def optimizer(self):
            return self.opt

    data = type("D", (), {"clip_mean": lambda self: None})()
    with caplog.at_level(logging.WARNING, logger="robustmedseg.factory.session"):
        session.begin_round(Plan(0.0), data)
    assert not [r for r in caplog.records if "CLIP loss disabled" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="robustmedseg.factory.session"):
        session.begin_round(Plan(1.0), data)
    assert [r for r in caplog.records if "CLIP loss disabled" in r.getMessage()]
