"""Secure aggregation end to end on real Fed-BioMed 6.4.1 nodes over 127.0.0.1 (slow: ~2-3 min on 2 cores).

One local federation, 3 nodes (one per phantom site); node ``site2`` requires secure aggregation
(``force_secure_aggregation``). One test, in steps that share the federation:

1. plain ``train.py``, 1 round, a seed whose round 1 samples two nodes other than site2;
2. ``train.py --secagg``, same seed, 2 rounds, then ``--resume`` +1 round in a new process
   (2 of 3 nodes per round; a new key setup for every new node set and on the resume);
   ``save_global_model.py`` exports the result;
3. the global model after round 1 equals the plain run's within the quantisation bound
   ``clip / 8192``; a node's masked reply, read as if it were its update, is nowhere near that
   node's trained weights (the plain run's reply of the same node: the node rounds are
   reproducible, same seed and same initial model), while the sum of the replies decodes to the
   global model;
4. a plain experiment that samples site2 stops with one error line that names it and says --secagg.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

from builders import FACTORY_TINY_FLAGS as _BASE_FLAGS  # noqa: E402
from builders import REPO, subprocess_env as _env  # noqa: E402  (the same subprocess environment)

TINY_FLAGS = _BASE_FLAGS + ["--min-nodes", "3", "--num_updates_per_round", "8"]
FORCED = "site2"


@pytest.fixture(scope="module")
def federation(preprocessed_sites, tmp_path_factory):
    from robustmedseg.data.lmdb_store import PrepareOptions, prepare_lmdb
    from robustmedseg.federation.local import LocalFederation

    root = tmp_path_factory.mktemp("secfed")
    datasets = {}
    for site, folder in sorted(preprocessed_sites.items()):
        out = root / f"lmdb_site{site}"
        prepare_lmdb(PrepareOptions(source=folder / "train", out=out, label=site, sizes=(32,), clip_model=None,
                                    recursive=True, progress=False))
        datasets[f"site{site}"] = out
    fed = LocalFederation(root / "federation", threads=1, secagg_required={FORCED})
    try:
        fed.up(datasets, timeout=240)
        yield fed
    finally:
        fed.stop()


def _train(fed, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train.py"), "--researcher-dir", str(fed.researcher_root),
           "--workdir", str(workdir), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _seed(ids: List[str], forced: str, in_first_round: bool, sites: Dict[str, str]) -> int:
    """A sampling seed whose round 1 includes (or not) ``forced`` and whose 3 first rounds each use
    a new node set (so that every round needs a new key setup). ``sites``: the researcher's site keys."""
    from robustmedseg.federation.strategy import SampleAtMostK

    for seed in range(1000):
        rounds = [SampleAtMostK(2, seed=seed, site_keys=sites).sample_nodes(sorted(ids), r) for r in range(3)]
        if (forced in rounds[0]) == in_first_round and rounds[0] != rounds[1] != rounds[2]:
            return seed
    raise AssertionError("no suitable seed")


def _breakpoint(workdir: Path, round_: int):
    from robustmedseg.federation.export import find_breakpoint, load_breakpoint_params

    info = json.loads((workdir / "run.json").read_text())
    folder, state_file = find_breakpoint(None, Path(info["breakpoints"][round_ - 1]))
    params, state = load_breakpoint_params(folder, state_file)
    return params, state, info


def _flat(params: Dict[str, torch.Tensor], keys) -> torch.Tensor:
    return torch.cat([torch.as_tensor(params[k]).double().flatten() for k in keys])


