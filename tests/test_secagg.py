"""Secure-aggregation codec (robustmedseg.federation.secagg) with Fed-BioMed's own LOM encrypter;
no nodes (the federation test is tests/test_secagg_e2e.py)."""
from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from robustmedseg.federation import secagg as codec

REPO = Path(__file__).resolve().parents[1]


def _encrypt(codes: Dict[str, torch.Tensor], node: str, nodes: List[str], secrets: Dict[tuple, bytes],
             weight: int, round_: int = 4, nonce: str = "secagg_0123456789") -> List[int]:
    """What Fed-BioMed 6.4.1 does on a node with the plan's output (flatten, quantise, weight, mask)."""
    from fedbiomed.common.secagg import SecaggLomCrypter

    flat = torch.cat([c.flatten() for c in codes.values()]).tolist()
    pairwise = {m: secrets[tuple(sorted((node, m)))] for m in nodes if m != node}
    return SecaggLomCrypter(nonce=nonce).encrypt(current_round=round_, node_id=node, params=flat,
                                                  pairwise_secrets=pairwise, node_ids=nodes,
                                                  clipping_range=codec.FBM_CLIPPING_RANGE, weight=weight)


@pytest.fixture
def federation_round():
    """A global model (wide-range, unit-range and constant tensors) and three nodes' updates (|change| < clip)."""
    gen = torch.Generator().manual_seed(0)
    global_ = {"mapping": torch.randn(400, generator=gen) * 100, "conv": torch.randn(30, 20, generator=gen),
               "kernel": torch.ones(4)}
    nodes = ["NODE_a", "NODE_b", "NODE_c"]
    trained = {n: {k: v + (0.1 * torch.randn(v.shape, generator=gen) if k != "kernel" else 0.0)
                   for k, v in global_.items()} for n in nodes}
    secrets = {tuple(sorted((a, b))): os.urandom(32) for a in nodes for b in nodes if a < b}
    return global_, nodes, trained, secrets


def _flat(params: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.double().flatten() for v in params.values()])


@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_secure_mean_matches_plain_mean(federation_round, weighting):
    global_, nodes, trained, secrets = federation_round
    clip = 1.0
    counts = {"NODE_a": 100, "NODE_b": 7, "NODE_c": 31} if weighting == "samples" else dict.fromkeys(nodes, 1)
    masked = []
    for node in nodes:
        round_ = codec.NodeRound(clip, weighting, global_)
        masked.append(_encrypt(round_.encode(trained[node]), node, nodes, secrets, counts[node]))
    total = sum(counts.values())
    mean = codec.decode_mean(codec.unmask_sum(masked), total, clip)
    secure = codec.apply_mean(global_, mean)
    plain = {k: sum(counts[n] * trained[n][k].double() for n in nodes) / total for k in global_}
    err = _flat(secure) - _flat(plain)
    bound = codec.resolution(clip) + 4 * torch.finfo(torch.float32).eps * _flat(plain).abs()
    assert bool((err.abs() <= bound).all())
    assert torch.equal(secure["kernel"], global_["kernel"])  # unchanged values are exact
    # rounding to the nearest level: no systematic shift (|mean error| << one level)
    conv_err = (secure["conv"].double() - plain["conv"]).flatten()
    assert abs(float(conv_err.mean())) < 0.1 * codec.resolution(clip)


def test_one_reply_reveals_nothing_and_wrong_masks_are_caught(federation_round):
    global_, nodes, trained, secrets = federation_round
    clip = 1.0
    replies = {n: _encrypt(codec.NodeRound(clip, "uniform", global_).encode(trained[n]), n, nodes, secrets, 1)
               for n in nodes}
    one = np.asarray(replies["NODE_a"], dtype=np.uint64)
    assert (one < codec.TARGET_RANGE).mean() < 1e-3
    with pytest.raises(codec.SecaggDecodeError, match="did not cancel"):
        codec.decode_mean(codec.unmask_sum([replies["NODE_a"], replies["NODE_b"]]), 2, clip)  # NODE_c missing
    stale = _encrypt(codec.NodeRound(clip, "uniform", global_).encode(trained["NODE_c"]), "NODE_c", nodes, secrets,
                     1, nonce="secagg_another_key")
    with pytest.raises(codec.SecaggDecodeError, match="did not cancel"):
        codec.decode_mean(codec.unmask_sum([replies["NODE_a"], replies["NODE_b"], stale]), 3, clip)
    with pytest.raises(codec.SecaggDecodeError, match="values"):
        codec.apply_mean(global_, np.zeros(3))


