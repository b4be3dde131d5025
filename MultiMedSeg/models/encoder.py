"""Feature-style encoder (fs_encoder_v2, docs/method.md#encoder), generalised to any generator size.

The encoder maps an (B, 1, S, S) slice and its (B, 2) one-hot [source, target] label to

* W+ codes (B, n_styles, style_dim) with n_styles = the generator's ``n_latent``;
* content features for the generator, converted by :meth:`FeatureStyleEncoder.convert_content`
  into the generator's ``features_in`` list of ``(feature, gate)`` pairs (or ``None``).

Resolution mapping.  The IResNet block outputs lie at S/2, S/4, S/8 and S/16.  A block feeds the
generator when its resolution is one where the generator accepts an injected feature (see
:class:`GeneratorLayout`); with the paper's S = 256 and a 512 px generator that is 128, 64, 32 and
16 px.  The coarsest used block starts the state of the dynamic skip layers (gate 1) and every finer
used block goes through one :class:`DynamicSkipLayer`.  Content channels are mapped to the
generator's channel count at that resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from model import EqualLinear, PixelNorm

from .dsbn import DomainBatchNorm2d, DomainRouting, Route, target_mask
from .iresnet import IResNet, stage_layers

FeaturesIn = List[Optional[Tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class GeneratorLayout:
    """Feature geometry of a ``model.Generator`` needed by the encoder and the interpreter.

    ``feature_channels[i]`` / ``feature_sizes[i]``: channels and side of entry i of the feature list
    returned by ``g_synthesis``.  ``insertion[res] = (index, channels)``: the ``features_in`` index
    where a (B, channels, res, res) feature is injected.  ``n_inputs``: length of ``features_in``.
    """

    size: int
    n_latent: int
    feature_channels: Tuple[int, ...]
    feature_sizes: Tuple[int, ...]
    insertion: Dict[int, Tuple[int, int]]
    n_inputs: int

    @classmethod
    def from_generator(cls, g: nn.Module) -> "GeneratorLayout":
        """Read the layout from a generator (``model.Generator`` conventions, docs/method.md#phase2-generator item 7).

        Feature list: the 4 px constant, conv1's output, then two conv outputs per resolution
        8..size.  Injection index for an input at resolution r (4 <= r <= size/2): the feature enters
        before the upsampling conv of the step r -> 2r, index 2*log2(r) - 3.
        """
        size = int(g.size)
        log_size = int(math.log2(size))
        ch = {int(k): int(v) for k, v in g.channels.items()}
        sizes = [4, 4] + [2 ** r for r in range(3, log_size + 1) for _ in range(2)]
        chans = [ch[s] for s in sizes]
        insertion = {2 ** r: (2 * r - 3, ch[2 ** r]) for r in range(2, log_size)}
        return cls(size, int(g.n_latent), tuple(chans), tuple(sizes), insertion, int(g.n_latent) + 1)


class ContentLayer(nn.Module):
    """DSBN -> conv3x3 -> DSBN -> PReLU -> conv3x3 -> DSBN (no biases, stride 1)."""

    def __init__(self, cin: int, cout: int, bn_mode: str, disable_dsbn: bool):
        super().__init__()
        self.bn1 = DomainBatchNorm2d(cin, bn_mode=bn_mode, disable=disable_dsbn)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn2 = DomainBatchNorm2d(cout, bn_mode=bn_mode, disable=disable_dsbn)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn3 = DomainBatchNorm2d(cout, bn_mode=bn_mode, disable=disable_dsbn)

    def forward(self, x: torch.Tensor, is_target: Route) -> torch.Tensor:
        x = self.conv1(self.bn1(x, is_target))
        x = self.conv2(self.prelu(self.bn2(x, is_target)))
        return self.bn3(x, is_target)


def _rconv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=True, padding_mode="reflect")


class DynamicSkipLayer(nn.Module):
    """Gated merge of the up-sampled state with the encoder content (docs/method.md#encoder).

    ĥ = lrelu0.2(W_h * up2(s)); r = σ(W_r * [ĥ, f]); h = r⊙ĥ; m = tanh(relu(W_m * [ĥ, f]));
    f̂ = (W_E * [h, f]) ⊙ m.  Gates r and m are per channel.  Returns (m, f̂, h).
    """

    def __init__(self, hidden_nc: int, feature_nc: int):
        super().__init__()
        self.trans = _rconv(hidden_nc, feature_nc)
        self.reset = _rconv(2 * feature_nc, feature_nc)
        self.mask = _rconv(2 * feature_nc, feature_nc)
        self.update = _rconv(2 * feature_nc, feature_nc)

    def forward(self, feature: torch.Tensor, state: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h_hat = F.leaky_relu(self.trans(F.interpolate(state, scale_factor=2.0, mode="nearest")), 0.2)
        both = torch.cat([h_hat, feature], 1)
        h = torch.sigmoid(self.reset(both)) * h_hat
        m = torch.tanh(F.relu(self.mask(both)))
        f_hat = self.update(torch.cat([h, feature], 1)) * m
        return m, f_hat, h


class FeatureStyleEncoder(nn.Module):
    """fs_encoder_v2: IResNet backbone with DSBN, style head, label modulation, content path.

    Args:
        layout: geometry of the generator the codes and content are meant for.
        style_dim: W dimension.
        input_size: side S of the input slices (power of two, 16 <= S <= layout.size).
        depth: IResNet depth (see ``iresnet.DEPTHS``; paper 50).
        base_channels: stem width (paper 64; stages use 1/2/4/8 times it).
        residual: build the content path (``--disable_residuals`` turns it off).
        dsbn: domain-specific BN (``--disable_DSBN`` turns it off: source branch for all samples).
        bn_mode: 'running' or 'batch' (see ``dsbn``).
    """

    def __init__(self, layout: GeneratorLayout, style_dim: int, input_size: int, depth: int = 50,
                 base_channels: int = 64, residual: bool = True, dsbn: bool = True, bn_mode: str = "running"):
        super().__init__()
        if input_size < 16 or input_size & (input_size - 1) or input_size > layout.size:
            raise ValueError(f"encoder input size must be a power of two in [16, {layout.size}], got {input_size}")
        self.input_size = input_size
        self.n_styles = layout.n_latent
        self.style_dim = style_dim
        self.layout = layout
        self.residual = residual
        self.backbone = IResNet(stage_layers(depth), base_channels, 1, bn_mode, disable_dsbn=not dsbn)
        widths = self.backbone.widths
        self.block_sizes = [input_size // 2 ** (k + 1) for k in range(4)]
        self.pool = nn.AdaptiveAvgPool2d(3)
        # One Linear producing all n_styles codes == n_styles independent Linear layers (same init law).
        self.styles = nn.Linear(sum(widths) * 9, self.n_styles * style_dim)
        self.n_label_groups = (self.n_styles + 1) // 2
        self.label_embed = EqualLinear(2, self.n_label_groups * style_dim)
        self.label_norm = PixelNorm()
        self.content_blocks: List[int] = []
        if residual:
            self._build_content(widths, bn_mode, not dsbn)

    def _build_content(self, widths: Sequence[int], bn_mode: str, disable_dsbn: bool) -> None:
        ins = self.layout.insertion
        self.content_blocks = [k for k, s in enumerate(self.block_sizes) if s in ins]
        if not self.content_blocks:
            raise ValueError(f"no encoder block resolution {self.block_sizes} is an injection resolution of the "
                             f"{self.layout.size} px generator ({sorted(ins)}); use another encoder input size")
        self.content = nn.ModuleList(
            [ContentLayer(widths[k], ins[self.block_sizes[k]][1], bn_mode, disable_dsbn) for k in self.content_blocks])
        # Skip layers from the second-coarsest used block to the finest (coarse -> fine order).
        coarse_to_fine = self.content_blocks[::-1]
        self.skips = nn.ModuleList(
            [DynamicSkipLayer(ins[self.block_sizes[prev]][1], ins[self.block_sizes[k]][1])
             for prev, k in zip(coarse_to_fine[:-1], coarse_to_fine[1:])])

    def modulation(self, label: torch.Tensor) -> torch.Tensor:
        """(B, 2) label -> (B, n_styles, style_dim) multiplicative modulation (entry k scales 2k, 2k+1)."""
        m = self.label_norm(self.label_embed(label.to(self.label_embed.weight.dtype)))
        m = m.view(label.shape[0], self.n_label_groups, self.style_dim)
        return m.repeat_interleave(2, dim=1)[:, : self.n_styles]

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]]]:
        """Returns codes (B, n_styles, style_dim) and the content list (fine -> coarse) or None."""
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ValueError(f"encoder expects {self.input_size}x{self.input_size} inputs, got {tuple(x.shape[-2:])}")
        is_target = DomainRouting.from_mask(target_mask(label))
        blocks = self.backbone(x, is_target)
        pooled = torch.cat([self.pool(b).flatten(1) for b in blocks], 1)
        codes = self.styles(pooled).view(x.shape[0], self.n_styles, self.style_dim)
        codes = codes * self.modulation(label)
        if not self.residual:
            return codes, None
        content = [layer(blocks[k], is_target) for layer, k in zip(self.content, self.content_blocks)]
        return codes, content

    def convert_content(self, content: Sequence[torch.Tensor]) -> FeaturesIn:
        """Content list (fine -> coarse, as returned by forward) -> generator ``features_in`` list.

        The coarsest block is injected with gate 1; every finer block goes through its dynamic skip
        layer and is injected as (f̂, 1 - m) at the generator index of its resolution.
        """
        out: FeaturesIn = [None] * self.layout.n_inputs
        order = list(zip(self.content_blocks, content))[::-1]  # coarse -> fine
        k0, state = order[0]
        out[self.layout.insertion[self.block_sizes[k0]][0]] = (state, state.new_ones(()))
        for skip, (k, feat) in zip(self.skips, order[1:]):
            m, f_hat, state = skip(feat, state)
            out[self.layout.insertion[self.block_sizes[k]][0]] = (f_hat, 1.0 - m)
        return out
