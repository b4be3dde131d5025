"""Quality benchmark of phase 2 (not a test): the five reference rows of issue 9 on one target site.

Rows (all through the public CLIs' ``main`` functions, in-process; every run is reused when its
folder already holds a finished run, so settings can be compared cheaply):

1. **source only**: ``pretrain.py`` on the source site; its ``_intra`` prediction on the target;
2. **target only**: ``pretrain.py`` on the few labelled target slices that ``--one_target_slice``
   keeps (the middle informative slice of each labelled target volume), no source data;
3. **adapted, real source**: ``train.py`` from row 1 with the real source slices; ``_pred``;
4. **adapted, synthetic source**: ``generate_volumes.py`` from row 1, then ``train.py`` with the
   synthetic volumes as the only source data; ``_pred`` (``--synthetic``);
5. **target supervised**: ``pretrain.py`` on every labelled training volume of the target.

Data: a demo output folder (``--data``, e.g. ``demo_output``: ``prep/site<k>``,
``prep/site<t>_all_labels``, ``prep/site<t>_fewshot``, ``final_global_model.pt``) or, without
``--data``, a phantom prepared here.  ``--split val`` scores the validation volumes (use it to choose
settings), ``--split test`` the test volumes (report once).  Printed: per-class Dice and HD95 as mean
± sd over volumes, mean GM/WM Dice, the adapted runs' own branches, and **gap closed** =
(adapted − source only) / (target supervised − source only).  ``--json`` writes the numbers.

    OMP_NUM_THREADS=1 python -m bench.bench_adaptation --data demo_output --work /tmp/p2 --split val \\
        --bn-mode batch --ensemble-weights 0.4,0.6 --synthetic
"""
from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

import model
from MultiMedSeg.training.metrics import gap_closed, read_metrics_csv, volume_statistics
from robustmedseg.errors import CliParser, run_cli
from robustmedseg.factory_file import write_factory_file

SOURCE = 0
CLASSES = (("1", "GM"), ("2", "WM"))


def build_parser() -> CliParser:
    p = CliParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="working folder (runs; reused)")
    p.add_argument("--data", type=Path, default=None,
                   help="demo output folder with prep/ and final_global_model.pt (default: make a phantom in --work)")
    p.add_argument("--generator", type=Path, default=None,
                   help="phase-1 final_global_model.pt (default: DATA/final_global_model.pt, else a random-init one)")
    p.add_argument("--target", type=int, default=2)
    p.add_argument("--split", choices=("val", "test"), default="val", help="volumes scored (choose settings on val)")
    p.add_argument("--tag", default="", help="suffix of the run folders (to keep variants apart)")
    p.add_argument("--adapt-tag", default="", help="extra suffix of the adapted runs only (variants of the "
                   "adaptation that reuse the same pretraining runs)")
    p.add_argument("--size", type=int, default=32, help="slice and generator size (phantom mode)")
    p.add_argument("--subjects", type=int, default=16, help="phantom subjects per site (phantom mode)")
    p.add_argument("--spacing", type=float, default=5.0, help="phantom voxel size in mm (phantom mode)")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--adapt-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--encoder-depth", type=int, default=10)
    p.add_argument("--encoder-base-channels", type=int, default=16)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--n-best", type=int, default=3)
    p.add_argument("--learning-rate", type=float, default=1e-4, help="encoder learning rate (paper 1e-4)")
    p.add_argument("--bn-mode", choices=("running", "batch"), default="running")
    p.add_argument("--ensemble-weights", default="0.6,0.4", help="inter,intra weights of _pred (inference)")
    p.add_argument("--latent-avg-samples", type=int, default=1024)
    p.add_argument("--synthetic", action="store_true", help="also the synthetic-source row (generate_volumes.py)")
    p.add_argument("--n-volumes", type=int, default=6, help="synthetic volumes")
    p.add_argument("--slices-in-one-z", type=int, default=1)
    p.add_argument("--extra-adapt", default="", help="extra train.py flags (quoted), e.g. '--use_da'")
    p.add_argument("--adapt-learning-rate", type=float, default=None, help="encoder lr of train.py (default: --learning-rate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the numbers as JSON")
    p.add_argument("--report", type=Path, default=None, help="write a markdown report")
    return p


