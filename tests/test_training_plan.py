"""Phase-1 training plan, driven in-process like a Fed-BioMed node (no gRPC), with tiny networks.

Covers the phase-1 factory (robustmedseg/factory/, training_plan.py): D/G alternation, lazy-regularisation
schedule, EMA rule, node-local state across rounds (locations, seeds, older files), the trainer's ADA settings
(``ada_every``, the quarter-turn set), CLIP loss (clamp, gradients, batch larger than the CLIP rows), the GAN
losses against their formulas, the one-line errors, strategy and export helpers. The augmentation itself is in
tests/test_ada.py, resume equivalence in tests/test_resume.py.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from robustmedseg.factory import ada as ada_mod
from robustmedseg.factory import losses, samples, state
from robustmedseg.factory.config import EMA_DECAY, FactoryConfig
from robustmedseg.factory.losses import spherical_distance_sq
from robustmedseg.factory.network import FactoryModel
from robustmedseg.factory.trainer import FactoryTrainer

from builders import FACTORY_TINY as TINY
from builders import REPO, factory_trainer, node_round as _round, write_slices as _write_slices


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def lmdb_plain(tmp_path_factory) -> Path:
    from robustmedseg.data.lmdb_store import PrepareOptions, prepare_lmdb

    root = tmp_path_factory.mktemp("plain")
    out = root / "lmdb"
    prepare_lmdb(PrepareOptions(source=_write_slices(root / "slices"), out=out, label=1, sizes=(16,),
                                clip_model=None, progress=False))
    return out


@pytest.fixture(scope="module")
def lmdb_clip(tmp_path_factory, tiny_clip) -> Path:
    from robustmedseg.data.lmdb_store import PrepareOptions, prepare_lmdb

    root = tmp_path_factory.mktemp("clipdata")
    out = root / "lmdb"
    prepare_lmdb(PrepareOptions(source=_write_slices(root / "slices", seed=1), out=out, label=2, sizes=(16,),
                                clip_model=tiny_clip["model"], clip_pretrained=tiny_clip["pretrained"],
                                device="cpu", progress=False))
    return out


@pytest.fixture()
def state_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ROBUSTMEDSEG_NODE_STATE_DIR", str(tmp_path / "node_state"))
    return tmp_path / "node_state"


def _changed(before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix + ".") and
               before[k].is_floating_point())


def _tiny_trainer(**overrides) -> FactoryTrainer:
    return factory_trainer(FactoryConfig.from_model_args({**TINY, **overrides}))


def _drive(trainer: FactoryTrainer, real: torch.Tensor, target: torch.Tensor) -> None:
    """What Fed-BioMed does around training_step."""
    trainer.opt.zero_grad()
    loss = trainer.training_step(real, target)
    loss.backward()
    trainer.opt.step()


def _batch(n: int = 4, domain: int = 1):
    torch.manual_seed(3)
    return torch.tanh(torch.randn(n, 1, 16, 16)), torch.tensor([[domain, i % 5] for i in range(n)])


# --------------------------------------------------------------------------- plan (in-process node)

def test_first_update_trains_d_only_second_trains_g(lmdb_plain, state_dir):
    from training_plan import FactoryTrainingPlan  # noqa: F401  (import check)

    plan, _, _ = _round(lmdb_plain, 1)
    init = {k: v for k, v in plan.initial_parameters().items()}
    after = plan.model().state_dict()
    assert _changed(init, after, "discriminator")
    assert not _changed(init, after, "generator")
    assert not _changed(init, after, "g_ema")
    plan2, _, _ = _round(lmdb_plain, 1, round_=1, params=after)  # continues at step 1: a G update
    after2 = plan2.model().state_dict()
    assert not _changed(after, after2, "discriminator")
    assert _changed(after, after2, "generator")
    # the EMA averages G's parameters from before the step (as the original): still the initial G here,
    # equal to G_ema's (up to float rounding of d * x + (1 - d) * x)
    assert all(torch.allclose(after[k], after2[k], atol=1e-6) for k in after if k.startswith("g_ema."))
    plan3, _, _ = _round(lmdb_plain, 2, round_=2, params=after2)  # steps 2 (D) and 3 (G)
    assert _changed(after2, plan3.model().state_dict(), "g_ema")


def test_node_reply_is_the_full_state_dict_of_the_three_networks(lmdb_plain, state_dir):
    plan, params, seen = _round(lmdb_plain, 2)
    assert seen == 2 * 4
    assert set(params) == set(plan.model().state_dict())
    assert {k.split(".")[0] for k in params} == {"generator", "discriminator", "g_ema"}


def test_lazy_regularisation_adds_steps_on_schedule(lmdb_plain, state_dir):
    n, d_every, g_every = 20, 2, 3
    plan, _, _ = _round(lmdb_plain, n, d_reg_every=d_every, g_reg_every=g_every)
    trainer = plan._session.trainer
    d_idx = [i // 2 for i in range(n) if i % 2 == 0]
    g_idx = [i // 2 for i in range(n) if i % 2 == 1]
    n_r1 = sum(1 for k in d_idx if k % d_every == 0)
    n_pl = sum(1 for k in g_idx if k % g_every == 0)
    assert (trainer.counts["d"], trainer.counts["g"]) == (len(d_idx), len(g_idx))
    assert (trainer.counts["r1"], trainer.counts["pl"]) == (n_r1, n_pl)
    # regularisation ADDS an optimiser step to the regular one (StyleGAN2 lazy regularisation)
    assert trainer.opt.steps == {"d": len(d_idx) + n_r1, "g": len(g_idx) + n_pl}
    assert trainer.counts["ema"] == len(g_idx)
    assert trainer.mean_path_length > 0


def test_lazy_adam_hyper_parameters():
    t = _tiny_trainer()
    (gd,), (gg,) = t.opt.d.param_groups, t.opt.g.param_groups
    assert gd["lr"] == pytest.approx(0.002 * 16 / 17) and gd["betas"] == pytest.approx((0.0, 0.99 ** (16 / 17)))
    assert gg["lr"] == pytest.approx(0.002 * 4 / 5) and gg["betas"] == pytest.approx((0.0, 0.99 ** (4 / 5)))


def test_state_persists_across_rounds(lmdb_plain, state_dir):
    from robustmedseg.factory.session import begin_round
    from robustmedseg.federation.inprocess import instantiate_plan
    from fedbiomed.common.training_args import TrainingArgs
    from training_plan import FactoryTrainingPlan

    # ada_target -1: any window with one positive D(real) raises p (the node stream is seeded, so
    # whether an untrained D crosses the default 0.6 is fixed by the seed, not a property to test)
    ada = {"augment": True, "ada_every": 1, "ada_length": 50, "ada_target": -1.0}
    plan0, params, _ = _round(lmdb_plain, 12, **ada)
    t0 = plan0._session.trainer
    saved_opt = t0.opt.state_dict()
    saved_rng = torch.get_rng_state()
    assert t0.ada_p > 0
    # a fresh plan object (what Fed-BioMed builds for the next round)
    plan1 = instantiate_plan(FactoryTrainingPlan)
    plan1.post_init(model_args={**TINY, "run_id": "test", **ada},
                    training_args=TrainingArgs({"num_updates": 4, "loader_args": {"batch_size": 4},
                                                "optimizer_args": {"lr": 0.002}}, only_required=False),
                    node_id="NODE_t", round=1)
    torch.manual_seed(0)  # what a seeded framework would do; the node stream must not restart
    session = begin_round(plan1, type("D", (), {"clip_mean": lambda self: None})())
    t1 = session.trainer
    assert torch.equal(torch.get_rng_state(), saved_rng)
    assert (t1.step, t1.ada_p, t1.mean_path_length) == (t0.step, t0.ada_p, t0.mean_path_length)
    t1._apply_pending_optimizer_state()
    restored = t1.opt.state_dict()
    for net in ("d", "g"):
        for idx, st in saved_opt[net]["state"].items():
            assert torch.equal(restored[net]["state"][idx]["exp_avg_sq"], st["exp_avg_sq"])
    # and training continues from the saved counter
    plan2, _, _ = _round(lmdb_plain, 4, round_=1, params=params, **ada)
    assert plan2._session.trainer.step == 16


def test_rerun_round_loads_state_from_before_it(lmdb_plain, state_dir):
    from robustmedseg.factory.state import list_states, run_dir

    _round(lmdb_plain, 4, round_=0)
    _round(lmdb_plain, 4, round_=1)           # e.g. finished, but the round failed on another node
    plan, _, _ = _round(lmdb_plain, 2, round_=1)  # the re-run of round 1 starts from round 0's state
    assert plan._session.resumed_from == 0 and plan._session.trainer.step == 6
    assert [r for r, _ in list_states(run_dir("test", "NODE_t"))] == [0, 1]


def test_sample_grids_are_written_on_the_node(lmdb_plain, state_dir):
    from PIL import Image

    plan, _, _ = _round(lmdb_plain, 4, sample_every=2)
    samples = plan._session.directory / "samples"
    names = sorted(p.name for p in samples.iterdir())
    assert names == ["0000000.png", "0000000_real.png", "0000002.png", "0000002_real.png"]
    grid = np.asarray(Image.open(samples / "0000002.png"))
    assert grid.ndim == 2 and grid.shape[0] > 16 * TINY["n_sample"]


# --------------------------------------------------------------------------- trainer-level rules

def test_ema_at_g_updates_uses_g_before_the_step_and_follows_the_formula():
    t = _tiny_trainer(mixing=0.0)
    real, target = _batch()
    with torch.no_grad():  # make G_ema differ from G so that the rule is visible
        for p in t.model.g_ema.parameters():
            p.add_(0.5)
    ema0 = {k: v.clone() for k, v in t.model.g_ema.state_dict().items()}
    _drive(t, real, target)  # D update: no EMA
    assert all(torch.equal(ema0[k], v) for k, v in t.model.g_ema.state_dict().items())
    g_before = {k: p.detach().clone() for k, p in t.model.generator.named_parameters()}
    _drive(t, real, target)  # G update (with a path-length step: G index 0)
    g_after = dict(t.model.generator.named_parameters())
    assert any(not torch.equal(g_before[k], g_after[k]) for k in g_before)
    for name, p_ema in t.model.g_ema.named_parameters():
        expected = EMA_DECAY * ema0[name] + (1 - EMA_DECAY) * g_before[name]
        assert torch.allclose(p_ema, expected, atol=1e-7), name
    assert t.counts["ema"] == 1
    assert EMA_DECAY == pytest.approx(0.997784, abs=1e-6)


def test_g_ema_starts_with_g_parameters_and_its_own_noise_buffers():
    t = _tiny_trainer()
    for (name, p), p_ema in zip(t.model.generator.named_parameters(), t.model.g_ema.parameters()):
        assert torch.equal(p, p_ema), name
    noises = [n for n, _ in t.model.generator.named_buffers() if "noises." in n]
    assert noises
    g_buf, e_buf = dict(t.model.generator.named_buffers()), dict(t.model.g_ema.named_buffers())
    assert all(not torch.equal(g_buf[n], e_buf[n]) for n in noises)  # as accumulate(g_ema, g, 0)


def test_path_length_mean_stays_in_the_graph():
    from robustmedseg.factory.losses import path_length_loss

    lengths = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    m0, decay = 0.5, 0.01
    penalty, m_new = path_length_loss(lengths, m0, decay)
    penalty.backward()
    with torch.no_grad():
        m = m0 + decay * (lengths.mean() - m0)
        n = lengths.numel()
        # d/dL_i of mean((L - m)^2) with m = m0 + decay * (mean(L) - m0): the running mean's term included
        expected = 2 / n * (lengths - m) - 2 * decay / n * (lengths - m).mean()
    assert m_new == pytest.approx(float(m))
    assert torch.allclose(lengths.grad, expected, atol=1e-7)
    assert not torch.allclose(lengths.grad, 2 / n * (lengths.detach() - m))  # != a detached mean


def test_r1_penalty_gradients_match_plain_autograd():
    from robustmedseg.factory.losses import r1_penalty

    t = _tiny_trainer()
    d = t.model.discriminator
    real, target = _batch()
    c, _ = t.conditions(target, real.device)
    grads = []
    for fast in (True, False):
        d.zero_grad()
        x = real.clone().requires_grad_(True)
        pred = d(x, c)
        if fast:
            penalty = r1_penalty(pred, x)
        else:
            (g,) = torch.autograd.grad(pred.sum(), x, create_graph=True)
            penalty = g.pow(2).reshape(g.shape[0], -1).sum(1).mean()
        penalty.backward()
        grads.append([p.grad.clone() for p in d.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*grads))


def test_batch_larger_than_clip_rows_and_clip_conditioning():
    t = _tiny_trainer(clip_prob=1.0)
    t.clip_mean = torch.randn(1, 16)
    real, target = _batch(n=12)  # 12 > n_domains * n_sample = 6
    c, e = t.conditions(target, real.device)
    assert c.shape == (12, 3 + 29) and e.shape == (12, 16)
    for _ in range(4):
        _drive(t, real, target)
    assert t.step == 4


def test_clip_mean_with_several_domains_in_a_batch_is_refused():
    t = _tiny_trainer(clip_prob=1.0)
    t.clip_mean = torch.randn(1, 16)
    with pytest.raises(ValueError, match="one domain"):
        t.conditions(torch.tensor([[0, 1], [1, 1]]), torch.device("cpu"))


def test_clip_loss_on_node_data(lmdb_clip, tiny_clip, state_dir):
    plan, _, _ = _round(lmdb_clip, 6, batch=6, clip_weight=50.0, clip_prob=1.0, clip_model=tiny_clip["model"],
                        clip_pretrained=tiny_clip["pretrained"])
    trainer = plan._session.trainer
    assert trainer.clip_mean is not None and trainer.clip_mean.shape == (1, 16)
    assert trainer.counts["clip"] == 3  # every G update of the round (clip_prob 1)
    assert all(torch.isfinite(p).all() for p in plan.model().parameters())


def test_clip_loss_is_finite_for_identical_vectors_and_has_gradients(tiny_clip):
    x = torch.randn(3, 16, requires_grad=True)
    d = spherical_distance_sq(x, x.detach().clone())
    d.sum().backward()
    assert torch.isfinite(d).all() and torch.isfinite(x.grad).all()
    from robustmedseg.factory.clip_loss import load_clip_loss

    loss_fn = load_clip_loss(tiny_clip["model"], tiny_clip["pretrained"])
    img = torch.tanh(torch.randn(2, 1, 16, 16)).requires_grad_(True)
    target = loss_fn.embed(img).detach()
    loss = loss_fn(img, target)  # identical embeddings: arccos(1) clamped
    loss.backward()
    assert torch.isfinite(loss) and loss.item() < 1e-3 and torch.isfinite(img.grad).all()
    far = loss_fn(img.detach(), -target)
    assert far.item() > 1.0  # antipodal: close to pi^2


def test_missing_clip_weights_is_a_clear_error():
    from robustmedseg.errors import InputError
    from robustmedseg.factory.clip_loss import load_clip_loss

    with pytest.raises(InputError, match="not found"):
        load_clip_loss("ViT-L-14", "/nonexistent/clip_weights.pt")


# --------------------------------------------------------------------------- ADA


def test_trainer_passes_the_quarter_turn_setting_to_the_augmentation(monkeypatch):
    """The FactoryConfig field (shipped in model_args) reaches every augmentation of D's inputs."""
    import robustmedseg.factory.trainer as trainer_mod

    assert FactoryConfig().ada_rot90 == "uniform"  # default: the ADA paper's four turns
    seen = []
    real = trainer_mod.augment

    def spy(images, p, rot90="uniform"):
        seen.append(rot90)
        return real(images, p, rot90)

    monkeypatch.setattr(trainer_mod, "augment", spy)
    for setting in ("original", "uniform"):
        seen.clear()
        trainer = _tiny_trainer(augment=True, augment_p=1.0, ada_rot90=setting)
        real_images, target = _batch()
        _drive(trainer, real_images, target)  # a D update: reals and fakes augmented
        assert seen and set(seen) == {setting}
    for setting in ada_mod.ROT90_SETS:  # the config accepts exactly the augmentation's settings
        FactoryConfig.from_model_args({**TINY, "ada_rot90": setting})
    with pytest.raises(ValueError):
        FactoryConfig.from_model_args({**TINY, "ada_rot90": "0,3"})


