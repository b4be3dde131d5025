"""Interpreter: pixel classifiers reading the generator's feature maps (docs/method.md#interpreter, #coach).

:class:`ListedLinear` applies a per-pixel linear map (C_i -> width) to every generator feature,
bilinearly up-samples (align_corners=True) to the output size and sums.  Because up-sampling is
linear, the maps of all features of one resolution are summed first and up-sampled once
(identical result to up-sample-then-linear, far cheaper).

:class:`PixelClassifier`: ListedLinear(->128) -> ReLU -> BN(128) -> 1x1(128->32) -> ReLU -> BN(32)
-> 1x1(32->L) -> softmax over classes (widths 256/128 when L >= 32).  The BN layers are 2-d BNs over
the (B, C, H, W) maps, i.e. exactly the BatchNorm1d over the B·H·W pixels of the original; they
follow ``bn_mode`` like the encoder's.

:class:`Interpreter` holds ``classifiers = {source, target}`` and routes every sample to the head of
its label's domain, with the gradient rules of docs/method.md#interpreter/#coach (see :func:`head_features`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .dsbn import make_bn, target_mask
from .encoder import FeaturesIn


class ListedLinear(nn.Module):
    """Sum over features of up-sampled per-pixel linear maps; ``forward(features, size)``."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 128):
        super().__init__()
        self.linear_layers = nn.ModuleList([nn.Linear(c, out_channels) for c in in_channels])

    def forward(self, features: Sequence[torch.Tensor], size: int) -> torch.Tensor:
        if len(features) != len(self.linear_layers):
            raise ValueError(f"expected {len(self.linear_layers)} features, got {len(features)}")
        by_res: Dict[Tuple[int, int], torch.Tensor] = {}
        for f, lin in zip(features, self.linear_layers):
            y = F.conv2d(f, lin.weight[:, :, None, None].to(f.dtype), lin.bias.to(f.dtype))
            key = tuple(f.shape[-2:])
            by_res[key] = y if key not in by_res else by_res[key] + y
        out = None
        for key, y in by_res.items():
            if key != (size, size):
                y = F.interpolate(y, size=(size, size), mode="bilinear", align_corners=True)
            out = y if out is None else out + y
        return out


class PixelClassifier(nn.Module):
    """Per-pixel MLP over generator features -> class probabilities (B, L, size, size)."""

    def __init__(self, feature_channels: Sequence[int], label_nc: int, bn_mode: str = "running"):
        super().__init__()
        w1, w2 = (128, 32) if label_nc < 32 else (256, 128)
        self.listed = ListedLinear(feature_channels, w1)
        self.bn1 = make_bn("2d", w1, bn_mode)
        self.fc2 = nn.Conv2d(w1, w2, 1)
        self.bn2 = make_bn("2d", w2, bn_mode)
        self.fc3 = nn.Conv2d(w2, label_nc, 1)

    def forward(self, features: Sequence[torch.Tensor], size: int) -> torch.Tensor:
        x = self.bn1(F.relu(self.listed(features, size)))
        x = self.bn2(F.relu(self.fc2(x)))
        return torch.softmax(self.fc3(x), dim=1)


def head_features(features: Sequence[torch.Tensor], detach: bool,
                  is_semi: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """Apply the detach rule of docs/method.md#coach to the features of one head's samples.

    Without ``is_semi``: everything detached iff ``detach``.  With ``is_semi`` (bool per sample):
    ``detach=True`` keeps gradients only for semi samples; ``detach=False`` detaches the semi samples
    and keeps the others live.
    """
    if is_semi is None:
        return [f.detach() for f in features] if detach else list(features)
    live = is_semi if detach else ~is_semi
    if bool(live.all()):
        return list(features)
    if not bool(live.any()):
        return [f.detach() for f in features]
    mask = live.view(-1, 1, 1, 1)
    return [torch.where(mask, f, f.detach()) for f in features]


class Interpreter(nn.Module):
    """Runs the generator on W+ codes and segments its features with the domain's head."""

    def __init__(self, feature_channels: Sequence[int], label_nc: int, invert_intensity: bool = False,
                 bn_mode: str = "running"):
        super().__init__()
        self.label_nc = label_nc
        self.invert_intensity = invert_intensity
        self.classifiers = nn.ModuleDict({
            "source": PixelClassifier(feature_channels, label_nc, bn_mode),
            "target": PixelClassifier(feature_channels, label_nc, bn_mode),
        })

    def forward(self, codes: torch.Tensor, label: torch.Tensor, decoder: nn.Module,
                features_in: Optional[FeaturesIn] = None, feature_scale: float = 1.0,
                noise: Optional[List[torch.Tensor]] = None, randomize_noise: bool = True,
                return_mask: bool = True, ex_seg: bool = False,
                is_semi: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns (image (B,1,R,R), probabilities (B,L,R,R) or None when not ``return_mask``).

        Samples with label[:,1] > label[:,0] use ``target``, the others ``source``.  The source head
        sees live features only with ``ex_seg`` (detach = not ex_seg), the target head is called with
        detach=True; ``is_semi`` modifies both as in :func:`head_features`.
        """
        image, features = decoder.g_synthesis(codes, noise=noise, randomize_noise=randomize_noise,
                                              features_in=features_in, feature_scale=feature_scale)
        image = image.mean(1, keepdim=True)
        if not return_mask:
            return image, None
        size = image.shape[-1]
        is_tgt = target_mask(label)
        groups = [(name, rows, detach) for name, rows, detach in
                  (("source", ~is_tgt, not ex_seg), ("target", is_tgt, True)) if bool(rows.any())]
        if len(groups) == 1:  # whole batch in one domain: no gather/scatter copies
            name, _, detach = groups[0]
            probs = self.classifiers[name](head_features(features, detach, is_semi), size)
        else:
            probs = image.new_zeros(image.shape[0], self.label_nc, size, size)
            for name, rows, detach in groups:
                semi = None if is_semi is None else is_semi[rows]
                feats = head_features([f[rows] for f in features], detach, semi)
                probs[rows] = self.classifiers[name](feats, size).to(probs.dtype)
        if self.invert_intensity:
            background = probs.argmax(1, keepdim=True) == 0
            image = torch.where(background, -image, image)
        return image, probs
