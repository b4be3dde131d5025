"""End-to-end phase 1 on real Fed-BioMed 6.4.1 nodes over 127.0.0.1 (slow: ~3-4 min on 2 cores).

One local federation (3 nodes, one per phantom site, LMDBs made by the real ``prepare_data.py``)
is shared by the tests of this module, which run in order:

1. ``train.py`` 2 rounds with 2-of-3 sampling; ``train.py --resume`` +2 rounds in a new researcher
   process keeping 1 breakpoint (no plan copy piles up, and the plan's source stays readable after
   the breakpoint it was loaded from is pruned); ``save_global_model.py``; the export loads strictly
   into ``model.Generator``.
2. Training-plan approval is on at every node: an edited plan is refused, in one line naming the
   nodes; a node-side exception reaches the researcher as one line with the node's own message;
   neither leaves an experiment folder.
3. A sampled node is SIGKILLed mid-round: the researcher exits non-zero with one line naming the
   node; ``--resume`` completes the round with the remaining nodes.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from builders import FACTORY_TINY_FLAGS as TINY_FLAGS
from builders import REPO, subprocess_env as _env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation(preprocessed_sites, tmp_path_factory):
    from robustmedseg.federation.local import LocalFederation

    root = tmp_path_factory.mktemp("fed")
    datasets = {}
    for site, folder in sorted(preprocessed_sites.items()):
        slices = folder / "train" if any((folder / "train").glob("*.npz")) else folder / "train" / "unlabeled"
        out = root / f"lmdb_site{site}"
        subprocess.run([sys.executable, str(REPO / "prepare_data.py"), str(slices), "--out", str(out), "--size", "32",
                        "--label", str(site), "--clip-model", "none", "--quiet"], check=True, env=_env())
        datasets[f"site{site}"] = out
    fed = LocalFederation(root / "federation", threads=1)
    try:
        fed.up(datasets, timeout=240)
        yield fed
    finally:
        fed.stop()


def _researcher(fed, workdir: Path, *args: str, wait: bool = True):
    cmd = [sys.executable, str(REPO / "train.py"), "--researcher-dir", str(fed.researcher_root),
           "--workdir", str(workdir), *args]
    if not wait:
        return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _run_info(workdir: Path) -> dict:
    return json.loads((workdir / "run.json").read_text())


def test_train_resume_export(federation, tmp_path):
    fed, work = federation, tmp_path / "work"
    ids = {n.node_id for n in fed.manifest.nodes}
    first = _researcher(fed, work, *TINY_FLAGS, "--rounds", "2", "--num_updates_per_round", "8",
                        "--min-nodes", "3", "--max-nodes-per-round", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "round 2/2" in first.stdout
    info = _run_info(work)
    first_id = info["experiment_id"]
    assert info["round_current"] == 2 and len(info["breakpoints"]) == 2
    for r in ("0", "1"):
        sampled = info["sampled"][r]
        assert len(sampled) == 2 == len(set(sampled)) and set(sampled) <= ids
    assert sorted(p.name for p in (work / "samples").iterdir()) == ["round_00001.png", "round_00002.png"]

    # new researcher process: +2 rounds from the latest breakpoint, keeping 1 breakpoint: the one the
    # plan was loaded from is pruned after round 3, and round 4 still reads the plan's source
    second = _researcher(fed, work, "--resume", "--rounds", "4", "--min-nodes", "3", "--keep-breakpoints", "1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed experiment" in second.stdout and "round 4/4" in second.stdout
    info = _run_info(work)
    assert info["round_current"] == 4 and len(info["breakpoints"]) == 1 and info["experiment_id"] == first_id
    assert all(len(set(info["sampled"][r])) == 2 for r in ("0", "1", "2", "3"))
    experiment = Path(info["experimentation_path"])
    assert len(list(experiment.glob("model_*.py"))) == 1  # one plan copy: the kept breakpoint's
    # node-local state persisted on the nodes that trained: one file per round they took part in (newest 2)
    run_id = info["model_args"]["run_id"]
    for node in fed.manifest.nodes:
        took_part = [int(r) for r in ("0", "1", "2", "3") if node.node_id in info["sampled"][r]]
        states = sorted((Path(node.root) / "var" / "robustmedseg" / run_id).glob("*/state_r*.pt"))
        assert [int(p.stem[-6:]) for p in states] == took_part[-2:]

    out = tmp_path / "final_global_model.pt"
    export = subprocess.run([sys.executable, str(REPO / "save_global_model.py"), "--researcher-dir",
                             str(fed.researcher_root), "--out", str(out)], env=_env(), capture_output=True, text=True)
    assert export.returncode == 0, export.stderr[-2000:]
    ckpt = torch.load(out, weights_only=True)
    assert set(ckpt) == {"g", "d", "g_ema", "args", "meta"} and ckpt["meta"]["round"] == 4
    from model import Discriminator, Generator, make_condition

    a = ckpt["args"]
    g = Generator(a["size"], style_dim=a["style_dim"], n_mlp=a["n_mlp"], n_domains=a["n_domains"],
                  channel_multiplier=a["channel_multiplier"], n_zbins=a["n_zbins"], clip_dim=a["clip_dim"],
                  channel_cap=a["channel_cap"])
    g.load_state_dict(ckpt["g_ema"], strict=True)
    d = Discriminator(a["size"], n_domains=a["n_domains"], channel_multiplier=a["channel_multiplier"],
                      n_zbins=a["n_zbins"], clip_dim=a["clip_dim"], channel_cap=a["channel_cap"],
                      style_dim=a["style_dim"])
    d.load_state_dict(ckpt["d"], strict=True)
    with torch.no_grad():
        img, _ = g([torch.randn(6, a["style_dim"])], make_condition([0, 1, 2] * 2, 14, a["n_domains"], a["n_zbins"]))
    assert img.shape == (6, 1, 32, 32) and torch.isfinite(img).all()


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and res.stderr.strip().splitlines()[-1] == errors[0], \
        res.stderr[-3000:]
    return errors[0]


def test_plan_approval_and_node_errors_are_one_line(federation, tmp_path):
    import configparser

    fed = federation
    for node in fed.manifest.nodes:  # the tool wrote approval ON and approved the project's plan by hash
        cfg = configparser.ConfigParser()
        cfg.read(Path(node.root) / "etc" / "config.ini")
        assert cfg["security"]["training_plan_approval"] == "True"
        assert cfg["security"]["allow_default_training_plans"] == "False"
    assert len(fed.manifest.approved_plan["hash"]) == 64
    experiments = fed.researcher_root / "var" / "experiments"
    before = sorted(p.name for p in experiments.iterdir()) if experiments.is_dir() else []
    flags = [*TINY_FLAGS, "--rounds", "1", "--num_updates_per_round", "2", "--min-nodes", "3",
             "--max-nodes-per-round", "3"]

    # an edited plan (one changed line in training_step) is refused by every node
    edited = tmp_path / "edited"
    edited.mkdir()
    source = (REPO / "training_plan.py").read_text()
    line = "        return self._session.trainer.training_step(data, target)\n"
    assert line in source
    (edited / "training_plan.py").write_text(source.replace(line, line.rstrip() + " * 1.0\n"))
    cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(edited)!r}); import train; "
           "train.cli(sys.argv[1:])", "--researcher-dir", str(fed.researcher_root), "--workdir",
           str(tmp_path / "w1"), *flags]
    error = _one_error_line(subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO))
    assert "has not approved this training plan" in error
    assert all(node.name in error and node.node_id in error for node in fed.manifest.nodes)

    # a node-side exception (data labelled 2 against --n_domains 2) names the node and its own message
    error = _one_error_line(_researcher(fed, tmp_path / "w2", *flags, "--n_domains", "2"))
    site2 = fed.node("site2")
    assert f"node {site2.name} ({site2.node_id})" in error and "domain indices must be in [0, 1]" in error
    assert "FB402" not in error and "rerun train.py without --resume" in error
    # neither run left an experiment folder (it would become the "latest experiment" of --resume)
    assert (sorted(p.name for p in experiments.iterdir()) if experiments.is_dir() else []) == before
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()


def _wait_for_task(log: Path, offset: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if "Task received" in log.read_bytes()[offset:].decode("utf-8", "replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"researcher ended before the round started: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError("the round never reached the node")


def test_node_killed_mid_round_then_resume(federation, tmp_path):
    from robustmedseg.federation.strategy import SampleAtMostK

    fed, work = federation, tmp_path / "work"
    first = _researcher(fed, work, *TINY_FLAGS, "--rounds", "1", "--num_updates_per_round", "2",
                        "--min-nodes", "3", "--seed", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    # round index 1 samples, with the same strategy stream, these nodes:
    nodes = sorted(n.node_id for n in fed.manifest.nodes)
    sites = {n.node_id: n.name for n in fed.manifest.nodes}  # the researcher's site keys: the dataset names
    victim_id = SampleAtMostK(2, seed=5, site_keys=sites).sample_nodes(nodes, 1)[0]
    victim = fed.node(victim_id)
    offset = Path(victim.log).stat().st_size
    proc = _researcher(fed, work, "--resume", "--rounds", "2", "--num_updates_per_round", "400",
                       "--min-nodes", "3", wait=False)
    try:
        _wait_for_task(Path(victim.log), offset, proc)
        time.sleep(1.5)
        fed.kill(victim.name, signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and victim.name in errors[0] and victim_id in errors[0], err[-2000:]
    assert "--resume" in errors[0]
    assert _run_info(work)["round_current"] == 1  # the failed round left no breakpoint

    again = _researcher(fed, work, "--resume", "--rounds", "2", "--num_updates_per_round", "4", "--min-nodes", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    info = _run_info(work)
    assert info["round_current"] == 2
    assert victim_id not in info["sampled"]["1"] and len(info["sampled"]["1"]) == 2
    fed.start([victim.name])  # leave the federation whole for any later test
