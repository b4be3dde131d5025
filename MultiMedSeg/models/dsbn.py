"""Domain-specific batch normalisation (DSBN) and the BatchNorm evaluation policy.

A :class:`DomainBatchNorm2d` / :class:`DomainBatchNorm1d` holds two ordinary batch-norm layers,
``bns.0`` for the source domain and ``bns.1`` for the target domain.  Every sample is normalised
by the layer of its own domain, so the batch statistics (and, in ``'running'`` mode, the running
statistics) are computed per domain subset.  With ``disable=True`` every sample uses ``bns.0``
(the ``--disable_DSBN`` ablation).

The domain of each sample is a boolean vector ``is_target`` of shape (B,); it is derived from the
(B, 2) one-hot ``[source, target]`` label with :func:`target_mask` (target iff label[:, 1] > label[:, 0]).

BatchNorm evaluation (docs/differences.md#d9-36) is selected by ``bn_mode``:

* ``'running'`` (default): ``track_running_stats=True``.  Training uses batch statistics and updates
  the running estimates; ``eval()`` uses the running estimates, so a prediction is deterministic and
  does not depend on the other slices of the batch.
* ``'batch'``: ``track_running_stats=False`` (the original behaviour): batch statistics always,
  also in ``eval()``; predictions then depend on the batch composition.

Fix of docs/differences.md#d9-34: the 1-d variant shares the routing code of the 2-d one (no unbound method call).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
from torch import nn

BN_MODES = ("running", "batch")


def check_bn_mode(bn_mode: str) -> str:
    """Return ``bn_mode`` if valid, else raise ValueError."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    return bn_mode


def make_bn(kind: str, num_features: int, bn_mode: str = "running", eps: float = 1e-5) -> nn.modules.batchnorm._BatchNorm:
    """A plain BatchNorm1d/2d ('1d' or '2d') following ``bn_mode``."""
    cls = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d}[kind]
    return cls(num_features, eps=eps, track_running_stats=check_bn_mode(bn_mode) == "running")


def target_mask(label: torch.Tensor) -> torch.Tensor:
    """(B, 2) one-hot [source, target] label -> bool (B,) mask, True for target samples."""
    if label.ndim != 2 or label.shape[1] != 2:
        raise ValueError(f"label must have shape (B, 2), got {tuple(label.shape)}")
    return label[:, 1] > label[:, 0]


@dataclass(frozen=True)
class DomainRouting:
    """Per-batch routing computed once (one host sync) and shared by every DSBN layer.

    ``kind``: 'source' (all samples source), 'target' (all target) or 'mixed', in which case
    ``src_idx`` / ``tgt_idx`` hold the sample indices of each domain.
    """

    kind: str
    src_idx: Optional[torch.Tensor] = None
    tgt_idx: Optional[torch.Tensor] = None

    @classmethod
    def from_mask(cls, is_target: Optional[torch.Tensor]) -> "DomainRouting":
        if is_target is None:
            return cls("source")
        n_tgt = int(is_target.sum())
        if n_tgt == 0:
            return cls("source")
        if n_tgt == is_target.numel():
            return cls("target")
        return cls("mixed", torch.nonzero(~is_target).flatten(), torch.nonzero(is_target).flatten())


Route = Union[None, torch.Tensor, DomainRouting]


def as_routing(route: Route) -> DomainRouting:
    """Accept a bool (B,) target mask, None (all source) or an existing routing."""
    return route if isinstance(route, DomainRouting) else DomainRouting.from_mask(route)


class _DomainBatchNorm(nn.Module):
    """Shared routing logic; subclasses fix the BN dimensionality."""

    _kind = "2d"

    def __init__(self, num_features: int, bn_mode: str = "running", disable: bool = False, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.disable = disable
        self.bns = nn.ModuleList([make_bn(self._kind, num_features, bn_mode, eps) for _ in range(2)])

    def forward(self, x: torch.Tensor, route: Route = None) -> torch.Tensor:
        """Normalise ``x`` (B, C, ...) with the BN of each sample's domain.

        ``route``: bool (B,) target mask, a :class:`DomainRouting`, or None (all source).
        """
        if self.disable:
            return self.bns[0](x)
        route = as_routing(route)
        if route.kind != "mixed":
            return self.bns[int(route.kind == "target")](x)
        out = torch.empty_like(x)
        out.index_copy_(0, route.src_idx, self.bns[0](x.index_select(0, route.src_idx)).to(x.dtype))
        out.index_copy_(0, route.tgt_idx, self.bns[1](x.index_select(0, route.tgt_idx)).to(x.dtype))
        return out

    def copy_source_to_target(self) -> None:
        """Initialise the target branch (``bns.1``) from the source branch, parameters and statistics."""
        self.bns[1].load_state_dict(self.bns[0].state_dict())

    def extra_repr(self) -> str:
        return f"{self.num_features}, disable={self.disable}"


class DomainBatchNorm2d(_DomainBatchNorm):
    """DSBN over (B, C, H, W)."""

    _kind = "2d"


class DomainBatchNorm1d(_DomainBatchNorm):
    """DSBN over (B, C) or (B, C, L)."""

    _kind = "1d"


def domain_norms(module: nn.Module) -> Iterator[_DomainBatchNorm]:
    """All DSBN layers inside ``module``."""
    return (m for m in module.modules() if isinstance(m, _DomainBatchNorm))
