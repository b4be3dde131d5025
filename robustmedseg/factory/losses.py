"""GAN losses and lazy regularisers of the data factory (docs/method.md#training-step).

All functions return scalar tensors; the weighting by the lazy-regularisation interval is done
by the caller (:mod:`robustmedseg.factory.trainer`).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F


def d_logistic_loss(real_pred: torch.Tensor, fake_pred: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic D loss: softplus(-D(real)) + softplus(D(fake)), batch means."""
    return F.softplus(-real_pred).mean() + F.softplus(fake_pred).mean()


def g_nonsaturating_loss(fake_pred: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss: softplus(-D(G(z)))."""
    return F.softplus(-fake_pred).mean()


def r1_penalty(real_pred: torch.Tensor, real_img: torch.Tensor) -> torch.Tensor:
    """R1: batch mean of ||grad_x D(x)||^2 on real images (``real_img`` must require grad).

    The weight-gradient part of the convolutions is skipped while taking this gradient
    (``op.conv2d_gradfix.no_weight_gradients``): only the gradient w.r.t. the input is needed here,
    the weight gradients come from the second backward.
    """
    from op import conv2d_gradfix

    with conv2d_gradfix.no_weight_gradients():
        (grad,) = torch.autograd.grad(real_pred.sum(), real_img, create_graph=True)
    return grad.pow(2).reshape(grad.shape[0], -1).sum(1).mean()


def path_lengths(fake_img: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """L per sample: with a fresh random image-space direction n ~ N(0, I)/sqrt(H*W),
    L = ||d(sum(G(w) * n))/dw||, the squared norm taken over the style dimension and averaged over
    the W+ latents before the square root (in the graph: the penalty is differentiated through it)."""
    noise = torch.randn_like(fake_img) / math.sqrt(fake_img.shape[2] * fake_img.shape[3])
    (grad,) = torch.autograd.grad((fake_img * noise).sum(), latents, create_graph=True)
    return torch.sqrt(grad.pow(2).sum(2).mean(1))


def path_length_loss(lengths: torch.Tensor, mean_path_length: float, decay: float = 0.01
                     ) -> Tuple[torch.Tensor, float]:
    """``(mean((L - m_new)^2), m_new)`` with ``m_new = m + decay * (mean(L) - m)``.

    ``m_new`` stays in the graph of the penalty, as in the original (and StyleGAN2): the gradient
    also flows through the running mean's ``decay * mean(L)`` term. The returned float is detached.
    """
    new_mean = mean_path_length + decay * (lengths.mean() - mean_path_length)
    penalty = (lengths - new_mean).pow(2).mean()
    return penalty, float(new_mean.detach())


def path_length_penalty(
    fake_img: torch.Tensor, latents: torch.Tensor, mean_path_length: float, decay: float = 0.01
) -> Tuple[torch.Tensor, float, torch.Tensor]:
    """Path-length regulariser (:func:`path_lengths` then :func:`path_length_loss`).

    Returns:
        (penalty = mean((L - m_new)^2), new running mean m_new, L per sample (detached)).
    """
    lengths = path_lengths(fake_img, latents)
    penalty, new_mean = path_length_loss(lengths, mean_path_length, decay)
    return penalty, new_mean, lengths.detach()


def spherical_distance_sq(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-row squared geodesic distance arccos(<x/|x|, y/|y|>)^2 on the unit sphere.

    FIX docs/differences.md#d9-9: the cosine is clamped to [-1 + eps, 1 - eps] before arccos, whose derivative is
    infinite at +-1 (the reference code produced NaN for identical vectors).
    """
    x = F.normalize(x, dim=-1)
    y = F.normalize(y, dim=-1)
    cos = (x * y).sum(-1).clamp(-1 + eps, 1 - eps)
    return torch.arccos(cos).pow(2)
