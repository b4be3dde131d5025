"""Quality benchmark of phase 2 (not a test): source-only pretraining vs domain adaptation.

On the embedded phantom (``demo.phantom``): source = site 0 (T1, scanner A, fully labeled),
target = site 2 (PET-like).  Steps, all through the public CLIs' ``main`` functions:

1. generate the phantom (sites 0 and 2) and preprocess both sites at ``--size`` px; every
   target training volume goes to ``train/labeled`` and ``--one_target_slice`` keeps one
   labeled slice (the middle one) per target volume;
2. a phase-1 generator of the same size initialised locally (no phase-1 training here);
3. ``pretrain.py`` on site 0, then ``inference.py`` of that run on the site-2 test volumes
   (source-only baseline: the source head on target images);
4. ``train.py`` (adaptation 0 -> 2) from the pretraining run, then ``inference.py`` on the
   same test volumes (``_pred`` ensemble, also ``_intra`` and ``_inter``);
5. print per-class Dice on the original grid and write a markdown report (``--report``).

Targets (issue): adaptation >= source-only + 0.10 mean Dice and >= 0.80 mean GM/WM Dice.

    OMP_NUM_THREADS=1 python -m bench.bench_adaptation --work /tmp/bench_phase2 --report notes.md
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

import model
from demo.phantom import generate_phantom
from MultiMedSeg import inference as inference_cli
from MultiMedSeg import pretrain as pretrain_cli
from MultiMedSeg import train as train_cli
from MultiMedSeg.data.preprocessing import PreprocessConfig, _count, preprocess
from robustmedseg.errors import CliParser

SOURCE, TARGET = 0, 2
CLASS_NAMES = {"1": "GM", "2": "WM", "foreground": "brain"}


def build_parser() -> CliParser:
    p = CliParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="working folder (phantom, slices, runs; reused)")
    p.add_argument("--report", type=Path, default=None, help="markdown report to write")
    p.add_argument("--size", type=int, default=64, help="slice and generator size (px)")
    p.add_argument("--subjects", type=int, default=8, help="phantom subjects per site")
    p.add_argument("--spacing", type=float, default=3.0, help="phantom voxel size (mm)")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--adapt-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--encoder-depth", type=int, default=18)
    p.add_argument("--encoder-base-channels", type=int, default=16)
    p.add_argument("--style-dim", type=int, default=64)
    p.add_argument("--channel-cap", type=int, default=32)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--learning-rate", type=float, default=1e-4, help="encoder learning rate (paper 1e-4)")
    p.add_argument("--seed", type=int, default=0)
    return p


def prepare_data(a: argparse.Namespace) -> Dict[int, Path]:
    phantom = a.work / "phantom"
    if not phantom.exists():
        generate_phantom(phantom, seed=a.seed, n_subjects=a.subjects, spacing=a.spacing, sites=(SOURCE, TARGET))
    sites = {}
    for site in (SOURCE, TARGET):
        out = a.work / f"prep{a.size}" / f"site{site}"
        if not out.exists():
            n_train = a.subjects - _count(a.subjects, 0.2) - _count(a.subjects, 0.3)  # every target train volume
            preprocess(PreprocessConfig(
                images=phantom / f"site{site}" / "images", labels=phantom / f"site{site}" / "labels", out=out,
                size=a.size, num_classes=3, val_frac=0.2, test_frac=0.3, seed=a.seed,
                labeled_train=None if site == SOURCE else n_train, discard_outside_labels=True),
                log=lambda *x: None)
        sites[site] = out
    return sites


def make_generator(a: argparse.Namespace) -> Path:
    path = a.work / f"generator{a.size}.pt"
    if not path.exists():
        args = dict(size=a.size, style_dim=a.style_dim, n_mlp=2, n_domains=3, channel_multiplier=2,
                    channel_cap=a.channel_cap)
        torch.manual_seed(a.seed)
        g = model.Generator(**args)
        torch.save({"g_ema": g.state_dict(), "g": g.state_dict(), "d": {}, "args": args}, path)
    return path


def read_dice(metrics_csv: Path, branch: str) -> Dict[str, float]:
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r["prediction"] == branch]
    classes = sorted({r["class"] for r in rows})
    return {c: sum(float(r["dice"]) for r in rows if r["class"] == c) / max(1, sum(r["class"] == c for r in rows))
            for c in classes}


def run(label: str, main, argv: List[str], log: List[str], skip: bool = False) -> Optional[float]:
    """Log the equivalent command line and run ``main(argv)`` in-process (unless ``skip``: reused output)."""
    cmd = f"python MultiMedSeg/{label}.py " + " ".join(shlex.quote(x) for x in argv)
    log.append(cmd)
    print(f"$ {cmd}" + ("   # output exists, reused" if skip else ""), flush=True)
    if skip:
        return None
    t0 = time.time()
    main(argv)
    return time.time() - t0


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sites = prepare_data(a)
    gen = make_generator(a)
    runs = a.work / f"runs{a.size}_lr{a.learning_rate:g}"
    commands: List[str] = []
    common = ["--encoder_depth", str(a.encoder_depth), "--encoder_base_channels", str(a.encoder_base_channels),
              "--encoder_input_size", str(a.size), "--batch_size", str(a.batch_size), "--lpips_lambda", "0",
              "--start_from_latent_avg", "--label_nc", "3", "--device", "cpu", "--seed", str(a.seed),
              "--val_interval", str(a.val_every), "--board_interval", "50", "--image_interval", "200",
              "--latent_avg_samples", "10000", "--learning_rate", str(a.learning_rate)]
    times = {}
    pre = runs / f"pretrain{a.pretrain_steps}"  # reused by later runs with the same settings
    pre_argv = ["--exp_dir", str(pre), "--overwrite", "--source_data", str(sites[SOURCE]), "--stylegan_weights",
                str(gen), "--src_label", str(SOURCE), "--max_steps", str(a.pretrain_steps),
                "--feature_scale_rate", str(2.0 / a.pretrain_steps), *common]
    times["pretrain"] = run("pretrain", pretrain_cli.main, pre_argv, commands,
                            skip=(pre / "checkpoints" / "best.json").exists())
    ada = runs / f"adapt{a.adapt_steps}_from{a.pretrain_steps}"
    ada_argv = ["--exp_dir", str(ada), "--overwrite", "--source_data", str(sites[SOURCE]), "--target_data",
                str(sites[TARGET]), "--checkpoint_dir", str(pre), "--src_label", str(SOURCE), "--tgt_label",
                str(TARGET), "--one_target_slice", "--max_steps", str(a.adapt_steps),
                "--feature_scale_rate", str(2.0 / a.adapt_steps), *common]
    times["adapt"] = run("train", train_cli.main, ada_argv, commands, skip=(ada / "checkpoints" / "best.json").exists())
    results = {}
    for name, folder in (("source_only", pre), ("adapted", ada)):
        out = runs / f"test_{folder.name}"
        run("inference", inference_cli.main, ["--exp_dir", str(out), "--overwrite", "--checkpoint_dir", str(folder),
                                              "--target_data", str(sites[TARGET]), "--ensemble_size", "5",
                                              "--device", "cpu"], commands)
        branches = ("intra",) if name == "source_only" else ("pred", "intra", "inter")
        results[name] = {b: read_dice(out / "metrics.csv", b) for b in branches}
    src = results["source_only"]["intra"]
    adp = results["adapted"]["pred"]
    mean = lambda d: (d["1"] + d["2"]) / 2  # noqa: E731 - mean GM/WM Dice
    lines = ["| model | GM Dice | WM Dice | mean GM/WM | brain Dice |", "|---|---|---|---|---|"]
    rows = [("source-only pretrain (intra)", src)] + [(f"adapted ({b})", results["adapted"][b])
                                                       for b in ("pred", "intra", "inter")]
    for title, d in rows:
        lines.append(f"| {title} | {d['1']:.3f} | {d['2']:.3f} | {mean(d):.3f} | {d['foreground']:.3f} |")
    gain = mean(adp) - mean(src)
    verdict = [f"- gain of the adapted ensemble over source-only: {gain:+.3f} mean Dice (target >= +0.10: "
               f"{'met' if gain >= 0.10 else 'NOT met'})",
               f"- adapted mean GM/WM Dice: {mean(adp):.3f} (target >= 0.80: {'met' if mean(adp) >= 0.80 else 'NOT met'})"]
    n_test = len(json.loads((sites[TARGET] / "metadata.json").read_text())["splits"]["test"])
    header = (f"Phantom {a.subjects} subjects/site at {a.spacing} mm, slices {a.size} px, source site {SOURCE} -> "
              f"target site {TARGET} (PET-like), {n_test} target test volumes, one labeled slice per target "
              f"training volume; pretrain {a.pretrain_steps} steps, adapt {a.adapt_steps} steps, batch "
              f"{a.batch_size}, encoder lr {a.learning_rate:g}, encoder IResNet-{a.encoder_depth}/{a.encoder_base_channels}, random-init generator "
              f"(style_dim {a.style_dim}, cap {a.channel_cap}), LPIPS off, CPU.  Dice on the original NIfTI grid.")
    text = "\n".join([header, "", *lines, "", *verdict, "",
                      "Wall times (s, this invocation; 2 shared CPU cores): "
                      + ", ".join(f"{k} {v:.0f}" if v is not None else f"{k} reused" for k, v in times.items()), "",
                      "Commands:", "```", " ".join(["OMP_NUM_THREADS=1 python -m bench.bench_adaptation",
                                                    *(argv if argv is not None else sys.argv[1:])]),
                      *commands, "```", ""])
    print(text)
    if a.report is not None:
        a.report.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
