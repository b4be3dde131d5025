"""Command-line options of ``pretrain.py``, ``train.py`` (docs/method.md#phase2-options), ``inference.py`` and
``predict.py``.

Every flag is accepted with underscores (the paper's spelling, e.g. ``--batch_size``) and
with dashes (``--batch-size``), as in every script (:class:`robustmedseg.errors.CliParser`).  Any option can also come from one JSON file given with
``--config FILE``: an object whose keys are option names (underscores), e.g.::

    {"source_root": "prep/site0/train", "val_root": "prep/site0/val", "label_nc": 3}

Flags on the command line override the file.  Unknown keys are an error naming the file.
This replaces the reference's ``configs*`` folders that were *renamed* at import time
(FIX docs/differences.md#d9-25): the data folders are plain options.

Data folders.  ``--source_data DIR`` / ``--target_data DIR`` name a preprocessed site
(``MultiMedSeg/preprocess.py`` output: ``DIR/train`` or ``DIR/train/{labeled,unlabeled}``,
``DIR/val``, ``DIR/test``, ``DIR/metadata.json``); the individual folder flags
(``--source_root``, ``--target_labeled``, ``--target_unlabeled``, ``--val_root``,
``--test_root``, ``--metadata``) override what those imply.  See :func:`resolve_training_roots`.

Dropped reference options (documented decision): ``--learn_in_w`` (broken shapes,
docs/differences.md#d9-37), ``--dataset_type`` (the config file replaces the DATASETS dict), ``--input_nc``
(always 1), inference ``--do_flip`` (the flip is recorded in ``metadata.json`` and undone
by the restoration).  DataParallel is gone: one ``--device`` (docs/differences.md#d9-27).  ``--workers`` and
``--test_workers`` default to 0 (the reference used 6).
``--only_intra`` is implied by ``pretrain.py`` (accepted there for the paper command) and
refused by ``train.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from robustmedseg.errors import CliParser, InputError
from robustmedseg.io import check_apart

PAPER_PRETRAIN = ("--batch_size 8 --start_from_latent_avg --label_nc 3 --max_steps 15000 "
                  "--stylegan_weights final_global_model.pt --only_intra --src_label 0")
PAPER_TRAIN = ("--start_from_latent_avg --label_nc 3 --max_steps 20000 --checkpoint_dir <pretrain exp>/checkpoints "
               "--one_target_slice --src_label 0 --tgt_label 1")


class _Parser(CliParser):
    """The project's parser (both spellings of every flag, one-line usage errors) with :meth:`add`."""

    def add(self, name: str, *aliases: str, **kwargs: Any) -> argparse.Action:
        """Add ``--name`` (destination ``name``) with other names of the same concept as aliases."""
        return self.add_argument(f"--{name}", *aliases, dest=name, **kwargs)


def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _common(p: _Parser) -> None:
    p.add("config", type=Path, default=None, metavar="FILE",
          help="JSON file of option values (keys = option names with underscores); flags override it")
    p.add("exp_dir", type=Path, default=None, help="output folder (required); must not exist unless --resume/--overwrite")
    p.add("overwrite", action="store_true", help="replace an existing --exp_dir")
    p.add("device", choices=("auto", "cpu", "cuda"), default="auto",
          help="one device for everything (auto: cuda when available); no DataParallel")
    p.add("seed", type=int, default=0, help="seed of torch/numpy/random (default 0, as the reference)")
    p.add("test_batch_size", type=int, default=8, help="slices per forward pass in validation/inference")
    p.add("test_workers", type=int, default=0, help="DataLoader workers for validation/inference (reference: 6)")
    p.add("allow_tf32", action="store_true",
          help="CUDA: TF32 tensor cores for float32 convolutions and matrix products (Ampere+; faster, about 1e-3 "
               "relative error per product); off by default")
    p.add("cudnn_benchmark", action="store_true",
          help="CUDA: cuDNN times the convolution algorithms once per input shape and keeps the fastest (fixed "
               "shapes); turns off the deterministic cuDNN setting of the reference; off by default")


