"""Per-domain fidelity of a data factory, measured offline (no ImageNet/Inception weights).

The question a multi-centric data factory must answer is "does the image generated under the
condition (domain d, z-bin b) look like a real slice of site d at height b?".  This module
answers it with a small **evaluator** network trained on real slices of every site:

1. :func:`train_evaluator` trains :class:`SliceClassifier` (a small CNN with two heads: domain and
   z-bin) on the real training slices of all sites, and measures it on held-out real volumes:
   ``real.domain_accuracy`` (must be high, otherwise the sites cannot be told apart and the
   factory cannot be judged on them), ``real.zbin_accuracy`` and ``real.zbin_within1``.
   It also stores, per domain, the penultimate-layer features of the held-out real slices, split
   in two halves *by volume* (A, B), and the **real-vs-real KID** ``KID(A, B)``.
2. :func:`score_generator` draws, per domain, as many generated slices as half A holds, with the
   z-bins of the real slices of that half, and reports

   * ``domain_accuracy``: fraction of generated slices the evaluator assigns to their
     **conditioned** domain (chance = 1/n_domains);
   * ``zbin_accuracy`` / ``zbin_within1``: the same for the conditioned z-bin (exact / ±1 bin);
   * ``kid[d]``: kernel inception distance (unbiased MMD², cubic polynomial kernel) between
     generated features and real half B, next to ``kid_real[d]`` = KID(A, B).  A generator that
     matches the site has ``kid[d]`` close to ``kid_real[d]``.

The evaluator is a measuring instrument, not part of the method, and no node runs it: it sits
beside the node-side ``robustmedseg.factory`` package, below its users (the demo, the benchmarks and
the researcher's per-round score, ``robustmedseg.federation.researcher``).  It needs real slices of every
site to be trained, so in a real federation it is either trained federatedly or supplied by the
sites; here (demo, benchmarks) it is trained on the pooled phantom.  The researcher-side use in
``train.py --fidelity-evaluator FILE`` needs no image at all: the file holds the network weights
and, per domain, feature vectors and z-bin counts of held-out real slices (see docs/phase1.md).

File format (``torch.save``, loadable with ``weights_only=True``)::

    {"format": "robustmedseg-fidelity/1", "config": {...}, "state_dict": {...},
     "reference": {"features": (N, F), "domains": (N,), "zbins": (N,), "halves": (N,)},
     "real": {... held-out accuracies, "kid_real": {domain: value}}, "sources": [...]}

CLI: ``python -m robustmedseg.fidelity train|score --help``.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model import N_ZBINS
from robustmedseg.errors import CliParser, InputError, run_cli
from robustmedseg.io import load_torch_file, save_torch_atomic, write_text_atomic

FORMAT = "robustmedseg-fidelity/1"


# ------------------------------------------------------------------------------------------ network
@dataclass
class EvaluatorConfig:
    size: int = 32
    n_domains: int = 3
    n_zbins: int = N_ZBINS
    width: int = 16
    feat_dim: int = 128


class SliceClassifier(nn.Module):
    """Small CNN: (B, 1, S, S) in [-1, 1] -> (domain logits, z-bin logits, features (B, feat_dim)).

    Blocks of two 3x3 convs + LeakyReLU + 2x average pooling down to 4x4 px, then a linear layer to
    ``feat_dim`` features (the space of the KID) and two linear heads.  No normalisation layers, so
    a prediction never depends on the rest of the batch.
    """

    def __init__(self, cfg: EvaluatorConfig):
        super().__init__()
        if cfg.size < 8 or cfg.size & (cfg.size - 1):
            raise ValueError(f"evaluator size must be a power of two >= 8, got {cfg.size}")
        self.cfg = cfg
        layers: List[nn.Module] = []
        ch_in, ch, res = 1, cfg.width, cfg.size
        while res > 4:
            layers += [nn.Conv2d(ch_in, ch, 3, padding=1), nn.LeakyReLU(0.2),
                       nn.Conv2d(ch, ch, 3, padding=1), nn.LeakyReLU(0.2), nn.AvgPool2d(2)]
            ch_in, ch, res = ch, min(2 * ch, 4 * cfg.width), res // 2
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(ch_in * 16, cfg.feat_dim)
        self.domain_head = nn.Linear(cfg.feat_dim, cfg.n_domains)
        self.zbin_head = nn.Linear(cfg.feat_dim, cfg.n_zbins)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.fc(self.body(x).flatten(1)), 0.2)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.domain_head(f), self.zbin_head(f), f


# ------------------------------------------------------------------------------------------ data
@dataclass
class RealSlices:
    """Real slices of one or more folders: images (N, 1, S, S), domain, z-bin and volume key."""

    images: torch.Tensor
    domains: torch.Tensor
    zbins: torch.Tensor
    volumes: List[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @staticmethod
    def concat(parts: Sequence["RealSlices"]) -> "RealSlices":
        return RealSlices(torch.cat([p.images for p in parts]), torch.cat([p.domains for p in parts]),
                          torch.cat([p.zbins for p in parts]), [v for p in parts for v in p.volumes])


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    if img.shape[-1] == size:
        return img
    return F.interpolate(img, size=(size, size), mode="area" if img.shape[-1] > size else "bilinear",
                         align_corners=None if img.shape[-1] > size else False)


def load_slice_folder(folder: Path, domain: int, size: int, n_zbins: int) -> RealSlices:
    """Every ``<volume>_slice<NNN>.npz`` under ``folder`` (recursive), z-bins by rank within volume."""
    from robustmedseg.data.slices import list_slices, load_slice
    from robustmedseg.data.zbins import parse_slice_name, zbins_for_files

    folder = Path(folder)
    paths = sorted(list_slices(folder, recursive=True))
    if not paths:
        raise InputError("no '<volume>_slice<NNN>.npz' files in this folder", folder)
    bins = zbins_for_files(paths, n_zbins)
    images = [torch.from_numpy(np.asarray(load_slice(p)["data"], dtype=np.float32)[..., 0])[None] for p in paths]
    vols = [f"{domain}:{parse_slice_name(p)[0]}" for p in paths]
    imgs = _resize(torch.stack(images), size)
    return RealSlices(imgs, torch.full((len(paths),), int(domain), dtype=torch.long),
                      torch.as_tensor(bins, dtype=torch.long), vols)


# ------------------------------------------------------------------------------------------ metrics
def kid(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² with the kernel k(a, b) = (a·b / d + 1)³ (the KID of Bińkowski et al.)."""
    x, y = x.double(), y.double()
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        return float("nan")
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


