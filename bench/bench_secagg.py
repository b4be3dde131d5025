"""Benchmark: secure aggregation (``train.py --secagg``, Fed-BioMed LOM) against the plain federation.

1. Weight ranges of the paper's model (512 px, channel multiplier 2): why the codec sends the
   change of a round and not the weights.
2. Per-round change of the stored values on one node (in-process node rounds, ``--updates`` and
   ``--long-updates`` updates): what ``--secagg-clip`` must cover.
3. Cost per value of the codec (node: encode + Fed-BioMed's quantise/weight/mask; researcher:
   unmask + decode) on ``--values`` values, extrapolated linearly to the paper model's state dict;
   Joye-Libert's encryption cost per value for comparison.
4. One local federation of 3 real nodes, the same seed twice: ``train.py`` plain, then
   ``train.py --secagg`` (same sampled nodes each round, same initial model, reproducible node
   rounds). Per-round wall time (median of rounds 2..R) and process time; the global model after
   round 1 of both runs: max and relative difference (the quantisation error).

Usage: ``python -m bench.bench_secagg [--updates 200] [--rounds 4] [--md FILE]``.
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
import torch

from bench.bench_federation import make_lmdbs, model_flags
from robustmedseg.cli import CliParser
from robustmedseg.errors import run_cli
from robustmedseg.factory.config import FactoryConfig
from robustmedseg.factory.network import FactoryModel
from robustmedseg.federation import secagg as codec

REPO = Path(__file__).resolve().parents[1]


PAPER_VALUES: List[int] = []


def weight_ranges() -> List[str]:
    torch.manual_seed(0)
    model = FactoryModel(FactoryConfig())
    names = dict(model.named_parameters())
    groups: Dict[str, List[torch.Tensor]] = {}
    for key, value in model.state_dict().items():
        if key.startswith("g_ema."):
            continue  # a copy of the generator at initialisation
        if key not in names:
            group = "buffers (blur kernels, fixed noise maps)"
        elif key.startswith("generator.style."):
            group = "G mapping network weights (lr_mul 0.01)"
        elif key.endswith("bias"):
            group = "biases"
        else:
            group = "other G and D weights"
        groups.setdefault(group, []).append(value.flatten())
    total = sum(v.numel() for v in model.state_dict().values())
    PAPER_VALUES.append(total)
    lines = [f"paper model (512 px, G + D + G_ema): {total:,} values"]
    for group, parts in groups.items():
        flat = torch.cat(parts)
        lines.append(f"{group}: {flat.numel():,} values, max |w| {flat.abs().max():.3g}, std {flat.std():.3g}")
    return lines


def round_changes(args: argparse.Namespace, lmdb: Path, root: Path) -> List[str]:
    from robustmedseg.federation.inprocess import run_node_round
    from robustmedseg.federation.researcher import initial_global_state
    from training_plan import FactoryTrainingPlan

    os.environ["ROBUSTMEDSEG_NODE_STATE_DIR"] = str(root / "change_state")
    lines = []
    for updates in (args.updates, args.long_updates):
        if updates <= 0:
            continue
        model_args = {"size": args.size, "style_dim": args.latent, "n_mlp": 2, "channel_cap": args.cap,
                      "augment": True, "run_id": f"changes{updates}", "sample_every": 10 ** 6, "log_every": 50}
        training = {"num_updates": updates, "loader_args": {"batch_size": args.batch},
                    "optimizer_args": {"lr": 0.002}, "log_interval": 0}
        start = initial_global_state(FactoryConfig.from_model_args(model_args))
        _, after, _ = run_node_round(FactoryTrainingPlan, model_args, training, lmdb, node_id="site0", round_=0,
                                     params=start)
        parts = []
        for net in ("generator", "discriminator", "g_ema"):
            delta = torch.cat([(after[k].double() - start[k].double()).flatten() for k in start
                               if k.startswith(net + ".")]).abs()
            parts.append(f"{net} max {delta.max():.3f} (p99.99 {np.quantile(delta.numpy(), 0.9999):.3f}, "
                         f"median {delta.median():.4f})")
        lines.append(f"|change| of one node's values over one round of {updates} updates: " + "; ".join(parts))
    return lines


def codec_cost(n_values: int) -> List[str]:
    from fedbiomed.common.secagg import SecaggCrypter, SecaggLomCrypter
    from fedbiomed.common.utils import get_default_biprime

    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(n_values, generator=gen)}
    nodes = ["NODE_a", "NODE_b"]
    secret = os.urandom(32)
    replies, t_node = [], []
    for node in nodes:
        after = {"w": base["w"] + 0.05 * torch.randn(n_values, generator=gen)}
        t = time.perf_counter()
        codes = codec.NodeRound(1.0, "uniform", base).encode(after)
        flat = codes["w"].tolist()  # what TorchModel.flatten hands to the encrypter
        other = nodes[1 - nodes.index(node)]
        replies.append(SecaggLomCrypter(nonce="secagg_bench_0001").encrypt(
            current_round=1, node_id=node, params=flat, pairwise_secrets={other: secret}, node_ids=nodes,
            clipping_range=codec.FBM_CLIPPING_RANGE, weight=1))
        t_node.append(time.perf_counter() - t)
    import tracemalloc

    tracemalloc.start()  # peak memory of one node's encoding (Python lists dominate)
    codes = codec.NodeRound(1.0, "uniform", base).encode({"w": base["w"] + 0.01})
    SecaggLomCrypter(nonce="secagg_bench_0002").encrypt(
        current_round=1, node_id=nodes[0], params=codes["w"].tolist(), pairwise_secrets={nodes[1]: secret},
        node_ids=nodes, clipping_range=codec.FBM_CLIPPING_RANGE, weight=1)
    node_peak = tracemalloc.get_traced_memory()[1] / n_values
    tracemalloc.stop()
    t = time.perf_counter()
    mean = codec.decode_mean(codec.unmask_sum(replies), 2, 1.0)
    codec.apply_mean(base, mean)
    t_res = time.perf_counter() - t
    # what crosses the network and is written to the researcher's experiment folder, per reply
    from fedbiomed.common.serializer import Serializer

    t = time.perf_counter()
    blob_secure = Serializer.dumps(replies[0])
    Serializer.loads(blob_secure)
    t_ser_secure = time.perf_counter() - t
    t = time.perf_counter()
    blob_plain = Serializer.dumps({"w": base["w"]})
    Serializer.loads(blob_plain)
    t_ser_plain = time.perf_counter() - t
    blobs = [Serializer.dumps(r) for r in replies]
    tracemalloc.start()  # peak memory of the researcher: both replies parsed, unmasked, decoded
    codec.apply_mean(base, codec.decode_mean(codec.unmask_sum([Serializer.loads(b) for b in blobs]), 2, 1.0))
    res_peak = tracemalloc.get_traced_memory()[1] / n_values
    tracemalloc.stop()
    small = [float(x) for x in np.random.default_rng(0).normal(0, 0.1, 2000)]
    t = time.perf_counter()
    SecaggCrypter().encrypt(num_nodes=2, current_round=1, params=small, key=int.from_bytes(os.urandom(256), "big"),
                            biprime=get_default_biprime(), clipping_range=1, weight=1)
    t_jl = (time.perf_counter() - t) / len(small)
    node_us, res_us = 1e6 * statistics.mean(t_node) / n_values, 1e6 * t_res / n_values
    paper = PAPER_VALUES[0]
    return [
        f"codec cost on {n_values:,} values (this CPU, 1 thread): node {node_us:.2f} us/value (encode + Fed-BioMed "
        f"quantise, weight, LOM mask), researcher {res_us:.2f} us/value for 2 replies (unmask + decode)",
        f"one reply serialised + parsed (Fed-BioMed msgpack): {len(blob_secure) / n_values:.1f} bytes/value and "
        f"{1e6 * t_ser_secure / n_values:.2f} us/value masked, {len(blob_plain) / n_values:.1f} bytes/value and "
        f"{1e6 * t_ser_plain / n_values:.3f} us/value plain float32",
        f"extrapolated to the paper model ({paper:,} values): node +{node_us * paper / 1e6:.0f} s per round and "
        f"~{node_peak * paper / 1e9:.0f} GB peak memory ({node_peak:.0f} bytes/value, Python lists), "
        f"researcher +{res_us * paper / 1e6:.0f} s per round and ~{res_peak * paper / 1e9:.0f} GB peak memory, "
        f"serialisation "
        f"+{(t_ser_secure - t_ser_plain) / n_values * paper:.0f} s per reply; reply size "
        f"{len(blob_secure) / n_values * paper / 1e9:.2f} GB instead of {len(blob_plain) / n_values * paper / 1e9:.2f} GB",
        f"Joye-Libert (reachable in Fed-BioMed 6.4.1, no MP-SPDZ): encryption {1e6 * t_jl:.0f} us/value = "
        f"{t_jl / (node_us / 1e6):.0f}x LOM, ~{t_jl * paper / 3600:.1f} h per node and round at 512 px",
    ]


def federated(args: argparse.Namespace, lmdbs: Dict[str, Path], root: Path) -> Dict[str, Dict[str, object]]:
    from robustmedseg.federation.local import LocalFederation

    env = {k: v for k, v in os.environ.items() if not k.startswith("FBM_")}
    env.update(OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    out: Dict[str, Dict[str, object]] = {}
    with LocalFederation(root / "fed", threads=args.threads) as fed:
        fed.up(lmdbs, timeout=300)
        for mode, extra in (("plain", []), ("secagg", ["--secagg"])):
            work = root / f"work_{mode}"
            cmd = [sys.executable, str(REPO / "train.py"), "--researcher-dir", str(fed.researcher_root),
                   "--workdir", str(work), *model_flags(args), "--rounds", str(args.rounds),
                   "--num_updates_per_round", str(args.updates), "--min-nodes", "3", "--max-nodes-per-round", "2",
                   "--seed", str(args.seed), "--keep-breakpoints", "0", *extra]
            t = time.time()
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(f"train.py ({mode}) failed:\n{run.stderr[-3000:]}")
            found = re.findall(r"^round \d+/\d+\s+([\d.]+) s \(node training ([\d.]+) s\)", run.stdout, re.M)
            info = json.loads((work / "run.json").read_text())
            out[mode] = {"process_s": time.time() - t, "rounds_s": [float(a) for a, _ in found],
                         "train_s": [float(b) for _, b in found], "info": info}
    return out


def round1_error(runs: Dict[str, Dict[str, object]]) -> List[str]:
    from robustmedseg.federation.export import find_breakpoint, load_breakpoint_params
    from robustmedseg.federation.researcher import initial_global_state

    params = {}
    for mode, run in runs.items():
        folder, state_file = find_breakpoint(None, Path(run["info"]["breakpoints"][0]))
        params[mode] = load_breakpoint_params(folder, state_file)[0]
    cfg = FactoryConfig.from_model_args(runs["secagg"]["info"]["model_args"])
    start = initial_global_state(cfg)
    flat = {m: torch.cat([p[k].double().flatten() for k in start]) for m, p in params.items()}
    g = torch.cat([start[k].double().flatten() for k in start])
    diff = flat["secagg"] - flat["plain"]
    same_nodes = runs["secagg"]["info"]["sampled"]["0"] == runs["plain"]["info"]["sampled"]["0"]
    return [
        f"global model after round 1, secure vs plain (same nodes: {same_nodes}): max |difference| "
        f"{diff.abs().max():.3g} (bound clip/8192 = {codec.resolution(cfg.secagg_clip):.3g}, plus float32 "
        f"rounding), mean {diff.mean():.2g}",
        f"relative: ||secure - plain|| / ||plain round update|| = {diff.norm() / (flat['plain'] - g).norm():.2e}; "
        f"/ ||plain weights|| = {diff.norm() / flat['plain'].norm():.2e}",
    ]


def build_parser() -> CliParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=200, help="updates per round (default 200)")
    p.add_argument("--long-updates", type=int, default=2000,
                   help="also measure the change over one round of this many updates (0: skip; default 2000)")
    p.add_argument("--rounds", type=int, default=4, help="federated rounds per run; the first is warm-up (default 4)")
    p.add_argument("--size", type=int, default=32, help="image size (default 32)")
    p.add_argument("--latent", type=int, default=64, help="latent width (default 64)")
    p.add_argument("--cap", type=int, default=32, help="channel cap (default 32)")
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--threads", type=int, default=1, help="threads per node (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs (default 0)")
    p.add_argument("--values", type=int, default=2_000_000, help="values for the codec cost (default 2e6)")
    p.add_argument("--skip-federation", action="store_true", help="only parts 1-3")
    p.add_argument("--md", type=Path, default=None, help="also append the figures as markdown to this file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = weight_ranges()
    lines += codec_cost(args.values)
    with tempfile.TemporaryDirectory(prefix="bench_secagg_") as tmp:
        root = Path(tmp)
        lmdbs = make_lmdbs(root, args.size)
        lines += round_changes(args, lmdbs["site0"], root)
        if not args.skip_federation:
            runs = federated(args, lmdbs, root)
            steady = slice(1, None) if args.rounds > 1 else slice(0, None)
            med = {m: statistics.median(r["rounds_s"][steady]) for m, r in runs.items()}
            train = {m: statistics.median(r["train_s"][steady]) for m, r in runs.items()}
            lines += [
                f"federation: {args.updates} updates/round, {args.size} px, latent {args.latent}, cap {args.cap}, "
                f"batch {args.batch}, 3 nodes, 2 per round, seed {args.seed}, {args.rounds} rounds per run",
                f"round wall (median of rounds 2..{args.rounds}): plain {med['plain']:.2f} s, secagg "
                f"{med['secagg']:.2f} s = {100 * (med['secagg'] - med['plain']) / med['plain']:+.1f} % "
                f"(node training inside: {train['plain']:.2f} s / {train['secagg']:.2f} s); first round "
                f"{runs['plain']['rounds_s'][0]:.2f} s / {runs['secagg']['rounds_s'][0]:.2f} s",
                f"train.py process: plain {runs['plain']['process_s']:.0f} s, secagg {runs['secagg']['process_s']:.0f} s",
            ]
            lines += round1_error(runs)
    print("\n".join(lines))
    if args.md:
        cmd = "python -m bench.bench_secagg " + " ".join(sys.argv[1:])
        text = "## Phase 1: secure aggregation (`bench/bench_secagg.py`)\n\n" + "\n".join(f"- {ln}" for ln in lines)
        text += f"\n\nCommand: `OMP_NUM_THREADS={args.threads} {cmd}`\n"
        with open(args.md, "a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    run_cli(main)
