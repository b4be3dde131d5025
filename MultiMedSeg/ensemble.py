"""The best-k ensemble of a phase-2 run: which checkpoints, how they are loaded, how they vote.

The ONE home of the ensemble: validation during training (:class:`MultiMedSeg.training.coach.Coach`,
a one-member ensemble of the network being trained), inference on a site's test volumes
(:mod:`MultiMedSeg.evaluation.test_volumes`), the evaluation settings (:mod:`MultiMedSeg.evaluation.selection`),
new scans (:mod:`MultiMedSeg.segment_scans`) and synthetic-volume generation (:mod:`MultiMedSeg.generation`)
all segment through :class:`Ensemble`.

* :func:`resolve_checkpoints` -- the ``n`` best checkpoints listed in ``checkpoints/best.json``
  (best first); the experiment folder or its ``checkpoints/`` folder are both accepted.
* :func:`load_ensemble` -- every checkpoint read ONCE into a :class:`Member` (network in eval mode
  + the feature scale it was validated with); all members must agree on (label_nc, output size,
  encoder input size, domains); members whose decoders are equal share one decoder module.
* :class:`Ensemble` -- the members (a sequence of :class:`Member`) and how they vote:
  :meth:`Ensemble.predict_batch` (one batch: ``intra`` and ``inter`` mean class probabilities, the
  ``trans`` image of the best member), :meth:`Ensemble.predict_volume` (every batch of one volume);
* the inter/intra blend: :func:`blend`, :func:`ensemble_probabilities`, :func:`label_volumes`,
  :func:`volume_labels` and :func:`translation_volume`;
* :class:`SegmentationEnsemble` -- mean class probabilities of one classifier head over the members
  (generation).

``intra`` = mean over the members of the class probabilities in the slices' own domain; ``inter`` = mean
of the probabilities of the translated slices segmented by the other head; ``pred`` =
``(w_inter * inter + w_intra * intra) / (w_inter + w_intra)``; the means divide by the number of members.

A member's feature scale is ``min(1, feature_scale_rate * global_step)`` of its own checkpoint,
the value it was validated with during training.  An ensemble runs every member with its own scale
(``feature_scale_from='each'``) or every member with the best (first) member's scale (``'best'``, the
original's generation, docs/differences.md#generation-feature-scale): :attr:`Ensemble.scales`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from MultiMedSeg import checkpoints as ck
from MultiMedSeg.models.psp import PSP, flip_label
from MultiMedSeg.options import FEATURE_SCALE_SOURCES, HEADS, stored_training_options
from robustmedseg.errors import InputError
from robustmedseg.io import load_torch_file



@dataclass
class Member:
    """One ensemble network with the feature scale it was validated with."""

    net: PSP
    feature_scale: float
    path: Optional[Path]  # None: a network not read from a file (validation of the network being trained)


def feature_scale_of(payload: Mapping[str, Any]) -> float:
    """feature_scale = min(1, rate * global_step) of a checkpoint (rate from its options)."""
    rate = float(stored_training_options(payload.get("opts") or {}).feature_scale_rate)  # the run's options, typed
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


def load_ensemble(paths: Sequence[Path], device: torch.device = torch.device("cpu"),
                  feature_scale_from: str = "each", trans_clamp: bool = True) -> "Ensemble":
    """Read every checkpoint once, check that they agree, share equal decoders, move to ``device``;
    ``feature_scale_from``, ``trans_clamp``: see :class:`Ensemble`."""
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
    return Ensemble(members, device, feature_scale_from, trans_clamp)


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


def _resize(t: torch.Tensor, size: Optional[Sequence[int]]) -> torch.Tensor:
    if size is None:
        return t
    size = tuple(int(s) for s in size)
    if tuple(t.shape[-2:]) == size:
        return t
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


class Ensemble(Sequence[Member]):
    """The members of an ensemble (a sequence of :class:`Member`, best first) and how they vote.

    Every member runs with its own feature scale (``feature_scale_from='each'``) or with the first
    (best) member's (``'best'``, as the original's generation): :attr:`scales`.  The nets must be in
    ``eval()`` for deterministic outputs (:func:`load_ensemble` does it).  ``device``: where the inputs
    go (default: the first member's).  ``trans_clamp``: the translated image is clamped to [-1, 1]
    (default; the original kept the network's values, ``inference.py --no_trans_clamp``)."""

    def __init__(self, members: Sequence[Member], device: Optional[torch.device] = None,
                 feature_scale_from: str = "each", trans_clamp: bool = True):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if feature_scale_from not in FEATURE_SCALE_SOURCES:
            raise ValueError(f"feature_scale_from must be one of {FEATURE_SCALE_SOURCES}, got {feature_scale_from!r}")
        self.members = list(members)
        self.config = self.members[0].net.config
        self._device = device
        self.feature_scale_from = feature_scale_from
        self.trans_clamp = trans_clamp

    @property
    def scales(self) -> List[float]:
        """The feature scale each member runs with: its own, or the best member's for all."""
        if self.feature_scale_from == "best":
            return [self.members[0].feature_scale] * len(self.members)
        return [m.feature_scale for m in self.members]

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, index):  # type: ignore[override]
        return self.members[index]

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members)

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else self.members[0].net.latent_avg.device

    @property
    def label_nc(self) -> int:
        return self.config.label_nc

    @property
    def adapted(self) -> bool:
        """Two domains (an adaptation run: intra, inter and pred) or one (pretraining: intra only)."""
        return len(self.config.src_tgt_domains) == 2

    @torch.no_grad()
    def predict_batch(self, x: torch.Tensor, label: torch.Tensor, out_size: Optional[Sequence[int]] = None,
                      inter: bool = True, progress: Optional[Callable[[int], None]] = None) -> Dict[str, torch.Tensor]:
        """One batch at the generator's resolution, each member with its scale of :attr:`scales`, resized to
        ``out_size`` (the slice grid; None: not resized).

        Returns ``intra`` (B, L, H, W), the mean class probabilities in the slices' own domain (the
        head ``label`` selects) and, with ``inter``, ``inter`` (B, L, H, W), the mean probabilities after
        translation to the other domain, and ``trans`` (B, 1, H, W), the translated image of the first
        (best) member, clamped to [-1, 1] unless ``trans_clamp`` is off (with ``invert_intensity`` negated again where that member's
        inter prediction is background, undoing the interpreter's inversion there).  ``progress``, when given, is
        called with the batch size after each member (a progress bar counts member-slices)."""
        x = x.to(self.device)
        label = label.to(self.device)
        sums: Dict[str, torch.Tensor] = {}
        trans = None
        for k, (member, scale) in enumerate(zip(self.members, self.scales)):
            out = member.net(x, label, resize=False, feature_scale=scale).float()
            sums["intra"] = sums.get("intra", 0) + _resize(out[:, 1:], out_size)
            if inter:
                t = member.net(x, flip_label(label), resize=False, feature_scale=scale).float()
                member_inter = _resize(t[:, 1:], out_size)
                sums["inter"] = sums.get("inter", 0) + member_inter
                if k == 0:
                    trans = _resize(t[:, :1], out_size)
                    if self.trans_clamp:
                        trans = trans.clamp(-1.0, 1.0)
                    if member.net.config.invert_intensity:
                        trans = torch.where(member_inter.argmax(1, keepdim=True) == 0, -trans, trans)
            if progress is not None:
                progress(int(x.shape[0]))
        result = {key: value / len(self.members) for key, value in sums.items()}
        if trans is not None:
            result["trans"] = trans
        return result

    def predict_volume(self, batches: Iterable[Mapping[str, torch.Tensor]], inter: bool,
                       progress: Optional[Callable[[int], None]] = None) -> Dict[str, torch.Tensor]:
        """:meth:`predict_batch` of every batch (``data``, ``domain``, ``weight``) of one volume, on the
        slice grid of the weight maps; CPU tensors ``intra`` (+ ``inter``, ``trans``) and ``weight``.
        ``progress``: see :meth:`predict_batch`."""
        parts: Dict[str, List[torch.Tensor]] = {"intra": [], "inter": [], "trans": [], "weight": []}
        for batch in batches:
            out = self.predict_batch(batch["data"], batch["domain"], batch["weight"].shape[-2:], inter=inter,
                                     progress=progress)
            for key, value in out.items():
                parts[key].append(value.cpu())
            parts["weight"].append(batch["weight"])
        return {key: torch.cat(value) for key, value in parts.items() if value}


