"""CLIP spherical loss of the refinement stage (docs/method.md#clip-loss, with the docs/differences.md#d9-9 fixes).

``loss = clip_weight * mean_b arccos(<x_b, y_b>)^2`` where ``x_b`` is the unit CLIP embedding of
the generated slice b and ``y_b`` the (normalised) client ``clip_mean`` row used to condition it.
Gradients flow through the frozen CLIP image tower into the generator.

Decisions (documented in the README):

* FIX docs/differences.md#d9-9: the cosine is clamped before arccos (:func:`spherical_distance_sq`), so identical
  vectors give a finite loss and gradient.
* FIX docs/differences.md#d9-9: the loss is taken on the **un-augmented** fake. ``clip_mean`` is computed from
  un-augmented real slices (``prepare_data.py``), so comparing it with augmented fakes would
  penalise the augmentation, not the generator.
* The image preprocessing is exactly the one of ``clip_mean.npy``
  (:mod:`robustmedseg.data.clip_embed`): channel repeated to 3, (x + 1) / 2, bicubic resize to
  the model input, model mean/std normalisation, ``encode_image``, L2 normalisation.
* The CLIP weights come from a local path (``--clip-pretrained``) or the local open_clip cache;
  nodes are offline, so a missing file is one clear :class:`~robustmedseg.errors.InputError`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from robustmedseg.data.clip_embed import ClipImageEncoder, load_clip_encoder

from .losses import spherical_distance_sq


class ClipSphericalLoss:
    """Differentiable CLIP embedding + spherical distance to target encodings.

    Args:
        encoder: a loaded :class:`ClipImageEncoder` (its weights are frozen here).
    """

    def __init__(self, encoder: ClipImageEncoder):
        self.encoder = encoder
        for param in encoder.model.parameters():
            param.requires_grad_(False)
        encoder.model.eval()

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.embed_dim)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit CLIP embeddings (B, D) of (B, 1, H, W) images in [-1, 1], with gradients."""
        enc = self.encoder
        model_device = next(enc.model.parameters()).device
        if model_device != images.device:
            enc.model.to(images.device)
        x = images.float().repeat(1, 3, 1, 1)
        x = (x + 1.0) / 2.0
        if tuple(x.shape[-2:]) != tuple(enc.image_size):
            x = F.interpolate(x, size=tuple(enc.image_size), mode="bicubic", align_corners=False)
        mean = torch.tensor(enc.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(enc.std, device=x.device).view(1, 3, 1, 1)
        return F.normalize(enc.model.encode_image((x - mean) / std).float(), dim=-1)

    def __call__(self, fake: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared spherical distance between CLIP(fake) and ``target`` rows (B, D)."""
        if target.shape[0] != fake.shape[0]:
            raise ValueError(f"target has {target.shape[0]} rows for a batch of {fake.shape[0]}")
        return spherical_distance_sq(self.embed(fake), target.to(fake.device).float()).mean()


def load_clip_loss(model_name: str, pretrained: Optional[str], device: str = "cpu") -> ClipSphericalLoss:
    """Load the frozen CLIP image tower for the loss (InputError if the weights are unavailable)."""
    return ClipSphericalLoss(load_clip_encoder(model_name, pretrained, device=device))
