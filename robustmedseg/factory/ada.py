"""Adaptive discriminator augmentation for single-channel images (docs/method.md#ada, with the
docs/differences.md#d9-6 fix).

Two parts:

* :func:`augment` — the non-leaking augmentation pipeline. Every elementary transform is
  applied per sample with probability ``p`` (the two arbitrary rotations with
  ``p_rot = 1 - sqrt(1 - p)``, so that their composition has probability ``p``); a translation
  moves both axes or neither (one gate per sample, :func:`sample_geometric`):

  - geometric pass, composed as one inverse 3x3 matrix per sample: x-flip, rotation by a
    multiple of 90 degrees (k uniform in {0, 1, 2, 3}, :data:`ROT90_CHOICES`; ``rot90="original"``
    draws from the original code's {0, 3}, :data:`ROT90_SETS`), integer
    translation (uniform, +-0.125 of the size), isotropic scale (lognormal, std 0.2 ln 2),
    pre-rotation (uniform +-pi), anisotropic scale (s, 1/s), post-rotation, fractional
    translation (normal, std 0.125 of the size). The transforms turn about the image centre.
    It is executed as: reflect-pad by the margin the transform needs, 2x upsample with the
    12-tap symlet-6 low-pass, bilinear ``grid_sample`` (zeros outside, align_corners False),
    2x downsample with the flipped filter. ``torch.nn.functional.grid_sample`` supports
    double backward with respect to its input in the torch versions we pin, which the R1
    penalty taken through the augmentation needs (checked by a gradgradcheck test).
  - colour pass on a 4x4 RGB colour matrix: brightness (normal, std 0.2), contrast
    (lognormal, std 0.5 ln 2), luma flip, hue rotation (uniform +-pi) and saturation
    (lognormal, std ln 2). A grey image is the RGB image (x, x, x), i.e. a multiple of the
    luma axis, which is an eigenvector of every one of these matrices. The grey output is
    therefore ``rowsum(M[0:3, 0:3]) * x + mean(t[0:3])``: **FIX docs/differences.md#d9-6** — the reference code
    used the *mean* of the nine linear entries, which scales images by 1/3 even at p = 0.
    Hue and saturation have no effect on grey images (they are drawn anyway, so the random
    stream matches a colour implementation).

  With ``p == 0`` (or when no sample draws any transform) each pass is skipped, so
  ``augment(x, 0)`` returns ``x`` exactly.

* :class:`AdaptiveAugment` — the controller of ``p``: it accumulates ``sign(D(real))`` over
  regular D steps and every ``update_every`` calls moves ``p`` by
  ``sign(r_t - target) * count / length`` (``count`` = number of samples accumulated), clamped
  to [0, 1] (``r_t == target`` moves by ``-count / length``, as the original). Its state is a
  plain dict (persisted node-locally between rounds, docs/differences.md#d9-7).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from op import upfirdn2d
from op.upfirdn import fir_matrix

# Symlet-6 decomposition low-pass filter (12 taps), the orthogonal wavelet used to band-limit the
# geometric transforms.
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)
_FILTER_PAD = len(SYM6) // 4  # support of the filter in original pixels on each side (3)


# --------------------------------------------------------------------------- matrices


def _eye(batch: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(n, device=device).unsqueeze(0).repeat(batch, 1, 1)


def _translate2d(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    m = _eye(tx.shape[0], 3, tx.device)
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def _scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    m = _eye(sx.shape[0], 3, sx.device)
    m[:, 0, 0], m[:, 1, 1] = sx, sy
    return m


def _rotate2d(theta: torch.Tensor) -> torch.Tensor:
    m = _eye(theta.shape[0], 3, theta.device)
    c, s = torch.cos(theta), torch.sin(theta)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = c, -s, s, c
    return m


def _gate(value: torch.Tensor, prob: float, neutral: float) -> torch.Tensor:
    """Keep ``value`` with probability ``prob`` **per sample** (one draw per row, shared by the
    row's components, e.g. both axes of a translation), else the neutral value."""
    keep = torch.rand(value.shape[0], device=value.device) < prob
    keep = keep.reshape((-1,) + (1,) * (value.dim() - 1))
    return torch.where(keep, value, torch.full_like(value, neutral))


# Multiples of 90 degrees the rotation step draws from. The ADA paper (and NVlabs' code) use all four;
# the original code drew from (0, 3) only (rosinality's category list), i.e. 0 or 270 degrees: a defect
# we fix by default (docs/differences.md#ada-rotation-set); ``rot90="original"`` restores it.
ROT90_CHOICES = (0, 1, 2, 3)
ROT90_SETS = {"uniform": ROT90_CHOICES, "original": (0, 3)}


def rot90_choices(rot90: str) -> Tuple[int, ...]:
    """The quarter turns drawn under the setting ``rot90`` (a key of :data:`ROT90_SETS`; ValueError)."""
    try:
        return ROT90_SETS[rot90]
    except KeyError:
        raise ValueError(f"rot90 must be one of {', '.join(ROT90_SETS)}, got {rot90!r}") from None

# The geometric transforms in the order they are composed (forward transform = last @ ... @ first).
GEOMETRIC_STEPS = ("xflip", "rot90", "int_translate", "iso_scale", "pre_rotate", "aniso_scale", "post_rotate",
                   "frac_translate")


def sample_geometric(batch: int, size: Tuple[int, int], p: float, device: torch.device,
                     rot90: str = "uniform") -> Dict[str, torch.Tensor]:
    """Per-sample parameters of the eight geometric transforms, the neutral value where the sample's
    gate is off. Every transform has ONE gate per sample (probability ``p``; ``p_rot`` for the two
    arbitrary rotations), translations included: both axes move together, as in the ADA paper.

    Returns a dict keyed by :data:`GEOMETRIC_STEPS`: ``xflip`` (B,) in {0, 1}; ``rot90`` (B,) k drawn
    uniformly from ``ROT90_SETS[rot90]`` (default all four turns; ``"original"``: {0, 3}); ``int_translate`` (B, 2) whole pixels (x, y); ``iso_scale`` (B,);
    ``pre_rotate`` (B,) radians; ``aniso_scale`` (B,); ``post_rotate`` (B,); ``frac_translate`` (B, 2)
    pixels (x, y).
    """
    height, width = size
    p_rot = 1.0 - math.sqrt(max(0.0, 1.0 - p))
    shape = (batch,)
    out: Dict[str, torch.Tensor] = {}
    out["xflip"] = _gate(torch.randint(0, 2, shape, device=device).float(), p, 0.0)
    choices = torch.tensor(rot90_choices(rot90), device=device, dtype=torch.float32)
    out["rot90"] = _gate(choices[torch.randint(0, len(choices), shape, device=device)], p, 0.0)
    t = (torch.rand(batch, 2, device=device) * 2 - 1) * 0.125
    dims = torch.tensor([width, height], device=device, dtype=torch.float32)
    out["int_translate"] = _gate(torch.round(t * dims), p, 0.0)
    out["iso_scale"] = _gate(torch.exp2(torch.randn(shape, device=device) * 0.2), p, 1.0)
    out["pre_rotate"] = _gate((torch.rand(shape, device=device) * 2 - 1) * math.pi, p_rot, 0.0)
    out["aniso_scale"] = _gate(torch.exp2(torch.randn(shape, device=device) * 0.2), p, 1.0)
    out["post_rotate"] = _gate((torch.rand(shape, device=device) * 2 - 1) * math.pi, p_rot, 0.0)
    out["frac_translate"] = _gate(torch.randn(batch, 2, device=device) * 0.125 * dims, p, 0.0)
    return out


def matrix_from_params(params: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse transforms (output pixel -> input pixel) of :func:`sample_geometric`'s parameters."""
    flip = params["xflip"]
    g_inv = _eye(flip.shape[0], 3, flip.device)
    g_inv = g_inv @ _scale2d(1 - 2 * flip, torch.ones_like(flip))
    g_inv = g_inv @ _rotate2d(-params["rot90"] * (math.pi / 2))
    t = params["int_translate"]
    g_inv = g_inv @ _translate2d(-t[:, 0], -t[:, 1])
    s = params["iso_scale"]
    g_inv = g_inv @ _scale2d(1 / s, 1 / s)
    g_inv = g_inv @ _rotate2d(-params["pre_rotate"])
    s = params["aniso_scale"]
    g_inv = g_inv @ _scale2d(1 / s, s)
    g_inv = g_inv @ _rotate2d(-params["post_rotate"])
    t = params["frac_translate"]
    g_inv = g_inv @ _translate2d(-t[:, 0], -t[:, 1])
    return g_inv


def geometric_matrix(batch: int, size: Tuple[int, int], p: float, device: torch.device,
                     rot90: str = "uniform") -> torch.Tensor:
    """Per-sample inverse transform (output pixel -> input pixel), centred coordinates, pixel units.

    Args:
        batch: number of samples.
        size: (height, width) of the images.
        p: augmentation probability.
        rot90: the quarter turns drawn (:data:`ROT90_SETS`).

    Returns:
        (batch, 3, 3) float32 matrices; identities where no transform was drawn.
    """
    return matrix_from_params(sample_geometric(batch, size, p, device, rot90))


def colour_matrix(batch: int, p: float, device: torch.device) -> torch.Tensor:
    """Per-sample 4x4 RGB colour matrices (brightness, contrast, luma flip, hue, saturation)."""
    shape = (batch,)
    eye4 = _eye(batch, 4, device)
    luma = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device) / math.sqrt(3)
    outer = torch.outer(luma, luma)
    c = eye4.clone()
    # brightness: translation along (1, 1, 1)
    b = _gate(torch.randn(shape, device=device) * 0.2, p, 0.0)
    m = eye4.clone()
    m[:, 0:3, 3] = b[:, None]
    c = m @ c
    # contrast
    s = _gate(torch.exp2(torch.randn(shape, device=device) * 0.5), p, 1.0)
    m = eye4.clone()
    m[:, 0:3, 0:3] *= s[:, None, None]
    c = m @ c
    # luma flip: Householder reflection of the luma axis
    f = _gate(torch.randint(0, 2, shape, device=device).float(), p, 0.0)
    c = (eye4 - 2 * outer * f[:, None, None]) @ c
    # hue rotation about the luma axis (Rodrigues)
    theta = _gate((torch.rand(shape, device=device) * 2 - 1) * math.pi, p, 0.0)
    c = _rotate_about_luma(theta, luma) @ c
    # saturation: scale the component orthogonal to the luma axis
    s = _gate(torch.exp2(torch.randn(shape, device=device) * 1.0), p, 1.0)
    c = (outer + (eye4 - outer) * s[:, None, None]) @ c
    return c


def _rotate_about_luma(theta: torch.Tensor, luma: torch.Tensor) -> torch.Tensor:
    v = luma[:3]
    cross = torch.tensor([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]], device=theta.device)
    rot = (torch.cos(theta)[:, None, None] * torch.eye(3, device=theta.device)
           + torch.sin(theta)[:, None, None] * cross
           + (1 - torch.cos(theta))[:, None, None] * torch.outer(v, v))
    m = _eye(theta.shape[0], 4, theta.device)
    m[:, 0:3, 0:3] = rot
    return m