def test_ada_every_is_honoured(lmdb_plain, state_dir):
    plan, _, _ = _round(lmdb_plain, 8, augment=True, ada_every=3, ada_length=10)
    ada = plan._session.trainer.ada
    assert ada.calls == 4 % 3  # 4 regular D updates: one update of p after 3 calls, 1 call pending


# --------------------------------------------------------------------------- GAN losses, node state, errors
# Values of the GAN losses against their formulas, node-state locations and seeds, and the one-line
# errors (found missing by mutation testing).

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


# --------------------------------------------------------------------------- strategy, export, CLI

def test_strategy_samples_at_most_k_distinct_nodes_and_survives_breakpoints():
    from robustmedseg.federation.strategy import NodeFailureError, SampleAtMostK

    nodes = [f"NODE_{i}" for i in range(5)]
    s = SampleAtMostK(max_nodes=2, seed=7)
    picks = [s.sample_nodes(nodes, r) for r in range(20)]
    assert all(len(p) == 2 == len(set(p)) and set(p) <= set(nodes) for p in picks)
    assert len({tuple(p) for p in picks}) > 1
    assert SampleAtMostK(3).sample_nodes(nodes[:2], 0) == nodes[:2]
    state = json.loads(json.dumps(s.save_state_breakpoint()))  # breakpoints are JSON
    s2 = SampleAtMostK()
    s2.load_state_breakpoint(state)
    assert s2.max_nodes == 2 and s2.sampled(19) == picks[19]
    assert s2.sample_nodes(nodes, 3) == picks[3]  # same stream after a resume
    first, second = picks[3]
    with pytest.raises(NodeFailureError, match=f"{first}.*{second}") as info:  # nobody replied
        s2.refine({}, 3)
    assert info.value.nodes == [first, second]
    # partial failure: one sampled node replied, the other did not -> the round fails, naming only the missing
    with pytest.raises(NodeFailureError, match=second) as info:
        s2.refine({first: {"success": True, "node_id": first, "params": {}, "sample_size": 4}}, 3)
    assert info.value.nodes == [second] and "no training reply" in info.value.reasons[second]
    # a reply with success False is a failure too, with the node's message
    with pytest.raises(NodeFailureError, match="boom") as info:
        s2.refine({first: {"success": True, "params": {}, "sample_size": 4}, second: {"success": False, "msg": "boom"}},
                  3)
    assert info.value.nodes == [second]


