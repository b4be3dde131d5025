"""Secure aggregation of the data factory (Fed-BioMed 6.4.1, LOM scheme): the codec on both sides.

With ``train.py --secagg`` the researcher never receives one node's generator or discriminator:
it receives, from each sampled node, a vector of 64-bit integers masked with pairwise one-time
masks (Fed-BioMed's Low-Overhead Masking: Diffie-Hellman keys agreed between the sampled nodes,
ChaCha20 masks that cancel in the sum). Only the sum over the sampled nodes can be unmasked.
A new key set is agreed whenever the sampled set of nodes changes, and on every ``--resume``.

What a node encodes (node side, :class:`NodeRound`):

* the change of every state-dict tensor during the round, ``delta = w_after - w_global``, where
  ``w_global`` is the global model the node received (both sides know it), divided by the
  clipping range ``C`` (``--secagg-clip``, :data:`DEFAULT_CLIP`) and shifted by half a
  quantisation step, so that Fed-BioMed's quantiser (which truncates onto
  ``SAParameters.TARGET_RANGE`` = 2^13 levels over [-1, 1]) rounds to the nearest level and an
  unchanged value (a blur kernel, a fixed noise map) is encoded exactly;
* why the change and not the weights: the stored weights of the mapping network are
  N(0, 1)/lr_mlp, i.e. up to ~±500, the others ~±5 (equalised learning rate), so one clipping
  range over the weights would leave a resolution of ~0.12 on weights of unit scale; a change
  during one round is bounded by the optimiser whatever the weight's scale: Adam (beta1 = 0) moves
  a value by about lr per step, so by ~lr x (steps of its network) per round, 2.0 for the paper's
  2000-update rounds (:data:`DEFAULT_CLIP`); measured max 0.74 at 32 px, BENCHMARKS.md.

Aggregation weights: Fed-BioMed's secure sum multiplies each node's integers by the sample count
the node reports and divides by their total. The method averages nodes uniformly (as the plain
runs, ``--aggregation uniform``), so under secure aggregation each node reports a count of 1
(:meth:`NodeRound.finish`); as a side effect the researcher no longer learns the dataset sizes.
With ``--aggregation samples`` the nodes report their real counts (Fed-BioMed's weighting).

Decoding (researcher side, :func:`unmask_sum` and :func:`decode_mean`): the masked integer
vectors are summed modulo 2^64 (the masks cancel), which gives the exact integer sum of the
quantised updates; the mean update is ``C * (2 * sum / (total * T) - 1)`` and the new global
model ``w_global + mean``. Fed-BioMed's own decoder truncates the sum divided by the total to an
integer (a bias of up to one step per round); decoding the exact sum avoids it. Maximum error of
the average against the plain average: ``C / T`` per value and round (:func:`resolution`).

Nothing in this module imports ``fedbiomed.researcher`` (the nodes import it).
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from fedbiomed.common.constants import SAParameters

#: quantisation levels of Fed-BioMed's secure aggregation (2^13 in 6.4.1)
TARGET_RANGE = int(SAParameters.TARGET_RANGE)
#: clipping range handed to Fed-BioMed (an integer); ours is applied by scaling before
FBM_CLIPPING_RANGE = 1
#: default clipping range of the per-round change of one stored parameter (``--secagg-clip``)
DEFAULT_CLIP = 2.0
#: what a Fed-BioMed 6.4.1 node replies when its secure-aggregation setting and the request disagree
NODE_REFUSAL = "Could not configure secure aggregation on node"
WEIGHTINGS = ("uniform", "samples")


class SecaggDecodeError(RuntimeError):
    """The masked sums did not decode (the nodes' masks did not cancel)."""


def resolution(clip: float) -> float:
    """Largest difference between the secure and the plain average, per value and round."""
    return float(clip) / TARGET_RANGE


# ------------------------------------------------------------------------------------ node side


class _OneSample:
    def __len__(self) -> int:
        return 1


class _ReportOneSample:
    """Stands in for the training loader once training is over: Fed-BioMed then reports (and
    weights the secure sum by) a sample count of 1."""

    def __init__(self, loader: object):
        self.loader = loader
        self.dataset = _OneSample()


class NodeRound:
    """Node side of one secure-aggregation round (created by the training plan)."""

    def __init__(self, clip: float, weighting: str, base: Mapping[str, torch.Tensor]):
        if clip <= 0:
            raise ValueError(f"secagg clip must be > 0, got {clip}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"secagg weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.clip, self.weighting, self.base = float(clip), weighting, dict(base)

    @classmethod
    def start(cls, model: torch.nn.Module, model_args: Mapping[str, object]) -> Optional["NodeRound"]:
        """Before training: keep the received global model if the researcher asks for secure
        aggregation (``model_args['secagg_clip'] > 0``), else return None."""
        clip = float(model_args.get("secagg_clip") or 0.0)
        if clip <= 0:
            return None
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cls(clip, str(model_args.get("secagg_weighting") or "uniform"), base)

    def clipped_fraction(self, model: torch.nn.Module) -> float:
        """Fraction of the values whose change this round exceeds the clipping range."""
        over = total = 0
        with torch.no_grad():
            for key, value in model.state_dict().items():
                delta = value.detach().double() - self.base[key].to(value.device).double()
                over += int((delta.abs() > self.clip).sum())
                total += delta.numel()
        return over / max(total, 1)

    def report_clipping(self, trainer: object, model: torch.nn.Module) -> None:
        """Add ``secagg_clipped`` (fraction of clipped changes) to the node's round metrics."""
        trainer._track(secagg_clipped=self.clipped_fraction(model))

    def finish(self, plan: object) -> None:
        """After training: with uniform weights, make Fed-BioMed report one sample (see module doc)."""
        if self.weighting == "uniform":
            plan.training_data_loader = _ReportOneSample(plan.training_data_loader)

    def encode(self, params: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """What the node hands to Fed-BioMed's encrypter instead of its weights: the change
        divided by the clipping range, shifted by half a quantisation step (values in [-1, 1])."""
        half_step = 1.0 / TARGET_RANGE
        out = {}
        for key, value in params.items():
            if not value.is_floating_point():
                raise ValueError(f"secure aggregation encodes floating-point tensors only; {key} is {value.dtype}")
            delta = value.detach().double() - self.base[key].to(value.device).double()
            out[key] = (delta / self.clip + half_step).clamp_(-1.0, 1.0).to(value.dtype)
        return out

    @torch.no_grad()
    def encode_model(self, model: torch.nn.Module) -> None:
        """Replace the model's values by their codes (:meth:`encode`) just before Fed-BioMed
        flattens, quantises and masks them; the round is over, the node keeps nothing of it."""
        model.load_state_dict(self.encode(model.state_dict()))


# ------------------------------------------------------------------------------ researcher side


def unmask_sum(masked: Iterable[Sequence[int]]) -> np.ndarray:
    """Sum of the nodes' masked integer vectors modulo 2^64 (LOM: the pairwise masks cancel)."""
    total: Optional[np.ndarray] = None
    for vector in masked:
        arr = np.asarray(vector, dtype=np.uint64)
        if total is None:
            total = arr.copy()
        elif arr.shape != total.shape:
            raise SecaggDecodeError(f"masked vectors of different lengths ({arr.size} and {total.size})")
        else:
            total += arr  # wraps modulo 2^64, as the masks do
    if total is None:
        raise SecaggDecodeError("no masked vector to aggregate")
    return total


def decode_mean(sums: np.ndarray, total_weight: int, clip: float) -> np.ndarray:
    """Mean change (float64) from the exact integer sums of ``total_weight`` weighted codes."""
    total_weight = int(total_weight)
    if total_weight < 1:
        raise SecaggDecodeError(f"total weight must be >= 1, got {total_weight}")
    limit = total_weight * (TARGET_RANGE - 1)
    if sums.size and int(sums.max()) > limit:
        bad = int((sums > np.uint64(limit)).sum())
        raise SecaggDecodeError(f"{bad} of {sums.size} unmasked sums exceed {limit}: the nodes' masks did not "
                                f"cancel (inconsistent secure-aggregation keys)")
    return float(clip) * (2.0 * sums.astype(np.float64) / (total_weight * TARGET_RANGE) - 1.0)


def apply_mean(global_params: Mapping[str, torch.Tensor], mean: np.ndarray) -> Dict[str, torch.Tensor]:
    """New global state: ``w_global + mean change``. ``mean`` is flat, in the order of
    ``global_params`` (the order in which Fed-BioMed flattens the same weights on the nodes)."""
    expected = sum(v.numel() for v in global_params.values())
    if mean.size != expected:
        raise SecaggDecodeError(f"the nodes sent {mean.size} values, the model has {expected}")
    flat = torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float64))
    out, start = {}, 0
    for key, value in global_params.items():
        change = flat[start:start + value.numel()].reshape(value.shape).to(value.device)
        out[key] = (value.detach().double() + change).to(value.dtype)
        start += value.numel()
    return out