def blend(inter: torch.Tensor, intra: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """The ensemble's ``pred`` probabilities: ``(w_inter * inter + w_intra * intra) / (w_inter + w_intra)``."""
    w_inter, w_intra = weights
    return (w_inter * inter + w_intra * intra) / (w_inter + w_intra)


def ensemble_probabilities(pred: Mapping[str, torch.Tensor], weights: Sequence[float]) -> Dict[str, torch.Tensor]:
    """intra / inter / pred class probabilities (Z, L, H, W) from the ensemble means (pred and inter only
    for an adapted run, :func:`blend`)."""
    out = {"intra": pred["intra"]}
    if "inter" in pred:
        out["inter"] = pred["inter"]
        out["pred"] = blend(pred["inter"], pred["intra"], weights)
    return out


def volume_labels(probs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(Z, L, H, W) scores + (Z, 1, H, W) weight -> (Z, H, W) int64 labels; 0 outside the weight."""
    return (probs * weight).argmax(1)


def label_volumes(pred: Mapping[str, torch.Tensor], weights: Sequence[float],
                  mask_outside_weight: bool = False) -> Dict[str, np.ndarray]:
    """intra / inter / pred label volumes (Z, H, W) from the ensemble means; background outside the
    weight maps only with ``mask_outside_weight`` (the original applied no weight at inference)."""
    w = pred["weight"] if mask_outside_weight else torch.ones_like(pred["weight"])
    return {k: volume_labels(v, w).numpy() for k, v in ensemble_probabilities(pred, weights).items()}


def translation_volume(pred: Mapping[str, torch.Tensor], mask_outside_weight: bool = False) -> np.ndarray:
    """(Z, H, W) float32 translated image of the best checkpoint; -1 outside the weight maps only
    with ``mask_outside_weight``."""
    trans = pred["trans"][:, 0].numpy()
    if mask_outside_weight:
        trans = np.where(pred["weight"][:, 0].numpy() > 0, trans, -1.0)
    return trans.astype(np.float32)


class SegmentationEnsemble(Ensemble):
    """The best checkpoints, loaded once, averaging class probabilities of one head (generation)."""

    def __init__(self, members: Sequence[Member], head: str, device: Optional[torch.device] = None,
                 feature_scale_from: str = "each"):
        super().__init__(members, device, feature_scale_from)
        self.head = head

    @classmethod
    def load(cls, paths: Sequence[Path], label: int, head: str = "auto",  # type: ignore[override]
             device: torch.device = torch.device("cpu"), feature_scale_from: str = "each") -> "SegmentationEnsemble":
        """:func:`load_ensemble` of ``paths`` with the head that segments domain ``label`` (:func:`choose_head`)
        and the members' feature scales chosen by ``feature_scale_from`` (:class:`Ensemble`)."""
        members = load_ensemble(paths, device).members
        return cls(members, choose_head(head, label, members[0].net.config.src_tgt_domains, members[0].path),
                   feature_scale_from=feature_scale_from)

    def domain_label(self, batch: int) -> torch.Tensor:
        """(batch, 2) one-hot [source, target] selecting the head: [1, 0] source, [0, 1] target."""
        row = [1.0, 0.0] if self.head == "source" else [0.0, 1.0]
        return torch.tensor([row], device=self.device).expand(batch, 2)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, R, R) images in [-1, 1] -> mean class probabilities (B, L, R, R) over the members."""
        x = self.members[0].net.face_pool(images.to(self.device))  # same pooling in every member
        return self.predict_batch(x, self.domain_label(x.shape[0]), inter=False)["intra"]

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, R, R) -> (B, R, R) int64 argmax labels of the ensemble mean."""
        return self.probabilities(images).argmax(1)