def _model(p: _Parser, mode: str) -> None:
    p.add("label_nc", "--num_classes", "--n_segmentation_labels", type=int, metavar="L", default=3,
          help="number of segmentation classes incl. background (default 3)")
    p.add("src_label", type=int, default=None, help="phase-1 domain id of the source (required)")
    if mode == "train":
        p.add("tgt_label", type=int, default=None, help="phase-1 domain id of the target (required)")
    p.add("n_domains", type=int, default=None,
          help="generator conditioning width; default: read from the generator file / checkpoint (paper: 3)")
    p.add("output_size", type=int, default=None, help="generator size; default: read from the generator file (paper: 512)")
    p.add("encoder_input_size", type=int, default=None,
          help="side of the slices fed to the encoder (pretrain default: min(256, output size), the paper's 256; "
               "train: from the checkpoint)")
    p.add("encoder_depth", type=int, default=None,
          help="IResNet depth of the encoder (pretrain default 50 as the paper, e.g. 18 for tiny runs; "
               "train: from the checkpoint)")
    p.add("encoder_base_channels", type=int, default=None,
          help="channels of the encoder's first stage (pretrain default 64 as the paper; train: from the checkpoint)")
    p.add("backbone_weights", "--arcface_model", type=Path, default=None,
          help="ArcFace IResNet backbone.pth to initialise the encoder (paper); default: random init")
    p.add("start_from_latent_avg", action="store_true", help="add the domain's average W to the codes (paper: on)")
    p.add("disable_residuals", action="store_true", help="no content features injected into the generator")
    p.add("disable_DSBN", action="store_true", help="one BatchNorm branch for both domains")
    p.add("invert_intensity", action="store_true",
          help="negate target images (and source background) -- for dark-foreground modalities")
    p.add("bn_mode", choices=("running", "batch"), default="running",
          help="BatchNorm in eval: 'running' statistics (deterministic, default) or per-batch statistics "
               "(the reference's behaviour, docs/differences.md#d9-36)")
    p.add("latent_avg_samples", type=int, default=100_000,
          help="z samples per domain and middle z-bin for the mean latents (paper 1e5)")


def _losses(p: _Parser) -> None:
    p.add("l2_lambda", type=float, default=1.0, help="MSE reconstruction weight")
    p.add("ssim_lambda", type=float, default=1.0, help="(1 - SSIM) weight (FIX docs/differences.md#d9-28: really SSIM)")
    p.add("lpips_lambda", type=float, default=0.8, help="LPIPS weight (needs --alex_model and --alex_pretr_model)")
    p.add("ce_lambda", type=float, default=1.0, help="cross-entropy weight")
    p.add("dice_lambda", type=float, default=1.0, help="soft Dice weight")
    p.add("ce_weights", type=_floats, default=None, help="per-class CE weights, label_nc numbers (default 1/L each)")
    p.add("dice_weights", type=_floats, default=None, help="per-class Dice weights, label_nc numbers (default 1/L each)")
    p.add("alex_model", type=Path, default=None, help="LPIPS v0.1 linear heads alex.pth")
    p.add("alex_pretr_model", type=Path, default=None, help="AlexNet ImageNet weights (alex_pretr.pth)")
    p.add("consider_only_vessels_within_brain", action="store_true",
          help="metrics: label 2 (vessel) is scored only inside the GT non-background region (brain), as the "
               "original; the other classes and 'foreground' are unchanged")


