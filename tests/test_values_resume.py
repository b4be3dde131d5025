"""Resume equivalence and aggregation values.

* Phase 1, trainer level: N updates in one go equal N/2 updates, the node state written to disk and read
  back into fresh objects, then N/2 more -- weights, Adam moments and step counts, ADA, path-length mean.
* Phase 1, node rounds (in-process Fed-BioMed node): a round re-run after a researcher resume, from the
  breakpoint and the node state, in a process whose random stream is elsewhere, reproduces the
  uninterrupted round exactly (weights sent and node state saved).
* Phase 1 aggregation: the global model is the uniform mean of the node replies (Fed-BioMed's FedAverage
  with the weights of our strategy), whatever the nodes' dataset sizes.
* Phase 2: a run stopped at a checkpoint and resumed with ``--resume`` ends with the same weights and
  optimiser states as the run that was not stopped.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from robustmedseg.factory.config import FactoryConfig
from robustmedseg.factory.network import FactoryModel
from robustmedseg.factory.state import load_state, rng_state, save_state, set_rng_state
from robustmedseg.factory.trainer import FactoryTrainer
from builders import FACTORY_TINY as TINY
from builders import factory_trainer as _trainer, node_round as _round, write_slices as _write_slices

# ada_target -1 (the lowest valid target): p grows at every D update with one positive D(real), so the augmentation (and its state) matters
ADA = dict(augment=True, ada_every=1, ada_length=20, ada_target=-1.0, d_reg_every=2, g_reg_every=2)


def assert_same_tensors(a, b, what: str) -> None:
    """Recursive exact equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert set(a) == set(b), (what, set(a) ^ set(b))
        for k in a:
            assert_same_tensors(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{i}]")
    else:
        assert a == b, (what, a, b)


# ------------------------------------------------------------------------------------------ phase 1
def _drive(trainer: FactoryTrainer, batches) -> None:
    for real, target in batches:  # what Fed-BioMed does around training_step
        trainer.opt.zero_grad()
        trainer.training_step(real, target).backward()
        trainer.opt.step()


def test_phase1_node_state_round_trip_reproduces_uninterrupted_training(tmp_path):
    cfg = FactoryConfig.from_model_args({**TINY, **ADA, "run_id": "eq"})
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.tanh(torch.randn(4, 1, 16, 16, generator=gen)), torch.tensor([[1, i % 5] for i in range(4)]))
               for _ in range(8)]
    torch.manual_seed(11)
    init = FactoryModel(cfg).state_dict()

    torch.manual_seed(1)
    whole = _trainer(cfg, init)
    _drive(whole, batches)

    torch.manual_seed(1)
    first = _trainer(cfg, init)
    _drive(first, batches[:4])
    assert first.ada_p > 0 and first.opt.steps["d"] > 0  # ADA moved, R1 steps taken: the state matters
    save_state(tmp_path, 0, {"trainer": first.state_dict(), "rng": rng_state()})
    params = {k: v.clone() for k, v in first.model.state_dict().items()}  # what the node sends
    del first
    torch.manual_seed(999)  # another process: its own random stream
    random.seed(999)
    np.random.seed(999)
    second = _trainer(cfg, params)
    state = load_state(tmp_path, 1)
    set_rng_state(state["rng"])
    second.load_state_dict(state["trainer"])
    _drive(second, batches[4:])

    assert_same_tensors(whole.model.state_dict(), second.model.state_dict(), "weights")
    assert_same_tensors(whole.opt.state_dict(), second.opt.state_dict(), "optimizer")
    assert (whole.step, whole.ada_p, whole.mean_path_length) == (second.step, second.ada_p, second.mean_path_length)
    # Adam's step counts continue over the interruption: one per regular and per regulariser update
    d_steps = whole.counts["d"] + whole.counts["r1"]
    assert max(float(s["step"]) for s in second.opt.state_dict()["d"]["state"].values()) == d_steps == 6


@pytest.fixture(scope="module")
def node_data(tmp_path_factory) -> Path:
    from robustmedseg.data.lmdb_store import PrepareOptions, prepare_lmdb

    root = tmp_path_factory.mktemp("resume_data")
    out = root / "lmdb"
    prepare_lmdb(PrepareOptions(source=_write_slices(root / "slices", n_vol=2, n_slices=6, seed=4), out=out, label=1,
                                sizes=(16,), clip_model=None, progress=False))
    return out


def _node_state(directory: Path, round_: int) -> dict:
    state = torch.load(directory / f"state_r{round_:06d}.pt", weights_only=True)
    state.pop("rng")  # equal streams are checked through the weights of the next round
    return state


