"""The demo pipeline as a list of stages, each a list of real command lines (see :mod:`demo.run`).

Every stage runs the project's user-facing CLIs as subprocesses, exactly as a user would type
them; only the settings are tiny so that the whole pipeline fits a 2-core CPU in about 20 minutes.
:func:`paper_commands` prints the paper-scale equivalent for a GPU user with real data.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

SOURCE_SITE = 0
#: Target of the adaptation. Site 2 (PET-like: inverted GM/WM contrast, 8 mm blur, Poisson noise) is
#: the largest domain gap of the phantom, so a source-only model fails there and adaptation has
#: something to show; site 1 (the same T1 contrast with another scanner's bias/gamma) is much closer.
TARGET_SITE = 2
SITES = (0, 1, 2)
CLASS_NAMES = {"1": "GM", "2": "WM"}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and schedules of one demo run (``default`` < 20 min on 2 cores, ``quick`` = the smoke test,
    ``quality`` = the default's earlier schedules at 64 px on a 3 mm phantom, about 46 min).

    Every value of ``default`` was chosen on the validation volumes, or for the data factory on the fidelity
    of its samples (BENCHMARKS.md, "Does the method work?").
    """

    name: str
    n_subjects: int
    spacing: float
    size: int = 32
    labeled_train: int = 2
    val_frac: float = 0.15
    test_frac: float = 0.25
    # fidelity evaluator (measuring instrument, not part of the method)
    evaluator_steps: int = 800
    # phase 1 (federated data factory)
    latent: int = 64
    n_mlp: int = 2
    channel_cap: int = 32
    # Chosen on validation data (BENCHMARKS.md, "Does the method work?"): few updates per round (client drift),
    # lr 0.004, R1 1 and a mapping network at full learning rate (lr_mlp 1; the paper's 0.01 learns the
    # site conditioning too slowly for a CPU budget; the exported file is re-parametrised to 0.01).
    # 480 rounds. The factory's fidelity on held-out slices still rises at round 480 in every seed, but on the
    # quiet 2-core machine of 4 Dec a round took 1.5 s, and the longer phase-2 schedules below use the time the
    # fast paths saved (BENCHMARKS.md, "Evidence over seeds", issue 23 target 5)
    rounds: int = 480
    updates: int = 25
    batch: int = 8
    nodes_per_round: int = 2
    lr: float = 0.004
    lr_mlp: float = 1.0
    r1: float = 1.0
    ada_length: int = 500_000
    fidelity_every: int = 16
    fidelity_n: int = 64
    sample_every_rounds: int = 32
    # phase 2
    encoder_depth: int = 10
    encoder_base_channels: int = 16
    # Schedules chosen on the validation volumes (BENCHMARKS.md, "Evidence over seeds", issue 23 target 5): the
    # source model and target supervised still improve at step 600 (1200 steps); the runs with few target labels
    # (adaptation, target only) peak within their first 100-250 steps and then decline (300 steps, validated
    # every 25 so that the best checkpoints are found).
    pretrain_steps: int = 1200  # the source model and target supervised (all labels of their site)
    adapt_steps: int = 300  # the runs with few target labels: adaptation and target only
    val_interval: int = 100  # validation every N steps of the pretrain_steps runs
    adapt_val_interval: int = 25  # ... and of the adapt_steps runs
    p2_batch: int = 8
    latent_avg_samples: int = 1024
    n_best: int = 3
    bn_mode: str = "batch"  # validation: target-only 0.32 -> 0.42, gap closed 0.00 -> 0.12 (BENCHMARKS.md)
    # The (inter, intra) weights of `_pred` and the ensemble size are no demo setting: each training run
    # chooses them on its validation volumes and records them (checkpoints/evaluation.json), and
    # inference.py / predict.py use what the run recorded (docs/phase2.md).
    # synthetic source
    n_volumes: int = 6
    slices_in_one_z: int = 1
    # the task: "brain" (grey/white matter of demo.phantom) or "vessels" (demo.vessels: vessel trees, brain
    # masks, weight maps and the original's vessel settings, VESSEL_FLAGS)
    task: str = "brain"
    keep_largest_component: bool = True  # generate_volumes.py (a vessel tree is many small blobs per slice: off)
    predict_stage: bool = True
    # vessel task: best-checkpoint classes (the original's vessel runs: favoured). A vessel Dice of 0 never makes a
    # best checkpoint (as the original), so the 6-step smoke preset scores every foreground class instead
    optimize_mode: str = "favoured"