def test_uniform_aggregation_weights():
    from robustmedseg.federation.strategy import SampleAtMostK

    s = SampleAtMostK(max_nodes=2, weighting="uniform")
    s.sample_nodes(["a", "b"], 0)
    replies = {n: {"success": True, "node_id": n, "params": {}, "sample_size": size}
               for n, size in (("a", 10), ("b", 30))}
    _, weights, _, _ = s.refine(replies, 0)
    assert weights == {"a": 0.5, "b": 0.5}
    s2 = SampleAtMostK(max_nodes=2, weighting="samples")
    s2.sample_nodes(["a", "b"], 0)
    assert s2.refine(replies, 0)[1] == {"a": 0.25, "b": 0.75}


def test_export_layout_and_strict_reload(tmp_path):
    from robustmedseg.factory_file import load_factory_file
    from robustmedseg.federation.export import build_export
    from robustmedseg.io import save_torch_atomic

    cfg = FactoryConfig.from_model_args({**TINY, "run_id": "x"})
    model = FactoryModel(cfg)
    export = build_export(model.state_dict(), {"model_args": cfg.to_model_args(), "id": "e", "round_current": 3})
    assert not any(k.startswith(("generator.", "g_ema.")) for k in export["g"])
    assert "style.0.weight" in export["g_ema"] and "final_linear.1.weight" in export["d"]
    path = tmp_path / "final_global_model.pt"
    save_torch_atomic(export, path)
    g, _ = load_factory_file(path)
    assert torch.equal(g.state_dict()["style.0.weight"], model.g_ema.state_dict()["style.0.weight"])
    assert torch.load(path, weights_only=True)["meta"]["round"] == 3