@torch.no_grad()
def classify(net: SliceClassifier, images: torch.Tensor, batch: int = 256
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted domains, predicted z-bins, features) of ``images`` in eval mode."""
    net.eval()
    doms, zbs, feats = [], [], []
    for start in range(0, images.shape[0], batch):
        d, z, f = net(images[start:start + batch])
        doms.append(d.argmax(1))
        zbs.append(z.argmax(1))
        feats.append(f)
    return torch.cat(doms), torch.cat(zbs), torch.cat(feats)


def accuracies(pred_d: torch.Tensor, pred_z: torch.Tensor, domains: torch.Tensor, zbins: torch.Tensor,
               n_domains: int) -> Dict[str, Any]:
    """Domain / z-bin accuracies, overall and per domain (mean over domains for the overall domain figure)."""
    ok_d = (pred_d == domains).float()
    ok_z = (pred_z == zbins).float()
    ok_z1 = ((pred_z - zbins).abs() <= 1).float()
    per = {}
    for d in range(n_domains):
        sel = domains == d
        if bool(sel.any()):
            per[str(d)] = {"domain_accuracy": float(ok_d[sel].mean()), "zbin_accuracy": float(ok_z[sel].mean()),
                           "zbin_within1": float(ok_z1[sel].mean()), "n": int(sel.sum())}
    per_zbin = {}  # z-bin accuracy of each conditioned (or true) z-bin, e.g. the vertex and base bins
    for z in sorted(set(zbins.tolist())):
        sel = zbins == z
        per_zbin[str(int(z))] = {"zbin_accuracy": float(ok_z[sel].mean()), "zbin_within1": float(ok_z1[sel].mean()),
                                 "n": int(sel.sum())}
    confusion = torch.zeros(n_domains, n_domains, dtype=torch.long)
    for t, p in zip(domains.tolist(), pred_d.tolist()):
        confusion[t, p] += 1
    return {"domain_accuracy": float(np.mean([v["domain_accuracy"] for v in per.values()])) if per else float("nan"),
            "zbin_accuracy": float(ok_z.mean()), "zbin_within1": float(ok_z1.mean()), "per_domain": per,
            "per_zbin": per_zbin, "confusion": confusion.tolist()}


def volume_halves(volumes: Sequence[str]) -> torch.Tensor:
    """0/1 per slice: volumes (sorted by key) alternate between half A (0) and half B (1)."""
    order = {v: i % 2 for i, v in enumerate(sorted(set(volumes)))}
    return torch.as_tensor([order[v] for v in volumes], dtype=torch.long)


# ------------------------------------------------------------------------------------------ training
def _augment(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random integer translation (±shift px, padding -1 = background) and left-right flip per sample."""
    b, _, s, _ = x.shape
    pad = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    out = torch.stack([pad[i, :, int(dy[i]):int(dy[i]) + s, int(dx[i]):int(dx[i]) + s] for i in range(b)])
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def train_classifier(train: RealSlices, cfg: EvaluatorConfig, steps: int = 800, batch: int = 64,
                     lr: float = 3e-3, seed: int = 0, zbin_weight: float = 0.5,
                     log: Optional[Any] = None) -> SliceClassifier:
    """Train :class:`SliceClassifier` on ``train`` (cross-entropy on domain + ``zbin_weight`` x z-bin)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = SliceClassifier(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    # balanced over domains: each domain contributes equally to every batch in expectation
    weights = torch.zeros(len(train))
    for d in train.domains.unique():
        sel = train.domains == d
        weights[sel] = 1.0 / float(sel.sum())
    net.train()
    for step in range(steps):
        idx = torch.multinomial(weights, batch, replacement=True, generator=gen)
        x = _augment(train.images[idx], gen)
        d_logit, z_logit, _ = net(x)
        loss = F.cross_entropy(d_logit, train.domains[idx]) + zbin_weight * F.cross_entropy(z_logit, train.zbins[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step + 1) % max(1, steps // 5) == 0:
            log(f"  evaluator step {step + 1}/{steps}: loss {float(loss.detach()):.3f}")
    net.eval()
    return net


def train_evaluator(train: RealSlices, heldout: RealSlices, cfg: EvaluatorConfig, steps: int = 800,
                    batch: int = 64, seed: int = 0, lr: float = 3e-3, log: Optional[Any] = None) -> Dict[str, Any]:
    """Train the evaluator, measure it on ``heldout`` and build the evaluator payload (see module doc)."""
    for name, part in (("training", train), ("held-out", heldout)):
        missing = sorted(set(range(cfg.n_domains)) - set(part.domains.unique().tolist()))
        if missing:
            raise InputError(f"the {name} slices of the evaluator have no slice of domain(s) {missing}")
    net = train_classifier(train, cfg, steps=steps, batch=batch, lr=lr, seed=seed, log=log)
    pred_d, pred_z, feats = classify(net, heldout.images)
    # KID is not scale invariant: features are divided by their RMS over the held-out real slices
    feature_scale = float(1.0 / feats.pow(2).mean().sqrt().clamp_min(1e-12))
    feats = feats * feature_scale
    real = accuracies(pred_d, pred_z, heldout.domains, heldout.zbins, cfg.n_domains)
    halves = volume_halves(heldout.volumes)
    kid_real = {}
    for d in range(cfg.n_domains):
        sel = heldout.domains == d
        a, b = feats[sel & (halves == 0)], feats[sel & (halves == 1)]
        kid_real[str(d)] = kid(a, b)
    real["kid_real"] = kid_real
    real["n_heldout_volumes"] = len(set(heldout.volumes))
    real["n_train_slices"] = len(train)
    return {"format": FORMAT, "config": asdict(cfg), "state_dict": {k: v.clone() for k, v in net.state_dict().items()},
            "reference": {"features": feats.float().clone(), "domains": heldout.domains.clone(),
                          "zbins": heldout.zbins.clone(), "halves": halves, "feature_scale": feature_scale},
            "real": real, "train": {"steps": steps, "batch": batch, "lr": lr, "seed": seed}}


# ------------------------------------------------------------------------------------------ evaluator
class Evaluator:
    """A trained evaluator file: the network plus the held-out real reference."""

    def __init__(self, payload: Mapping[str, Any], path: Optional[Path] = None):
        if payload.get("format") != FORMAT:
            raise InputError(f"not a fidelity evaluator file (format {payload.get('format')!r}, expected {FORMAT})",
                             path)
        self.path = path
        self.cfg = EvaluatorConfig(**payload["config"])
        self.net = SliceClassifier(self.cfg)
        self.net.load_state_dict(payload["state_dict"])
        self.net.eval().requires_grad_(False)
        ref = payload["reference"]
        self.features, self.domains = ref["features"], ref["domains"]
        self.zbins, self.halves = ref["zbins"], ref["halves"]
        self.feature_scale = float(ref.get("feature_scale", 1.0))
        self.real: Dict[str, Any] = dict(payload["real"])
        self.payload = payload

    @classmethod
    def load(cls, path: Path) -> "Evaluator":
        path = Path(path)
        return cls(load_torch_file(path, "fidelity evaluator file", mapping=True), path)

    def save(self, path: Path) -> None:
        save_torch_atomic(dict(self.payload), path)

    def check_generator(self, g: nn.Module) -> None:
        for name in ("n_domains", "n_zbins"):
            if int(getattr(g, name)) != int(getattr(self.cfg, name)):
                raise InputError(f"generator has {name} = {getattr(g, name)} but the fidelity evaluator was trained "
                                 f"with {getattr(self.cfg, name)}", self.path)

    @torch.no_grad()
    def score(self, g: nn.Module, n_per_domain: Optional[int] = None, seed: int = 0, batch: int = 64,
              encoding: Optional[Mapping[int, torch.Tensor]] = None) -> Dict[str, Any]:
        """Fidelity of generator ``g`` (see module doc).  ``n_per_domain`` None: the size of half A."""
        self.check_generator(g)
        device = next(g.parameters()).device
        # the generator draws its per-layer noise from the global stream: seed it too (and leave the
        # caller's stream as it was), so that the same generator always gets the same score
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            return self._score(g, n_per_domain, seed, batch, encoding, device)

    def _score(self, g: nn.Module, n_per_domain: Optional[int], seed: int, batch: int,
               encoding: Optional[Mapping[int, torch.Tensor]], device: torch.device) -> Dict[str, Any]:
        gen = torch.Generator().manual_seed(seed)
        was_training = g.training
        g.eval()
        preds_d, preds_z, conds_d, conds_z = [], [], [], []
        kids: Dict[str, float] = {}
        for d in range(self.cfg.n_domains):
            sel = self.domains == d
            ref_a = self.zbins[sel & (self.halves == 0)]
            ref_b = self.features[sel & (self.halves == 1)]
            n = int(n_per_domain or len(ref_a))
            pool = ref_a if len(ref_a) else self.zbins[sel]
            zb = pool[torch.randint(0, len(pool), (n,), generator=gen)]
            images = []
            for start in range(0, n, batch):
                bz = zb[start:start + batch]
                z = torch.randn(len(bz), g.style_dim, generator=gen).to(device)
                c = g.condition(d, bz.to(device))
                e = None
                if encoding is not None and d in encoding and encoding[d] is not None:
                    e = encoding[d].to(device).float().reshape(1, -1).expand(len(bz), -1)
                img, _ = g([z], (c, e), randomize_noise=True)
                images.append(_resize(img.float().cpu().clamp(-1, 1), self.cfg.size))
            images_t = torch.cat(images)
            pd, pz, feats = classify(self.net, images_t)
            preds_d.append(pd)
            preds_z.append(pz)
            conds_d.append(torch.full((n,), d, dtype=torch.long))
            conds_z.append(zb)
            kids[str(d)] = kid(feats * self.feature_scale, ref_b)
        g.train(was_training)
        out = accuracies(torch.cat(preds_d), torch.cat(preds_z), torch.cat(conds_d), torch.cat(conds_z),
                         self.cfg.n_domains)
        out["kid"] = kids
        out["kid_real"] = dict(self.real.get("kid_real", {}))
        out["real_domain_accuracy"] = float(self.real["domain_accuracy"])
        out["relative_domain_accuracy"] = out["domain_accuracy"] / max(out["real_domain_accuracy"], 1e-9)
        return out


def scalar_summary(score: Mapping[str, Any]) -> Dict[str, float]:
    """Flat ``name -> value`` view of :meth:`Evaluator.score` (for TensorBoard and tables)."""
    flat = {"domain_accuracy": score["domain_accuracy"], "zbin_accuracy": score["zbin_accuracy"],
            "zbin_within1": score["zbin_within1"]}
    for d, v in score.get("kid", {}).items():
        flat[f"kid_domain{d}"] = v
    for d, v in score.get("per_domain", {}).items():
        flat[f"domain_accuracy_domain{d}"] = v["domain_accuracy"]
    return flat


# ------------------------------------------------------------------------------------------ CLI
def _domain_folder(text: str) -> Tuple[int, Path]:
    domain, sep, folder = text.partition("=")
    if not sep or not domain.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected DOMAIN=FOLDER (e.g. 0=prep/site0/train), got {text!r}")
    return int(domain), Path(folder)


def build_parser() -> CliParser:
    p = CliParser(prog="python -m robustmedseg.fidelity",
                  description="Per-domain fidelity of a data factory: train the evaluator on real "
                              "slices, then score generators (domain / z-bin accuracy, KID).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the evaluator on real slices and measure it on held-out volumes")
    t.add_argument("--train", type=_domain_folder, action="append", required=True, metavar="D=FOLDER",
                   help="training slices of domain D (folder of <volume>_slice<NNN>.npz, searched recursively); repeat")
    t.add_argument("--heldout", type=_domain_folder, action="append", required=True, metavar="D=FOLDER",
                   help="held-out volumes of domain D (accuracy and the KID reference); repeat")
    t.add_argument("--out", type=Path, required=True, help="evaluator file to write (.pt)")
    t.add_argument("--size", type=int, default=32, help="image side the evaluator works at (= generator size)")
    t.add_argument("--n-zbins", type=int, default=N_ZBINS, help=f"number of z-bins (default {N_ZBINS})")
    t.add_argument("--steps", type=int, default=800, help="training steps (default 800)")
    t.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    t.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, cosine-annealed (default 3e-3)")
    t.add_argument("--width", type=int, default=16, help="channels of the first block (default 16)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", type=Path, default=None, help="also write the held-out measurements as JSON")
    s = sub.add_parser("score", help="score a generator file with a trained evaluator")
    s.add_argument("--evaluator", type=Path, required=True, help="evaluator file written by 'train'")
    s.add_argument("--generator", type=Path, required=True, help="final_global_model.pt (its g_ema is scored)")
    s.add_argument("--n", type=int, default=None, help="generated slices per domain (default: size of half A)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", type=Path, default=None, help="write the scores as JSON")
    return p


def _fmt_score(score: Mapping[str, Any], real: Mapping[str, Any]) -> str:
    lines = [f"domain accuracy {score['domain_accuracy']:.3f} (real held-out {real['domain_accuracy']:.3f}), "
             f"z-bin accuracy {score['zbin_accuracy']:.3f} (±1: {score['zbin_within1']:.3f}; real "
             f"{real['zbin_accuracy']:.3f} / {real['zbin_within1']:.3f})"]
    for d, v in score["per_domain"].items():
        lines.append(f"  domain {d}: accuracy {v['domain_accuracy']:.3f}, KID {score['kid'][d]:.4f} "
                     f"(real vs real {real.get('kid_real', {}).get(d, float('nan')):.4f})")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        cfg = EvaluatorConfig(size=args.size, n_domains=1 + max(d for d, _ in args.train + args.heldout),
                              n_zbins=args.n_zbins, width=args.width)
        t0 = time.time()
        train = RealSlices.concat([load_slice_folder(f, d, cfg.size, cfg.n_zbins) for d, f in args.train])
        held = RealSlices.concat([load_slice_folder(f, d, cfg.size, cfg.n_zbins) for d, f in args.heldout])
        payload = train_evaluator(train, held, cfg, steps=args.steps, batch=args.batch, seed=args.seed, lr=args.lr,
                                  log=lambda m: print(m, flush=True))
        payload["sources"] = {"train": [f"{d}={f}" for d, f in args.train],
                              "heldout": [f"{d}={f}" for d, f in args.heldout]}
        save_torch_atomic(payload, args.out)
        real = payload["real"]
        print(f"evaluator -> {args.out} ({time.time() - t0:.0f} s): held-out real domain accuracy "
              f"{real['domain_accuracy']:.3f}, z-bin accuracy {real['zbin_accuracy']:.3f} (±1: "
              f"{real['zbin_within1']:.3f}); KID real vs real "
              + ", ".join(f"d{d} {v:.4f}" for d, v in real["kid_real"].items()))
        if args.json is not None:
            write_text_atomic(args.json, json.dumps(real, indent=2) + "\n")
        return 0
    from robustmedseg.factory_file import load_factory_file

    ev = Evaluator.load(args.evaluator)
    g, _ = load_factory_file(args.generator)
    score = ev.score(g, n_per_domain=args.n, seed=args.seed)
    print(_fmt_score(score, ev.real))
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(score, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
