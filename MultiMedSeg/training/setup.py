"""Set-up of a phase-2 run, before the training loop (:class:`MultiMedSeg.training.coach.Coach`).

* the experiment-folder policy: :func:`check_exp_dir` (no side effects) and :class:`RunFolder`
  (where the run writes, and what is left when it ends);
* the model of a pretraining run: :func:`pretrain_config` (generator geometry from the phase-1 file,
  read by :func:`robustmedseg.factory_file.read_factory_file`, the rest from the flags);
* the model of an adaptation run: :func:`best_checkpoint` of the pretraining run and
  :func:`adaptation_model` (its config with two domains);
* :func:`check_domains`: domain ids must index the generator's conditioning;
* the run's preprocessing plan (:mod:`MultiMedSeg.data.preprocessing_plan`): :func:`preprocessing_plan` finds the
  ``metadata.json`` of the site the run segments and :func:`run_plan` builds the plan from it;
  :func:`write_run_plan` writes the plan of a finished run (``python -m MultiMedSeg.plan``).

Every problem is a one-line :class:`~robustmedseg.errors.InputError` naming the file.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from MultiMedSeg.data.preprocessing_plan import PLAN_NAME, PreprocessingPlan, plan_from_metadata, save_plan
from MultiMedSeg.data.volumes_to_slices import METADATA_NAME
from MultiMedSeg.data.restore import load_metadata
from MultiMedSeg.models.psp import PSP, PSPConfig
from MultiMedSeg.options import OPTIONS_NAME, TrainingOptions, stored_training_options
from MultiMedSeg import checkpoints as ck
from robustmedseg.errors import InputError
from robustmedseg.factory_file import read_factory_file
from robustmedseg.io import check_parents, clean_stale_temporaries, load_torch_file, replace_dir, temp_sibling


def check_exp_dir(opts: TrainingOptions) -> Path:
    """Refuse an existing ``--exp_dir`` unless ``--resume``/``--overwrite`` (no side effects)."""
    exp = Path(opts.exp_dir)
    check_parents(exp)
    if opts.resume:
        if not (exp / "checkpoints" / ck.LAST_NAME).is_file():
            raise InputError(f"nothing to resume: checkpoints/{ck.LAST_NAME} not found", exp)
    elif exp.exists():
        if not opts.overwrite:
            raise InputError("experiment folder already exists (pass --resume to continue it or --overwrite "
                             "to replace it)", exp)
        if any(exp.iterdir()) and not ((exp / OPTIONS_NAME).is_file() or (exp / "checkpoints").is_dir()):
            raise InputError("refusing to --overwrite a non-empty folder that is not a training output", exp)
    return exp


class RunFolder:
    """The folder a phase-2 run writes to, and what is left of it when the run ends.

    * a new run (``--exp_dir`` absent) writes into ``--exp_dir``; if it fails or is interrupted
      before a resumable state (``checkpoints/last.pt``) was saved, the folder is removed, so
      nothing blocks the rerun; with a saved state it stays for ``--resume``;
    * ``--overwrite`` of an existing run writes into a hidden sibling temporary
      (:func:`robustmedseg.io.temp_sibling`) that replaces the old run only when the new one
      completes; on a failure or an interruption the temporary is removed and the old run is
      left as it was;
    * ``--resume`` writes into ``--exp_dir`` and leaves it as it is on a failure.
    """

    def __init__(self, opts: TrainingOptions):
        self.final = Path(opts.exp_dir)
        if opts.resume:
            self.mode, self.path = "resume", self.final
        elif self.final.exists():
            self.mode, self.path = "replace", temp_sibling(self.final, "new")
        else:
            self.mode, self.path = "new", self.final
        self.opened = False

    def open(self) -> Path:
        """Create the folder (and ``checkpoints/``); returns it."""
        if self.mode == "replace":
            clean_stale_temporaries(self.final)
        elif self.mode == "new" and self.final.exists():
            raise InputError("experiment folder appeared while this run was being set up", self.final)
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.opened = True
        return self.path

    def commit(self) -> None:
        """The run completed: a replacement run takes the place of the old one now."""
        if self.mode == "replace" and self.opened:
            replace_dir(self.path, self.final)

    def abandon(self) -> Optional[str]:
        """The run failed or was interrupted: remove what cannot be resumed; returns a note for the user."""
        if not self.opened:
            return None
        if self.mode == "replace":
            shutil.rmtree(self.path, ignore_errors=True)
            return f"the new run was discarded; the previous run in {self.final} is unchanged"
        if self.mode == "new":
            if (self.path / "checkpoints" / ck.LAST_NAME).is_file():
                return f"the run in {self.final} keeps its last saved state: --resume continues it"
            shutil.rmtree(self.path, ignore_errors=True)
            return f"removed the incomplete run folder {self.final} (nothing to resume yet)"
        return None

    @property
    def keeps_progress(self) -> bool:
        """Whether a state saved now survives :meth:`abandon` (False while replacing an old run)."""
        return self.mode != "replace"


def check_domains(opts: TrainingOptions, n_domains: int, source: Path) -> None:
    """Domain ids must index the generator's conditioning (one-line error naming ``source``)."""
    for flag in ("src_label", "tgt_label"):
        value = getattr(opts, flag)
        if value is not None and not 0 <= value < n_domains:
            raise InputError(f"--{flag} {value} is not a domain of this generator (n_domains = {n_domains})", source)


