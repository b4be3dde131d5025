"""The module Fed-BioMed trains and aggregates: G, D and G_ema under one ``nn.Module``.

State-dict keys are ``generator.*``, ``discriminator.*`` and ``g_ema.*`` (docs/method.md#files); this full
state dict (parameters and buffers of the three networks) is the only thing a node sends back.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch
from torch import nn

from .config import FactoryConfig

PREFIXES = ("generator", "discriminator", "g_ema")


def build_networks(cfg: FactoryConfig) -> Tuple[nn.Module, nn.Module]:
    """A fresh (Generator, Discriminator) pair from the config."""
    from model import Discriminator, Generator

    kw = cfg.model_kwargs()
    return Generator.from_args(kw), Discriminator.from_args(kw)


class FactoryModel(nn.Module):
    """Container of the generator, the discriminator and the EMA generator.

    ``g_ema`` starts with the parameters of ``generator`` (its buffers, i.e. the fixed noise maps, are
    its own random draws, as in the original's ``accumulate(g_ema, generator, 0)``) and never receives
    gradients.
    """

    def __init__(self, cfg: FactoryConfig):
        super().__init__()
        self.generator, self.discriminator = build_networks(cfg)
        self.g_ema, _ = build_networks(cfg)
        with torch.no_grad():
            for p_ema, p in zip(self.g_ema.parameters(), self.generator.parameters()):
                p_ema.copy_(p)
        self.g_ema.eval()
        self.g_ema.requires_grad_(False)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """``g_ema <- decay * g_ema + (1 - decay) * generator`` over parameters (buffers are kept)."""
        from model import fast_paths_enabled

        if fast_paths_enabled():  # the same two element-wise ops per tensor, batched (issue 23)
            ema, params = list(self.g_ema.parameters()), [p.detach() for p in self.generator.parameters()]
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, params, alpha=1.0 - decay)
            return
        for p_ema, p in zip(self.g_ema.parameters(), self.generator.parameters()):
            p_ema.mul_(decay).add_(p.detach(), alpha=1.0 - decay)


def split_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{'generator.x': t, ...}`` -> ``{'g': {'x': t}, 'd': {...}, 'g_ema': {...}}`` (docs/method.md#state-dict
    keys)."""
    names = {"generator": "g", "discriminator": "d", "g_ema": "g_ema"}
    out: Dict[str, Dict[str, torch.Tensor]] = {v: {} for v in names.values()}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in names or not rest:
            raise KeyError(f"unexpected key in the factory state dict: {key}")
        out[names[prefix]][rest] = value
    return out


PAPER_LR_MLP = 0.01


def reparametrize_mapping(state: Mapping[str, torch.Tensor], n_mlp: int, lr_mlp: float,
                          to_lr_mlp: float = PAPER_LR_MLP) -> Dict[str, torch.Tensor]:
    """A generator state dict trained with mapping lr multiplier ``lr_mlp``, expressed for ``to_lr_mlp``.

    An ``EqualLinear`` with multiplier ``m`` computes ``x @ (W * m / sqrt(in)).T + b * m`` from its stored
    ``W`` and ``b``; the same function with multiplier ``m'`` needs ``W' = W * m / m'`` and ``b' = b * m / m'``.
    Only the mapping layers ``style.<i>`` carry the multiplier.  The result is the *same generator*
    (up to float rounding) stored in the paper's parametrisation, so every loader that builds
    ``Generator(..., lr_mlp=0.01)`` (phase 2, the original code) reads it correctly.
    """
    factor = float(lr_mlp) / float(to_lr_mlp)
    out = dict(state)
    if factor == 1.0:
        return out
    for i in range(int(n_mlp)):
        for name in (f"style.{i}.weight", f"style.{i}.bias"):
            if name not in state:
                raise KeyError(f"generator state dict has no '{name}'")
            out[name] = state[name] * factor
    return out