# ------------------------------------------------------------------------------------------ data
def phantom_data(a: argparse.Namespace) -> Path:
    """A demo-like data folder (prep/site0, prep/site<t>, _all_labels, _fewshot) made here."""
    from demo.fewshot import write_fewshot
    from demo.phantom import generate_phantom
    from MultiMedSeg.data.preprocessing import PreprocessConfig, preprocess

    root = a.work / f"data{a.size}"
    phantom = root / "data"
    if not phantom.exists():
        generate_phantom(phantom, seed=a.seed, n_subjects=a.subjects, spacing=a.spacing, sites=(SOURCE, a.target))
    jobs = [(SOURCE, "site0", None), (a.target, f"site{a.target}", 2), (a.target, f"site{a.target}_all_labels", None)]
    for site, name, labeled in jobs:
        out = root / "prep" / name
        if not out.exists():
            preprocess(PreprocessConfig(images=phantom / f"site{site}" / "images",
                                        labels=phantom / f"site{site}" / "labels", out=out, size=a.size,
                                        num_classes=3, val_frac=0.15, test_frac=0.25, seed=0, labeled_train=labeled,
                                        discard_outside_labels=True), log=lambda *x: None)
    few = root / "prep" / f"site{a.target}_fewshot"
    if not few.exists():
        write_fewshot(root / "prep" / f"site{a.target}" / "train" / "labeled", few, 3)
    return root


def generator_file(a: argparse.Namespace, data: Path) -> Path:
    if a.generator is not None:
        return a.generator
    if (data / "final_global_model.pt").is_file():
        return data / "final_global_model.pt"
    path = a.work / f"generator{a.size}_random.pt"
    if not path.exists():
        args = model.GeneratorArgs(size=a.size, style_dim=64, n_mlp=2, n_domains=3, channel_multiplier=2,
                                   channel_cap=32)
        torch.manual_seed(a.seed)
        g = model.Generator.from_args(args)
        write_factory_file(path, g, args)
    return path


# ------------------------------------------------------------------------------------------ runs
def run(label: str, main, argv: List[str], log: List[str], done: bool) -> Optional[float]:
    """Log the equivalent command line and run ``main(argv)`` in-process (unless ``done``: reused)."""
    cmd = f"python {label} " + " ".join(shlex.quote(str(x)) for x in argv)
    log.append(cmd)
    print(f"$ {cmd}" + ("   # output exists, reused" if done else ""), flush=True)
    if done:
        return None
    t0 = time.process_time()
    main([str(x) for x in argv])
    return time.process_time() - t0


def finished(folder: Path) -> bool:
    return (folder / "checkpoints" / "best.json").is_file()


