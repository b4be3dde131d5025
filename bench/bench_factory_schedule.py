"""Does the data factory learn every site? Central vs federated training of the SAME factory, in-process.

Separates the causes of a factory that does not learn the domains (issue 9): the same networks,
losses and update rule (:class:`robustmedseg.factory.trainer.FactoryTrainer`, one update = one D or
one G step) are trained

* ``--mode central``: one trainer on batches drawn from the union of the sites' LMDBs (every batch
  mixes domains; fakes use the real batch's conditions, as the federated update does);
* ``--mode federated``: the Fed-BioMed schedule simulated without gRPC: every round samples
  ``--nodes-per-round`` of the sites, each trains ``--updates`` updates from the global state with
  its own persistent node state (step counter, Adam moments, ADA), and the returned G/D/G_ema state
  dicts are averaged uniformly (FedAverage with uniform weights, as the paper).

Nodes of one round run one after the other in this process (same arithmetic as the real
federation, where they run in parallel).  Every ``--eval-every`` updates of the global model the
fidelity evaluator (:mod:`robustmedseg.fidelity`) scores ``g_ema`` (and the raw generator):
domain accuracy, z-bin accuracy, KID.  Output: a JSON trace (``--out``) with CPU time.

    OMP_NUM_THREADS=1 python -m bench.bench_factory_schedule --lmdb lmdb/site0 lmdb/site1 lmdb/site2 \\
        --evaluator evaluator.pt --mode central --total-updates 2400 --out central.json
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader

from robustmedseg.data.dataset import LMDBSlices
from robustmedseg.errors import CliParser, run_cli
from robustmedseg.factory.config import FactoryConfig
from robustmedseg.fidelity import Evaluator, scalar_summary
from robustmedseg.factory.network import FactoryModel
from robustmedseg.factory.optim import AlternatingAdam
from robustmedseg.factory.trainer import FactoryTrainer
from robustmedseg.io import save_torch_atomic, write_text_atomic


def build_parser() -> CliParser:
    p = CliParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lmdb", type=Path, nargs="+", required=True, help="one prepare_data.py LMDB folder per site")
    p.add_argument("--evaluator", type=Path, required=True, help="fidelity evaluator file")
    p.add_argument("--mode", choices=("central", "federated"), required=True)
    p.add_argument("--total-updates", type=int, default=2400,
                   help="central: updates; federated: rounds x updates (updates of the global model's timeline)")
    p.add_argument("--updates", type=int, default=100, help="federated: updates per round per node")
    p.add_argument("--nodes-per-round", type=int, default=2)
    p.add_argument("--average", choices=("uniform", "owned-domain-columns"), default="uniform",
                   help="DIAGNOSTIC ONLY (not the method): 'owned-domain-columns' averages the domain columns of "
                        "G's and D's label_embed only over the sampled node that owns that domain")
    p.add_argument("--eval-every", type=int, default=400, help="score g_ema every N updates of the timeline")
    p.add_argument("--eval-n", type=int, default=96, help="generated slices per domain per evaluation")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--style_dim", "--latent", dest="latent", type=int, default=64)
    p.add_argument("--n_mlp", type=int, default=2)
    p.add_argument("--channel-cap", type=int, default=32)
    p.add_argument("--lr-mlp", type=float, default=0.01)
    p.add_argument("--r1", type=float, default=10.0)
    p.add_argument("--mixing", type=float, default=0.9)
    p.add_argument("--g-reg-every", type=int, default=4, help="path length every N G updates (huge = off)")
    p.add_argument("--path-regularize", type=float, default=2.0)
    p.add_argument("--d-reg-every", type=int, default=16)
    p.add_argument("--augment", action="store_true")
    p.add_argument("--augment-p", type=float, default=0.0)
    p.add_argument("--ada-length", type=int, default=500_000)
    p.add_argument("--ada-every", type=int, default=256)
    p.add_argument("--ema-rampup", type=float, default=None, help="EMA half-life ramp-up (fraction of images seen)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="JSON trace to write")
    p.add_argument("--save", type=Path, default=None, help="write the final model as a final_global_model.pt")
    return p


def make_cfg(a: argparse.Namespace, n_domains: int) -> FactoryConfig:
    kw: Dict[str, Any] = dict(size=a.size, style_dim=a.latent, n_mlp=a.n_mlp, n_domains=n_domains,
                              channel_cap=a.channel_cap, lr_mlp=a.lr_mlp, r1=a.r1, mixing=a.mixing,
                              g_reg_every=a.g_reg_every, d_reg_every=a.d_reg_every,
                              path_regularize=a.path_regularize,
                              augment=a.augment, augment_p=a.augment_p, ada_length=a.ada_length,
                              ada_every=a.ada_every, seed=a.seed, n_sample=1, sample_every=10**9, log_every=10**9)
    if a.ema_rampup is not None and "ema_rampup" in FactoryConfig.__dataclass_fields__:
        kw["ema_rampup"] = a.ema_rampup
    return FactoryConfig(**kw)


def infinite(loader: DataLoader):
    while True:
        yield from loader


class Site:
    """A simulated node: its data and its persistent state between rounds."""

    def __init__(self, path: Path, size: int, batch: int, seed: int):
        self.data = LMDBSlices(path, size)
        gen = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(self.data, batch_size=batch, shuffle=True, drop_last=True, generator=gen)
        self.state: Optional[Dict[str, Any]] = None


def run_updates(model: FactoryModel, cfg: FactoryConfig, batches, n: int, lr: float,
                state: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``n`` Fed-BioMed-style updates (zero_grad, training_step, backward, step); returns the trainer state."""
    opt = AlternatingAdam(model.discriminator.parameters(), model.generator.parameters(), lr=lr,
                          d_reg_every=cfg.d_reg_every, g_reg_every=cfg.g_reg_every)
    trainer = FactoryTrainer(model, opt, cfg)
    if state is not None:
        trainer.load_state_dict(state)
    for _ in range(n):
        real, target = next(batches)
        opt.zero_grad()
        loss = trainer.training_step(real, target)
        loss.backward()
        opt.step()
    trainer._apply_pending_optimizer_state()
    return trainer.state_dict()


