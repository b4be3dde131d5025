"""The best-k ensemble of a phase-2 run: which checkpoints, how they are loaded, how they vote.

Used by inference (:mod:`MultiMedSeg.evaluation.test_volumes`), synthetic-volume generation
(:mod:`MultiMedSeg.generation`) and any other tool that segments with a trained run.

* :func:`resolve_checkpoints` -- the ``n`` best checkpoints listed in ``checkpoints/best.json``
  (best first); the experiment folder or its ``checkpoints/`` folder are both accepted.
* :func:`load_ensemble` -- every checkpoint read ONCE into a :class:`Member` (network in eval mode
  + the feature scale it was validated with); all members must agree on (label_nc, output size,
  encoder input size, domains); members whose decoders are equal share one decoder module.
* :class:`SegmentationEnsemble` -- mean class probabilities of one classifier head over the members.

A member's feature scale is ``min(1, feature_scale_rate * global_step)`` of its own checkpoint,
the value it was validated with during training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch

from MultiMedSeg.models.psp import PSP
from MultiMedSeg import checkpoints as ck
from robustmedseg.errors import InputError
from robustmedseg.io import load_torch_file

HEADS = ("auto", "source", "target")


@dataclass
class Member:
    """One ensemble network with the feature scale it was validated with."""

    net: PSP
    feature_scale: float
    path: Path


def feature_scale_of(payload: Mapping[str, Any]) -> float:
    """feature_scale = min(1, rate * global_step) of a checkpoint (rate from its options)."""
    opts = payload.get("opts") or {}
    rate = float(opts.get("feature_scale_rate", 1e-4))
    return min(1.0, rate * int(payload.get("global_step", 0)))


def resolve_checkpoints(ckpt_dir: Path, ensemble_size: Optional[int] = None, exact: bool = True) -> List[Path]:
    """The ``ensemble_size`` best checkpoints of a phase-2 run (all when None), best first.

    ``ckpt_dir`` is the experiment folder or its ``checkpoints`` folder (both accepted).  With
    ``exact``, asking for more checkpoints than the run kept is an error; otherwise the ones kept
    are used.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise InputError("checkpoint folder not found (give the phase-2 experiment folder or its checkpoints/)",
                         ckpt_dir)
    index = ck.BestIndex.load(ck.checkpoints_folder(ckpt_dir))
    if not index.entries:
        raise InputError("best-checkpoint index is empty (the run never validated)", index.path)
    if ensemble_size is not None:
        if ensemble_size < 1:
            raise InputError(f"--ensemble_size must be >= 1, got {ensemble_size}", index.path)
        if exact and ensemble_size > len(index.entries):
            raise InputError(f"--ensemble_size {ensemble_size} but only {len(index.entries)} best checkpoints "
                             f"are listed", index.path)
    return index.paths(ensemble_size)


def load_member(path: Path) -> Member:
    """Build the PSP stored in one checkpoint (the file is read once), in eval mode on the CPU."""
    payload = load_torch_file(path, "phase-2 checkpoint", mapping=True)
    net = PSP.from_checkpoint(path, payload)
    if net.config.start_from_latent_avg and net.load_info.get("latent_avg_missing"):
        net.compute_latent_avg(seed=0)  # deterministic; only for checkpoints saved without latent_avg
    return Member(net.eval(), feature_scale_of(payload), Path(path))


def _agreement_key(net: PSP) -> Tuple[Any, ...]:
    c = net.config
    return c.label_nc, c.output_size, c.encoder_input_size, tuple(c.src_tgt_domains)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def share_identical_decoders(members: Sequence[Member]) -> int:
    """Point members whose decoder equals the first one's at that module (memory); returns how many."""
    shared = 0
    for m in members[1:]:
        if m.net.decoder is not members[0].net.decoder and _same_state(m.net.decoder, members[0].net.decoder):
            m.net.decoder = members[0].net.decoder
            shared += 1
    return shared


def load_ensemble(paths: Sequence[Path], device: torch.device = torch.device("cpu")) -> List[Member]:
    """Read every checkpoint once, check that they agree, share equal decoders, move to ``device``."""
    members: List[Member] = []
    for path in paths:
        m = load_member(path)
        if members and _agreement_key(m.net) != _agreement_key(members[0].net):
            raise InputError(f"checkpoint differs from the best one in (label_nc, output size, encoder size, "
                             f"domains): {_agreement_key(m.net)} vs {_agreement_key(members[0].net)}", path)
        members.append(m)
    share_identical_decoders(members)
    for m in members:
        m.net.to(device)
    return members


def choose_head(head: str, label: int, domains: Sequence[int], path: Path) -> str:
    """'source' or 'target': the head that segments phase-1 domain ``label``.

    ``'auto'`` uses the head of the checkpoint domain equal to ``label`` (source = one-hot [1, 0],
    target = [0, 1]); a ``label`` that is not a checkpoint domain is an error unless the head is named.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head == "target" and len(domains) < 2:
        raise InputError(f"--head target needs an adaptation checkpoint (two domains), this one has {list(domains)}",
                         path)
    if head != "auto":
        return head
    if label == domains[0]:
        return "source"
    if len(domains) > 1 and label == domains[1]:
        return "target"
    raise InputError(f"--label {label} is not a domain of the checkpoints (source/target = {list(domains)}); "
                     f"pass --head source (or target) to segment it with that head anyway", path)


class SegmentationEnsemble:
    """The best checkpoints, loaded once, averaging class probabilities of one head."""

    def __init__(self, members: Sequence[Member], head: str):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        self.head = head
        self.config = self.members[0].net.config

    @classmethod
    def load(cls, paths: Sequence[Path], label: int, head: str = "auto",
             device: torch.device = torch.device("cpu")) -> "SegmentationEnsemble":
        """:func:`load_ensemble` of ``paths`` with the head that segments domain ``label`` (:func:`choose_head`)."""
        members = load_ensemble(paths, device)
        return cls(members, choose_head(head, label, members[0].net.config.src_tgt_domains, members[0].path))

    @property
    def device(self) -> torch.device:
        return self.members[0].net.latent_avg.device

    @property
    def label_nc(self) -> int:
        return self.config.label_nc

    def domain_label(self, batch: int) -> torch.Tensor:
        """(batch, 2) one-hot [source, target] selecting the head: [1, 0] source, [0, 1] target."""
        row = [1.0, 0.0] if self.head == "source" else [0.0, 1.0]
        return torch.tensor([row], device=self.device).expand(batch, 2)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, R, R) images in [-1, 1] -> mean class probabilities (B, L, R, R) over the members."""
        x = self.members[0].net.face_pool(images.to(self.device))  # same pooling in every member
        label = self.domain_label(x.shape[0])
        total = None
        for m in self.members:
            probs = m.net(x, label, resize=False, feature_scale=m.feature_scale)[:, 1:].float()
            total = probs if total is None else total + probs
        return total / len(self.members)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, R, R) -> (B, R, R) int64 argmax labels of the ensemble mean."""
        return self.probabilities(images).argmax(1)