BACKBONE_NOTE = ("note: no --backbone_weights: the encoder starts from random weights (the paper initialises it "
                 "from ArcFace backbone.pth)")


def backbone_note(opts: TrainingOptions) -> Optional[str]:
    """The note of a new pretraining (not ``--resume``) without ``--backbone_weights``: its encoder starts
    from random weights, not the paper's ArcFace initialisation (docs/differences.md#backbone-default)."""
    if opts.only_intra and not opts.resume and opts.backbone_weights is None:
        return BACKBONE_NOTE
    return None


def pretrain_config(opts: TrainingOptions) -> PSPConfig:
    """PSPConfig of a pretraining run: generator geometry from the phase-1 file, the rest from flags."""
    path = Path(opts.stylegan_weights)
    _, args = read_factory_file(path)
    n_domains = int(args["n_domains"])
    if opts.n_domains is not None and opts.n_domains != n_domains:
        raise InputError(f"generator file was trained with n_domains = {n_domains} but --n_domains is "
                         f"{opts.n_domains}", path)
    size = int(args["size"])
    if opts.output_size is not None and opts.output_size != size:
        raise InputError(f"generator file is {size} px but --output_size is {opts.output_size}", path)
    check_domains(opts, n_domains, path)
    try:
        return PSPConfig.from_generator_args(
            args, src_tgt_domains=[opts.src_label], label_nc=opts.label_nc, encoder_depth=opts.encoder_depth or 50,
            encoder_base_channels=opts.encoder_base_channels or 64,
            encoder_input_size=opts.encoder_input_size or min(256, size), residual=not opts.disable_residuals,
            dsbn=not opts.disable_DSBN, invert_intensity=opts.invert_intensity,
            start_from_latent_avg=opts.start_from_latent_avg, bn_mode=opts.bn_mode, eval_noise=opts.eval_noise)
    except ValueError as err:
        raise InputError(f"invalid model configuration: {err}", path) from None


def best_checkpoint(folder: Path) -> Path:
    """The best checkpoint of a finished run (``best.json``; ``last.pt`` when nothing was validated)."""
    folder = ck.checkpoints_folder(Path(folder))
    if (folder / ck.INDEX_NAME).is_file():
        index = ck.BestIndex.load(folder)
        if index.entries:
            return index.paths(1)[0]
    if (folder / ck.LAST_NAME).is_file():
        return folder / ck.LAST_NAME
    raise InputError("no checkpoint found (expected checkpoints/best.json or last.pt; given by --checkpoint_dir)",
                     folder)


def adaptation_model(opts: TrainingOptions) -> Tuple[PSP, Path]:
    """PSP for ``train.py``: the pretraining checkpoint with two domains [src, tgt]."""
    path = best_checkpoint(opts.checkpoint_dir)
    payload = load_torch_file(path, "pretraining checkpoint", mapping=True)
    config = payload.get("config")
    if not isinstance(config, Mapping):
        raise InputError("not a MultiMedSeg phase-2 checkpoint (no 'config')", path)
    n_domains = int(config.get("n_domains", 0))
    if opts.n_domains is not None and opts.n_domains != n_domains:
        raise InputError(f"checkpoint has n_domains = {n_domains} but --n_domains is {opts.n_domains}", path)
    check_domains(opts, n_domains, path)
    src = list(config.get("src_tgt_domains", []))[:1]
    if src and src[0] != opts.src_label:
        raise InputError(f"checkpoint was pretrained with source domain {src[0]} but --src_label is "
                         f"{opts.src_label}", path)
    overrides: Dict[str, Any] = dict(src_tgt_domains=[opts.src_label, opts.tgt_label], label_nc=opts.label_nc,
                                     invert_intensity=opts.invert_intensity, bn_mode=opts.bn_mode,
                                     eval_noise=opts.eval_noise,
                                     start_from_latent_avg=opts.start_from_latent_avg or
                                     bool(config.get("start_from_latent_avg")),
                                     residual=not opts.disable_residuals, dsbn=not opts.disable_DSBN)
    for flag in ("output_size", "encoder_depth", "encoder_base_channels", "encoder_input_size"):
        if getattr(opts, flag) is not None:
            overrides[flag] = getattr(opts, flag)
    if int(config.get("label_nc", opts.label_nc)) != opts.label_nc:
        raise InputError(f"checkpoint segments {config.get('label_nc')} classes but --label_nc is {opts.label_nc}",
                         path)
    try:
        net = PSP(PSPConfig.from_dict(config).replace(**overrides))
    except (TypeError, ValueError) as err:
        raise InputError(f"invalid model configuration: {err}", path) from None
    net.load_checkpoint(path, payload)
    if opts.reinit_encoder:  # the original's behaviour (docs/differences.md#d9-38)
        net.reinitialise_encoder(opts.backbone_weights)
    return net, path


