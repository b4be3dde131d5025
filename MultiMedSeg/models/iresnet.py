"""IResNet backbone (ArcFace style) with domain-specific batch normalisation.

Block (:class:`IBasicBlock`): BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride on this second conv)
-> BN, plus a shortcut (1x1 strided conv + BN) when the shape changes.  Every BN is a
:class:`~MultiMedSeg.models.dsbn.DomainBatchNorm2d`.  Four stages of widths ``base·(1, 2, 4, 8)``
(paper: 64/128/256/512); the first block of every stage has stride 2.

Depths (blocks per stage): 50 = [3, 4, 14, 3] (the paper's ArcFace IResNet-50), 34 = [3, 4, 6, 3],
18 = [2, 2, 2, 2], 10 = [1, 1, 1, 1] (tiny, for tests).

ArcFace weights (``backbone.pth`` of the Feature-Style-Encoder, docs/method.md#pretrained) can be loaded with
:func:`load_arcface_weights`: every convolution and PReLU weight of the stages and the stem PReLU
must be present with the same shape (strict); the stem conv is always new (1 input channel) and
every BatchNorm keeps its fresh initialisation (the file's BN parameters and statistics are
discarded, as in the original).  Without a file the backbone is randomly initialised (torch default).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from model import channels_last
from robustmedseg.errors import InputError
from robustmedseg.io import load_torch_file, strip_module_prefix

from .dsbn import DomainBatchNorm2d, Route, as_routing

DEPTHS: Dict[int, List[int]] = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3]}


def stage_layers(depth: int) -> List[int]:
    """Blocks per stage for a named depth."""
    if depth not in DEPTHS:
        raise ValueError(f"encoder depth must be one of {sorted(DEPTHS)}, got {depth}")
    return list(DEPTHS[depth])


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """ArcFace residual block with DSBN; ``forward(x, is_target)``."""

    def __init__(self, cin: int, cout: int, stride: int = 1, bn_mode: str = "running", disable_dsbn: bool = False):
        super().__init__()

        def bn(c: int) -> DomainBatchNorm2d:
            return DomainBatchNorm2d(c, bn_mode=bn_mode, disable=disable_dsbn)

        self.bn1 = bn(cin)
        self.conv1 = conv3x3(cin, cout)
        self.bn2 = bn(cout)
        self.prelu = nn.PReLU(cout)
        self.conv2 = conv3x3(cout, cout, stride)
        self.bn3 = bn(cout)
        self.downsample: Optional[nn.ModuleList] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.ModuleList([nn.Conv2d(cin, cout, 1, stride=stride, bias=False), bn(cout)])

    def forward(self, x: torch.Tensor, is_target: Route = None) -> torch.Tensor:
        out = self.conv1(self.bn1(x, is_target))
        out = self.prelu(self.bn2(out, is_target))
        out = self.bn3(self.conv2(out), is_target)
        skip = x
        if self.downsample is not None:
            skip = self.downsample[1](self.downsample[0](x), is_target)
        return out + skip


class IResNet(nn.Module):
    """Stem (conv3x3 s1 -> DSBN -> PReLU) and four stride-2 stages; returns the four stage outputs.

    Key names follow ArcFace's (``conv1``, ``bn1``, ``prelu``, ``layer{1..4}.{i}.{bn1,conv1,...}``,
    ``downsample.{0,1}``) so its conv/PReLU weights load by name.
    """

    def __init__(self, layers: Sequence[int], base_channels: int = 64, in_channels: int = 1,
                 bn_mode: str = "running", disable_dsbn: bool = False):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {list(layers)}")
        self.widths = [base_channels * m for m in (1, 2, 4, 8)]
        self.conv1 = conv3x3(in_channels, base_channels)
        self.bn1 = DomainBatchNorm2d(base_channels, bn_mode=bn_mode, disable=disable_dsbn)
        self.prelu = nn.PReLU(base_channels)
        cin = base_channels
        for s, (n_blocks, cout) in enumerate(zip(layers, self.widths), start=1):
            blocks = [IBasicBlock(cin if i == 0 else cout, cout, 2 if i == 0 else 1, bn_mode, disable_dsbn)
                      for i in range(n_blocks)]
            self.add_module(f"layer{s}", nn.ModuleList(blocks))
            cin = cout

    def stages(self) -> List[nn.ModuleList]:
        return [getattr(self, f"layer{s}") for s in range(1, 5)]

    def forward(self, x: torch.Tensor, is_target: Route = None) -> List[torch.Tensor]:
        """``is_target``: bool (B,) target mask, a DomainRouting, or None (all source)."""
        is_target = as_routing(is_target)
        # CPU fast paths (model.channels_last, issue 23): the stages run channels-last (a 1-channel input has
        # no layout to inherit, so the stem's output is converted)
        x = self.prelu(self.bn1(channels_last(self.conv1(x)), is_target))
        outs = []
        for stage in self.stages():
            for block in stage:
                x = block(x, is_target)
            outs.append(x)
        return outs


def _arcface_keys(net: IResNet) -> List[str]:
    """Our keys that come from an ArcFace file: stage conv/PReLU weights and the stem PReLU."""
    keys = []
    for name, _ in net.named_parameters():
        if name == "conv1.weight" or ".bn" in f".{name}" or "downsample.1." in name:
            continue
        keys.append(name)
    return keys


def load_arcface_weights(net: IResNet, path: Optional[os.PathLike]) -> bool:
    """Copy ArcFace conv/PReLU weights from ``path`` into ``net``; ``None`` keeps random init.

    Returns True when weights were loaded.  Raises :class:`InputError` naming the file when it is
    missing, unreadable or lacks a compatible conv/PReLU weight (e.g. another depth/width).
    """
    if path is None:
        return False
    state = load_torch_file(path, "ArcFace backbone weights (given by --backbone_weights)")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError("ArcFace backbone file (given by --backbone_weights) is not a state dict", path)
    state = strip_module_prefix(state)
    own = dict(net.named_parameters())
    with torch.no_grad():
        for key in _arcface_keys(net):
            src = state.get(key)  # same names (ArcFace shortcut: Sequential(conv, bn))
            if not isinstance(src, torch.Tensor):
                raise InputError(f"ArcFace backbone lacks '{key}' (the encoder depth/width must match the file: "
                                 f"IResNet-50, base 64)", path)
            if src.shape != own[key].shape:
                raise InputError(f"ArcFace weight '{key}' has shape {tuple(src.shape)}, the encoder expects "
                                 f"{tuple(own[key].shape)} (use --encoder_depth 50 and --encoder_base_channels 64)", path)
            own[key].copy_(src)
    return True