# --------------------------------------------------------------------------- execution


def _filter(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    f = torch.tensor(SYM6, device=device, dtype=dtype)
    return f / f.sum()


def _margins(g_inv: torch.Tensor, height: int, width: int, extra: int) -> Tuple[int, int, int, int]:
    """Reflect-padding (left, right, top, bottom) covering the sampled area plus the filter support."""
    cx, cy = width / 2 + extra, height / 2 + extra
    corners = torch.tensor([[-cx, -cy, 1.0], [cx, -cy, 1.0], [cx, cy, 1.0], [-cx, cy, 1.0]], device=g_inv.device)
    pts = (g_inv.float() @ corners.t()).transpose(1, 2)[..., :2].reshape(-1, 2)
    lo, hi = pts.min(0).values, pts.max(0).values
    pad = _FILTER_PAD * 2
    left = int(math.ceil(max(0.0, -float(lo[0]) - width / 2))) + pad
    right = int(math.ceil(max(0.0, float(hi[0]) - width / 2))) + pad
    top = int(math.ceil(max(0.0, -float(lo[1]) - height / 2))) + pad
    bottom = int(math.ceil(max(0.0, float(hi[1]) - height / 2))) + pad
    return (min(left, width - 1), min(right, width - 1), min(top, height - 1), min(bottom, height - 1))


def reflect_matrix(n: int, before: int, after: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(before + n + after, n) 0/1 matrix of ``F.pad(..., mode="reflect")`` along one axis (pads < n)."""
    j = torch.arange(-before, n + after, device=device)
    src = torch.where(j < 0, -j, torch.where(j >= n, 2 * (n - 1) - j, j))
    return (src.view(-1, 1) == torch.arange(n, device=device).view(1, -1)).to(dtype)


def _geometric_axes(height: int, width: int, margins: Tuple[int, int, int, int], extra: int, dtype: torch.dtype,
                    device: torch.device) -> Tuple[torch.Tensor, ...]:
    """The four matrices of :func:`apply_geometric`'s fast path: (up_y, up_x) reflect-pad then 2x upsample
    each axis; (down_y, down_x) 2x downsample and crop the extension."""
    left, right, top, bottom = margins
    f = _filter(device, torch.float64)
    n = len(SYM6)
    up_pad, down_pad = ((n + 1) // 2, (n - 2) // 2), ((n - 2) // 2, (n - 2) // 2)
    out = []
    for size, lo, hi in ((height, top, bottom), (width, left, right)):
        pad = reflect_matrix(size, lo, hi, torch.float64, device)
        out.append((fir_matrix(size + lo + hi, f * 2, up=2, pad=up_pad) @ pad).to(dtype))
    for size in (height, width):
        down = fir_matrix(2 * (size + 2 * extra), f.flip(0), down=2, pad=down_pad)
        out.append(down[extra:extra + size].to(dtype))
    return tuple(out)


def apply_geometric(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """Resample ``images`` (B, C, H, W) with the inverse transforms ``g_inv`` (B, 3, 3).

    On the CPU fast paths (``model.fast_paths_enabled``, issue 23) the reflect padding, the 2x up- and
    downsampling filters and the final crop are linear maps along each axis, applied as small matrix
    products (``U_y @ x @ U_x^T``) instead of 1-channel FIR convolutions: the same function, other rounding.
    """
    from model import fast_paths_enabled

    batch, channels, height, width = images.shape
    extra = _FILTER_PAD
    left, right, top, bottom = _margins(g_inv, height, width, extra)
    fast = fast_paths_enabled() and images.device.type == "cpu"
    n = len(SYM6)
    if fast:
        up_y, up_x, down_y, down_x = _geometric_axes(height, width, (left, right, top, bottom), extra,
                                                     images.dtype, images.device)
        x = up_y @ images @ up_x.t()
    else:
        x = F.pad(images, [left, right, top, bottom], mode="reflect")
        f = _filter(images.device, images.dtype)
        # 2x upsampling that keeps pixel centres aligned: pads ((n + 1) // 2, (n - 2) // 2) = (6, 5).
        x = upfirdn2d(x, f * 2, up=2, pad=((n + 1) // 2, (n - 2) // 2))
    hp, wp = height + top + bottom, width + left + right
    # theta maps normalised output coordinates (extended output, align_corners False) to normalised
    # input coordinates of the padded, upsampled image.
    out_h, out_w = height + 2 * extra, width + 2 * extra
    denorm = torch.diag(torch.tensor([out_w / 2, out_h / 2, 1.0], device=images.device))
    norm_in = torch.tensor([[2 / wp, 0.0, 2 * (width / 2 + left) / wp - 1],
                            [0.0, 2 / hp, 2 * (height / 2 + top) / hp - 1],
                            [0.0, 0.0, 1.0]], device=images.device)
    # Zero insertion puts original pixel i at index 2i of the 2x grid, whereas grid_sample reads 2x pixel j
    # at (j + 0.5) / 2 original pixels: seen through grid_sample, the upsampled image sits a quarter of an
    # original pixel too far. Translations are unaffected (the downsampling undoes it), but every other
    # transform would turn about a centre off by 1/4 px (a flip would shift the image by 1/2 px). Conjugating
    # with that quarter-pixel offset puts the centre at the true image centre, as the original code does
    # with its +-0.5 px (2x units) translations around G (checked against torch.flip in the tests).
    quarter = torch.full((batch,), 0.25, device=images.device)
    g_inv = _translate2d(-quarter, -quarter) @ g_inv.float() @ _translate2d(quarter, quarter)
    theta = (norm_in @ g_inv @ denorm)[:, :2, :].to(images.dtype)
    grid = F.affine_grid(theta, [batch, channels, 2 * out_h, 2 * out_w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if fast:
        return down_y @ x @ down_x.t()
    # 2x downsampling with the flipped filter (correlation with f), then crop the extension.
    x = upfirdn2d(x, f.flip(0), down=2, pad=((n - 2) // 2, (n - 2) // 2))
    return x[:, :, extra:extra + height, extra:extra + width]


def apply_colour(images: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Grey-level equivalent of the RGB colour matrices ``c`` (B, 4, 4): gain * x + offset."""
    gain = c[:, 0:3, 0:3].sum(dim=2).mean(dim=1)  # row sums: the eigenvalue of the luma axis
    offset = c[:, 0:3, 3].mean(dim=1)
    return images * gain.to(images.dtype)[:, None, None, None] + offset.to(images.dtype)[:, None, None, None]


def augment(images: torch.Tensor, p: float, rot90: str = "uniform") -> torch.Tensor:
    """Non-leaking augmentation of a (B, 1, H, W) batch with probability ``p`` (see module docstring);
    ``rot90`` picks the quarter turns drawn (:data:`ROT90_SETS`)."""
    if p <= 0:
        return images
    batch, _, height, width = images.shape
    g_inv = geometric_matrix(batch, (height, width), p, images.device, rot90)
    identity = torch.eye(3, device=images.device)
    if not torch.allclose(g_inv, identity.expand_as(g_inv), atol=0.0, rtol=0.0):
        images = apply_geometric(images, g_inv)
    c = colour_matrix(batch, p, images.device)
    if not torch.equal(c, torch.eye(4, device=images.device).expand_as(c)):
        images = apply_colour(images, c)
    return images


# --------------------------------------------------------------------------- controller


class AdaptiveAugment:
    """Controller of the augmentation probability (the ADA heuristic r_t = E[sign(D(real))]).

    Args:
        target: target value of r_t (``--ada_target``).
        length: number of samples for p to go from 0 to 1 (``--ada_length``).
        update_every: number of :meth:`tune` calls between two updates of p (``--ada_every``).
        p: initial probability.
    """

    def __init__(self, target: float, length: int, update_every: int, p: float = 0.0):
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.target = float(target)
        self.length = int(length)
        self.update_every = int(update_every)
        self.p = float(p)
        self.sign_sum = 0.0
        self.count = 0
        self.calls = 0
        self.r_t = 0.0

    @torch.no_grad()
    def tune(self, real_pred: torch.Tensor) -> float:
        """Accumulate ``sign(real_pred)``; update p every ``update_every`` calls. Returns p."""
        self.sign_sum += float(torch.sign(real_pred.detach()).sum())
        self.count += int(real_pred.numel())
        self.calls += 1
        if self.calls >= self.update_every:
            self.r_t = self.sign_sum / max(1, self.count)
            direction = 1.0 if self.r_t > self.target else -1.0  # at r_t == target: -1, as the original
            self.p = min(1.0, max(0.0, self.p + direction * self.count / self.length))
            self.sign_sum, self.count, self.calls = 0.0, 0, 0
        return self.p

    def state_dict(self) -> Dict[str, float]:
        return {"p": self.p, "sign_sum": self.sign_sum, "count": self.count, "calls": self.calls, "r_t": self.r_t}

    def load_state_dict(self, state: Optional[Dict[str, float]]) -> None:
        if not state:
            return
        self.p = float(state["p"])
        self.sign_sum = float(state["sign_sum"])
        self.count = int(state["count"])
        self.calls = int(state["calls"])
        self.r_t = float(state.get("r_t", 0.0))
