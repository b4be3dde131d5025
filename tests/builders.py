"""Builders shared by several test modules (plain functions; the fixtures are in conftest.py).

Test modules import these instead of importing each other.

``TINY_GEN`` / :func:`tiny_generator_file`
    The tiny phase-1 generator of the phase-2 tests (32 px, style 32, 2 mapping layers, 3 domains,
    channels capped at 16) and a factory file of it, written with the project's one writer
    (``robustmedseg.factory_file.write_factory_file``), initialised from ``torch.manual_seed(seed)``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from model import Generator, GeneratorArgs
from robustmedseg.factory_file import write_factory_file

TINY_GEN = GeneratorArgs(size=32, style_dim=32, n_mlp=2, n_domains=3, channel_multiplier=2, channel_cap=16)


def tiny_generator_file(path: Path, seed: int = 0, **overrides) -> Path:
    """A factory file of :data:`TINY_GEN` (fields replaced by ``overrides``), initialised locally."""
    import dataclasses

    args = dataclasses.replace(TINY_GEN, **overrides)
    torch.manual_seed(seed)
    return write_factory_file(path, Generator.from_args(args), args)
