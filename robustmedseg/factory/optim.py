"""Lazy-regularised Adam pair behind one ``torch.optim.Optimizer`` facade.

Fed-BioMed 6.4.1 only checks ``isinstance(opt, torch.optim.Optimizer)`` and calls
``zero_grad()`` / ``step()`` around each ``training_step`` (its declearn optimizers cannot
alternate between parameter sets). :class:`AlternatingAdam` holds one Adam for D and one for G
and steps only the *active* one; the trainer selects the phase before computing the loss.

Lazy regularisation (StyleGAN2): with a regulariser every k minibatches there are k + 1
optimiser steps per k minibatches, so lr is multiplied by c = k / (k + 1) and the betas raised to
the power c: G (k = g_reg_every = 4) lr * 4/5, betas (0, 0.99^(4/5)); D (k = d_reg_every = 16)
lr * 16/17, betas (0, 0.99^(16/17)).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional

import torch


def lazy_adam(params: Iterable[torch.nn.Parameter], lr: float, reg_every: int) -> torch.optim.Adam:
    ratio = reg_every / (reg_every + 1)
    from model import fast_paths_enabled

    # foreach: the multi-tensor implementation (bit-identical on CPU, fewer Python round trips; issue 23);
    # None (torch's default: foreach on CUDA only) on the plain paths
    return torch.optim.Adam(params, lr=lr * ratio, betas=(0.0, 0.99 ** ratio), foreach=fast_paths_enabled() or None)


class AlternatingAdam(torch.optim.Optimizer):
    """Two Adams (``d`` and ``g``); :meth:`step` steps the active phase only."""

    def __init__(self, d_params: Iterable[torch.nn.Parameter], g_params: Iterable[torch.nn.Parameter],
                 lr: float = 0.002, d_reg_every: int = 16, g_reg_every: int = 4):
        self.d = lazy_adam(d_params, lr, d_reg_every)
        self.g = lazy_adam(g_params, lr, g_reg_every)
        self.phase = "d"
        self.steps = {"d": 0, "g": 0}
        # Deliberately not calling Optimizer.__init__: expose the inner groups instead.
        self.defaults = dict(lr=lr)
        self.param_groups = self.d.param_groups + self.g.param_groups
        self.state = {}  # type: ignore[assignment]

    def set_phase(self, phase: str) -> None:
        if phase not in ("d", "g"):
            raise ValueError(f"phase must be 'd' or 'g', got {phase!r}")
        self.phase = phase

    @property
    def active(self) -> torch.optim.Adam:
        return self.d if self.phase == "d" else self.g

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.d.zero_grad(set_to_none=set_to_none)
        self.g.zero_grad(set_to_none=set_to_none)

    def inner_step(self) -> None:
        """Step the active Adam now (a step inside a training step, e.g. the regular loss before a
        lazy regulariser), then clear all gradients."""
        self.active.step()
        self.steps[self.phase] += 1
        self.zero_grad()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        out = self.active.step(closure)
        self.steps[self.phase] += 1
        return out

    def state_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        return {"d": self.d.state_dict(), "g": self.g.state_dict(), "phase": self.phase, "steps": dict(self.steps)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:  # type: ignore[override]
        self.d.load_state_dict(state["d"])
        self.g.load_state_dict(state["g"])
        self.phase = state.get("phase", "d")
        self.steps = dict(state.get("steps", self.steps))
