"""The options of the phase-2 commands: ``pretrain.py``, ``train.py`` (docs/method.md#phase2-options),
``inference.py``, ``predict.py``, ``select_evaluation`` and ``plan``.

One configuration style: each command's options are ONE typed, frozen dataclass (:class:`PretrainOptions`,
:class:`AdaptOptions`, :class:`InferenceOptions`, :class:`PredictOptions`, :class:`SelectEvaluationOptions`,
:class:`PlanOptions`) and its flags are generated from the fields (:class:`robustmedseg.cli.DataclassParser`:
a flag's type and default are its field's).  Nothing is added or changed after parsing: derived values are
properties (:attr:`TrainingOptions.mode`, ``only_intra``, ``checkpoint_interval``, ``amp_mode``).  A
training run stores its options (``opt.json`` and every checkpoint's ``opts``, :meth:`TrainingOptions.to_dict`)
and :func:`stored_training_options` / :func:`load_run_options` read them back as the same type.

Every flag is accepted with underscores (the paper's spelling, e.g. ``--batch_size``) and
with dashes (``--batch-size``), as in every script (:class:`robustmedseg.cli.CliParser`).  Any option of the
training and inference commands can also come from one JSON file given with
``--config FILE``: an object whose keys are option names (underscores), e.g.::

    {"source_root": "prep/site0/train", "val_root": "prep/site0/val", "label_nc": 3}

Flags on the command line override the file.  Unknown keys are an error naming the file.
This replaces the reference's ``configs*`` folders that were *renamed* at import time
(FIX docs/differences.md#d9-25): the data folders are plain options.

Data folders.  ``--source_data DIR`` / ``--target_data DIR`` name a preprocessed site
(``MultiMedSeg/preprocess.py`` output: ``DIR/train`` or ``DIR/train/{labeled,unlabeled}``,
``DIR/val``, ``DIR/test``, ``DIR/metadata.json``); the individual folder flags
(``--source_root``, ``--target_labeled``, ``--target_unlabeled``, ``--val_root``,
``--test_root``, ``--metadata``) override what those imply; they are filled in once, when the options
object is built (:func:`resolve_training_roots`).

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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Type, Union

from robustmedseg.cli import BooleanFlag, CliParser, DataclassParser, dataclass_from_dict, field_type
from robustmedseg.errors import InputError
from robustmedseg.io import check_apart

OPTIONS_NAME = "opt.json"  # a training run's options, in its experiment folder
PAPER_PRETRAIN = ("--batch_size 8 --start_from_latent_avg --label_nc 3 --max_steps 15000 "
                  "--stylegan_weights final_global_model.pt --only_intra --src_label 0 "
                  "--backbone_weights pretrained_models/backbone.pth")
PAPER_TRAIN = ("--start_from_latent_avg --label_nc 3 --max_steps 20000 --checkpoint_dir <pretrain exp>/checkpoints "
               "--one_target_slice --src_label 0 --tgt_label 1")


# ---------------------------------------------------------------------------------- the options, typed
@dataclass(frozen=True)
class _RunOptions:
    """Options every phase-2 command that writes an ``--exp_dir`` shares (flags of ``_common``)."""

    config: Optional[Path] = None
    exp_dir: Optional[Path] = None
    overwrite: bool = False
    device: str = "auto"
    seed: int = 0
    test_batch_size: int = 8
    test_workers: int = 0
    allow_tf32: bool = False
    cudnn_benchmark: bool = False

    def to_dict(self) -> Dict[str, Any]:
        """JSON/``weights_only``-safe dict of the options (paths as strings)."""
        out: Dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, (list, tuple)):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            out[f.name] = value
        return out

    @classmethod
    def path_fields(cls) -> List[str]:
        """Names of the fields that hold a path (every input of the command, and its output)."""
        return [f.name for f in fields(cls) if field_type(cls, f.name) is Path]


@dataclass(frozen=True)
class TrainingOptions(_RunOptions):
    """The options of a phase-2 training run (``pretrain.py``: :class:`PretrainOptions`, ``train.py``:
    :class:`AdaptOptions`), stored in the run as ``opt.json`` and in every checkpoint (:meth:`to_dict`)
    and read back with :func:`stored_training_options`.

    The data folders are the values after ``--source_data`` / ``--target_data`` filled the ones not given
    (:func:`resolve_training_roots`, when the options are built).  Derived values are properties:
    :attr:`mode`, :attr:`only_intra`, :attr:`checkpoint_interval`, :attr:`amp_mode`.  A pretraining run
    has no target data: the target fields stay at their defaults."""

    MODE: ClassVar[str] = ""
    resume: bool = False
    source_data: Optional[Path] = None
    source_root: Optional[Path] = None
    val_root: Optional[Path] = None
    target_data: Optional[Path] = None
    target_labeled: Optional[Path] = None
    target_unlabeled: Optional[Path] = None
    checkpoint_dir: Optional[Path] = None
    one_target_slice: bool = False
    reinit_encoder: bool = False
    stylegan_weights: Optional[Path] = None
    label_nc: int = 3
    src_label: Optional[int] = None
    tgt_label: Optional[int] = None
    n_domains: Optional[int] = None
    output_size: Optional[int] = None
    encoder_input_size: Optional[int] = None
    encoder_depth: Optional[int] = None
    encoder_base_channels: Optional[int] = None
    backbone_weights: Optional[Path] = None
    start_from_latent_avg: bool = False
    disable_residuals: bool = False
    disable_DSBN: bool = False
    invert_intensity: bool = False
    bn_mode: str = "running"
    eval_noise: str = "fixed"
    latent_avg_samples: int = 100_000
    l2_lambda: float = 1.0
    ssim_lambda: float = 1.0
    lpips_lambda: float = 0.8
    ce_lambda: float = 1.0
    dice_lambda: float = 1.0
    ce_weights: Optional[List[float]] = None
    dice_weights: Optional[List[float]] = None
    alex_model: Optional[Path] = None
    alex_pretr_model: Optional[Path] = None
    consider_only_vessels_within_brain: bool = False
    empty_class_score: str = "perfect"
    batch_size: int = 4
    workers: int = 0
    learning_rate: float = 1e-4
    head_learning_rate: float = 1e-3
    optim_name: str = "ranger"
    max_steps: int = 20000
    image_interval: int = 500
    board_interval: int = 100
    val_interval: int = 1000
    save_interval: Optional[int] = None
    step_count: str = "updates"
    n_best: int = 5
    ensemble_selection: str = "validation"
    optimize_mode: str = "foreground"
    train_decoder: bool = False
    disable_balanced_sampling: bool = False
    use_da: bool = False
    feature_scale_rate: float = 1e-4  # the paper's: full feature injection at step 10000
    amp: str = "fp16"
    no_amp: bool = False

    @property
    def mode(self) -> str:
        """``'pretrain'`` or ``'train'`` (adaptation)."""
        return self.MODE

    @property
    def only_intra(self) -> bool:
        """Pretraining trains (and validates) the intra branch only."""
        return self.MODE == "pretrain"

    @property
    def checkpoint_interval(self) -> int:
        """``iteration_<step>.pt`` every this many steps (``--save_interval``, default: at the end)."""
        return self.save_interval if self.save_interval is not None else self.max_steps

    @property
    def amp_mode(self) -> str:
        """The mixed precision used: ``--amp``, or ``off`` with ``--no_amp``."""
        return "off" if self.no_amp else self.amp

    def to_dict(self) -> Dict[str, Any]:
        """The fields, plus ``mode`` and ``only_intra`` (what the readers of older runs look for)."""
        return {**super().to_dict(), "mode": self.mode, "only_intra": self.only_intra}


@dataclass(frozen=True)
class PretrainOptions(TrainingOptions):
    """``MultiMedSeg/pretrain.py`` (P2a)."""

    MODE: ClassVar[str] = "pretrain"
    batch_size: int = 8
    max_steps: int = 15000
    ensemble_selection: str = "paper"  # a pretraining run records its intra branch (no weights to choose)


@dataclass(frozen=True)
class AdaptOptions(TrainingOptions):
    """``MultiMedSeg/train.py`` (P2c)."""

    MODE: ClassVar[str] = "train"


@dataclass(frozen=True)
class InferenceOptions(_RunOptions):
    """``MultiMedSeg/inference.py``: the test folder and metadata are filled from ``--target_data``
    when the options are built."""

    checkpoint_dir: Optional[Path] = None
    target_data: Optional[Path] = None
    test_root: Optional[Path] = None
    metadata: Optional[Path] = None
    labels: Optional[Path] = None
    ensemble_size: Optional[int] = None
    ensemble_weights: Optional[List[float]] = None
    mask_outside_weight: bool = False
    label_nc: Optional[int] = None
    consider_only_vessels_within_brain: bool = False
    empty_class_score: str = "perfect"
    trans_clamp: bool = True
    metrics_space: str = "restored"


@dataclass(frozen=True)
class PredictOptions:
    """``MultiMedSeg/predict.py``."""

    input: Optional[List[Path]] = None
    output: Optional[Path] = None
    checkpoint_dir: Optional[Path] = None
    device: str = "auto"
    ensemble_size: Optional[int] = None
    ensemble_weights: Optional[List[float]] = None
    save_probabilities: bool = False
    output_format: str = "nifti"
    series: Optional[str] = None
    overwrite: bool = False
    keep_going: bool = False
    no_fov_mask: bool = False
    test_batch_size: int = 8
    seed: int = 0
    allow_tf32: bool = False
    cudnn_benchmark: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class SelectEvaluationOptions:
    """``python -m MultiMedSeg.select_evaluation``."""

    checkpoint_dir: Optional[Path] = None
    target_data: Optional[Path] = None
    val_root: Optional[Path] = None
    ensemble_selection: str = "validation"
    empty_class_score: Optional[str] = None
    device: str = "auto"
    test_batch_size: int = 8
    overwrite: bool = False


@dataclass(frozen=True)
class PlanOptions:
    """``python -m MultiMedSeg.plan``."""

    checkpoint_dir: Optional[Path] = None
    metadata: Optional[Path] = None
    force: bool = False
    show: bool = False
    overwrite: bool = False


# synthesis noise of a pSp in eval() when none is given (PSPConfig.eval_noise): the generator's fixed buffers or
# fresh random noise (the original: its g_synthesis always randomises)
EVAL_NOISE_MODES = ("fixed", "random")
# how a class absent from both the prediction and the ground truth is scored: Dice 1 / distances 0, or the
# original's Dice 0 / distances inf (the keys of MultiMedSeg.evaluation.metrics.BOTH_EMPTY)
EMPTY_CLASS_SCORES = ("perfect", "original")
# where inference.py scores (metrics.csv): the restored volume in mm or the preprocessed slice stack in voxels
# (the keys of MultiMedSeg.evaluation.metrics.METRICS_UNIT)
METRICS_SPACES = ("restored", "preprocessed")
# how training counts its steps (MultiMedSeg.training.coach.step_after_update): step k = k updates made
# ('updates') or the original's steps 0 ... max_steps, validated after the update of step k ('original')
STEP_COUNTS = ("updates", "original")
HEADS = ("auto", "source", "target")  # classifier head of the ensemble (MultiMedSeg.ensemble.choose_head)
NOISE_MODES = ("slice", "volume", "fixed")  # synthesis noise of generate_volumes.py (MultiMedSeg.generation)
# whose feature scale the ensemble members run with (MultiMedSeg.ensemble.Ensemble.scales): the best checkpoint's
# for all (the original's generation) or each checkpoint's own
FEATURE_SCALE_SOURCES = ("best", "each")
# fields whose canonical flag has another name (the field keeps the reference's name; the flag is the
# project's one name of the concept, the reference's name is an alias)
CANONICAL_FLAGS = {"ckpt_dir": "--checkpoint_dir", "z_depth": "--n_zbins", "n_segmentation_labels": "--label_nc"}


@dataclass(frozen=True)
class GenerationConfig:
    """``generate_volumes.py`` (the settings of :func:`MultiMedSeg.generation.generate`); a field without a
    default is a required flag."""

    ckpt_dir: Path
    label: int
    n_volumes: int
    slices_in_one_z: int
    n_segmentation_labels: int
    out_dir: Path
    generator: Optional[Path] = None
    clip_mean: Optional[Path] = None
    z_depth: Optional[int] = None
    n_domains: Optional[int] = None
    batch_size: int = 4
    device: str = "auto"
    ensemble_size: Optional[int] = None
    head: str = "auto"
    keep_largest_component: bool = False
    noise: str = "slice"
    feature_scale_from: str = "best"
    seed: int = 0
    nifti: bool = True
    montage: bool = True
    overwrite: bool = False

    @staticmethod
    def flag(name: str) -> str:
        """The canonical ``generate_volumes.py`` flag of field ``name`` (what error messages name)."""
        return CANONICAL_FLAGS.get(name, f"--{name}")

    def validate(self) -> None:
        """Check the plain-value settings (one-line :class:`InputError`)."""
        if int(self.label) < 0:
            raise InputError(f"--label must be >= 0, got {self.label}")
        for name in ("n_volumes", "slices_in_one_z", "batch_size", "n_segmentation_labels"):
            low = 2 if name == "n_segmentation_labels" else 1
            if int(getattr(self, name)) < low:
                raise InputError(f"{self.flag(name)} must be >= {low}, got {getattr(self, name)}")
        if self.noise not in NOISE_MODES:
            raise InputError(f"--noise must be one of {', '.join(NOISE_MODES)}, got {self.noise!r}")
        if self.head not in HEADS:
            raise InputError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.feature_scale_from not in FEATURE_SCALE_SOURCES:
            raise InputError(f"--feature_scale_from must be one of {', '.join(FEATURE_SCALE_SOURCES)}, "
                             f"got {self.feature_scale_from!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise InputError(f"--device must be auto, cpu or cuda, got {self.device!r}")


TRAINING_OPTIONS: Dict[str, Type[TrainingOptions]] = {"pretrain": PretrainOptions, "train": AdaptOptions}


def stored_training_options(stored: Mapping[str, Any], source: Optional[Path] = None) -> TrainingOptions:
    """A run's stored options (``opt.json``, a checkpoint's ``opts``) read back as the type that wrote
    them: :class:`PretrainOptions` or :class:`AdaptOptions` by their ``mode`` (older files: ``only_intra``).
    Keys the class does not have (derived values, options of older versions) are left out."""
    if not isinstance(stored, Mapping):
        raise InputError("stored options are not a JSON object", source)
    mode = stored.get("mode") or ("pretrain" if stored.get("only_intra") else "train")
    if mode not in TRAINING_OPTIONS:
        raise InputError(f"stored options name an unknown mode {mode!r}", source)
    cls = TRAINING_OPTIONS[mode]
    values = {k: v for k, v in stored.items() if v is not None}
    try:
        options, _ = dataclass_from_dict(cls, values)
    except TypeError as err:
        raise InputError(f"stored options cannot be read ({err})", source) from None
    return options


def load_run_options(exp_dir: Path) -> Optional[TrainingOptions]:
    """The options a training run stored in ``EXP/opt.json`` (None when it has none)."""
    path = Path(exp_dir) / OPTIONS_NAME
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"options file is not valid JSON ({err})", path) from None
    return stored_training_options(stored, path)


# ---------------------------------------------------------------------------------- flags from the fields
def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


class _Parser(DataclassParser):
    """The project's parser (both spellings of every flag, one-line usage errors) whose flags are the
    fields of one options dataclass (:class:`robustmedseg.cli.DataclassParser`); a list of numbers is
    written ``1,2,3``."""

    list_converters = {float: _floats}


_EMPTY_CLASS_HELP = ("a class absent from both the prediction and the ground truth of a volume: 'perfect' (default) "
                     "Dice 1 and distances 0, 'original' Dice 0 and distances inf, as the original "
                     "(docs/differences.md#empty-class)")


def _common(p: _Parser) -> None:
    p.add("config", metavar="FILE",
          help="JSON file of option values (keys = option names with underscores); flags override it")
    p.mark_required(p.add("exp_dir", help="output folder (required); must not exist unless --resume/--overwrite"))
    p.add("overwrite", help="replace an existing --exp_dir")
    p.add("device", choices=("auto", "cpu", "cuda"),
          help="one device for everything (auto: cuda when available); no DataParallel")
    p.add("seed", help="seed of torch/numpy/random (default 0, as the reference)")
    p.add("test_batch_size", help="slices per forward pass in validation/inference")
    p.add("test_workers", help="DataLoader workers for validation/inference (reference: 6)")
    p.add("allow_tf32",
          help="CUDA: TF32 tensor cores for float32 convolutions and matrix products (Ampere+; faster, about 1e-3 "
               "relative error per product); off by default")
    p.add("cudnn_benchmark",
          help="CUDA: cuDNN times the convolution algorithms once per input shape and keeps the fastest (fixed "
               "shapes); turns off the deterministic cuDNN setting of the reference; off by default")


def _model(p: _Parser, mode: str) -> None:
    p.add("label_nc", "--num_classes", "--n_segmentation_labels", metavar="L",
          help="number of segmentation classes incl. background (default 3)")
    p.mark_required(p.add("src_label", help="phase-1 domain id of the source (required)"))
    if mode == "train":
        p.mark_required(p.add("tgt_label", help="phase-1 domain id of the target (required)"))
    p.add("n_domains",
          help="generator conditioning width; default: read from the generator file / checkpoint (paper: 3)")
    p.add("output_size", help="generator size; default: read from the generator file (paper: 512)")
    p.add("encoder_input_size",
          help="side of the slices fed to the encoder (pretrain default: min(256, output size), the paper's 256; "
               "train: from the checkpoint)")
    p.add("encoder_depth",
          help="IResNet depth of the encoder (pretrain default 50 as the paper, e.g. 18 for tiny runs; "
               "train: from the checkpoint)")
    p.add("encoder_base_channels",
          help="channels of the encoder's first stage (pretrain default 64 as the paper; train: from the checkpoint)")
    p.add("backbone_weights", "--arcface_model",
          help="ArcFace IResNet backbone.pth to initialise the encoder (the paper's initialisation; IResNet-50, "
               "base 64). Without it a pretraining starts the encoder from random weights and says so in a note")
    p.add("start_from_latent_avg", help="add the domain's average W to the codes (paper: on)")
    p.add("disable_residuals", help="no content features injected into the generator")
    p.add("disable_DSBN", help="one BatchNorm branch for both domains")
    p.add("invert_intensity",
          help="negate target images (and source background) -- for dark-foreground modalities")
    p.add("bn_mode", choices=("running", "batch"),
          help="BatchNorm in eval: 'running' statistics (deterministic, default) or per-batch statistics "
               "(the reference's behaviour, docs/differences.md#d9-36)")
    p.add("eval_noise", choices=EVAL_NOISE_MODES,
          help="synthesis noise of the network in eval (validation, inference, prediction, generation's "
               "segmentation), stored in its checkpoints: 'fixed' the generator's noise buffers (deterministic, "
               "default) or 'random' fresh noise at every forward pass (the original's; with --bn_mode batch it "
               "restores the original entirely, docs/differences.md#d9-36)")
    p.add("latent_avg_samples",
          help="z samples per domain and middle z-bin for the mean latents (paper 1e5)")


def _losses(p: _Parser) -> None:
    p.add("l2_lambda", help="MSE reconstruction weight")
    p.add("ssim_lambda", help="(1 - SSIM) weight (FIX docs/differences.md#d9-28: really SSIM)")
    p.add("lpips_lambda", help="LPIPS weight (needs --alex_model and --alex_pretr_model)")
    p.add("ce_lambda", help="cross-entropy weight")
    p.add("dice_lambda", help="soft Dice weight")
    p.add("ce_weights", help="per-class CE weights, label_nc numbers (default 1/L each)")
    p.add("dice_weights", help="per-class Dice weights, label_nc numbers (default 1/L each)")
    p.add("alex_model", help="LPIPS v0.1 linear heads alex.pth")
    p.add("alex_pretr_model", help="AlexNet ImageNet weights (alex_pretr.pth)")
    p.add("consider_only_vessels_within_brain",
          help="metrics: label 2 (vessel) is scored only inside the GT non-background region (brain), as the "
               "original; the other classes and 'foreground' are unchanged")
    p.add("empty_class_score", choices=EMPTY_CLASS_SCORES,
          help="validation metrics (best-k choice, evaluation.json): " + _EMPTY_CLASS_HELP)


def training_parser(mode: str) -> _Parser:
    """Parser of ``pretrain.py`` (``mode='pretrain'``) or ``train.py`` (``mode='train'``)."""
    pre = mode == "pretrain"
    desc = ("Phase 2a: pretrain the pSp segmenter on labeled source slices (intra branch only)." if pre else
            "Phase 2c: adapt a pretrained pSp segmenter to a target domain (intra, inter and cycle branches).")
    epilog = f"Paper command: python MultiMedSeg/{mode}.py --exp_dir EXP --config data.json " + (
        PAPER_PRETRAIN if pre else PAPER_TRAIN)
    p = _Parser(TRAINING_OPTIONS[mode], prog=f"MultiMedSeg/{mode}.py", command=f"MultiMedSeg.{mode}", description=desc, epilog=epilog)
    _common(p)
    p.add("resume", help="continue the run in --exp_dir from checkpoints/last.pt")
    p.add("source_data",
          help="preprocessed source site folder (uses DIR/train[/labeled] and, for pretrain, DIR/val)")
    p.add("source_root", help="folder of labeled source training slices")
    p.add("val_root",
          help="validation slices (pretrain: source; train: labeled target); default from --*_data")
    if not pre:
        p.add("target_data",
              help="preprocessed target site folder (DIR/train/labeled, DIR/train/unlabeled, DIR/val)")
        p.add("target_labeled", help="folder of labeled target training slices")
        p.add("target_unlabeled", help="folder of unlabeled target training slices (optional)")
        p.mark_required(p.add("checkpoint_dir",
                              help="pretrain output (its folder or checkpoints/): its best checkpoint initialises "
                                   "this run (required)"))
        p.add("one_target_slice", help="keep only the middle labeled slice of each target volume")
        p.add("reinit_encoder",
              help="as the original: do not carry the pretrained encoder over, start it again from the ArcFace "
                   "backbone (--backbone_weights; the rest random) and recompute both mean latents; only the "
                   "generator and the classifiers come from --checkpoint_dir (default: the encoder is kept)")
    else:
        p.mark_required(p.add("stylegan_weights",
                              help="phase-1 final_global_model.pt (g_ema used; required)"))
        p.add_argument("--only_intra", dest="paper_only_intra", action="store_true",  # not an option: a property
                       help="accepted for the paper command; pretraining is always intra-only")
    _model(p, mode)
    _losses(p)
    p.add("batch_size", help="training batch size")
    p.add("workers", help="DataLoader workers for training (reference: 6)")
    p.add("learning_rate", help="encoder (and decoder) learning rate")
    p.add("head_learning_rate", help="Adam learning rate of the pixel classifiers")
    p.add("optim_name", choices=("ranger", "adam"), help="encoder optimiser")
    p.add("max_steps", help="number of optimisation steps")
    p.add("image_interval", help="TensorBoard image grid every N steps")
    p.add("board_interval", help="TensorBoard scalars every N steps")
    p.add("val_interval", help="validate every N steps (and at --max_steps)")
    p.add("save_interval", help="write iteration_<step>.pt every N steps (default: at the end)")
    p.add("step_count", choices=STEP_COUNTS,
          help="'updates' (default): --max_steps updates, step k is validated after k updates; 'original': the "
               "original's steps 0 ... max_steps (max_steps + 1 updates; step 0 is never validated), step k "
               "validated after its own update, i.e. after k + 1 updates (docs/differences.md#step-count)")
    p.add("n_best", "--ensemble_size", help="k best checkpoints kept")
    if not pre:
        from MultiMedSeg.evaluation.settings import RULES, WEIGHT_GRID

        grid = " / ".join(f"{a:g},{b:g}" for a, b in WEIGHT_GRID)
        p.add("ensemble_selection", choices=RULES,
              help="evaluation settings written to checkpoints/evaluation.json at the end (what inference.py and "
                   "predict.py use by default): 'validation' (default) scores the ensemble of the kept best "
                   f"checkpoints on the validation volumes for the (inter, intra) weights {grid} and keeps the best "
                   f"mean Dice (ties: the paper's {grid.split(' / ')[0]}); 'paper' records the paper's fixed "
                   f"{grid.split(' / ')[0]} (docs/differences.md)")
    p.add("optimize_mode", choices=("foreground", "favoured"),
          help="best-checkpoint classes: all foreground classes, or the favoured ones (largest weight in the CE or "
               "Dice weights, whichever has the larger maximum; every class incl. background without weights)")
    p.add("train_decoder", help="also train the generator")
    p.add("disable_balanced_sampling", help="plain random source/target pairs")
    p.add("use_da", help="mirror + rotation/scale augmentation")
    p.add("feature_scale_rate",
          help="feature_scale = min(1, rate*step) (paper 1e-4: full injection at step 10000)")
    p.add("amp", choices=("fp16", "bf16", "off"),
          help="CUDA mixed precision: autocast to float16 with a gradient scaler (default, as the reference), to "
               "bfloat16 (no scaler; Ampere+), or off (float32). Never used on CPU")
    p.add("no_amp", help="same as --amp off (kept for older commands)")
    return p


def inference_parser() -> _Parser:
    p = _Parser(InferenceOptions, prog="MultiMedSeg/inference.py", command="MultiMedSeg.inference",
                description="Phase 3: segment test volumes with the k best checkpoints of a training run and "
                            "write <id>_intra/_inter/_pred/_trans NIfTI files on the original grid.",
                epilog="Example: python MultiMedSeg/inference.py --checkpoint_dir EXP --target_data PREP/site2 "
                       "--exp_dir OUT --ensemble_size 5")
    _common(p)
    p.mark_required(p.add("checkpoint_dir",
                          help="training output folder (or its checkpoints/) (required)"))
    p.add("target_data", help="preprocessed site folder: DIR/test and DIR/metadata.json")
    p.add("test_root", help="folder of test slices (default DIR/test of --target_data)")
    p.add("metadata", help="metadata.json of the preprocessing (default DIR/metadata.json)")
    p.add("labels",
          help="folder of ground-truth label NIfTI files <id>.nii[.gz] (default: label paths in the metadata)")
    p.add("ensemble_size",
          help="number of best checkpoints averaged (default: the run's checkpoints/evaluation.json; a run without "
               "it: 5, the paper's)")
    p.add("ensemble_weights", metavar="INTER,INTRA",
          help="weights of the inter and intra probabilities in _pred (default: the run's "
               "checkpoints/evaluation.json, chosen on validation when it was trained; a run without it: 0.6,0.4, "
               "the paper's)")
    p.add("mask_outside_weight",
          help="predict background (and -1 in _trans) outside each slice's weight map; default: the weight map "
               "is not applied at inference, as the original")
    p.add("label_nc", "--num_classes", "--n_segmentation_labels", metavar="L",
          help="check: must equal the checkpoints' label_nc")
    p.add("consider_only_vessels_within_brain",
          help="metrics: label 2 (vessel) is scored only inside the GT non-background region (brain), as the "
               "original; the other classes and 'foreground' are unchanged")
    p.add("empty_class_score", choices=EMPTY_CLASS_SCORES, help="metrics.csv: " + _EMPTY_CLASS_HELP)
    p.add("trans_clamp", action=BooleanFlag,
          help="clamp the translated image <id>_trans to [-1, 1], the slice format's range (default); "
               "--no_trans_clamp keeps the network's values, as the original (docs/differences.md#trans-range)")
    p.add("metrics_space", choices=METRICS_SPACES,
          help="metrics.csv: 'restored' (default) Dice, HD95 and HD in mm on each volume restored to its original "
               "grid against the label file; 'preprocessed' the original's figures: Dice and maximum HD in voxels on "
               "the preprocessed slice stack against the slices' masks (hd95 empty); column unit = mm or voxel "
               "(docs/differences.md#inference-metrics)")
    return p


def predict_parser() -> _Parser:
    from MultiMedSeg.data.formats import OUTPUT_FORMATS

    p = _Parser(PredictOptions, prog="MultiMedSeg/predict.py", command="MultiMedSeg.predict",
                description="Segment new scans (NIfTI, NRRD, MetaImage, DICOM series; any orientation) with the k "
                            "best checkpoints of a training run, preprocessed by the run's plan, and write the labels "
                            "on each scan's own grid. No labels needed.",
                epilog="Example: python MultiMedSeg/predict.py -i new_scans/ -o segmentations/ --checkpoint_dir "
                       "runs/adapt_site2 -- outputs: OUT/<id>.nii.gz (labels; --output_format input: the input's "
                       "format), OUT/<id>_probabilities.nii.gz with --save_probabilities, OUT/predict.json.")
    p.mark_required(p.add("input", flags=("-i", "--input"), metavar="PATH",
                   help="scans: image files and/or folders (a folder's image files, its DICOM series and those of its "
                        "sub-folders); formats: .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, DICOM series folders"))
    p.mark_required(p.add("output", flags=("-o", "--output"), metavar="OUT",
                   help="output folder (refused if it exists, unless --overwrite; written completely or not at all)"))
    p.mark_required(p.add("checkpoint_dir",
                          help="training run (its folder or checkpoints/) holding best.json and plan.json (required)"))
    p.add("device", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    p.add("ensemble_size", metavar="K",
          help="number of best checkpoints averaged: the K best by validation score (checkpoints/best.json order; "
               "default: the run's checkpoints/evaluation.json; a run without it: 5; a run that kept fewer uses all "
               "it kept, with a note). Time is proportional to K: fewer members trade Dice for time "
               "(docs/phase2.md#prediction-time-on-a-cpu)")
    p.add("ensemble_weights", metavar="INTER,INTRA",
          help="adapted runs: weights of the inter and intra probabilities (default: the run's "
               "checkpoints/evaluation.json; a run without it: 0.6,0.4, the paper's), as inference.py's _pred; "
               "an inter weight of 0 skips the members' inter passes (half the time, identical output)")
    p.add("save_probabilities",
          help="also write OUT/<id>_probabilities (x, y, z, class) float32 on the scan's grid")
    p.add("output_format", choices=OUTPUT_FORMATS,
          help="nifti (default, .nii.gz), input (the scan's own format; a DICOM series: NIfTI), nrrd or mha")
    p.add("series", metavar="UID", help="DICOM SeriesInstanceUID to segment in a folder holding several")
    p.add("overwrite", help="replace an existing output folder once the new one is complete")
    p.add("keep_going",
          help="a batch: segment every good scan, list the scans that cannot be read or segmented under 'failed' in "
               "OUT/predict.json (a warning line each) and exit with status 3 (default: the first bad scan stops "
               "everything, nothing written, exit 2)")
    p.add("no_fov_mask",
          help="write the model's raw labels: no background outside the head and the training slab (the "
               "field-of-view rule, MultiMedSeg/data/field_of_view.py)")
    p.add("test_batch_size", help="slices per forward pass (default 8)")
    p.add("seed", help="seed of torch/numpy/random (default 0)")
    p.add("allow_tf32", help="CUDA: TF32 tensor cores for float32 convolutions (off by default)")
    p.add("cudnn_benchmark", help="CUDA: cuDNN autotuning per input shape (off by default)")
    p.add("quiet", help="print only warnings and errors (and no progress bar; the bar, with the estimated time "
                        "left, is shown only when stderr is a terminal)")
    return p


def select_evaluation_parser() -> _Parser:
    from MultiMedSeg.evaluation.settings import RULES  # no torch import before --help

    p = _Parser(SelectEvaluationOptions, prog="python -m MultiMedSeg.select_evaluation",
                command="MultiMedSeg.select_evaluation",
                description="Choose (or choose again) the evaluation settings of a trained run: its "
                            "checkpoints/evaluation.json.",
                epilog="Example: python -m MultiMedSeg.select_evaluation --checkpoint_dir runs/adapt_site2 "
                       "--target_data prep/site2 --overwrite", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add("checkpoint_dir", required=True, help="training run (its folder or checkpoints/)")
    p.add("target_data", help="preprocessed target site: its val/ holds the validation volumes (default: the "
                              "val_root of the run's opt.json)")
    p.add("val_root", help="folder of validation slices (overrides --target_data)")
    p.add("ensemble_selection", choices=RULES,
          help="validation (default): the (inter, intra) weights with the best validation mean Dice; "
               "paper: the paper's 0.6,0.4 without searching")
    p.add("empty_class_score", choices=EMPTY_CLASS_SCORES,
          help="validation Dice of the candidates (default: the run's opt.json, else perfect): " + _EMPTY_CLASS_HELP)
    p.add("device", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    p.add("test_batch_size", help="slices per forward pass (default 8)")
    p.add("overwrite", help="replace an existing evaluation.json")
    return p


def parse_select_evaluation_options(argv: Optional[Sequence[str]]) -> SelectEvaluationOptions:
    parser = select_evaluation_parser()
    opts: SelectEvaluationOptions = parser.build(parser.parse_args(argv))
    if opts.checkpoint_dir is None:
        raise InputError("--checkpoint_dir is required")
    if opts.test_batch_size < 1:
        raise InputError("--test_batch_size must be >= 1")
    return opts


def plan_parser() -> _Parser:
    p = _Parser(PlanOptions, prog="python -m MultiMedSeg.plan", command="MultiMedSeg.plan",
                description="Write (or show) the preprocessing plan of a training run, for runs trained before "
                            "plans existed.",
                epilog="Example: python -m MultiMedSeg.plan --checkpoint_dir runs/adapt_site2 "
                       "--metadata prep/site2/metadata.json", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add("checkpoint_dir", required=True, help="training run (its folder or checkpoints/)")
    p.add("metadata",
          help="metadata.json (or its folder) of the preprocessed site the run segments: the target site of an "
               "adapted run, the source site of a pretraining run (default: the one named by the run's saved "
               "options)")
    p.add("force", help="accept a --metadata other than the one the run's options name (e.g. the data moved)")
    p.add("show", help="print the run's plan and stop")
    p.add("overwrite", help="replace an existing plan.json")
    return p


def parse_plan_options(argv: Optional[Sequence[str]]) -> PlanOptions:
    parser = plan_parser()
    opts: PlanOptions = parser.build(parser.parse_args(argv))
    if opts.checkpoint_dir is None:
        raise InputError("--checkpoint_dir is required")
    return opts


def _check_ensemble(opts: Union[InferenceOptions, PredictOptions]) -> None:
    """None = not given: the run's evaluation settings (MultiMedSeg.evaluation.settings) decide."""
    if opts.ensemble_size is not None and opts.ensemble_size < 1:
        raise InputError("--ensemble_size must be >= 1")
    w = opts.ensemble_weights
    if w is not None and (len(w) != 2 or min(w) < 0 or sum(w) <= 0):
        raise InputError("--ensemble_weights needs two non-negative numbers (inter, intra) with a positive sum")