def training_parser(mode: str) -> _Parser:
    """Parser of ``pretrain.py`` (``mode='pretrain'``) or ``train.py`` (``mode='train'``)."""
    pre = mode == "pretrain"
    desc = ("Phase 2a: pretrain the pSp segmenter on labeled source slices (intra branch only)." if pre else
            "Phase 2c: adapt a pretrained pSp segmenter to a target domain (intra, inter and cycle branches).")
    epilog = f"Paper command: python MultiMedSeg/{mode}.py --exp_dir EXP --config data.json " + (
        PAPER_PRETRAIN if pre else PAPER_TRAIN)
    p = _Parser(prog=f"MultiMedSeg/{mode}.py", description=desc, epilog=epilog)
    _common(p)
    p.add("resume", action="store_true", help="continue the run in --exp_dir from checkpoints/last.pt")
    p.add("source_data", type=Path, default=None,
          help="preprocessed source site folder (uses DIR/train[/labeled] and, for pretrain, DIR/val)")
    p.add("source_root", type=Path, default=None, help="folder of labeled source training slices")
    p.add("val_root", type=Path, default=None,
          help="validation slices (pretrain: source; train: labeled target); default from --*_data")
    if not pre:
        p.add("target_data", type=Path, default=None,
              help="preprocessed target site folder (DIR/train/labeled, DIR/train/unlabeled, DIR/val)")
        p.add("target_labeled", type=Path, default=None, help="folder of labeled target training slices")
        p.add("target_unlabeled", type=Path, default=None, help="folder of unlabeled target training slices (optional)")
        p.add("checkpoint_dir", type=Path, default=None,
              help="pretrain output (its folder or checkpoints/): its best checkpoint initialises this run (required)")
        p.add("one_target_slice", action="store_true", help="keep only the middle labeled slice of each target volume")
        p.add("reinit_encoder", action="store_true",
              help="as the original: do not carry the pretrained encoder over, start it again from the ArcFace "
                   "backbone (--backbone_weights; the rest random) and recompute both mean latents; only the "
                   "generator and the classifiers come from --checkpoint_dir (default: the encoder is kept)")
    else:
        p.add("stylegan_weights", type=Path, default=None, help="phase-1 final_global_model.pt (g_ema used; required)")
        p.add("only_intra", action="store_true", help="accepted for the paper command; pretraining is always intra-only")
    _model(p, mode)
    _losses(p)
    p.add("batch_size", type=int, default=8 if pre else 4, help="training batch size")
    p.add("workers", type=int, default=0, help="DataLoader workers for training (reference: 6)")
    p.add("learning_rate", type=float, default=1e-4, help="encoder (and decoder) learning rate")
    p.add("head_learning_rate", type=float, default=1e-3, help="Adam learning rate of the pixel classifiers")
    p.add("optim_name", choices=("ranger", "adam"), default="ranger", help="encoder optimiser")
    p.add("max_steps", type=int, default=15000 if pre else 20000, help="number of optimisation steps")
    p.add("image_interval", type=int, default=500, help="TensorBoard image grid every N steps")
    p.add("board_interval", type=int, default=100, help="TensorBoard scalars every N steps")
    p.add("val_interval", type=int, default=1000, help="validate every N steps (and at --max_steps)")
    p.add("save_interval", type=int, default=None, help="write iteration_<step>.pt every N steps (default: at the end)")
    p.add("n_best", "--ensemble_size", type=int, default=5, help="k best checkpoints kept")
    if not pre:
        from MultiMedSeg.training.evaluation import RULES, WEIGHT_GRID

        grid = " / ".join(f"{a:g},{b:g}" for a, b in WEIGHT_GRID)
        p.add("ensemble_selection", choices=RULES, default="validation",
              help="evaluation settings written to checkpoints/evaluation.json at the end (what inference.py and "
                   "predict.py use by default): 'validation' (default) scores the ensemble of the kept best "
                   f"checkpoints on the validation volumes for the (inter, intra) weights {grid} and keeps the best "
                   f"mean Dice (ties: the paper's {grid.split(' / ')[0]}); 'paper' records the paper's fixed "
                   f"{grid.split(' / ')[0]} (docs/differences.md)")
    p.add("optimize_mode", choices=("foreground", "favoured"), default="foreground",
          help="best-checkpoint classes: all foreground classes, or the favoured ones (largest weight in the CE or "
               "Dice weights, whichever has the larger maximum; every class incl. background without weights)")
    p.add("train_decoder", action="store_true", help="also train the generator")
    p.add("disable_balanced_sampling", action="store_true", help="plain random source/target pairs")
    p.add("use_da", action="store_true", help="mirror + rotation/scale augmentation")
    p.add("feature_scale_rate", type=float, default=1e-4,
          help="feature_scale = min(1, rate*step) (paper 1e-4: full injection at step 10000)")
    p.add("amp", choices=("fp16", "bf16", "off"), default="fp16",
          help="CUDA mixed precision: autocast to float16 with a gradient scaler (default, as the reference), to "
               "bfloat16 (no scaler; Ampere+), or off (float32). Never used on CPU")
    p.add("no_amp", action="store_true", help="same as --amp off (kept for older commands)")
    return p