# ---------------------------------------------------------------------------------- preprocessing plan
def run_plan(metadata: Path, domains: Sequence[int], label_nc: int) -> PreprocessingPlan:
    """The plan of a run with checkpoint domains ``domains`` ([src] or [src, tgt]) from the
    ``metadata.json`` of the site it segments (the target of an adapted run, else the source)."""
    meta = load_metadata(metadata)
    adapted = len(domains) == 2
    plan = plan_from_metadata(meta, Path(metadata), int(domains[-1] if adapted else domains[0]),
                              "target" if adapted else "source")
    if plan.num_classes != int(label_nc):
        raise InputError(f"label count mismatch: the preprocessed site has {plan.num_classes} classes, the run "
                         f"{label_nc}", metadata)
    return plan


def find_site_metadata(*folders: Optional[Path]) -> Optional[Path]:
    """``metadata.json`` of the preprocessed site holding one of ``folders`` (the folder itself, or
    its parent or grandparent: ``SITE/val``, ``SITE/train/labeled``); None when there is none."""
    for folder in folders:
        if folder is None:
            continue
        folder = Path(folder)
        for candidate in (folder, folder.parent, folder.parent.parent):
            if (candidate / METADATA_NAME).is_file():
                return candidate / METADATA_NAME
    return None


def site_metadata(opts: TrainingOptions) -> Optional[Path]:
    """``metadata.json`` of the site a run segments, from its options (parsed, or stored in its checkpoints
    and read back with :func:`~MultiMedSeg.options.stored_training_options`): the source data of a
    pretraining run, the target data of an adaptation run."""
    keys = (("source_data", "val_root", "source_root") if opts.only_intra
            else ("target_data", "val_root", "target_labeled"))
    return find_site_metadata(*(getattr(opts, k) for k in keys if getattr(opts, k) is not None))


def preprocessing_plan(opts: TrainingOptions) -> Optional[PreprocessingPlan]:
    """The plan of this training run (pretraining: the source site, adaptation: the target site), or
    None with a note on stderr when no ``metadata.json`` is found next to its data."""
    metadata = site_metadata(opts)
    if metadata is None:
        print(f"note: no {METADATA_NAME} found next to the {'source' if opts.only_intra else 'target'} data: this "
              "run will have no preprocessing plan for predict; write one later with python -m MultiMedSeg.plan "
              "--checkpoint_dir EXP --metadata PREP/metadata.json", file=sys.stderr)
        return None
    domains = [opts.src_label] if opts.only_intra else [opts.src_label, opts.tgt_label]
    return run_plan(metadata, domains, opts.label_nc)


def write_run_plan(checkpoint_dir: Path, metadata: Optional[Path] = None, force: bool = False,
                   overwrite: bool = False) -> Tuple[Path, PreprocessingPlan]:
    """Write ``checkpoints/plan.json`` of a finished run: from the site its saved options name, or from
    ``metadata`` (a ``metadata.json`` or its folder), which must be that site unless ``force``.  Domains
    and classes come from the run's best checkpoint."""
    folder = ck.checkpoints_folder(Path(checkpoint_dir))
    if (folder / PLAN_NAME).exists() and not overwrite:
        raise InputError("the run already has a plan (pass --overwrite to replace it)", folder / PLAN_NAME)
    index = ck.BestIndex.load(folder)
    if not index.entries:
        raise InputError("best-checkpoint index is empty (the run never validated)", index.path)
    best = index.paths(1)[0]
    payload = load_torch_file(best, "phase-2 checkpoint", mapping=True)
    config, stored = payload.get("config"), payload.get("opts") or {}
    if not isinstance(config, Mapping):
        raise InputError("not a MultiMedSeg phase-2 checkpoint (no 'config')", best)
    trained_on = site_metadata(stored_training_options(stored, best))
    if metadata is None:
        if trained_on is None:
            raise InputError("the run's options name no preprocessed site that still exists; give its "
                             "metadata.json with --metadata", best)
        metadata = trained_on
    else:
        metadata = Path(metadata)
        metadata = metadata / METADATA_NAME if metadata.is_dir() else metadata
        if trained_on is not None and metadata.resolve() != trained_on.resolve() and not force:
            raise InputError(f"the run was trained on the site of {trained_on}, not this one (pass --force if the "
                             f"data moved)", metadata)
    plan = run_plan(metadata, list(config["src_tgt_domains"]), int(config["label_nc"]))
    return save_plan(plan, folder), plan