def test_changes_beyond_the_clip_are_clipped_and_counted():
    base = {"w": torch.zeros(8)}
    round_ = codec.NodeRound(0.5, "uniform", base)
    model = torch.nn.Module()
    model.register_buffer("w", torch.tensor([0.0, 0.1, -0.49, 0.6, -2.0, 0.0, 0.0, 0.0]))
    assert round_.clipped_fraction(model) == pytest.approx(2 / 8)
    codes = round_.encode(model.state_dict())["w"]
    assert float(codes.max()) <= 1.0 and float(codes.min()) >= -1.0


def test_uniform_weighting_reports_one_sample():
    class Plan:
        training_data_loader = type("Loader", (), {"dataset": list(range(40))})()

    plan = Plan()
    codec.NodeRound(1.0, "samples", {}).finish(plan)
    assert len(plan.training_data_loader.dataset) == 40  # Fed-BioMed's sample-count weights
    codec.NodeRound(1.0, "uniform", {}).finish(plan)
    assert len(plan.training_data_loader.dataset) == 1


def test_start_only_when_the_researcher_asks():
    model = torch.nn.Linear(2, 2)
    assert codec.NodeRound.start(model, {"secagg_clip": 0.0}) is None
    assert codec.NodeRound.start(model, {}) is None
    started = codec.NodeRound.start(model, {"secagg_clip": 0.25, "secagg_weighting": "samples"})
    assert started.clip == 0.25 and started.weighting == "samples"
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(started.base["weight"], model.weight)  # the received model was copied


def test_config_rejects_bad_secagg_settings():
    from robustmedseg.factory.config import FactoryConfig

    with pytest.raises(ValueError, match="secagg_clip"):
        FactoryConfig.from_model_args({"secagg_clip": -1.0})
    with pytest.raises(ValueError, match="secagg_weighting"):
        FactoryConfig.from_model_args({"secagg_weighting": "median"})


def test_node_security_settings_written(tmp_path):
    from robustmedseg.federation.local import set_node_security

    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "config.ini").write_text("[default]\nid = NODE_x\n\n[security]\nsecure_aggregation = False\n"
                                    "force_secure_aggregation = False\ntraining_plan_approval = False\n")
    set_node_security(tmp_path, secure_aggregation=True, force_secure_aggregation=True)
    cfg = configparser.ConfigParser()
    cfg.read(etc / "config.ini")
    assert cfg["security"]["secure_aggregation"] == "True"
    assert cfg["security"]["force_secure_aggregation"] == "True"
    assert cfg["security"]["training_plan_approval"] == "False" and cfg["default"]["id"] == "NODE_x"


@pytest.mark.parametrize("flags, message", [
    (["--secagg", "--max-nodes-per-round", "1"], "--max_nodes_per_round >= 2"),
    (["--secagg", "--secagg-clip", "0"], "--secagg_clip must be > 0"),
])
def test_train_rejects_unusable_secagg_flags(tmp_path, flags, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FBM_")}
    env["PYTHONPATH"] = str(REPO)
    run = subprocess.run([sys.executable, str(REPO / "train.py"), "--researcher-dir", str(tmp_path / "r"), *flags],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: {run.stderr.strip().splitlines()[-1][7:]}"]
    assert message in run.stderr
    assert not (tmp_path / "r").exists()  # nothing created before the flags were checked