def test_export_of_a_factory_trained_with_another_mapping_lr_is_the_same_generator(tmp_path):
    """--lr_mlp 1: the export stores the mapping in the paper's parametrisation (lr_mlp 0.01) and a
    Generator built with the paper's default computes the same images."""
    from model import Generator
    from robustmedseg.federation.export import build_export

    cfg = FactoryConfig.from_model_args({**TINY, "run_id": "x", "lr_mlp": 1.0})
    model = FactoryModel(cfg)
    with torch.no_grad():  # a trained-looking mapping (non-zero biases)
        for p in model.g_ema.style.parameters():
            p.add_(0.3 * torch.randn_like(p))
    export = build_export(model.state_dict(), {"model_args": cfg.to_model_args(), "id": "e", "round_current": 1})
    assert export["args"]["lr_mlp"] == 0.01 and export["meta"]["trained_lr_mlp"] == 1.0
    kw = {k: export["args"][k] for k in ("style_dim", "n_mlp", "n_domains", "channel_multiplier", "n_zbins",
                                         "clip_dim", "channel_cap")}
    paper = Generator(export["args"]["size"], **kw)  # lr_mlp defaults to the paper's 0.01
    paper.load_state_dict(export["g_ema"])
    z = torch.randn(3, cfg.style_dim)
    c = paper.condition([0, 1, 2], [0, 5, 9])
    with torch.no_grad():
        want, _ = model.g_ema([z], c, randomize_noise=False)
        got, _ = paper([z], c, randomize_noise=False)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.equal(export["g_ema"]["style.0.weight"], model.g_ema.state_dict()["style.0.weight"])