def test_secure_aggregation_schedule_privacy_and_refusal(federation, tmp_path):
    from fedbiomed.common.serializer import Serializer

    from robustmedseg.factory.config import FactoryConfig
    from robustmedseg.federation import secagg as codec
    from robustmedseg.federation.researcher import initial_global_state

    fed = federation
    ids = [n.node_id for n in fed.manifest.nodes]
    forced_id = fed.node(FORCED).node_id
    sites = {n.node_id: n.name for n in fed.manifest.nodes}  # the dataset names, as the researcher reads them
    seed = _seed(ids, forced_id, in_first_round=False, sites=sites)

    # 1-2. plain and secure runs from the same seed, then a resume and the export
    plain_dir, secure_dir = tmp_path / "plain", tmp_path / "secure"
    plain = _train(fed, plain_dir, *TINY_FLAGS, "--rounds", "1", "--seed", str(seed))
    assert plain.returncode == 0, plain.stderr[-3000:]
    secure = _train(fed, secure_dir, *TINY_FLAGS, "--rounds", "2", "--seed", str(seed), "--secagg",
                    "--keep-breakpoints", "0")
    assert secure.returncode == 0, secure.stderr[-3000:]
    assert "secure aggregation: LOM" in secure.stdout and "round 2/2" in secure.stdout
    # a stage-2-like resume: new schedule flags, secure aggregation kept from the breakpoint
    resumed = _train(fed, secure_dir, "--resume", "--rounds", "3", "--num_updates_per_round", "4", "--min-nodes", "3",
                     "--keep-breakpoints", "0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed experiment" in resumed.stdout and "round 3/3" in resumed.stdout
    assert "secure aggregation: LOM" in resumed.stdout  # kept from the breakpoint

    info = json.loads((secure_dir / "run.json").read_text())
    assert info["round_current"] == 3 and info["secagg"]["active"] and info["secagg"]["weighting"] == "uniform"
    assert info["training_args"]["num_updates"] == 4
    assert all(len(info["sampled"][r]) == 2 for r in ("0", "1", "2"))
    assert forced_id in info["sampled"]["1"] or forced_id in info["sampled"]["2"]  # the forced node trained
    # a new Diffie-Hellman key set for every round here: new node set in rounds 2 and 3, resume in 3
    dh_ids = []
    for r in (1, 2, 3):
        _, state, _ = _breakpoint(secure_dir, r)
        secagg_state = state["secagg"]["attributes_states"]["_SecureAggregation__secagg"]
        dh_ids.append(secagg_state["attributes"]["_dh"]["arguments"]["secagg_id"])
        replies = state["training_replies"][str(r - 1)]
        assert all(rep["encrypted"] and rep["sample_size"] == 1 for rep in replies.values())  # uniform weights
    assert len(set(dh_ids)) == 3

    out = tmp_path / "final_global_model.pt"
    export = subprocess.run([sys.executable, str(REPO / "save_global_model.py"), "--researcher-dir",
                             str(fed.researcher_root), "--out", str(out)], env=_env(), capture_output=True, text=True)
    assert export.returncode == 0, export.stderr[-2000:]
    from robustmedseg.factory_file import load_factory_file

    assert torch.load(out, weights_only=True)["meta"]["round"] == 3
    exported = load_factory_file(out)[0].state_dict()
    last, _, _ = _breakpoint(secure_dir, 3)
    assert all(torch.equal(v, last[f"g_ema.{k}"]) for k, v in exported.items())

    # 3. round 1: secure global model == plain global model within the quantisation bound
    plain_params, plain_state, _ = _breakpoint(plain_dir, 1)
    secure_params, secure_state, _ = _breakpoint(secure_dir, 1)
    cfg = FactoryConfig.from_model_args(info["model_args"])
    keys = list(initial_global_state(cfg))
    start = _flat(initial_global_state(cfg), keys)
    p, s = _flat(plain_params, keys), _flat(secure_params, keys)
    bound = codec.resolution(cfg.secagg_clip) + 4 * torch.finfo(torch.float32).eps * p.abs()
    assert info["sampled"]["0"] == json.loads((plain_dir / "run.json").read_text())["sampled"]["0"]
    assert bool(((s - p).abs() <= bound).all()), (s - p).abs().max()
    assert (p - start).abs().max() > 10 * codec.resolution(cfg.secagg_clip)  # the round did move the model

    # what the researcher received from each node vs that node's trained weights (its plain reply)
    own = {n: Serializer.load(r["params_path"]) for n, r in plain_state["training_replies"]["0"].items()}
    masked = {n: Serializer.load(r["params_path"]) for n, r in secure_state["training_replies"]["0"].items()}
    assert set(own) == set(masked) and len(masked) == 2
    for node, reply in masked.items():
        y = np.asarray(reply, dtype=np.uint64)
        assert y.size == p.numel()
        assert (y < codec.TARGET_RANGE).mean() < 1e-3  # hardly any entry is even a valid code
        as_update = torch.from_numpy(cfg.secagg_clip * (2.0 * y.astype(np.float64) / codec.TARGET_RANGE - 1.0))
        node_update = _flat({k: torch.as_tensor(v) for k, v in own[node].items()}, keys) - start
        assert (as_update - node_update).abs().median() > 1e6
        assert abs(np.corrcoef(as_update.numpy(), node_update.numpy())[0, 1]) < 0.05
    summed = codec.decode_mean(codec.unmask_sum(masked.values()), len(masked), cfg.secagg_clip)
    assert ((start + torch.from_numpy(summed)).float().double() - s).abs().max() == 0

    # 4. a node that requires secure aggregation refuses a plain experiment, in one line
    refusal_seed = _seed(ids, forced_id, in_first_round=True, sites=sites)
    refused = _train(fed, tmp_path / "refused", *TINY_FLAGS, "--rounds", "1", "--seed", str(refusal_seed))
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, refused.stderr[-2000:]
    assert FORCED in errors[0] and forced_id in errors[0] and "requires secure aggregation" in errors[0]
    assert "--secagg" in errors[0]
