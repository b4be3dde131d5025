"""Benchmark the full phase-1 node update (robustmedseg.factory.trainer), regularisers and ADA included.

Times, in one process, the four kinds of update a node runs (regular D, D + lazy R1, regular G,
G + lazy path length), each as Fed-BioMed drives it (zero_grad, training_step, backward, step,
EMA), under three augmentation settings: ADA off (baseline), ADA on with p = 0 (the identity fast
path), ADA with a fixed p = 0.3 (geometric + colour pass on every D input, R1 through it). The
"cycle" column is the mean cost per update over one lazy-regularisation cycle (d_reg_every = 16,
g_reg_every = 4). Ratios are relative to the ADA-off baseline. Repetitions are interleaved and the minimum is kept
(robust on a shared machine).
Usage: ``python -m bench.bench_train_step [--size 64] [--cap 64] [--latent 128] [--batch 4] [--reps 3]``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from robustmedseg.cli import CliParser
from robustmedseg.errors import run_cli
from robustmedseg.factory.config import FactoryConfig
from robustmedseg.factory.network import FactoryModel
from robustmedseg.factory.optim import AlternatingAdam
from robustmedseg.factory.trainer import FactoryTrainer


def make_trainer(args: argparse.Namespace, augment: bool, p: float) -> FactoryTrainer:
    cfg = FactoryConfig.from_model_args({"size": args.size, "style_dim": args.latent, "n_mlp": 8,
                                         "channel_cap": args.cap, "augment": augment, "augment_p": p,
                                         "clip_dim": 16})
    torch.manual_seed(0)
    model = FactoryModel(cfg)
    opt = AlternatingAdam(model.discriminator.parameters(), model.generator.parameters(), 0.002,
                          cfg.d_reg_every, cfg.g_reg_every)
    return FactoryTrainer(model, opt, cfg)


# step index of each update kind: D regular (D index 1), D + R1 (D index 0), G regular, G + path length
KINDS = {"D": 2, "D+R1": 0, "G": 3, "G+PL": 1}


def time_update(trainer: FactoryTrainer, step: int, real: torch.Tensor, target: torch.Tensor) -> float:
    trainer.step = step
    t = time.perf_counter()
    trainer.opt.zero_grad()
    loss = trainer.training_step(real, target)
    loss.backward()
    trainer.opt.step()
    return time.perf_counter() - t


def bench_all(args: argparse.Namespace, settings: Dict[str, tuple]) -> Dict[str, Dict[str, float]]:
    """Interleaved repetitions (settings x kinds per repetition); the minimum over repetitions is kept,
    which is the least sensitive statistic on a shared machine."""
    trainers = {name: make_trainer(args, *spec) for name, spec in settings.items()}
    real = torch.tanh(torch.randn(args.batch, 1, args.size, args.size))
    target = torch.tensor([[0, i % 29] for i in range(args.batch)])
    times: Dict[str, Dict[str, list]] = {n: {k: [] for k in KINDS} for n in settings}
    for rep in range(args.reps + 1):  # repetition 0 warms up
        for name, trainer in trainers.items():
            for kind, step in KINDS.items():
                elapsed = time_update(trainer, step, real, target)
                if rep:
                    times[name][kind].append(elapsed)
    out = {}
    for name, trainer in trainers.items():
        cfg = trainer.cfg
        row = {k: min(v) for k, v in times[name].items()}
        d_cycle = ((cfg.d_reg_every - 1) * row["D"] + row["D+R1"]) / cfg.d_reg_every
        g_cycle = ((cfg.g_reg_every - 1) * row["G"] + row["G+PL"]) / cfg.g_reg_every
        row["cycle"] = (d_cycle + g_cycle) / 2
        out[name] = row
    return out


def build_parser() -> CliParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="image size (default 64)")
    p.add_argument("--cap", type=int, default=64, help="channel cap (default 64)")
    p.add_argument("--latent", type=int, default=128, help="latent width (default 128)")
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per update kind (default 3)")
    p.add_argument("--md", type=Path, default=None, help="append the table as markdown to this file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    rows = bench_all(args, {"ADA off": (False, 0.0), "ADA p=0": (True, 0.0), "ADA p=0.3": (True, 0.3)})
    base = rows["ADA off"]
    cols = ["D", "D+R1", "G", "G+PL", "cycle"]
    header = "| setting | " + " | ".join(f"{c} ms" for c in cols) + " | cycle vs ADA off |"
    lines = [header, "|" + "---|" * (len(cols) + 2)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{1000 * row[c]:.0f}" for c in cols)
                     + f" | {row['cycle'] / base['cycle']:.2f}x |")
    title = (f"size {args.size}, channel cap {args.cap}, latent {args.latent}, n_mlp 8, batch {args.batch}, "
             f"{torch.get_num_threads()} thread(s)")
    print(title)
    print("\n".join(lines))
    if args.md:
        cmd = "python -m bench.bench_train_step " + " ".join(sys.argv[1:])
        with open(args.md, "a") as handle:
            handle.write(f"## Phase 1: one node update (bench/bench_train_step.py)\n\n{title}\n\n" + "\n".join(lines)
                         + f"\n\nCommand: `{cmd}`\n\n")


if __name__ == "__main__":
    run_cli(main)