def test_unknown_model_args_are_rejected():
    with pytest.raises(ValueError, match="unknown factory model_args: bogus"):
        FactoryConfig.from_model_args({"bogus": 1})


def test_train_cli_help_and_resume_refuses_architecture_flags():
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--max_nodes_per_round" in out.stdout and "--resume" in out.stdout
    import train

    with pytest.raises(Exception, match="--size"):
        train._resume_updates({"size": 64, "resume": "LATEST"})


def test_gpu_switches_travel_in_model_args_and_are_applied_on_the_node(lmdb_plain, state_dir):
    """--allow-tf32 / --cudnn-benchmark: researcher flags -> model_args -> torch.backends on the node."""
    import train

    parser = train.build_parser()
    assert not train._config_from_args(parser.parse_args([])).allow_tf32
    cfg = train._config_from_args(parser.parse_args(["--allow-tf32", "--cudnn_benchmark"]))
    assert cfg.allow_tf32 and cfg.cudnn_benchmark and cfg.to_model_args()["allow_tf32"] is True
    argv = ["--resume", "--no-allow-tf32"]
    explicit = vars(train.build_parser(suppress=True).parse_args(argv))
    model_up, _, _, _ = train._resume_updates(explicit)
    assert model_up == {"allow_tf32": False}
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    try:
        _round(lmdb_plain, 1, allow_tf32=True, cudnn_benchmark=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
        _round(lmdb_plain, 1, run_id="test2")
        assert not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
        assert not torch.backends.cudnn.benchmark
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.deterministic) = saved


