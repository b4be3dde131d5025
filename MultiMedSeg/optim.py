"""Ranger optimiser: RAdam + Lookahead + gradient centralisation (docs/method.md#coach).

Built on ``torch.optim.RAdam`` (its variance-rectification threshold is ρ_t > 5, i.e. the original
N_sma threshold 5; below it the step is the bias-corrected momentum step).  Before every RAdam step
the gradient of each parameter with more than one dimension is centralised (its mean over all
dimensions but the first is subtracted).  After it, Lookahead keeps a slow copy of the weights and,
every ``k`` steps of a parameter, moves it by ``alpha`` toward the fast weights and resets the fast
weights to it.

``Ranger`` *is* a ``torch.optim.Optimizer`` (a RAdam subclass): ``param_groups``, ``zero_grad``,
``state_dict``/``load_state_dict`` (slow weights and Lookahead counters included) and
``torch.amp.GradScaler.step`` work unchanged.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple, Union

import torch

Params = Union[Iterable[torch.Tensor], Iterable[dict]]


def foreach_default() -> Optional[bool]:
    """``foreach`` for the phase-2 optimisers: True (multi-tensor updates: fewer Python round trips, the same
    formulas, rounding within ~1e-8; issue 23) on the fast paths, None (torch's default: foreach on CUDA
    only) under ``model.plain_paths`` / ``RMS_PLAIN_PATHS=1``."""
    from model import fast_paths_enabled

    return True if fast_paths_enabled() else None


class Ranger(torch.optim.RAdam):
    """Ranger with the original Coach's settings as defaults: lr 1e-4, α=0.5, k=6,
    betas (0.95, 0.999), eps 1e-5, weight decay 0, gradient centralisation on >1-D parameters."""

    def __init__(self, params: Params, lr: float = 1e-4, alpha: float = 0.5, k: int = 6,
                 betas: Tuple[float, float] = (0.95, 0.999), eps: float = 1e-5, weight_decay: float = 0.0,
                 use_gc: bool = True, foreach: Optional[bool] = None):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Lookahead alpha must be in [0, 1], got {alpha}")
        if k < 1:
            raise ValueError(f"Lookahead k must be >= 1, got {k}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
        for group in self.param_groups:
            group.setdefault("alpha", alpha)
            group.setdefault("k", k)
            group.setdefault("use_gc", use_gc)

    @staticmethod
    def _centralize(grad: torch.Tensor) -> None:
        if grad.dim() > 1:
            grad.sub_(grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first: dict = {}  # slow weights start at the pre-step weights (RAdam must see an empty state)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Ranger does not support sparse gradients")
                if group["use_gc"]:
                    self._centralize(p.grad)
                if "slow_buffer" not in self.state[p]:
                    first[p] = p.detach().clone()
        super().step()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if p in first:
                    state["slow_buffer"] = first[p]
                    state["lookahead_step"] = 0
                state["lookahead_step"] += 1
                if state["lookahead_step"] % group["k"] == 0:
                    slow = state["slow_buffer"]
                    slow.add_(p.detach() - slow, alpha=group["alpha"])
                    p.copy_(slow)
        return loss