def inference_parser() -> _Parser:
    p = _Parser(prog="MultiMedSeg/inference.py",
                description="Phase 3: segment test volumes with the k best checkpoints of a training run and "
                            "write <id>_intra/_inter/_pred/_trans NIfTI files on the original grid.",
                epilog="Example: python MultiMedSeg/inference.py --checkpoint_dir EXP --target_data PREP/site2 "
                       "--exp_dir OUT --ensemble_size 5")
    _common(p)
    p.add("checkpoint_dir", type=Path, default=None, help="training output folder (or its checkpoints/) (required)")
    p.add("target_data", type=Path, default=None, help="preprocessed site folder: DIR/test and DIR/metadata.json")
    p.add("test_root", type=Path, default=None, help="folder of test slices (default DIR/test of --target_data)")
    p.add("metadata", type=Path, default=None, help="metadata.json of the preprocessing (default DIR/metadata.json)")
    p.add("labels", type=Path, default=None,
          help="folder of ground-truth label NIfTI files <id>.nii[.gz] (default: label paths in the metadata)")
    p.add("ensemble_size", type=int, default=None,
          help="number of best checkpoints averaged (default: the run's checkpoints/evaluation.json; a run without "
               "it: 5, the paper's)")
    p.add("ensemble_weights", type=_floats, default=None, metavar="INTER,INTRA",
          help="weights of the inter and intra probabilities in _pred (default: the run's "
               "checkpoints/evaluation.json, chosen on validation when it was trained; a run without it: 0.6,0.4, "
               "the paper's)")
    p.add("mask_outside_weight", action="store_true",
          help="predict background (and -1 in _trans) outside each slice's weight map; default: the weight map "
               "is not applied at inference, as the original")
    p.add("label_nc", "--num_classes", "--n_segmentation_labels", type=int, metavar="L", default=None,
          help="check: must equal the checkpoints' label_nc")
    p.add("consider_only_vessels_within_brain", action="store_true",
          help="metrics: label 2 (vessel) is scored only inside the GT non-background region (brain), as the "
               "original; the other classes and 'foreground' are unchanged")
    return p


def predict_parser() -> _Parser:
    from MultiMedSeg.data.formats import OUTPUT_FORMATS

    p = _Parser(prog="MultiMedSeg/predict.py",
                description="Segment new scans (NIfTI, NRRD, MetaImage, DICOM series; any orientation) with the k "
                            "best checkpoints of a training run, preprocessed by the run's plan, and write the labels "
                            "on each scan's own grid. No labels needed.",
                epilog="Example: python MultiMedSeg/predict.py -i new_scans/ -o segmentations/ --checkpoint_dir "
                       "runs/adapt_site2 -- outputs: OUT/<id>.nii.gz (labels; --output_format input: the input's "
                       "format), OUT/<id>_probabilities.nii.gz with --save_probabilities, OUT/predict.json.")
    p.add_argument("-i", "--input", dest="input", type=Path, nargs="+", default=None, metavar="PATH",
                   help="scans: image files and/or folders (a folder's image files, its DICOM series and those of its "
                        "sub-folders); formats: .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, DICOM series folders")
    p.add_argument("-o", "--output", dest="output", type=Path, default=None, metavar="OUT",
                   help="output folder (refused if it exists, unless --overwrite; written completely or not at all)")
    p.add("checkpoint_dir", type=Path, default=None,
          help="training run (its folder or checkpoints/) holding best.json and plan.json (required)")
    p.add("device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add("ensemble_size", type=int, default=None,
          help="number of best checkpoints averaged (default: the run's checkpoints/evaluation.json; a run without "
               "it: 5; a run that kept fewer uses all it kept)")
    p.add("ensemble_weights", type=_floats, default=None, metavar="INTER,INTRA",
          help="adapted runs: weights of the inter and intra probabilities (default: the run's "
               "checkpoints/evaluation.json; a run without it: 0.6,0.4, the paper's), as inference.py's _pred")
    p.add("save_probabilities", action="store_true",
          help="also write OUT/<id>_probabilities (x, y, z, class) float32 on the scan's grid")
    p.add("output_format", choices=OUTPUT_FORMATS, default="nifti",
          help="nifti (default, .nii.gz), input (the scan's own format; a DICOM series: NIfTI), nrrd or mha")
    p.add("series", default=None, metavar="UID", help="DICOM SeriesInstanceUID to segment in a folder holding several")
    p.add("overwrite", action="store_true", help="replace an existing output folder once the new one is complete")
    p.add("keep_going", action="store_true",
          help="a batch: segment every good scan, list the scans that cannot be read or segmented under 'failed' in "
               "OUT/predict.json (a warning line each) and exit with status 3 (default: the first bad scan stops "
               "everything, nothing written, exit 2)")
    p.add("no_fov_mask", action="store_true",
          help="write the model's raw labels: no background outside the head and the training slab (the "
               "field-of-view rule, MultiMedSeg/data/field_of_view.py)")
    p.add("test_batch_size", type=int, default=8, help="slices per forward pass (default 8)")
    p.add("seed", type=int, default=0, help="seed of torch/numpy/random (default 0)")
    p.add("allow_tf32", action="store_true", help="CUDA: TF32 tensor cores for float32 convolutions (off by default)")
    p.add("cudnn_benchmark", action="store_true", help="CUDA: cuDNN autotuning per input shape (off by default)")
    p.add("quiet", action="store_true", help="print only warnings and errors")
    return p