def test_sampling_and_averaging_follow_site_identity_not_node_ids():
    """The same sites under fresh random node ids (a new deployment) get the same schedule (issue 19)."""
    from robustmedseg.federation.strategy import SampleAtMostK

    sites = ("site0", "site1", "site2", "site3")

    def schedule(ids):
        keys = dict(zip(ids, sites))
        s = SampleAtMostK(max_nodes=2, seed=3, site_keys=keys)
        return [[keys[n] for n in s.sample_nodes(list(reversed(ids)), r)] for r in range(12)], s, keys

    first, _, _ = schedule(["NODE_c", "NODE_a", "NODE_d", "NODE_b"])
    second, s, keys = schedule(["NODE_9", "NODE_7", "NODE_8", "NODE_1"])
    assert first == second and len({tuple(p) for p in first}) > 1
    # without site keys the draw follows the ids' order, which differs between the two deployments
    plain = [SampleAtMostK(2, seed=3).sample_nodes(["NODE_9", "NODE_7", "NODE_8", "NODE_1"], r) for r in range(12)]
    assert [[keys[n] for n in p] for p in plain] != first
    # the replies are averaged in site order, whatever order they arrived in
    s2 = SampleAtMostK(max_nodes=4, seed=0, site_keys=keys)
    nodes = s2.sample_nodes(list(keys), 0)
    replies = {n: {"success": True, "node_id": n, "params": {}, "sample_size": 1} for n in reversed(nodes)}
    params, weights, _, _ = s2.refine(replies, 0)
    assert [keys[n] for n in params] == list(sites) == [keys[n] for n in weights]


def test_site_keys_are_dataset_names_and_seed_node_streams():
    from robustmedseg.factory import state
    from robustmedseg.federation.researcher import site_keys

    class Data:  # what Experiment.training_data() answers: node id -> dataset entry
        def __init__(self, entries):
            self.entries = entries

        def data(self):
            return self.entries

    class Exp:
        def __init__(self, entries):
            self._data = Data(entries)

        def training_data(self):
            return self._data

    keys = site_keys(Exp({"NODE_x": {"name": "site0"}, "NODE_y": {"name": "site1"}, "NODE_z": {"name": "site1"}}))
    assert keys == {"NODE_x": "site0", "NODE_y": "site1@NODE_y", "NODE_z": "site1@NODE_z"}
    # a node seeds its stream from its site, not from its id: the same site under another id, same seed
    assert state.node_seed(0, state.site_of(keys, "NODE_x")) == state.node_seed(0, state.site_of({"NODE_q": "site0"}, "NODE_q"))
    assert state.node_seed(0, "site0") != state.node_seed(0, "site1") != state.node_seed(1, "site1")
    assert state.site_of({}, "NODE_x") == "NODE_x"
    with pytest.raises(ValueError, match="site_keys"):
        FactoryConfig.from_model_args({"site_keys": {"NODE_x": ""}})
