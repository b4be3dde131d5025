"""CLIP image embeddings of slices, and their mean (the domain's ``clip_mean.npy``).

Encoding one slice (docs/method.md#lmdb step 6): repeat the single channel to 3, map [-1, 1] to [0, 1]
with (x + 1) / 2, resize bicubically (align_corners False, no antialiasing) to the model's
input size, normalise with the model's preprocessing mean/std (OpenAI's for ViT-L-14), run
``encode_image`` and L2-normalise.  ``clip_mean.npy`` is the arithmetic mean of these unit
vectors, NOT re-normalised, float32 of shape (1, D), D = the model's embedding width (768 for
ViT-L-14): callers must read D from the file, never assume 768.

Weights cannot be downloaded on the nodes: ``pretrained`` is either an open_clip tag (which
must already be in the local cache) or a local weights file (a state dict, as open_clip
accepts).  Failure to load is one :class:`InputError` line.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from robustmedseg.device import resolve_device
from robustmedseg.errors import InputError

DEFAULT_CLIP_MODEL = "ViT-L-14"
DEFAULT_CLIP_PRETRAINED = "openai"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipImageEncoder:
    """An open_clip model plus the preprocessing its ``encode_image`` expects."""

    model: torch.nn.Module
    image_size: Tuple[int, int]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    device: torch.device
    embed_dim: int
    info: Dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings (B, D) float32 on CPU of slices ``images`` (B, 1, H, W) in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected (B, 1, H, W) images, got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32).repeat(1, 3, 1, 1)
        x = (x + 1.0) / 2.0
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        features = self.model.encode_image((x - mean) / std).float()
        return F.normalize(features, dim=-1).cpu()


class MeanAccumulator:
    """Running mean of embedding rows, summed in float64; result (1, D) float32."""

    def __init__(self) -> None:
        self._sum: Optional[np.ndarray] = None
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        block = rows.detach().double().sum(dim=0).numpy()
        self._sum = block if self._sum is None else self._sum + block
        self.count += int(rows.shape[0])

    def mean(self) -> np.ndarray:
        if self._sum is None or self.count == 0:
            raise ValueError("no embedding was added")
        return (self._sum / self.count).astype(np.float32)[None, :]


@contextlib.contextmanager
def _quiet_loading_logs() -> Iterator[None]:
    """Silence open_clip/huggingface retry chatter while a model loads; errors are re-raised."""
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _is_tag(pretrained: str) -> bool:
    return not (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
                or os.path.exists(pretrained))


def _default_quick_gelu(name: str, pretrained: str) -> bool:
    """OpenAI CLIP weights were trained with QuickGELU: use it for the ``openai`` tag and for
    local files (the documented use is OpenAI weights); other tags follow open_clip's table."""
    import open_clip

    if not _is_tag(pretrained):
        return True
    cfg = open_clip.get_pretrained_cfg(name.replace("/", "-"), pretrained) or {}
    return bool(cfg.get("quick_gelu", pretrained == "openai"))


def load_clip_encoder(name: str = DEFAULT_CLIP_MODEL, pretrained: Optional[str] = DEFAULT_CLIP_PRETRAINED,
                      device: str = "auto", quick_gelu: Optional[bool] = None) -> ClipImageEncoder:
    """Build an open_clip image encoder.

    ``pretrained``: an open_clip tag available offline (e.g. ``openai`` in the local cache), a
    local weights file, or None for random weights (tests only).  ``quick_gelu`` None picks
    the activation matching the weights (see :func:`_default_quick_gelu`).
    """
    import open_clip

    if name.replace("/", "-") not in open_clip.list_models():
        raise InputError(f"unknown CLIP model '{name}' (see open_clip.list_models()), or use --clip-model none")
    if pretrained and not _is_tag(pretrained) and not os.path.isfile(pretrained):
        raise InputError("CLIP weights file not found (--clip-pretrained)", pretrained)
    if quick_gelu is None:
        quick_gelu = bool(pretrained) and _default_quick_gelu(name, pretrained)
    torch_device = resolve_device(device)
    try:
        with _quiet_loading_logs():
            model = open_clip.create_model(name, pretrained=pretrained or None, device=torch_device,
                                           force_quick_gelu=quick_gelu)
    except Exception as err:  # open_clip raises RuntimeError/OSError/KeyError... for missing weights
        if pretrained and _is_tag(pretrained):
            raise InputError(f"cannot load CLIP weights '{pretrained}' for {name} (offline?): pass a local "
                             "file with --clip-pretrained PATH, or --clip-model none") from err
        raise InputError(f"cannot load CLIP weights for {name}: {err}", pretrained) from err
    model.eval()
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    image_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mean = tuple(float(v) for v in cfg.get("mean", OPENAI_MEAN))
    std = tuple(float(v) for v in cfg.get("std", OPENAI_STD))
    embed_dim = _embed_dim(model, image_size, torch_device)
    info = {"model": name, "pretrained": pretrained, "quick_gelu": quick_gelu, "embed_dim": embed_dim,
            "image_size": list(image_size), "mean": list(mean), "std": list(std)}
    return ClipImageEncoder(model, image_size, mean, std, torch_device, embed_dim, info)  # type: ignore[arg-type]


def _embed_dim(model: torch.nn.Module, image_size: Tuple[int, int], device: torch.device) -> int:
    """Embedding width read from the model (``visual.output_dim``), or from one forward pass."""
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if isinstance(dim, int):
        return dim
    with torch.no_grad():
        return int(model.encode_image(torch.zeros(1, 3, *image_size, device=device)).shape[-1])


def clip_mean_of(encoder: ClipImageEncoder, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Mean unit embedding (1, D) float32 of (H, W, 1) slices in [-1, 1] (in-memory helper)."""
    acc = MeanAccumulator()
    for start in range(0, len(images), batch_size):
        chunk = np.stack([np.asarray(im, np.float32)[..., 0] for im in images[start:start + batch_size]])
        acc.add(encoder.encode(torch.from_numpy(chunk)[:, None]))
    return acc.mean()