def stats(metrics_csv: Path, branch: str) -> Dict[str, Any]:
    return volume_statistics(read_metrics_csv(metrics_csv, branch), CLASSES)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    from MultiMedSeg import inference as inference_cli
    from MultiMedSeg import pretrain as pretrain_cli
    from MultiMedSeg import train as train_cli

    a.work.mkdir(parents=True, exist_ok=True)
    data = a.data if a.data is not None else phantom_data(a)
    prep = data / "prep"
    t = a.target
    gen = generator_file(a, data)
    size = json.loads((prep / "site0" / "metadata.json").read_text())["size"]
    runs = a.work / "runs"
    tag = a.tag
    common = ["--encoder_depth", a.encoder_depth, "--encoder_base_channels", a.encoder_base_channels,
              "--encoder_input_size", size, "--batch_size", a.batch_size, "--lpips_lambda", 0,
              "--start_from_latent_avg", "--label_nc", 3, "--device", "cpu", "--seed", a.seed,
              "--val_interval", a.val_every, "--n_best", a.n_best, "--latent_avg_samples", a.latent_avg_samples,
              "--learning_rate", a.learning_rate, "--bn_mode", a.bn_mode, "--test_batch_size", 32]
    pre_rate = ["--feature_scale_rate", round(1.5 / a.pretrain_steps, 6), "--max_steps", a.pretrain_steps]
    log: List[str] = []
    cpu: Dict[str, Optional[float]] = {}
    folders = {"source_only": runs / f"source_only{tag}", "target_only": runs / f"target_only{tag}",
               "target_supervised": runs / f"target_supervised{tag}"}
    cpu["source_only"] = run("MultiMedSeg/pretrain.py", pretrain_cli.main, [
        "--exp_dir", folders["source_only"], "--overwrite", "--source_data", prep / "site0", "--stylegan_weights", gen,
        "--src_label", SOURCE, *pre_rate, *common], log, finished(folders["source_only"]))
    cpu["target_only"] = run("MultiMedSeg/pretrain.py", pretrain_cli.main, [
        "--exp_dir", folders["target_only"], "--overwrite", "--source_root", prep / f"site{t}_fewshot",
        "--val_root", prep / f"site{t}" / "val", "--stylegan_weights", gen, "--src_label", t, *pre_rate, *common],
        log, finished(folders["target_only"]))
    cpu["target_supervised"] = run("MultiMedSeg/pretrain.py", pretrain_cli.main, [
        "--exp_dir", folders["target_supervised"], "--overwrite", "--source_data", prep / f"site{t}_all_labels",
        "--stylegan_weights", gen, "--src_label", t, *pre_rate, *common], log, finished(folders["target_supervised"]))
    adapt = ["--target_data", prep / f"site{t}", "--checkpoint_dir", folders["source_only"], "--src_label", SOURCE,
             "--tgt_label", t, "--one_target_slice", "--max_steps", a.adapt_steps,
             "--feature_scale_rate", round(1.5 / a.adapt_steps, 6), *common, *shlex.split(a.extra_adapt)]
    if a.adapt_learning_rate is not None:
        adapt += ["--learning_rate", a.adapt_learning_rate]  # the later flag wins
    tag = a.tag + a.adapt_tag
    folders["adapted_real"] = runs / f"adapted_real{tag}"
    cpu["adapted_real"] = run("MultiMedSeg/train.py", train_cli.main, [
        "--exp_dir", folders["adapted_real"], "--overwrite", "--source_data", prep / "site0", *adapt], log,
        finished(folders["adapted_real"]))
    if a.synthetic:
        import generate_volumes

        fake = runs / f"synthetic_source{a.tag}"
        cpu["generate"] = run("generate_volumes.py", generate_volumes.main, [
            "--ckpt_dir", folders["source_only"], "--generator", gen, "--label", SOURCE, "--n_volumes", a.n_volumes,
            "--slices_in_one_z", a.slices_in_one_z, "--n_segmentation_labels", 3, "--keep-largest-component",
            "--seed", a.seed, "--batch_size", 8, "--device", "cpu", "--out_dir", fake, "--overwrite", "--quiet"],
            log, (fake / "nifti").is_dir())
        folders["adapted_synthetic"] = runs / f"adapted_synthetic{tag}"
        cpu["adapted_synthetic"] = run("MultiMedSeg/train.py", train_cli.main, [
            "--exp_dir", folders["adapted_synthetic"], "--overwrite", "--source_root", fake, *adapt], log,
            finished(folders["adapted_synthetic"]))
    scored = prep / f"site{t}" / a.split
    weights = a.ensemble_weights.replace(" ", "")
    results: Dict[str, Any] = {}
    branches: Dict[str, Any] = {}
    for name, folder in folders.items():
        out = a.work / "inference" / f"{folder.name}_{a.split}_w{weights.replace(',', '-')}"
        if not (out / "metrics.csv").is_file():
            run("MultiMedSeg/inference.py", inference_cli.main, [
                "--exp_dir", out, "--overwrite", "--checkpoint_dir", folder, "--test_root", scored,
                "--metadata", prep / f"site{t}" / "metadata.json", "--ensemble_size", a.n_best, "--device", "cpu",
                "--test_batch_size", 32, "--ensemble_weights", weights], log, False)
        adapted = name.startswith("adapted")
        results[name] = stats(out / "metrics.csv", "pred" if adapted else "intra")
        if adapted:
            branches[name] = {b: stats(out / "metrics.csv", b)["mean"]["dice"]["mean"]
                              for b in ("intra", "inter", "pred")}
    so, ts = results["source_only"]["mean"]["dice"]["mean"], results["target_supervised"]["mean"]["dice"]["mean"]
    gap = {k.split("_", 1)[1]: gap_closed(results[k]["mean"]["dice"]["mean"], so, ts)
           for k in results if k.startswith("adapted")}
    lines = ["| row | Dice GM | Dice WM | Dice mean | HD95 mean (mm) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        fmt = lambda s, d=3: f"{s['mean']:.{d}f} ± {s['sd']:.{d}f}"  # noqa: E731
        lines.append(f"| {name} | {fmt(r['GM']['dice'])} | {fmt(r['WM']['dice'])} | {fmt(r['mean']['dice'])} | "
                     f"{fmt(r['mean']['hd95'], 1)} |")
    text = "\n".join([
        f"{a.split} volumes of site {t} (n = {len(results['source_only']['volumes'])}); generator {gen}; bn_mode {a.bn_mode}; "
        f"ensemble weights (inter,intra) {weights}; pretrain {a.pretrain_steps} / adapt {a.adapt_steps} steps; tag '{tag}'",
        "", *lines, "",
        "adapted branches (mean GM/WM Dice): " + "; ".join(
            f"{k}: intra {v['intra']:.3f}, inter {v['inter']:.3f}, pred {v['pred']:.3f}" for k, v in branches.items()),
        "gap closed: " + ", ".join(f"{k} {v:.3f}" for k, v in gap.items()),
        "CPU s: " + ", ".join(f"{k} {v:.0f}" if v is not None else f"{k} reused" for k, v in cpu.items()), "",
        "Commands:", "```", *log, "```", ""])
    print(text)
    if a.report is not None:
        a.report.write_text(text)
    if a.json is not None:
        a.json.write_text(json.dumps({"results": results, "branches": branches, "gap_closed": gap, "cpu": cpu,
                                      "args": vars(a)}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