def test_phase1_round_rerun_after_a_resume_reproduces_the_round(node_data, tmp_path, monkeypatch):
    """Breakpoint after round 0; round 1 run once in the uninterrupted node, and again after the researcher
    resumed (new node process: another random stream when Fed-BioMed splits the dataset)."""
    from robustmedseg.factory.state import run_dir

    runs = {}
    for name in ("uninterrupted", "resumed"):
        monkeypatch.setenv("ROBUSTMEDSEG_NODE_STATE_DIR", str(tmp_path / name))
        torch.manual_seed(0)
        _, params0, _ = _round(node_data, 5, round_=0, **ADA)
        if name == "resumed":
            _round(node_data, 5, round_=1, params=params0, **ADA)  # round 1 ran, then the researcher died
            torch.manual_seed(12345)  # the restarted node process
        plan, params1, _ = _round(node_data, 5, round_=1, params=params0, **ADA)
        runs[name] = (params1, _node_state(run_dir("test", "NODE_t"), 1), plan._session)
    (a, state_a, session_a), (b, state_b, session_b) = runs["uninterrupted"], runs["resumed"]
    assert session_b.resumed_from == 0 and session_a.resumed_from == 0
    assert_same_tensors(a, b, "weights sent")
    assert_same_tensors(state_a, state_b, "node state")
    assert state_a["trainer"]["ada"]["p"] > 0


def test_phase1_aggregate_is_the_uniform_mean_of_the_node_replies(node_data, tmp_path, monkeypatch):
    from fedbiomed.researcher.aggregators import FedAverage

    from robustmedseg.federation.strategy import SampleAtMostK

    monkeypatch.setenv("ROBUSTMEDSEG_NODE_STATE_DIR", str(tmp_path / "state"))
    from robustmedseg.federation.inprocess import run_node_round
    from training_plan import FactoryTrainingPlan

    replies = {}
    for node, updates in (("NODE_a", 2), ("NODE_b", 6)):  # different amounts of data seen
        args = {**TINY, "run_id": "agg"}
        training = {"num_updates": updates, "loader_args": {"batch_size": 4}, "optimizer_args": {"lr": 0.002},
                    "log_interval": 0}
        _, params, seen = run_node_round(FactoryTrainingPlan, args, training, node_data, node_id=node)
        replies[node] = {"success": True, "node_id": node, "params": params, "sample_size": seen}
    strategy = SampleAtMostK(max_nodes=2, weighting="uniform")
    assert strategy.sample_nodes(list(replies), 0) == ["NODE_a", "NODE_b"]
    model_params, weights, _, _ = strategy.refine(replies, 0)
    assert weights == {"NODE_a": 0.5, "NODE_b": 0.5}
    aggregated = FedAverage().aggregate(model_params, weights)
    a, b = replies["NODE_a"]["params"], replies["NODE_b"]["params"]
    assert set(aggregated) == set(a)
    differs = 0
    for key, value in aggregated.items():
        if a[key].is_floating_point():
            torch.testing.assert_close(value, (a[key] + b[key]) / 2, rtol=0, atol=1e-6)
            differs += int(not torch.equal(a[key], b[key]))
    assert differs > 10  # the two nodes really sent different models


# ------------------------------------------------------------------------------------------ phase 2
@pytest.fixture(scope="module")
def phase2_data(tmp_path_factory) -> Path:
    from builders import tiny_generator_file as write_generator
    from builders import make_slices

    root = tmp_path_factory.mktemp("resume_phase2")
    for vid in ("a", "b"):
        make_slices(root / "train", vid, 4, size=32)  # 8 slices = 2 batches of 4: epochs end at even steps
    make_slices(root / "val", "v", 3, size=32)
    write_generator(root / "g.pt")
    return root


def _pretrain(root: Path, exp: Path, max_steps: int, resume: bool = False) -> None:
    from MultiMedSeg import pretrain as pretrain_cli
    from builders import MMS_TINY

    pretrain_cli.main((["--resume"] if resume else []) + [
        "--exp_dir", str(exp), "--source_root", str(root / "train"), "--val_root", str(root / "val"),
        "--stylegan_weights", str(root / "g.pt"), "--src_label", "0", "--lpips_lambda", "0", "--label_nc", "3",
        "--max_steps", str(max_steps), "--val_interval", "2", "--use_da", *MMS_TINY])


def test_phase2_resume_reproduces_the_uninterrupted_run(phase2_data, tmp_path):
    _pretrain(phase2_data, tmp_path / "whole", 4)
    _pretrain(phase2_data, tmp_path / "split", 2)
    stopped = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert stopped["global_step"] == 2 and stopped["optimizer"]["state"]  # moments to carry over
    torch.manual_seed(4321)  # the resumed process starts elsewhere
    _pretrain(phase2_data, tmp_path / "split", 4, resume=True)
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for key in ("state_dict", "optimizer", "optimizer_seg"):
        assert_same_tensors(a[key], b[key], key)