def parse_predict_options(argv: Optional[Sequence[str]]) -> PredictOptions:
    """Parse and check the options of ``predict.py``."""
    parser = predict_parser()
    opts: PredictOptions = parser.build(parser.parse_args(argv))
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
    """The flags (after ``--config``) with every number checked; :meth:`_Parser.build` makes the options."""
    _apply_config(parser, argv)
    values = parser.parse_args(argv)
    _check_numbers(values, parser)
    return values


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


def check_exp_dir_apart(opts: _RunOptions) -> None:
    """``--exp_dir`` may not be, contain or lie inside any input path of the command (every other
    path option: data folders, checkpoints, weights, metadata, the config file)."""
    inputs = {f"--{name}": getattr(opts, name) for name in opts.path_fields() if name != "exp_dir"}
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


def resolve_training_roots(given: argparse.Namespace, mode: str) -> Dict[str, Path]:
    """The data folders ``--source_data`` / ``--target_data`` imply and the flags did not give
    (``source_root``, ``target_labeled``, ``target_unlabeled``, ``val_root``)."""
    filled: Dict[str, Path] = {}
    if given.source_data is not None and given.source_root is None:
        filled["source_root"] = _source_train(given.source_data)
    if mode == "pretrain":
        if given.val_root is None and given.source_data is not None:
            filled["val_root"] = given.source_data / "val"
        return filled
    if given.target_data is not None:
        train = given.target_data / "train"
        if given.target_labeled is None:
            filled["target_labeled"] = _subfolder(train, "labeled") or train
        unlabeled = _subfolder(train, "unlabeled")
        if given.target_unlabeled is None and unlabeled is not None and any(unlabeled.glob("*.npz")):
            filled["target_unlabeled"] = unlabeled  # an empty unlabeled/ folder (all volumes labeled) is skipped
        if given.val_root is None:
            filled["val_root"] = given.target_data / "val"
    return filled