def _check_ensemble(opts: argparse.Namespace) -> None:
    """None = not given: the run's evaluation settings (MultiMedSeg.training.evaluation) decide."""
    if opts.ensemble_size is not None and opts.ensemble_size < 1:
        raise InputError("--ensemble_size must be >= 1")
    w = opts.ensemble_weights
    if w is not None and (len(w) != 2 or min(w) < 0 or sum(w) <= 0):
        raise InputError("--ensemble_weights needs two non-negative numbers (inter, intra) with a positive sum")


def parse_predict_options(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse and check the options of ``predict.py``."""
    opts = predict_parser().parse_args(argv)
    for flag, name in (("-i", "input"), ("-o", "output"), ("--checkpoint_dir", "checkpoint_dir")):
        if getattr(opts, name) is None:
            raise InputError(f"{flag} is required")
    _check_ensemble(opts)
    if opts.test_batch_size < 1:
        raise InputError("--test_batch_size must be >= 1")
    return opts


def _apply_config(parser: _Parser, argv: Optional[Sequence[str]]) -> None:
    """Load ``--config`` (if any) into the parser defaults."""
    pre = CliParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return
    path = known.config
    if not path.is_file():
        raise InputError("config file not found (given by --config)", path)
    try:
        cfg = json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"config file is not valid JSON ({err})", path) from None
    if not isinstance(cfg, dict):
        raise InputError("config file must hold a JSON object of option values", path)
    dests = {a.dest: a for a in parser._actions}
    unknown = sorted(set(cfg) - set(dests) - {"help"})
    if unknown:
        raise InputError(f"unknown option(s) in config file: {', '.join(unknown)}", path)
    values: Dict[str, Any] = {}
    for key, value in cfg.items():
        action = dests[key]
        if value is not None and action.type is Path:
            value = Path(value)
            if not value.is_absolute():
                value = path.parent / value  # relative to the config file
        elif value is not None and action.type is _floats and not isinstance(value, list):
            value = _floats(str(value))
        values[key] = value
    parser.set_defaults(**values)


def parse(parser: _Parser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    _apply_config(parser, argv)
    opts = parser.parse_args(argv)
    opts._path_flags = [a.dest for a in parser._actions if a.type is Path]
    _check_numbers(opts, parser)
    return opts


# lowest accepted value of the integer options (default 1); the domain ids are checked against the generator
_MAX_WORKERS = 4 * (os.cpu_count() or 1)  # DataLoader processes: more can only exhaust the machine
_INT_MIN = {"seed": 0, "workers": 0, "test_workers": 0, "src_label": 0, "tgt_label": 0, "label_nc": 2}


def _check_numbers(opts: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every number option: finite, floats >= 0, integers >= their minimum (one-line errors)."""
    for action in parser._actions:
        value = getattr(opts, action.dest, None)
        if value is None or action.type not in (int, float, _floats):
            continue
        flag = f"--{action.dest}"
        numbers = value if isinstance(value, list) and action.type is _floats else [value]
        if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers) or \
                (action.type is int and not isinstance(value, int)):
            raise InputError(f"{flag} must be {'an integer' if action.type is int else 'a number'}, got {value!r}")
        if action.type is int:
            low = _INT_MIN.get(action.dest, 1)
            high = {"seed": 2**32 - 1, "workers": _MAX_WORKERS, "test_workers": _MAX_WORKERS}.get(action.dest)
            if value < low or (high is not None and value > high):
                raise InputError(f"{flag} must be in [{low}, {high}], got {value}" if high is not None else
                                 f"{flag} must be >= {low}, got {value}")
            continue
        for number in numbers:
            if not math.isfinite(number) or number < 0:
                raise InputError(f"{flag} must be a finite number >= 0, got {number}")


