"""Slice-file naming and z-bins (the vertical position class of a slice in its volume).

Slice files are named ``<volume>_slice<NNN>.npz``.  The z-bin of a slice is computed from
its RANK among the slices of its volume found in the folder, not from the number in its
name, so gaps in the numbering (slices removed upstream, numbering not starting at 0) still
give bins spread over ``0 .. n_zbins-1`` (docs/differences.md#d9-11 fix):

    b = floor(rank * n_zbins / D),   rank in 0..D-1, D = number of slices of the volume.

With D >= n_zbins every bin receives at least one slice; with fewer slices some bins are
skipped, but no bin ever exceeds ``n_zbins - 1``.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

from model import N_ZBINS

from .slices import slice_index, volume_id
from robustmedseg.errors import InputError

PathLike = Union[str, Path]

DEFAULT_N_ZBINS = N_ZBINS


def parse_slice_name(path: PathLike) -> Tuple[str, int]:
    """Return ``(volume_id, slice_number)`` of ``<volume>_slice<NNN>.npz`` (InputError otherwise)."""
    return volume_id(path), slice_index(path)


def zbin_of_rank(rank: int, depth: int, n_zbins: int = DEFAULT_N_ZBINS) -> int:
    """z-bin of the slice of rank ``rank`` (0-based) in a volume of ``depth`` slices."""
    if not 0 <= rank < depth:
        raise ValueError(f"rank {rank} outside 0..{depth - 1}")
    return rank * n_zbins // depth


def zbins_for_files(paths: Sequence[PathLike], n_zbins: int = DEFAULT_N_ZBINS) -> np.ndarray:
    """z-bin of every slice file (int64 array aligned with ``paths``).

    Slices are grouped by volume id and ranked by their slice number.  Two files of one
    volume with the same slice number (``a_slice7.npz`` and ``a_slice007.npz``) are an
    input error.
    """
    if n_zbins < 1:
        raise ValueError("n_zbins must be >= 1")
    volumes: Dict[str, List[Tuple[int, int]]] = defaultdict(list)  # volume -> [(number, position)]
    for position, path in enumerate(paths):
        volume, number = parse_slice_name(path)
        volumes[volume].append((number, position))
    bins = np.empty(len(paths), dtype=np.int64)
    for volume, members in volumes.items():
        members.sort()
        for (number, position), (next_number, next_position) in zip(members, members[1:]):
            if number == next_number:
                raise InputError(f"slice number {number} of volume '{volume}' also used by "
                                 f"{Path(paths[position]).name}", paths[next_position])
        depth = len(members)
        for rank, (_, position) in enumerate(members):
            bins[position] = zbin_of_rank(rank, depth, n_zbins)
    return bins
