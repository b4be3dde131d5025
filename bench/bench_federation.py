"""Benchmark: cost of Fed-BioMed federation vs the same training run locally in one process.

Federated: a local federation of 3 real Fed-BioMed nodes (127.0.0.1, one process each, 1 thread
each), ``train.py`` with 2 of 3 nodes sampled per round, ``--updates`` updates per round. The round
wall time is measured by ``train.py`` around ``Experiment.run_once()`` (request, node-side plan
instantiation and training, parameter transfer both ways, aggregation, breakpoint); the first
round (warm-up: imports and first plan on the nodes) is reported separately.

Local baseline, same process, same thread count: the same node round (same plan, model, data and
number of updates) run in-process by :func:`robustmedseg.federation.inprocess.run_node_round`.
The two sampled nodes train in parallel in the federation (one core each), so the federated round
is compared with ONE local node round (the critical path); the sequential cost of both node rounds
is printed too.

Overhead % = (federated round - local node round) / local node round. Target <= 15 %.
Usage: ``python -m bench.bench_federation [--updates 200] [--rounds 3] [--size 32] [--md FILE]``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from robustmedseg.cli import CliParser
from robustmedseg.errors import run_cli

REPO = Path(__file__).resolve().parents[1]


def make_lmdbs(root: Path, size: int, n_sites: int = 3, n_slices: int = 48) -> Dict[str, Path]:
    from robustmedseg.data.lmdb_store import PrepareOptions, prepare_lmdb

    out = {}
    for k in range(n_sites):
        src = root / f"slices{k}"
        src.mkdir(parents=True)
        rng = np.random.default_rng(k)
        for i in range(n_slices):
            data = np.tanh(rng.normal(size=(size, size, 1))).astype(np.float32)
            np.savez(src / f"vol{i // 16}_slice{i % 16:03d}.npz", data=data,
                     mask=np.eye(2, dtype=bool)[np.zeros((size, size), int)])
        out[f"site{k}"] = root / f"lmdb{k}"
        prepare_lmdb(PrepareOptions(source=src, out=out[f"site{k}"], label=k, sizes=(size,), clip_model=None,
                                    progress=False))
    return out


def model_flags(args: argparse.Namespace) -> List[str]:
    return ["--size", str(args.size), "--latent", str(args.latent), "--n_mlp", "2", "--channel-cap",
            str(args.cap), "--batch", str(args.batch), "--augment", "--sample-every", "100", "--log-every", "50"]


def federated(args: argparse.Namespace, lmdbs: Dict[str, Path], root: Path) -> Dict[str, object]:
    from robustmedseg.federation.local import LocalFederation

    env = {k: v for k, v in os.environ.items() if not k.startswith("FBM_")}
    env.update(OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    t0 = time.time()
    with LocalFederation(root / "fed", threads=args.threads) as fed:
        fed.up(lmdbs, timeout=300)
        up_s = time.time() - t0
        cmd = [sys.executable, str(REPO / "train.py"), "--researcher-dir", str(fed.researcher_root),
               "--workdir", str(root / "work"), *model_flags(args), "--rounds", str(args.rounds),
               "--num_updates_per_round", str(args.updates), "--min-nodes", "3", "--max-nodes-per-round", "2"]
        t1 = time.time()
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        total_s = time.time() - t1
    if run.returncode:
        raise SystemExit(f"train.py failed:\n{run.stderr[-3000:]}")
    found = re.findall(r"^round \d+/\d+\s+([\d.]+) s \(node training ([\d.]+) s\)", run.stdout, re.M)
    info = json.loads((root / "work" / "run.json").read_text())
    cpu = [max(r["node_cpu_s"].values()) for r in info["rounds"]]
    return {"up_s": up_s, "train_py_s": total_s, "rounds_s": [float(a) for a, _ in found],
            "node_train_s": [float(b) for _, b in found], "node_cpu_s": cpu}


def local(args: argparse.Namespace, lmdbs: Dict[str, Path], root: Path) -> List[float]:
    import torch

    from robustmedseg.federation.inprocess import run_node_round
    from training_plan import FactoryTrainingPlan

    torch.set_num_threads(args.threads)
    os.environ["ROBUSTMEDSEG_NODE_STATE_DIR"] = str(root / "local_state")
    model_args = {"size": args.size, "style_dim": args.latent, "n_mlp": 2, "channel_cap": args.cap,
                  "augment": True, "run_id": "bench", "sample_every": 100, "log_every": 50}
    training = {"num_updates": args.updates, "loader_args": {"batch_size": args.batch},
                "optimizer_args": {"lr": 0.002}, "log_interval": 0}
    times = []
    for r in range(args.rounds):
        site = f"site{r % len(lmdbs)}"
        t = time.time()
        run_node_round(FactoryTrainingPlan, model_args, training, lmdbs[site], node_id=site, round_=r)
        times.append(time.time() - t)
    return times


def build_parser() -> CliParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=200, help="updates per round (default 200)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds; the first is warm-up (default 3)")
    p.add_argument("--size", type=int, default=32, help="image size (default 32)")
    p.add_argument("--latent", type=int, default=64, help="latent width (default 64)")
    p.add_argument("--cap", type=int, default=32, help="channel cap (default 32)")
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--threads", type=int, default=1, help="threads per node and for the local run (default 1)")
    p.add_argument("--md", type=Path, default=None, help="also write the figures as markdown to this file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_fed_") as tmp:
        root = Path(tmp)
        lmdbs = make_lmdbs(root, args.size)
        loc = local(args, lmdbs, root)
        fed = federated(args, lmdbs, root)
    fed_rounds, node_train = fed["rounds_s"], fed["node_train_s"]
    if not fed_rounds:
        raise SystemExit("could not parse the round times printed by train.py")
    steady = slice(1, None) if len(fed_rounds) > 1 else slice(0, None)
    steady_fed = statistics.median(fed_rounds[steady])
    steady_train = statistics.median(node_train[steady])
    steady_cpu = statistics.median(fed["node_cpu_s"][steady])
    steady_loc = statistics.median(loc[1:]) if len(loc) > 1 else loc[0]
    overhead = 100.0 * (steady_fed - steady_loc) / steady_loc
    comm = 100.0 * (steady_fed - steady_train) / steady_train
    lines = [
        f"setup: {args.updates} updates/round, {args.size} px, latent {args.latent}, channel cap {args.cap}, "
        f"batch {args.batch}, ADA on, {args.threads} thread(s) per node; 3 nodes, 2 sampled per round",
        f"local node round (in-process, median of rounds 2..{len(loc)}): {steady_loc:.2f} s "
        f"({1000 * steady_loc / args.updates:.0f} ms/update); first round {loc[0]:.2f} s",
        f"local, both sampled nodes sequentially: {2 * steady_loc:.2f} s",
        f"federated round (median of rounds 2..{len(fed_rounds)}): {steady_fed:.2f} s; first round {fed_rounds[0]:.2f} s",
        f"slowest sampled node's own training time inside the round (Fed-BioMed reply timing): {steady_train:.2f} s "
        f"wall, {steady_cpu:.2f} s CPU",
        f"federation machinery (round wall - node training: request, plan set-up, transfers, aggregation, "
        f"breakpoint): {steady_fed - steady_train:.2f} s = {comm:+.1f} % of node training (target <= 15 %)",
        f"round wall vs one local in-process node round: {overhead:+.1f} % (includes CPU contention: the 2 "
        f"sampled nodes train at the same time on this box)",
        f"one-off costs: federation up {fed['up_s']:.0f} s, train.py process total {fed['train_py_s']:.0f} s "
        f"(researcher start-up + node discovery included)",
    ]
    print("\n".join(lines))
    if args.md:
        cmd = "python -m bench.bench_federation " + " ".join(sys.argv[1:])
        text = "## Phase 1: federation overhead (bench/bench_federation.py)\n\n" + "\n".join(f"- {ln}" for ln in lines)
        text += f"\n\nCommand: `OMP_NUM_THREADS={args.threads} {cmd}` (2-core CPU box, shared with other jobs).\n"
        args.md.parent.mkdir(parents=True, exist_ok=True)
        with open(args.md, "a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    run_cli(main)