def evaluate(ev: Evaluator, model: FactoryModel, n: int, seed: int) -> Dict[str, Any]:
    out = {"g_ema": scalar_summary(ev.score(model.g_ema, n_per_domain=n, seed=seed))}
    out["g"] = scalar_summary(ev.score(model.generator, n_per_domain=n, seed=seed))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    ev = Evaluator.load(a.evaluator)
    cfg = make_cfg(a, n_domains=len(a.lmdb))
    model = FactoryModel(cfg)
    sites = [Site(p, a.size, a.batch, a.seed + i) for i, p in enumerate(a.lmdb)]
    trace: List[Dict[str, Any]] = []
    cpu0, wall0 = time.process_time(), time.time()

    def record(done: int, extra: Optional[Dict[str, Any]] = None) -> None:
        row = {"updates": done, "cpu_s": time.process_time() - cpu0, "wall_s": time.time() - wall0,
               **evaluate(ev, model, a.eval_n, a.seed), **(extra or {})}
        trace.append(row)
        dump()
        ge = row["g_ema"]
        print(f"[{a.mode}] {done:6d} updates  cpu {row['cpu_s']:7.0f} s  g_ema: domain acc {ge['domain_accuracy']:.3f} "
              f"z-bin acc {ge['zbin_accuracy']:.3f} (±1 {ge['zbin_within1']:.3f}) KID "
              + " ".join(f"{ge[k]:.3f}" for k in sorted(ge) if k.startswith("kid_"))
              + " per domain " + " ".join(f"{ge[f'domain_accuracy_domain{d}']:.2f}" for d in range(len(sites)))
              + f" | g: domain acc {row['g']['domain_accuracy']:.3f}" + (f" nodes {extra['nodes']}" if extra else ""),
              flush=True)

    def dump() -> None:
        result = {"args": vars(a), "trace": trace,
                  "real": {k: ev.real[k] for k in ("domain_accuracy", "zbin_accuracy", "zbin_within1", "kid_real")}}
        write_text_atomic(a.out, json.dumps(result, indent=1, default=str) + "\n")

    record(0)
    if a.mode == "central":
        gen = torch.Generator().manual_seed(a.seed)
        loader = DataLoader(ConcatDataset([s.data for s in sites]), batch_size=a.batch, shuffle=True,
                            drop_last=True, generator=gen)
        batches = infinite(loader)
        state = None
        done = 0
        while done < a.total_updates:
            n = min(a.eval_every, a.total_updates - done)
            state = run_updates(model, cfg, batches, n, a.lr, state)
            done += n
            record(done)
    else:
        rng = random.Random(a.seed)
        iters = [infinite(s.loader) for s in sites]
        rounds = a.total_updates // a.updates
        for r in range(rounds):
            chosen = sorted(rng.sample(range(len(sites)), min(a.nodes_per_round, len(sites))))
            global_state = {k: v.clone() for k, v in model.state_dict().items()}
            replies = []
            for k in chosen:
                model.load_state_dict(global_state)
                sites[k].state = run_updates(model, cfg, iters[k], a.updates, a.lr, sites[k].state)
                replies.append({k2: v.clone() for k2, v in model.state_dict().items()})
            avg = {key: sum(rep[key].float() for rep in replies) / len(replies) for key in global_state}
            if a.average == "owned-domain-columns":
                for key in avg:
                    if key.endswith("label_embed.weight"):
                        for k, rep in zip(chosen, replies):  # node k holds domain k only
                            avg[key][:, k] = rep[key][:, k].float()
            model.load_state_dict({k: avg[k].to(global_state[k].dtype) for k in avg})
            done = (r + 1) * a.updates
            if done % a.eval_every == 0 or r == rounds - 1:
                record(done, {"round": r + 1, "nodes": chosen})
    if a.save is not None:
        from robustmedseg.federation.export import build_export

        save_torch_atomic(build_export(model.state_dict(), {"model_args": cfg.to_model_args()}), a.save)
    return 0


if __name__ == "__main__":
    run_cli(main)