DEFAULT = DemoConfig(name="default", n_subjects=16, spacing=5.0)
QUICK = DemoConfig(name="quick", n_subjects=4, spacing=6.0, labeled_train=1, val_frac=0.25, test_frac=0.25,
                   evaluator_steps=20, latent=32, channel_cap=16, rounds=2, updates=8, batch=4, fidelity_every=1,
                   fidelity_n=8, sample_every_rounds=1,
                   encoder_base_channels=8, pretrain_steps=6, adapt_steps=6, val_interval=3, adapt_val_interval=3,
                   p2_batch=4, latent_avg_samples=256, n_best=2, n_volumes=2)
#: the schedules the default had before issue 23's target 5, at which the quality run was measured (BENCHMARKS.md)
QUALITY = DemoConfig(name="quality", n_subjects=16, spacing=3.0, size=64, pretrain_steps=600,
                     adapt_steps=600, adapt_val_interval=100)
#: The vessel case (issue 24): 64 px slices of the 3 mm vascular phantom (a one-voxel vessel is 3 mm wide), losses
#: at the full 64 px (no pooling of the masks), the original's vessel settings (VESSEL_FLAGS); schedules meant
#: for < 30 min on 2 quiet cores (measured: 22 min, BENCHMARKS.md "The vessel case").
VESSELS = DemoConfig(name="vessels", n_subjects=16, spacing=3.0, size=64, evaluator_steps=300, rounds=160,
                     pretrain_steps=500, adapt_steps=500, adapt_val_interval=100, task="vessels",
                     keep_largest_component=False, predict_stage=False)
#: the structure of the vessel preset at smoke-test cost (tests/test_demo_vessels.py)
VESSELS_QUICK = DemoConfig(name="vessels-quick", n_subjects=4, spacing=6.0, size=32, labeled_train=1, val_frac=0.25,
                           test_frac=0.25, evaluator_steps=20, latent=32, channel_cap=16, rounds=2, updates=8,
                           batch=4, fidelity_every=1, fidelity_n=8, sample_every_rounds=1, encoder_base_channels=8,
                           pretrain_steps=6, adapt_steps=6, val_interval=3, adapt_val_interval=3, p2_batch=4,
                           latent_avg_samples=256, n_best=2, n_volumes=2, task="vessels", keep_largest_component=False,
                           predict_stage=False, optimize_mode="foreground")
PRESETS = {c.name: c for c in (DEFAULT, QUICK, QUALITY, VESSELS, VESSELS_QUICK)}
#: phase-2 flags of the vessel task, as the original's vessel runs: losses weighted towards the vessel class
#: (its largest weight makes it the favoured class), the favoured-mode image-loss weighting and best-checkpoint
#: choice, and vessels scored inside the brain only.  The original publishes no class weights; these were set
#: a priori (vessel 0.7, brain 0.2, background 0.1), not tuned.
VESSEL_CLASS_WEIGHTS = (0.1, 0.2, 0.7)
VESSEL_FLAGS = ("--ce_weights", ",".join(map(str, VESSEL_CLASS_WEIGHTS)), "--dice_weights",
                ",".join(map(str, VESSEL_CLASS_WEIGHTS)), "--consider_only_vessels_within_brain")


#: The three pretrainings (and the five inference runs) run three at a time, also on two cores: each is one
#: single-threaded process whose results do not depend on what runs beside it, and three processes time-sharing
#: two cores finish the three runs in about 3/2 of one run's time instead of two (measured in BENCHMARKS.md, "The
#: vessel case": 274 s for 541 CPU-s). With ``--threads N`` each command gets ``N // 3`` threads (at least 1).
PHASE2_LANES = 3


@dataclass
class Stage:
    """One pipeline stage: commands run in order, all logged to ``logs/<name>.log``.

    ``outputs`` (relative to the demo folder) are removed before a (re)run, so a stage interrupted
    half-way can be run again with ``--resume``.  ``federation`` marks the stage that needs the local
    Fed-BioMed nodes up (they are stopped in a ``finally`` whatever happens).  ``parallel`` > 1 runs
    the (independent) commands that many at a time, the ``--threads`` budget shared between them.
    """

    name: str
    title: str
    commands: List[List[str]]
    outputs: List[str]
    federation: Optional[Dict[str, str]] = None
    parallel: int = 1  # commands run at most this many at a time (independent commands only)
    threads: Optional[int] = None  # OpenMP threads of a command run alone (None: --threads)