def check_exp_dir_apart(opts: argparse.Namespace) -> None:
    """``--exp_dir`` may not be, contain or lie inside any input path of the command (every other
    path option: data folders, checkpoints, weights, metadata, the config file)."""
    inputs = {f"--{name}": getattr(opts, name) for name in opts._path_flags if name != "exp_dir"}
    check_apart({"--exp_dir": opts.exp_dir}, inputs)


def _subfolder(root: Path, *names: str) -> Optional[Path]:
    for name in names:
        p = root / name
        if p.is_dir():
            return p
    return None


def _source_train(root: Path) -> Path:
    train = root / "train"
    if not train.is_dir():
        raise InputError("preprocessed site has no train/ folder (given by --source_data)", root)
    return _subfolder(train, "labeled") or train


def resolve_training_roots(opts: argparse.Namespace, mode: str) -> None:
    """Fill ``source_root``, ``target_labeled``, ``target_unlabeled``, ``val_root`` from ``--*_data``."""
    if opts.source_data is not None and opts.source_root is None:
        opts.source_root = _source_train(opts.source_data)
    if mode == "pretrain":
        if opts.val_root is None and opts.source_data is not None:
            opts.val_root = opts.source_data / "val"
        return
    if opts.target_data is not None:
        train = opts.target_data / "train"
        if opts.target_labeled is None:
            opts.target_labeled = _subfolder(train, "labeled") or train
        unlabeled = _subfolder(train, "unlabeled")
        if opts.target_unlabeled is None and unlabeled is not None and any(unlabeled.glob("*.npz")):
            opts.target_unlabeled = unlabeled  # an empty unlabeled/ folder (all volumes labeled) is skipped
        if opts.val_root is None:
            opts.val_root = opts.target_data / "val"


def _require(opts: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(opts, name) is None:
            raise InputError(f"--{name} is required (on the command line or in --config)")


def _check_class_weights(opts: argparse.Namespace) -> None:
    for name in ("ce_weights", "dice_weights"):
        w = getattr(opts, name, None)
        if w is not None and opts.label_nc is not None and len(w) != opts.label_nc:
            raise InputError(f"--{name} has {len(w)} values but --label_nc is {opts.label_nc}")


def parse_training_options(argv: Optional[Sequence[str]], mode: str) -> argparse.Namespace:
    """Parse and check the options of ``pretrain.py``/``train.py`` (one-line errors)."""
    opts = parse(training_parser(mode), argv)
    opts.mode = mode
    opts.only_intra = mode == "pretrain"
    resolve_training_roots(opts, mode)
    _require(opts, "exp_dir", "src_label", "source_root", "val_root")
    if mode == "pretrain":
        _require(opts, "stylegan_weights")
        opts.target_labeled = opts.target_unlabeled = None
        if opts.invert_intensity:
            raise InputError("--invert_intensity is incompatible with pretraining (--only_intra), as in the reference")
    else:
        _require(opts, "tgt_label", "target_labeled", "checkpoint_dir")
        if opts.tgt_label == opts.src_label:
            raise InputError(f"--tgt_label equals --src_label ({opts.src_label})")
    for name in ("batch_size", "max_steps", "val_interval", "board_interval", "image_interval", "n_best",
                 "test_batch_size", "label_nc"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise InputError(f"--{name} must be >= 1")
    if opts.label_nc < 2:
        raise InputError("--label_nc must be >= 2 (background + at least one class)")
    _check_class_weights(opts)
    check_exp_dir_apart(opts)
    if opts.save_interval is None:
        opts.save_interval = opts.max_steps
    if opts.no_amp:
        opts.amp = "off"
    return opts


def parse_inference_options(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse and check the options of ``inference.py``."""
    opts = parse(inference_parser(), argv)
    if opts.target_data is not None:
        if opts.test_root is None:
            opts.test_root = opts.target_data / "test"
        if opts.metadata is None:
            opts.metadata = opts.target_data / "metadata.json"
    _require(opts, "exp_dir", "checkpoint_dir", "test_root", "metadata")
    _check_ensemble(opts)
    check_exp_dir_apart(opts)
    return opts


def options_to_dict(opts: argparse.Namespace) -> Dict[str, Any]:
    """JSON/``weights_only``-safe dict of the options (paths as strings)."""
    out: Dict[str, Any] = {}
    for key, value in vars(opts).items():
        if key.startswith("_"):
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, (list, tuple)):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        out[key] = value
    return out
