"""Balanced source/target sampler (docs/method.md#datasets ``MyRandomSampler``, with FIX docs/differences.md#d9-32).

With both domains the dataset interleaves source (even) and target (odd) indices.  One
epoch is a random permutation of the ``n//2`` (source, target) index pairs, flattened.

Balanced mode (the default; ``--disable_balanced_sampling`` turns it off) works on the
*batches the DataLoader will form*: the flattened list is cut into consecutive groups of
``batch_size`` (the reference hard-codes 4, docs/differences.md#d9-32).  A group without a labeled target
slice gets one of its target indices replaced by a labeled target slice drawn uniformly over the
labeled target slices, as the original (one index per slice, ``labeled_target_indices``; the
replaced index goes to a bucket); a group with more than one labeled target gives its
extra ones back for bucketed indices while the bucket lasts.  So every full batch holds
at least one labeled target slice.  Labeled-ness is asked from the dataset for the exact
index, so the modulo wrap-around of the target list is handled (docs/differences.md#d9-32).

With one domain: a plain random permutation.  All randomness comes from a
``torch.Generator`` seeded from torch's global RNG at each epoch (follows ``--seed``).
"""
from __future__ import annotations

from typing import Iterator, List, Optional

import torch
from torch.utils.data import Sampler

from MultiMedSeg.data.images_dataset import ImagesDataset
from robustmedseg.errors import InputError


class BalancedSampler(Sampler[int]):
    """Index sampler for :class:`ImagesDataset` (see the module docstring)."""

    def __init__(self, dataset: ImagesDataset, batch_size: int, balanced: bool = True):
        if dataset.both_domains and balanced and batch_size < 2:
            raise InputError("balanced sampling of source and target needs --batch_size >= 2 "
                             "(or pass --disable_balanced_sampling)")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.balanced = balanced and dataset.both_domains
        self.labeled = dataset.labeled_target_indices() if dataset.both_domains else []

    def __len__(self) -> int:
        return len(self.dataset)

    def _generator(self) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        return gen

    def epoch_indices(self, gen: Optional[torch.Generator] = None) -> List[int]:
        gen = gen or self._generator()
        n = len(self.dataset)
        if not self.dataset.both_domains:
            return torch.randperm(n, generator=gen).tolist()
        order: List[int] = []
        for p in torch.randperm(n // 2, generator=gen).tolist():
            order += [2 * p, 2 * p + 1]
        if len(order) < n:
            order.append(n - 1)
        if self.balanced and self.labeled:
            order = self._balance(order, gen)
        return order

    def _balance(self, order: List[int], gen: torch.Generator) -> List[int]:
        bucket: List[int] = []
        for start in range(0, len(order), self.batch_size):
            group = range(start, min(start + self.batch_size, len(order)))
            targets = [j for j in group if self.dataset.locate(order[j])[0] == 1]
            labeled = [j for j in targets if self.dataset.has_gt(order[j])]
            if not labeled and targets:
                j = targets[0]
                bucket.append(order[j])
                order[j] = self.labeled[int(torch.randint(len(self.labeled), (1,), generator=gen))]
            for j in labeled[1:]:
                if not bucket:
                    break
                order[j] = bucket.pop(0)
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices())