def _py(*args: object) -> List[str]:
    return [sys.executable, *[str(a) for a in args]]


def _repo() -> Path:
    return Path(__file__).resolve().parents[1]


def build_stages(out: Path, cfg: DemoConfig, clip_model: str = "none", clip_pretrained: Optional[str] = None,
                 target: int = TARGET_SITE, seed: int = 0) -> List[Stage]:
    """The demo stages for the output folder ``out`` (absolute paths in every command).

    ``seed`` is the seed of every training stage: the data factory (initial weights, node streams, node
    sampling), the three pretrainings, the synthetic volumes and the two adaptations. The data (phantom,
    splits) and the measuring instrument (the fidelity evaluator) do not depend on it, so that runs of
    several seeds measure the method's variation on the same data with the same ruler."""
    repo, out = _repo(), out.resolve()
    data, prep, lmdb, fed = out / "data", out / "prep", out / "lmdb", out / "federation"
    runs = out / "runs"
    stages: List[Stage] = []

    vessels = cfg.task == "vessels"
    task = ["--task", "vessels"] if vessels else []
    stages.append(Stage("phantom", "phantom data (3 sites)" + (", vessel task" if vessels else ""), [
        _py("-m", "demo.phantom", "--out", data, "--seed", 0, "--n-subjects", cfg.n_subjects, *task,
            "--spacing", cfg.spacing, "--montage", out / "phantom_montage.png")],
        ["data", "phantom_montage.png"]))

    def preprocess(site: int, dest: Path, labeled: Optional[int]) -> List[str]:
        cmd = _py("-m", "MultiMedSeg.preprocess", "--images", data / f"site{site}" / "images",
                  "--labels", data / f"site{site}" / "labels", "--out", dest, "--size", cfg.size,
                  "--num-classes", 3, "--val-frac", cfg.val_frac, "--test-frac", cfg.test_frac, "--seed", 0)
        if vessels:  # the original's inputs: brain masks (class 1, extracerebral slices discarded), weight maps
            cmd += ["--brain-masks", str(data / f"site{site}" / "brain_masks"),
                    "--weights", str(data / f"site{site}" / "weights")]
        else:
            cmd += ["--discard-outside-labels"]
        return cmd + (["--labeled-train", str(labeled)] if labeled is not None else [])

    prep_cmds = [preprocess(site, prep / f"site{site}", None if site == SOURCE_SITE else cfg.labeled_train)
                 for site in SITES]
    # the upper bound: the same split of the target site with every training volume labelled
    prep_cmds.append(preprocess(target, prep / f"site{target}_all_labels", None))
    stages.append(Stage("preprocess", f"preprocess each site to {cfg.size} px slices", prep_cmds, ["prep"],
                        parallel=2))

    clip = ["--clip-model", clip_model] + (["--clip-pretrained", clip_pretrained] if clip_pretrained else [])
    stages.append(Stage("prepare_data", "client-side LMDB per site (prepare_data.py); few-shot target slices", [
        *[_py(repo / "prepare_data.py", prep / f"site{site}" / "train", "--recursive", "--out",
              lmdb / f"site{site}", "--size", cfg.size, "--label", site, "--n-domains", len(SITES), *clip, "--quiet")
          for site in SITES],
        _py("-m", "demo.fewshot", "--labeled", prep / f"site{target}" / "train" / "labeled", "--out",
            prep / f"site{target}_fewshot", "--label-nc", 3)],
        ["lmdb", f"prep/site{target}_fewshot"], parallel=2))

    stages.append(Stage("evaluator", "fidelity evaluator: classifier of real slices (domain, z-bin)", [
        _py("-m", "robustmedseg.fidelity", "train", "--out", out / "evaluator.pt", "--json",
            out / "evaluator.json", "--size", cfg.size, "--steps", cfg.evaluator_steps,
            *[a for site in SITES for a in ("--train", f"{site}={prep / f'site{site}' / 'train'}")],
            *[a for site in SITES for split in ("val", "test")
              for a in ("--heldout", f"{site}={prep / f'site{site}' / split}")])],
        ["evaluator.pt", "evaluator.json"]))

    clip_dim = [] if clip_model == "none" else ["--clip-dim", str(_clip_dim(clip_model))]
    fl_train = _py(repo / "train.py", "--researcher-dir", fed / "researcher", "--workdir", runs / "factory",
                   "--min-nodes", len(SITES), "--size", cfg.size, "--latent", cfg.latent, "--n_mlp", cfg.n_mlp,
                   "--channel-cap", cfg.channel_cap, "--n_domains", len(SITES), *clip_dim, "--augment",
                   "--rounds", cfg.rounds, "--num_updates_per_round", cfg.updates, "--batch", cfg.batch,
                   "--max-nodes-per-round", cfg.nodes_per_round, "--lr", cfg.lr, "--lr_mlp", cfg.lr_mlp, "--r1", cfg.r1,
                   "--ada_length", cfg.ada_length,
                   "--sample-every", max(cfg.updates, 4) * cfg.sample_every_rounds,
                   "--log-every", max(cfg.updates // 4, 1), "--keep-breakpoints", 1,
                   "--fidelity-evaluator", out / "evaluator.pt", "--fidelity-every", cfg.fidelity_every,
                   "--fidelity-n", cfg.fidelity_n, "--seed", seed)
    stages.append(Stage("federated", "federated data factory: 3 Fed-BioMed nodes, train.py, save_global_model.py", [
        fl_train,
        _py(repo / "save_global_model.py", "--researcher-dir", fed / "researcher", "--out",
            out / "final_global_model.pt")],
        ["federation", "runs/factory", "final_global_model.pt"],
        federation={f"site{s}": str(lmdb / f"site{s}") for s in SITES}))

    def tiny(steps: int, val_interval: int) -> List[object]:
        return ["--lpips_lambda", 0, "--latent_avg_samples", cfg.latent_avg_samples,
                "--feature_scale_rate", round(1.5 / max(steps, 1), 6), "--batch_size", cfg.p2_batch,
                "--test_batch_size", 32, "--val_interval", val_interval, "--n_best", cfg.n_best,
                "--start_from_latent_avg", "--device", "cpu", "--label_nc", 3, "--bn_mode", cfg.bn_mode,
                "--seed", seed, *((*VESSEL_FLAGS, "--optimize_mode", cfg.optimize_mode) if vessels else ())]

    encoder = ["--encoder_depth", cfg.encoder_depth, "--encoder_base_channels", cfg.encoder_base_channels,
               "--encoder_input_size", cfg.size]
    gen_file = out / "final_global_model.pt"
    pre = runs / "pretrain_site0"
    t_only, t_sup = runs / f"target_only_site{target}", runs / f"target_supervised_site{target}"
    stages.append(Stage("pretrain", f"segmenters: source (site 0), target-only and target-supervised (site {target})", [
        _py(repo / "MultiMedSeg" / "pretrain.py", "--exp_dir", pre, "--source_data", prep / "site0",
            "--stylegan_weights", gen_file, "--src_label", SOURCE_SITE, "--max_steps", cfg.pretrain_steps,
            *encoder, *tiny(cfg.pretrain_steps, cfg.val_interval)),
        _py(repo / "MultiMedSeg" / "pretrain.py", "--exp_dir", t_only, "--source_root", prep / f"site{target}_fewshot",
            "--val_root", prep / f"site{target}" / "val", "--stylegan_weights", gen_file, "--src_label", target,
            "--max_steps", cfg.adapt_steps, *encoder, *tiny(cfg.adapt_steps, cfg.adapt_val_interval)),
        _py(repo / "MultiMedSeg" / "pretrain.py", "--exp_dir", t_sup, "--source_data",
            prep / f"site{target}_all_labels", "--stylegan_weights", gen_file, "--src_label", target,
            "--max_steps", cfg.pretrain_steps, *encoder, *tiny(cfg.pretrain_steps, cfg.val_interval))],
        ["runs/pretrain_site0", f"runs/target_only_site{target}", f"runs/target_supervised_site{target}"],
        parallel=PHASE2_LANES))

    fake = out / "synthetic_site0"
    stages.append(Stage("generate", "synthetic labelled source volumes (generate_volumes.py)", [
        _py(repo / "generate_volumes.py", "--ckpt_dir", pre, "--generator", gen_file,
            "--label", SOURCE_SITE, "--n_volumes", cfg.n_volumes, "--slices_in_one_z", cfg.slices_in_one_z,
            "--n_segmentation_labels", 3, *(["--keep-largest-component"] if cfg.keep_largest_component else []),
            "--seed", seed, "--batch_size", 8,
            "--device", "cpu", "--out_dir", fake)], ["synthetic_site0"]))

    adapt_common = ["--target_data", prep / f"site{target}", "--checkpoint_dir", pre, "--src_label", SOURCE_SITE,
                    "--tgt_label", target, "--one_target_slice", "--max_steps", cfg.adapt_steps,
                    *tiny(cfg.adapt_steps, cfg.adapt_val_interval)]
    stages.append(Stage("adapt", f"adapt to site {target}: with the real source, and with the synthetic source", [
        _py(repo / "MultiMedSeg" / "train.py", "--exp_dir", runs / f"adapt_real_site{target}",
            "--source_data", prep / "site0", *adapt_common),
        _py(repo / "MultiMedSeg" / "train.py", "--exp_dir", runs / f"adapt_synth_site{target}",
            "--source_root", fake, *adapt_common)],
        [f"runs/adapt_real_site{target}", f"runs/adapt_synth_site{target}"], parallel=2))

    inf = out / "inference"
    stages.append(Stage("inference", f"segment the site-{target} test volumes with the 5 models (MultiMedSeg/inference.py)", [
        _py(repo / "MultiMedSeg" / "inference.py", "--exp_dir", inf / name, "--checkpoint_dir", ckpt,
            "--target_data", prep / f"site{target}", "--device", "cpu", "--test_batch_size", 32, "--label_nc", 3,
            *(["--consider_only_vessels_within_brain"] if vessels else []))
        for name, ckpt in [("source_only", pre), ("target_only", t_only),
                           ("adapted_real", runs / f"adapt_real_site{target}"),
                           ("adapted_synthetic", runs / f"adapt_synth_site{target}"), ("target_supervised", t_sup)]],
        ["inference"], parallel=PHASE2_LANES))

    stages.append(Stage("fidelity", "factory fidelity of final_global_model.pt (domain / z-bin accuracy, KID)", [
        _py("-m", "robustmedseg.fidelity", "score", "--evaluator", out / "evaluator.pt", "--generator",
            gen_file, "--json", out / "factory_fidelity.json")], ["factory_fidelity.json"]))

    new_scans = out / "predict"
    if cfg.predict_stage:
        stages.append(Stage("predict", f"segment the site-{target} test scans stored as NRRD in another "
                                       "orientation (MultiMedSeg/predict.py)", [
            _py("-m", "demo.reorient", "--metadata", prep / f"site{target}" / "metadata.json", "--split", "test",
                "--axcodes", "PIL", "--format", "nrrd", "--out", new_scans / "scans"),
            _py(repo / "MultiMedSeg" / "predict.py", "-i", new_scans / "scans", "-o", new_scans / "segmentations",
                "--checkpoint_dir", runs / f"adapt_real_site{target}", "--output_format", "input", "--device",
                "cpu")],
            ["predict"]))

    stages.append(Stage("report", "REPORT.md, summary.json and figures", [
        _py("-m", "demo.vessel_report" if vessels else "demo.report", "--out", out, "--target", target)],
        ["REPORT.md", "summary.json", "generator_grid.png", "synthetic_montage.png", "segmentation_overlay.png",
         "predict_overlay.png", "fidelity_rounds.png", "generator_mip.png", "segmentation_mip.png"]))
    return stages


def _clip_dim(model: str) -> int:
    """Embedding width of a few common open_clip models (train.py's --clip-dim must match clip_mean.npy)."""
    widths = {"ViT-L-14": 768, "ViT-B-32": 512, "ViT-B-16": 512, "RN50": 1024, "ViT-H-14": 1024}
    if model not in widths:
        raise ValueError(f"unknown CLIP width for '{model}'; use one of {sorted(widths)} or --clip-model none")
    return widths[model]


def paper_commands() -> str:
    """The paper-scale pipeline (docs/method.md#factory-training–#generation) for a GPU user with real multi-site
    data, as shell text."""
    lines = [
        "# Paper-scale pipeline (GPU; replace the phantom by your own NIfTI data). Sites: site0 = labeled",
        "# source, site1/site2 = targets with few labels. Every script documents its flags with --help.",
        "",
        "# 1. each hospital: preprocess its volumes into 512 px slices",
        "python -m MultiMedSeg.preprocess --images DATA/site0/images --labels DATA/site0/labels \\",
        "    --out prep/site0 --size 512 --num-classes 3 --discard-outside-labels",
        "for k in 1 2; do",
        "  python -m MultiMedSeg.preprocess --images DATA/site$k/images --labels DATA/site$k/labels \\",
        "      --out prep/site$k --size 512 --num-classes 3 --labeled-train 2 --discard-outside-labels",
        "done",
        "",
        "# 2. each hospital: its phase-1 LMDB with the mean CLIP ViT-L-14 embedding (local OpenAI weights)",
        "for k in 0 1 2; do",
        "  python prepare_data.py prep/site$k/train --recursive --out lmdb/site$k --size 512 --label $k \\",
        "      --n-domains 3 --clip-model ViT-L-14 --clip-pretrained /models/ViT-L-14-openai.pt --device cuda",
        "done",
        "",
        "# 3. one Fed-BioMed node per hospital with lmdb/site<k> registered under the tag #im2im (README:",
        "#    'Real multi-hospital deployment'): fedbiomed component create ...; fedbiomed node -p fbm-node",
        "#    dataset add; then start it on its GPU:",
        "fedbiomed node -p fbm-node start --gpu",
        "#    (a CPU-only test on one machine: python -m robustmedseg.federation.local up --root fed \\",
        "#       --dataset site0=lmdb/site0 --dataset site1=lmdb/site1 --dataset site2=lmdb/site2",
        "#     and --researcher-dir fed/researcher without --use-gpu below)",
        "",
        "# 4. researcher: the data factory, 350 rounds x 2000 updates, then the CLIP stage to round 385",
        "python train.py --researcher-dir fbm-researcher --workdir factory_run --min-nodes 3 --size 512 \\",
        "    --n_domains 3 --augment --num_updates_per_round 2000 --rounds 350 --use-gpu",
        "python train.py --researcher-dir fbm-researcher --workdir factory_run --min-nodes 3 --resume \\",
        "    --num_updates_per_round 200 --rounds 385 --clip-weight 50 \\",
        "    --clip-pretrained /models/ViT-L-14-openai.pt --use-gpu",
        "python save_global_model.py --researcher-dir fbm-researcher --out final_global_model.pt",
        "",
        "# 5. source client: pretrain the segmenter (intra branch), 15000 steps, batch 8",
        "python MultiMedSeg/pretrain.py --exp_dir runs/pretrain --source_data prep/site0 \\",
        "    --stylegan_weights final_global_model.pt --src_label 0 --label_nc 3 --batch_size 8 \\",
        "    --start_from_latent_avg --only_intra --max_steps 15000 \\",
        "    --backbone_weights pretrained_models/backbone.pth \\",
        "    --alex_model pretrained_models/alex.pth --alex_pretr_model pretrained_models/alex_pretr.pth",
        "",
        "# 6. synthetic labelled source volumes from the data factory",
        "python generate_volumes.py --ckpt_dir runs/pretrain --label 0 --n_volumes 50 \\",
        "    --slices_in_one_z 10 --n_segmentation_labels 3 --out_dir fake_site0",
        "",
        "# 7. target client: adapt with one labeled slice per target volume, 20000 steps",
        "#    (--source_data prep/site0 with the real source, or --source_root fake_site0 with the synthetic one)",
        "python MultiMedSeg/train.py --exp_dir runs/adapt_site2 --source_root fake_site0 \\",
        "    --target_data prep/site2 --checkpoint_dir runs/pretrain --src_label 0 --tgt_label 2 \\",
        "    --label_nc 3 --start_from_latent_avg --one_target_slice --max_steps 20000 \\",
        "    --alex_model pretrained_models/alex.pth --alex_pretr_model pretrained_models/alex_pretr.pth",
        "",
        "# 8. inference: ensemble of the 5 best checkpoints, NIfTI on the original grid + metrics.csv",
        "python MultiMedSeg/inference.py --exp_dir runs/adapt_site2_test --checkpoint_dir runs/adapt_site2 \\",
        "    --target_data prep/site2 --ensemble_size 5",
        "",
        "# 9. new scans of site 2 (NIfTI, NRRD, MetaImage or DICOM series folders, any orientation): labels on",
        "#    each scan's own grid, preprocessed by the run's plan (runs/adapt_site2/checkpoints/plan.json)",
        "python MultiMedSeg/predict.py -i new_scans -o segmentations --checkpoint_dir runs/adapt_site2",
    ]
    return "\n".join(lines)


def shell_line(cmd: Sequence[str]) -> str:
    """A command list as one copy-pasteable shell line."""
    return " ".join(shlex.quote(c) for c in cmd)
