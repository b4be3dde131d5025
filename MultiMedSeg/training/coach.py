"""Phase-2 training loop (docs/method.md#coach): source pretraining and target domain adaptation.

One :class:`Coach` runs both: ``opts.only_intra`` (``pretrain.py``) trains the intra branch
on source slices; otherwise (``train.py``) even steps run the intra branch and odd steps the
inter + cycle branches on balanced source/target batches.

Fixes of docs/differences.md in this file: one device, no DataParallel (docs/differences.md#d9-27); the SSIM term really
is ``1 - SSIM`` (docs/differences.md#d9-28, in :mod:`MultiMedSeg.losses`); validation never skips small
batches and groups slices by volume id, not by loader order (docs/differences.md#d9-30); the classifier
optimiser only steps when a head received gradients (docs/differences.md#d9-31); the best-k index is JSON
(docs/differences.md#d9-26, :mod:`MultiMedSeg.checkpoints`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from MultiMedSeg import losses as L
from MultiMedSeg.data.images_dataset import ImagesDataset, VolumeDataset
from MultiMedSeg.data.sampler import BalancedSampler
from MultiMedSeg.data.transforms import eval_transform, train_transform
from MultiMedSeg.models.psp import PSP, PSPConfig, flip_label
from MultiMedSeg.optim import Ranger, foreach_default
from MultiMedSeg import checkpoints as ck
from MultiMedSeg.ensemble import Ensemble, Member, blend, volume_labels
from MultiMedSeg.evaluation.metrics import branch_metrics, mean_metrics, selection_score
from MultiMedSeg.options import OPTIONS_NAME, TrainingOptions
from MultiMedSeg.data.preprocessing_plan import save_plan
from MultiMedSeg.training.setup import (RunFolder, adaptation_model, backbone_note, check_exp_dir, pretrain_config,
                                       preprocessing_plan)
from robustmedseg.device import configure_backends, resolve_device, seed_everything
from robustmedseg.errors import InputError
from robustmedseg.io import load_torch_file

VAL_ENSEMBLE_WEIGHTS = (0.5, 0.5)  # validation ensemble (inter, intra), as the reference


def last_training_step(max_steps: int, step_count: str) -> int:
    """The last training step (0-based) of a run: ``max_steps - 1`` (``--step_count updates``: max_steps
    updates) or ``max_steps`` (``original``: steps 0 ... max_steps, max_steps + 1 updates)."""
    return max_steps if step_count == "original" else max_steps - 1


def step_after_update(step: int, max_steps: int, val_interval: int, step_count: str) -> Tuple[int, bool, bool]:
    """After the update of training step ``step`` (0-based, the step the update's feature scale and
    intra/inter turn are taken from): ``(label, validate, final)``.  ``label`` names the state the
    validation and checkpoints see: the number of updates made (``updates``: ``step + 1``) or the step
    itself (``original``); it is validated every ``val_interval`` and at ``max_steps``, never at 0."""
    label = step if step_count == "original" else step + 1
    final = label == max_steps
    return label, (label > 0 and label % val_interval == 0) or final, final


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype of ``--amp`` on ``device`` (None: no autocast; AMP is CUDA only)."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise InputError(f"--amp bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                         "use --amp fp16 or --amp off")
    return torch.bfloat16 if amp == "bf16" else torch.float16


class LossBundle:
    """The loss weights and (if used) the LPIPS network, built once from the options."""

    def __init__(self, opts: TrainingOptions, device: torch.device):
        self.cfg = L.LossConfig.from_options(opts)
        self.lpips = None
        if opts.lpips_lambda > 0:
            self.lpips = L.build_lpips(opts.alex_model, opts.alex_pretr_model).to(device)

    def calc_loss(self, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, where: torch.Tensor,
                  weight: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        return L.calc_loss(x.float(), y.float(), out.float(), where, self.cfg, weight=weight, lpips=self.lpips)

    def mask_loss(self, seg: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        """CE + Dice without weight maps (the inter branch's translated segmentation)."""
        return L.mask_loss(y.float(), seg.float(), self.cfg)

    def favoured_channels(self) -> List[int]:
        return self.cfg.favoured()


def make_encoder_optimizer(params: List[torch.nn.Parameter], opts: TrainingOptions) -> torch.optim.Optimizer:
    """Ranger (default, docs/method.md#coach) or Adam over the encoder (and decoder) parameters."""
    if opts.optim_name == "adam":
        return torch.optim.Adam(params, lr=opts.learning_rate, foreach=foreach_default())
    return Ranger(params, lr=opts.learning_rate, foreach=foreach_default())


# ---------------------------------------------------------------------------------- coach
class Coach:
    """Builds model, data, losses and optimisers from the options and runs training."""

    def __init__(self, opts: TrainingOptions):
        self.opts = opts
        self.device = resolve_device(opts.device)
        self.amp_dtype = amp_dtype(opts.amp_mode, self.device)
        self.use_amp = self.amp_dtype is not None
        seed_everything(opts.seed)
        configure_backends(opts.allow_tf32, opts.cudnn_benchmark)
        check_exp_dir(opts)
        self.run = RunFolder(opts)  # nothing is created before the model and the data are ready
        self.exp_dir = self.run.path  # where this run writes (a hidden temporary while replacing an old run)
        self.ckpt_dir = self.exp_dir / "checkpoints"
        self.global_step = 0
        self.best = ck.BestIndex(self.ckpt_dir, opts.n_best)
        self._writer = None
        self.net = self._build_model()
        opts = self.opts  # with the model's geometry
        self._build_data()
        self.plan = preprocessing_plan(opts)  # checked now, written with the run (MultiMedSeg.data.preprocessing_plan)
        self.losses = LossBundle(opts, self.device)
        self.optimizer = make_encoder_optimizer(self.net.encoder_parameters(opts.train_decoder), opts)
        self.optimizer_seg = torch.optim.Adam(self.net.classifier_parameters(), lr=opts.head_learning_rate,
                                              foreach=foreach_default())
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if opts.resume:
            self._resume()
        self.run.open()
        try:
            ck.write_json(self.exp_dir / OPTIONS_NAME, self.opts.to_dict())
            if self.plan is not None:
                save_plan(self.plan, self.ckpt_dir)
        except BaseException:
            self.run.abandon()
            raise
        note = backbone_note(self.opts)  # once the run is set up (an input error stays one line)
        if note:
            print(note, file=sys.stderr)

    # ---------------------------------------------------------------- building
    def _build_model(self) -> PSP:
        opts = self.opts
        if opts.resume:
            payload = load_torch_file(self.ckpt_dir / ck.LAST_NAME, "resume checkpoint", mapping=True)
            self._resume_payload = payload
            net = PSP(PSPConfig.from_dict(payload["config"]))
            net.load_checkpoint(self.ckpt_dir / ck.LAST_NAME, payload)
            self._check_resume_config(net.config)
            if not opts.only_intra:
                net.freeze_source_classifier()
        elif opts.only_intra:
            net = PSP(pretrain_config(opts), arcface_weights=opts.backbone_weights)
            net.load_generator(opts.stylegan_weights)
        else:
            net, self.init_checkpoint = adaptation_model(opts)
            net.freeze_source_classifier()
        net.set_decoder_trainable(bool(opts.train_decoder))
        net.to(self.device)
        net.compute_latent_avg(n=opts.latent_avg_samples, seed=opts.seed)
        # the rest of the run is reported with the model's real geometry (a new options object, never a change)
        self.opts = dataclasses.replace(opts, output_size=net.config.output_size,
                                        encoder_input_size=net.config.encoder_input_size,
                                        n_domains=net.config.n_domains)
        return net

    def _check_resume_config(self, config: PSPConfig) -> None:
        opts = self.opts
        want = [opts.src_label] + ([] if opts.only_intra else [opts.tgt_label])
        if list(config.src_tgt_domains) != want or config.label_nc != opts.label_nc:
            raise InputError(f"--resume: the run in this folder has domains {config.src_tgt_domains} and "
                             f"label_nc {config.label_nc}, the options give {want} and {opts.label_nc}",
                             self.ckpt_dir / ck.LAST_NAME)

    def _build_data(self) -> None:
        opts = self.opts
        size = self.net.config.encoder_input_size
        self.train_set = ImagesDataset(
            source_root=opts.source_root, target_labeled=opts.target_labeled, target_unlabeled=opts.target_unlabeled,
            transform=train_transform(size, opts.use_da), one_target_slice=opts.one_target_slice,
            invert_intensity=opts.invert_intensity, label_nc=opts.label_nc,
            min_length=max(opts.batch_size, opts.test_batch_size))
        if self.train_set.natural_length < 1:
            raise InputError("no training slices")
        self.sampler = BalancedSampler(self.train_set, opts.batch_size, balanced=not opts.disable_balanced_sampling)
        self.train_loader = DataLoader(self.train_set, batch_size=opts.batch_size, sampler=self.sampler,
                                       drop_last=True, num_workers=opts.workers,
                                       pin_memory=self.device.type == "cuda")
        val_domain = 0 if opts.only_intra else 1
        self.val_set = VolumeDataset(opts.val_root, val_domain, eval_transform(size), label_nc=opts.label_nc,
                                     invert_intensity=opts.invert_intensity, flag="--val_root")
        self.val_domain = val_domain

    # ---------------------------------------------------------------- helpers
    def feature_scale(self, step: Optional[int] = None) -> float:
        step = self.global_step if step is None else step
        return min(1.0, self.opts.feature_scale_rate * step)

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.exp_dir / "logs"))
        return self._writer

    def _autocast(self):
        if self.use_amp:
            return torch.autocast(device_type="cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def selected_channels(self) -> List[str]:
        """Classes whose Dice selects the best checkpoints (``--optimize_mode``), as the original:
        ``foreground`` every class but the background; ``favoured`` the favoured classes (max CE/Dice
        weight, background included if it has it), or every class *including the background* when
        no class weights are given."""
        return L.classes_for_mode(self.opts.optimize_mode, self.losses.favoured_channels(), self.opts.label_nc)

    # ---------------------------------------------------------------- training
    def _to_device(self, batch: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def intra_loss(self, b: Mapping[str, torch.Tensor], fs: float) -> Tuple[torch.Tensor, Dict[str, float], torch.Tensor]:
        """Intra branch: reconstruct and segment each slice in its own domain."""
        out = self.net(b["data"], b["domain"], feature_scale=fs, ex_seg=True)
        loss, logs = self.losses.calc_loss(b["data"], b["mask"], out.float(), b["has_gt"].bool(), b["weight"])
        return loss, logs, out

    def inter_loss(self, b: Mapping[str, torch.Tensor], fs: float) -> Tuple[torch.Tensor, Dict[str, float], torch.Tensor]:
        """Inter branch: translate to the other domain, cycle back, segment both ways (docs/method.md#coach)."""
        x, y, w, label, has_gt = b["data"], b["mask"], b["weight"], b["domain"], b["has_gt"].bool()
        is_tgt = label[:, 1] > label[:, 0]
        semi = is_tgt & has_gt
        is_semi = semi if bool(semi.any()) else None
        trans = self.net(x, flip_label(label), feature_scale=fs, is_semi=is_semi).float()
        cycle = self.net(trans[:, :1].detach(), label, feature_scale=fs, ex_seg=True, is_semi=is_semi).float()
        rows = has_gt if is_semi is not None else ~is_tgt
        extra, extra_logs = self.losses.mask_loss(trans[:, 1:][rows], y[rows])
        loss, logs = self.losses.calc_loss(x, y, cycle, rows, w)
        logs.update({f"trans_{k}": v for k, v in extra_logs.items()})
        return loss + extra, logs, cycle

    def _step_optimizers(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()
        for opt in (self.optimizer_seg, self.optimizer):
            # FIX docs/differences.md#d9-31: never step an optimiser none of whose parameters received a gradient
            if any(p.grad is not None for g in opt.param_groups for p in g["params"]):
                self.scaler.step(opt)
        self.scaler.update()

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        self.net.train()
        b = self._to_device(batch)
        fs = self.feature_scale()
        intra = self.opts.only_intra or self.global_step % 2 == 0
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_seg.zero_grad(set_to_none=True)
        with self._autocast():
            loss, logs, out = (self.intra_loss if intra else self.inter_loss)(b, fs)
        if not torch.isfinite(loss):  # the slices are checked finite: the settings made training diverge
            raise InputError(f"training diverged: non-finite loss at step {self.global_step} "
                             f"({', '.join(f'{k} {v:.3g}' for k, v in logs.items())}); lower --learning_rate / "
                             "--head_learning_rate or check the loss weights", self.run.final)
        self._step_optimizers(loss)
        self._last = (b, out.detach())
        prefix = "" if intra else "inter_"
        logs = {f"{prefix}{k}": v for k, v in logs.items()}
        logs["feature_scale"] = fs
        return logs

    def _batches(self):
        while True:
            yield from self.train_loader

    def train(self) -> Dict[str, Any]:
        """Run until ``--max_steps``; returns a summary (last validation, best index)."""
        from tqdm import tqdm

        opts = self.opts
        last_val: Dict[str, float] = {}
        bar = tqdm(total=last_training_step(opts.max_steps, opts.step_count) + 1, initial=self.global_step,
                   desc=opts.mode, dynamic_ncols=True,
                   disable=not sys.stderr.isatty())
        batches = self._batches()
        try:
            self._loop(opts, bar, batches, last_val)
            self.record_evaluation_settings()
        except BaseException:
            note = self.run.abandon()
            if note:
                print(note, file=sys.stderr)
            raise
        finally:
            bar.close()
            if self._writer is not None:
                self._writer.close()
        self.run.commit()
        return {"step": self.global_step, "val": last_val, "best": self.best.to_list()}

    def _loop(self, opts: TrainingOptions, bar, batches, last_val: Dict[str, float]) -> None:
        try:
            while self.global_step <= last_training_step(opts.max_steps, opts.step_count):
                step = self.global_step
                logs = self.train_step(next(batches))
                if step % opts.board_interval == 0:
                    self._log_scalars("train", logs)
                if step % opts.image_interval == 0:
                    self._log_images()
                label, validate, final = step_after_update(step, opts.max_steps, opts.val_interval, opts.step_count)
                self.global_step = label  # what validation and the best checkpoints record
                bar.update(1)
                bar.set_postfix(loss=f"{logs.get('loss', logs.get('inter_loss', 0.0)):.3f}")
                if validate:
                    last_val.clear()
                    last_val.update(self.validate())
                self.global_step = step + 1  # the next training step (what last.pt resumes from)
                if label % opts.checkpoint_interval == 0 or final:
                    self.save_training_state(f"iteration_{label}.pt")  # also refreshes last.pt
                elif validate:
                    self.save_training_state()
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP
            if self.global_step > 0 and self.run.keeps_progress:
                self.save_training_state()  # keep the progress for --resume
                print(f"interrupted at step {self.global_step}; state saved to "
                      f"{self.run.final / 'checkpoints' / ck.LAST_NAME}", file=sys.stderr)
            raise

    # ---------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Per-volume Dice/Hausdorff of intra, inter and ensemble; updates the best-k index."""
        self.net.eval()
        opts = self.opts
        fs = self.feature_scale()
        ensemble = Ensemble([Member(self.net, fs, None)], self.device)  # the one ensemble code, one member
        batches = self.val_set.volume_batches(opts.test_batch_size)
        loader = DataLoader(self.val_set, batch_sampler=[idx for _, idx in batches], num_workers=opts.test_workers)
        per_volume: List[Dict[str, float]] = []
        loss_logs: List[Dict[str, float]] = []
        current: Optional[str] = None
        parts: Dict[str, List[torch.Tensor]] = {}
        for (vid, _), batch in zip(batches, loader):
            if current is not None and vid != current:
                per_volume += self._volume_metrics(parts)
                parts = {}
            current = vid
            b = self._to_device(batch)
            pred = ensemble.predict_batch(b["data"], b["domain"], b["mask"].shape[-2:], inter=not opts.only_intra)
            for key in ("intra", "inter"):
                if key in pred:
                    parts.setdefault(key, []).append(pred[key].cpu())
            parts.setdefault("mask", []).append(b["mask"].cpu())
            parts.setdefault("weight", []).append(b["weight"].cpu())
            loss_logs.append(self._val_losses(b, fs))
        if parts:
            per_volume += self._volume_metrics(parts)
        metrics = mean_metrics(per_volume)
        metrics.update(mean_metrics(loss_logs))
        self._log_scalars("val", metrics)
        score = selection_score(metrics, self.selected_channels(), opts.only_intra)
        metrics["score"] = score
        saved = self.best.add(score, self.global_step, metrics, self._model_payload())
        if saved:
            print(f"step {self.global_step}: new best checkpoint {saved} (score {score:.4f})", file=sys.stderr)
        self.net.train()
        return metrics

    def _volume_metrics(self, parts: Mapping[str, List[torch.Tensor]]) -> List[Dict[str, float]]:
        mask = torch.cat(list(parts["mask"]))
        if not bool(mask.any()):  # a volume without ground truth
            return []
        weight = torch.cat(list(parts["weight"]))
        gt = volume_labels(mask, weight)
        preds = {"intra_": volume_labels(torch.cat(list(parts["intra"])), weight)}
        if "inter" in parts:
            inter = torch.cat(list(parts["inter"]))
            intra = torch.cat(list(parts["intra"]))
            preds["inter_"] = volume_labels(inter, weight)
            preds[""] = volume_labels(blend(inter, intra, VAL_ENSEMBLE_WEIGHTS), weight)
        return [branch_metrics({k: v.numpy() for k, v in preds.items()}, gt.numpy(), self.opts.label_nc,
                               self.opts.consider_only_vessels_within_brain, self.opts.empty_class_score)]

    def _val_losses(self, b: Mapping[str, torch.Tensor], fs: float) -> Dict[str, float]:
        """Validation losses at the encoder size (intra; plus inter when adapting), as the original: the
        mask and the weight map are average-pooled to the encoder size like the network output (soft
        targets); the inter losses compare the cycle image with the input and the *translated*
        segmentation with the mask. Logged only: they select nothing."""
        size = self.net.config.encoder_input_size
        y = F.adaptive_avg_pool2d(b["mask"].float(), size)
        w = F.adaptive_avg_pool2d(b["weight"].float(), size)
        has_gt = y.flatten(1).any(1)
        out = self.net(b["data"], b["domain"], feature_scale=fs).float()
        _, logs = self.losses.calc_loss(b["data"], y, out, has_gt, w)
        if not self.opts.only_intra:
            trans = self.net(b["data"], flip_label(b["domain"]), feature_scale=fs).float()
            cycle = self.net(trans[:, :1], b["domain"], feature_scale=fs).float()
            _, inter_logs = self.losses.calc_loss(b["data"], y, torch.cat([cycle[:, :1], trans[:, 1:]], 1), has_gt, w)
            logs.update({f"inter_{k}": v for k, v in inter_logs.items()})
        return logs

    def record_evaluation_settings(self) -> Optional[Path]:
        """``checkpoints/evaluation.json``: the ensemble the run is judged with, what ``inference.py`` and
        ``predict.py`` use by default (:mod:`MultiMedSeg.evaluation.settings`; adaptation: the weights
        ``--ensemble_selection`` picks on the validation volumes; pretraining: the intra branch)."""
        from MultiMedSeg.evaluation.settings import describe, write_settings
        from MultiMedSeg.evaluation.selection import choose_settings

        if not self.best.entries:  # nothing qualified (every validation score was 0)
            print(f"note: no best checkpoint, so no {self.ckpt_dir / 'evaluation.json'}", file=sys.stderr)
            return None
        opts = self.opts
        record = choose_settings(self.ckpt_dir, opts.ensemble_selection, self.val_set,
                                 self.device, opts.test_batch_size, opts.consider_only_vessels_within_brain,
                                 opts.test_workers, inter=not opts.only_intra,
                                 both_empty=opts.empty_class_score, classes=self.selected_channels())
        path = write_settings(self.ckpt_dir, record)
        print(f"{describe(record)} -> {self.run.final / 'checkpoints' / path.name}", file=sys.stderr)
        return path

    # ---------------------------------------------------------------- logging
    def _log_scalars(self, prefix: str, logs: Mapping[str, float]) -> None:
        for k, v in logs.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{k}", v, self.global_step)

    def _log_images(self) -> None:
        """Grid: input | reconstruction | ground truth | prediction, one row per sample (max 4)."""
        b, out = self._last
        n = min(4, out.shape[0])
        scale = max(1, self.opts.label_nc - 1)
        img = lambda t: ((t.float().clamp(-1, 1) + 1) / 2)  # noqa: E731
        gt = (b["mask"][:n].argmax(1, keepdim=True).float() / scale) * b["mask"][:n].any(1, keepdim=True)
        pred = out[:n, 1:].argmax(1, keepdim=True).float() / scale
        row = torch.cat([img(b["data"][:n]), img(out[:n, :1]), gt, pred], dim=3)
        grid = torch.cat(list(row), dim=1).cpu()  # (1, n*H, 4*W)
        self.writer.add_image("train/images", grid, self.global_step)

    # ---------------------------------------------------------------- checkpoints
    def _model_payload(self) -> Dict[str, Any]:
        return self.net.checkpoint_payload(self.global_step, self.opts.to_dict())

    def save_training_state(self, name: str = ck.LAST_NAME) -> Path:
        """Model + optimisers + scaler + step + best index (loadable with ``weights_only=True``)."""
        payload = self._model_payload()
        payload.update(optimizer=self.optimizer.state_dict(), optimizer_seg=self.optimizer_seg.state_dict(),
                       scaler=self.scaler.state_dict(), best=self.best.to_list(), torch_rng=torch.get_rng_state())
        path = self.ckpt_dir / name
        ck.save_checkpoint(path, payload)
        if name != ck.LAST_NAME:
            ck.save_checkpoint(self.ckpt_dir / ck.LAST_NAME, payload)
        return path

    def _resume(self) -> None:
        payload = self._resume_payload
        path = self.ckpt_dir / ck.LAST_NAME
        try:
            self.optimizer.load_state_dict(payload["optimizer"])
            self.optimizer_seg.load_state_dict(payload["optimizer_seg"])
            if payload.get("scaler"):
                self.scaler.load_state_dict(payload["scaler"])
        except (KeyError, ValueError) as err:
            raise InputError(f"cannot restore the optimiser state ({err})", path) from None
        self.global_step = int(payload["global_step"])
        if (self.ckpt_dir / ck.INDEX_NAME).is_file():
            self.best = ck.BestIndex.load(self.ckpt_dir, self.opts.n_best)
        if isinstance(payload.get("torch_rng"), torch.Tensor):
            torch.set_rng_state(payload["torch_rng"])
        if self.global_step > last_training_step(self.opts.max_steps, self.opts.step_count):
            raise InputError(f"--resume: the run already reached step {self.global_step}; raise --max_steps "
                             f"to continue it", path)
