"""Phase-2 losses (docs/method.md#coach, #lpips); every function takes its settings as arguments (no global options,
docs/differences.md#d9-43).

Images are in [-1, 1], segmentations are (B, L, H, W) probabilities / one-hot maps.

* :func:`mse_loss`, :func:`ssim_loss` (1 - SSIM on (x+1)/2, pytorch_msssim, really SSIM: fix of
  docs/differences.md#d9-28),
  :class:`LPIPS` (AlexNet + v0.1 linear heads from local files),
* :func:`dice_loss`, :func:`ce_loss` with optional class weights,
* :func:`favoured_weight` (the ``--optimize_mode favoured`` image weighting),
* :class:`LossConfig` + :func:`calc_loss`, the combined image + mask loss of the Coach.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as _ssim
from torch import nn

from MultiMedSeg.options import TrainingOptions
from robustmedseg.cli import field_default
from robustmedseg.errors import InputError
from robustmedseg.io import load_torch_file

DICE_SMOOTH = 1e-5
DICE_EPS = 1e-8
CE_EPS = 1e-6


def _scalar(v: torch.Tensor) -> float:
    """Detached Python float for logging."""
    return float(v.detach())


# ---------------------------------------------------------------------------------------------- image
def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target)


def ssim_window(size: int, max_win: int = 11) -> int:
    """Gaussian window size for SSIM: 11 (standard) or the largest odd size <= the image side.

    pytorch_msssim filters without padding, so the image must be at least ``win_size`` pixels;
    16 px test images keep 11, smaller ones shrink the window (>= 3).
    """
    win = min(max_win, size if size % 2 else size - 1)
    if win < 3:
        raise ValueError(f"SSIM needs images of at least 3 pixels, got {size}")
    return win


def ssim_loss(pred: torch.Tensor, target: torch.Tensor, win_size: Optional[int] = None) -> torch.Tensor:
    """1 - SSIM((pred+1)/2, (target+1)/2), data range 1, mean over batch (single or multi channel)."""
    win = win_size or ssim_window(min(pred.shape[-2:]))
    a = (pred.float() + 1) / 2
    b = (target.float() + 1) / 2
    return 1 - _ssim(a, b, data_range=1.0, size_average=True, win_size=win)


# ---------------------------------------------------------------------------------------------- masks
def _class_weights(weights: Optional[Sequence[float]], n: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return like.new_full((n,), 1.0 / n)
    w = torch.as_tensor(list(weights), dtype=like.dtype, device=like.device)
    if w.numel() != n:
        raise ValueError(f"{w.numel()} class weights given for {n} classes")
    return w


def dice_loss(pred: torch.Tensor, target: torch.Tensor, weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Soft Dice over (batch, H, W) per channel: mean_c(w_c · −d_c).

    d_c = (2·tp + 1e-5) / (2·tp + fp + fn + 1e-5 + 1e-8); w_c = ``weights`` or 1/L (so by default the
    loss is −Σ d_c / L²; a perfect prediction gives −mean_c(w_c)).
    """
    p, y = pred.float(), target.float()
    dims = [0] + list(range(2, p.ndim))
    tp = (p * y).sum(dims)
    fp = (p * (1 - y)).sum(dims)
    fn = ((1 - p) * y).sum(dims)
    d = (2 * tp + DICE_SMOOTH) / (2 * tp + fp + fn + DICE_SMOOTH + DICE_EPS)
    return (_class_weights(weights, p.shape[1], p) * -d).mean()