def _require(opts: Any, *names: str) -> None:
    for name in names:
        if getattr(opts, name) is None:
            raise InputError(f"--{name} is required (on the command line or in --config)")


def _check_class_weights(opts: TrainingOptions) -> None:
    for name in ("ce_weights", "dice_weights"):
        w = getattr(opts, name)
        if w is not None and opts.label_nc is not None and len(w) != opts.label_nc:
            raise InputError(f"--{name} has {len(w)} values but --label_nc is {opts.label_nc}")


def parse_training_options(argv: Optional[Sequence[str]], mode: str) -> TrainingOptions:
    """Parse and check the options of ``pretrain.py`` (:class:`PretrainOptions`) or ``train.py``
    (:class:`AdaptOptions`); one-line errors."""
    parser = training_parser(mode)
    given = parse(parser, argv)
    opts: TrainingOptions = parser.build(given, **resolve_training_roots(given, mode))
    _require(opts, "exp_dir", "src_label", "source_root", "val_root")
    if mode == "pretrain":
        _require(opts, "stylegan_weights")
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
    return opts


def parse_inference_options(argv: Optional[Sequence[str]]) -> InferenceOptions:
    """Parse and check the options of ``inference.py``."""
    parser = inference_parser()
    given = parse(parser, argv)
    filled: Dict[str, Path] = {}
    if given.target_data is not None:
        if given.test_root is None:
            filled["test_root"] = given.target_data / "test"
        if given.metadata is None:
            filled["metadata"] = given.target_data / "metadata.json"
    opts: InferenceOptions = parser.build(given, **filled)
    _require(opts, "exp_dir", "checkpoint_dir", "test_root", "metadata")
    _check_ensemble(opts)
    check_exp_dir_apart(opts)
    return opts
