"""Convolutions with first and second order gradients and switchable weight gradients.

``conv2d`` / ``conv_transpose2d`` are drop-in replacements for the
``torch.nn.functional`` functions. Plain torch convolutions already support
double backward (R1 and path-length regularisation differentiate through
them), so the computation is delegated to them; what this module adds is the
:func:`no_weight_gradients` context: while it is active, backward passes do
not produce gradients for convolution weights (they receive ``None``), as
used around the R1 gradient computation. The switch is read when the
backward runs, not at forward time, so a graph built inside the context
still reaches the weights from a later backward outside it (the R1 penalty's
second order path). The first order weight gradient is still computed by
torch and then dropped; ``torch.autograd.grad(..., inputs=x)`` already skips it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["conv2d", "conv_transpose2d", "no_weight_gradients", "weight_gradients_disabled"]

IntOrPair = Union[int, Tuple[int, int]]

_state = threading.local()


def weight_gradients_disabled() -> bool:
    """Whether a :func:`no_weight_gradients` context is active in this thread."""
    return bool(getattr(_state, "disabled", False))


@contextlib.contextmanager
def no_weight_gradients(disable: bool = True) -> Iterator[None]:
    """Skip convolution weight gradients inside the block (``disable=False``: no effect)."""
    previous = weight_gradients_disabled()
    _state.disabled = previous or bool(disable)
    try:
        yield
    finally:
        _state.disabled = previous


class _WeightGate(torch.autograd.Function):
    """Identity on the weight whose backward drops the gradient while disabled."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor) -> torch.Tensor:
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Optional[torch.Tensor]:
        return None if weight_gradients_disabled() else grad


def _gate(weight: torch.Tensor) -> torch.Tensor:
    if not (weight.requires_grad and torch.is_grad_enabled()):
        return weight
    return _WeightGate.apply(weight)


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: Union[IntOrPair, str] = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d`` with first/second order gradients and :func:`no_weight_gradients` support."""
    return F.conv2d(input, _gate(weight), bias, stride, padding, dilation, groups)


def conv_transpose2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    output_padding: IntOrPair = 0,
    groups: int = 1,
    dilation: IntOrPair = 1,
) -> torch.Tensor:
    """``F.conv_transpose2d`` with first/second order gradients and :func:`no_weight_gradients` support."""
    return F.conv_transpose2d(input, _gate(weight), bias, stride, padding, output_padding, groups, dilation)