def ce_loss(pred: torch.Tensor, target: torch.Tensor, weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Weighted cross-entropy on probabilities: −mean_{B,H,W} Σ_c w_c·y_c·log(p_c + 1e-6)."""
    p, y = pred.float(), target.float()
    w = _class_weights(weights, p.shape[1], p).view(1, -1, *([1] * (p.ndim - 2)))
    return -(w * y * torch.log(p + CE_EPS)).sum(1).mean()


def favoured_channels(weights: Sequence[float]) -> List[int]:
    """Classes whose weight equals the maximum weight (``np.isclose``, as the original)."""
    close = np.isclose(np.asarray(weights, dtype=np.float64), max(weights))
    return [int(c) for c in np.flatnonzero(close)]


def favoured_weight(y: torch.Tensor, where: torch.Tensor, channels: Sequence[int],
                    high: float = 1.0, low: float = 0.3) -> torch.Tensor:
    """Image weight ω (B, 1, H, W): ``high`` on pixels of samples in ``where`` where any favoured
    channel of the ground truth ``y`` exceeds 0.5, ``low`` elsewhere."""
    hit = (y[:, list(channels)] > 0.5).any(1, keepdim=True) & where.view(-1, 1, 1, 1)
    return torch.where(hit, y.new_tensor(high), y.new_tensor(low))


# ---------------------------------------------------------------------------------------------- LPIPS
_TAPS = (2, 5, 8, 10, 12)  # slice ends in AlexNet.features: after relu1..relu5
_TAP_CHANNELS = (64, 192, 384, 256, 256)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
LPIPS_HELP = ("LPIPS needs --alex-model (v0.1 linear heads alex.pth) and --alex-pretr-model (torchvision AlexNet "
              "ImageNet weights) as local files (offline); set --lpips-lambda 0 to disable LPIPS")


def _load_state(path: Union[str, os.PathLike], what: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise InputError(f"{what} not found ({LPIPS_HELP})", path)
    return dict(load_torch_file(path, what, mapping=True))


def _alexnet_features() -> nn.Sequential:
    from torchvision.models import alexnet

    return alexnet(weights=None).features


class LPIPS(nn.Module):
    """LPIPS v0.1 distance with AlexNet features; frozen; ``forward(a, b)`` -> mean over the batch.

    ``alex_pretr_model``: AlexNet weights (a full torchvision state dict with ``features.*`` keys, or a
    features-only one).  ``alex_model``: linear heads with keys ``lin{i}.model.1.weight`` (or the
    renamed ``{i}.1.weight``), shapes (1, C_i, 1, 1).  Single-channel inputs broadcast to 3 channels.
    """

    def __init__(self, alex_model: Union[str, os.PathLike], alex_pretr_model: Union[str, os.PathLike]):
        super().__init__()
        features = _alexnet_features()
        self.slices = nn.ModuleList([features[a:b] for a, b in zip((0,) + _TAPS[:-1], _TAPS)])
        self._load_features(features, _load_state(alex_pretr_model, "AlexNet weights (--alex-pretr-model)"),
                            alex_pretr_model)
        self.heads = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in _TAP_CHANNELS])
        self._load_heads(_load_state(alex_model, "LPIPS linear heads (--alex-model)"), alex_model)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _load_features(features: nn.Sequential, state: Dict[str, torch.Tensor], path: object) -> None:
        if any(k.startswith("features.") for k in state):
            state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        own = features.state_dict()
        for k, v in own.items():
            if k not in state or not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape:
                raise InputError(f"AlexNet weights lack a compatible 'features.{k}' ({LPIPS_HELP})", path)
        features.load_state_dict({k: state[k] for k in own})

    def _load_heads(self, state: Dict[str, torch.Tensor], path: object) -> None:
        found: Dict[int, torch.Tensor] = {}
        for k, v in state.items():
            m = re.fullmatch(r"(?:lin)?(\d+)\.(?:model\.)?1\.weight", k)
            if m and isinstance(v, torch.Tensor):
                found[int(m.group(1))] = v
        for i, head in enumerate(self.heads):
            if i not in found or found[i].shape != head.shape:
                raise InputError(f"LPIPS heads lack a compatible 'lin{i}.model.1.weight' of shape "
                                 f"{tuple(head.shape)} ({LPIPS_HELP})", path)
            with torch.no_grad():
                head.copy_(found[i])

    def train(self, mode: bool = True) -> "LPIPS":  # always eval (dropout-free features, frozen)
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = (x.float() - self.shift) / self.scale  # broadcasts 1 -> 3 channels
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = a.new_zeros((), dtype=torch.float32)
        for fa, fb, w in zip(self._taps(a), self._taps(b), self.heads):
            total = total + F.conv2d((fa - fb) ** 2, w).mean((2, 3)).sum()
        return total / a.shape[0]


def build_lpips(alex_model: Optional[Union[str, os.PathLike]],
                alex_pretr_model: Optional[Union[str, os.PathLike]]) -> LPIPS:
    """LPIPS from local files; an InputError when a path is not given or not usable."""
    if not alex_model or not alex_pretr_model:
        raise InputError(LPIPS_HELP)
    return LPIPS(alex_model, alex_pretr_model)


# ---------------------------------------------------------------------------------------------- combined
@dataclass(frozen=True)
class LossConfig:
    """Loss weights of the Coach: the training options' fields of the same names (their one home and
    their defaults: :class:`MultiMedSeg.options.TrainingOptions`, docs/method.md#phase2-options).
    Build it with :meth:`from_options`."""

    l2_lambda: float
    ssim_lambda: float
    lpips_lambda: float
    ce_lambda: float
    dice_lambda: float
    ce_weights: Optional[List[float]]
    dice_weights: Optional[List[float]]
    optimize_mode: str  # 'foreground' or 'favoured'

    @classmethod
    def from_options(cls, opts: Optional[Any] = None, **changes: Any) -> "LossConfig":
        """The loss weights of a run's options (the training options' defaults when ``opts`` is None),
        with ``changes`` applied."""
        names = [f.name for f in fields(cls)]
        values = {n: getattr(opts, n) if opts is not None else field_default(TrainingOptions, n) for n in names}
        return cls(**{**values, **changes})

    def favoured_weights(self) -> Optional[List[float]]:
        """The class weights that define the favoured classes, as the original: the CE or the Dice
        weights, whichever has the larger maximum (CE on a tie); the given ones if only one is."""
        ce, dice = self.ce_weights, self.dice_weights
        if ce is not None and dice is not None:
            return list(ce) if max(ce) >= max(dice) else list(dice)
        return list(ce) if ce is not None else (list(dice) if dice is not None else None)

    def favoured(self) -> List[int]:
        """Favoured classes (max weight) in 'favoured' mode with weights given, else []."""
        w = self.favoured_weights()
        return favoured_channels(w) if self.optimize_mode == "favoured" and w else []


def selected_classes(cfg: LossConfig, label_nc: int) -> List[str]:
    """Classes whose validation Dice judges a run (``--optimize_mode``), as the original's best-checkpoint
    choice: ``foreground`` every class but the background; ``favoured`` the favoured classes (max CE/Dice
    weight, background included if it has it), or every class *including the background* when no class
    weights are given.  The best checkpoints and the ``_pred`` weights of an adapted run are both chosen on
    these classes."""
    return classes_for_mode(cfg.optimize_mode, cfg.favoured(), label_nc)


def classes_for_mode(optimize_mode: str, favoured: Sequence[int], label_nc: int) -> List[str]:
    """:func:`selected_classes` from the mode and the favoured classes (:meth:`LossConfig.favoured`)."""
    chans = list(range(1, label_nc))
    if optimize_mode == "favoured":
        chans = list(favoured) or list(range(label_nc))
    return [str(c) for c in chans]


def image_loss(x: torch.Tensor, x_hat: torch.Tensor, cfg: LossConfig, lpips: Optional[nn.Module] = None,
               omega: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """λ_l2·MSE + λ_ssim·(1 − SSIM) + λ_lpips·LPIPS of ω·x̂ vs ω·x."""
    if omega is not None:
        x, x_hat = x * omega, x_hat * omega
    total = x.new_zeros((), dtype=torch.float32)
    logs: Dict[str, float] = {}
    if cfg.l2_lambda > 0:
        v = mse_loss(x_hat.float(), x.float())
        logs["loss_l2"] = _scalar(v)
        total = total + cfg.l2_lambda * v
    if cfg.ssim_lambda > 0:
        v = ssim_loss(x_hat, x)
        logs["loss_ssim"] = _scalar(v)
        total = total + cfg.ssim_lambda * v
    if cfg.lpips_lambda > 0:
        if lpips is None:
            raise InputError(LPIPS_HELP)
        v = lpips(x_hat, x)
        logs["loss_lpips"] = _scalar(v)
        total = total + cfg.lpips_lambda * v
    return total, logs


def mask_loss(y: torch.Tensor, y_hat: torch.Tensor, cfg: LossConfig) -> Tuple[torch.Tensor, Dict[str, float]]:
    """λ_ce·CE + λ_dice·Dice with the configured class weights; zero for an empty selection."""
    total = y_hat.new_zeros((), dtype=torch.float32)
    logs: Dict[str, float] = {}
    if y.shape[0] == 0:
        return total, logs
    if cfg.ce_lambda > 0:
        v = ce_loss(y_hat, y, cfg.ce_weights)
        logs["loss_ce"] = _scalar(v)
        total = total + cfg.ce_lambda * v
    if cfg.dice_lambda > 0:
        v = dice_loss(y_hat, y, cfg.dice_weights)
        logs["loss_dice"] = _scalar(v)
        total = total + cfg.dice_lambda * v
    return total, logs


def calc_loss(x: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor, where: torch.Tensor, cfg: LossConfig,
              weight: Optional[torch.Tensor] = None, lpips: Optional[nn.Module] = None
              ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The Coach's loss (docs/method.md#coach calc_loss, with SSIM really used: docs/differences.md#d9-28).

    x (B,1,H,W) input, y (B,L,H,W) one-hot ground truth, y_hat (B,1+L,H,W) network output, ``where``
    bool (B,) samples with ground truth, ``weight`` (B,1,H,W) weight map or None.  Returns the total
    loss and a dict of float logs (``loss``, ``loss_l2``, ``loss_ssim``, ``loss_lpips``, ``loss_ce``,
    ``loss_dice``).
    """
    fav = cfg.favoured()
    omega = favoured_weight(y, where, fav) if fav else None
    img, logs = image_loss(x, y_hat[:, :1], cfg, lpips, omega)
    seg, y_sel = y_hat[:, 1:][where], y[where]
    if weight is not None:
        seg, y_sel = seg * weight[where], y_sel * weight[where]
    msk, mlogs = mask_loss(y_sel, seg, cfg)
    logs.update(mlogs)
    total = img + msk
    logs["loss"] = _scalar(total)
    return total, logs
