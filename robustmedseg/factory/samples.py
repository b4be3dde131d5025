"""Sample grids of the data factory (node side during training, researcher side after each round)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from robustmedseg.io import atomic_path


def sample_conditions(n_sample: int, n_domains: int, n_zbins: int, generator: torch.Generator,
                      style_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fixed grid inputs: ``n_sample`` z vectors, each shown under every domain (rows = z).

    Returns (z (n_sample * n_domains, style_dim), condition c (same rows, n_domains + n_zbins)); the
    z-bin of each z is drawn uniformly, domains cycle 0..n_domains-1.
    """
    from model import make_condition

    z = torch.randn(n_sample, style_dim, generator=generator).repeat_interleave(n_domains, dim=0)
    zbins = torch.randint(0, n_zbins, (n_sample,), generator=generator).repeat_interleave(n_domains)
    domains = torch.arange(n_domains).repeat(n_sample)
    return z, make_condition(domains, zbins, n_domains, n_zbins)


def to_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    """(B, 1, H, W) in [-1, 1] -> uint8 (rows*H', nrow*W') grey grid."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    batch, height, width = x.shape
    rows = (batch + nrow - 1) // nrow
    grid = np.zeros((rows * (height + pad) + pad, nrow * (width + pad) + pad), np.uint8)
    for i in range(batch):
        r, c = divmod(i, nrow)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[top:top + height, left:left + width] = x[i]
    return grid


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    """Write a PNG grid atomically (PIL)."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(to_grid(images, nrow)).save(tmp, format="PNG")
    return path


@torch.no_grad()
def generate_grid(g_ema: torch.nn.Module, n_sample: int, seed: int = 0,
                  encoding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Images of the fixed grid (:func:`sample_conditions`) from ``g_ema`` with fixed noise.

    ``encoding`` (1, D) or None: CLIP conditioning repeated to every row.
    """
    gen = torch.Generator().manual_seed(seed)
    z, c = sample_conditions(n_sample, g_ema.n_domains, g_ema.n_zbins, gen, g_ema.style_dim)
    device = next(g_ema.parameters()).device
    e = None if encoding is None else encoding.to(device).float().expand(z.shape[0], -1)
    was_training = g_ema.training
    g_ema.eval()
    images, _ = g_ema([z.to(device)], (c.to(device), e), randomize_noise=False)
    g_ema.train(was_training)
    return images
