"""Hyper-parameters of the data factory, as shipped to the nodes in Fed-BioMed ``model_args``.

``model_args`` is a flat JSON-able dict (Fed-BioMed serialises it). :func:`FactoryConfig.from_model_args`
validates it and fills defaults; unknown keys are rejected so a typo on the researcher side does not
silently fall back to a default on the nodes.  The networks' arguments are ``model.GeneratorArgs``
(their one owner): :class:`FactoryConfig` extends it with the training settings, so its first nine
fields are the generator's and the dict stays flat.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from model import GENERATOR_KEYS, GeneratorArgs

# Keys needed to rebuild the networks (also written as ``args`` in final_global_model.pt).
MODEL_KEYS = GENERATOR_KEYS

EMA_DECAY = 0.5 ** (32 / (10 * 1000))  # StyleGAN2's G_ema half-life: 10k images at batch 32

RUN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # names the node-state folder: nothing path-like


@dataclass(frozen=True)
class FactoryConfig(GeneratorArgs):
    """Everything the node-side training needs (defaults = the paper's configuration,
    docs/method.md#factory-cli/#schedule): the networks (the fields of ``model.GeneratorArgs``), then
    the training settings below.  Validated when built (ValueError)."""

    # lazy regularisation
    r1: float = 10.0
    path_regularize: float = 2.0
    path_batch_shrink: int = 2
    d_reg_every: int = 16
    g_reg_every: int = 4
    mixing: float = 0.9
    # ADA
    augment: bool = False
    augment_p: float = 0.0
    ada_target: float = 0.6
    ada_length: int = 500_000
    ada_every: int = 256
    # CLIP
    clip_weight: float = 0.0
    clip_model: str = "ViT-L-14"
    clip_pretrained: Optional[str] = "openai"
    clip_prob: float = 0.5
    # GPU switches of the node processes (see robustmedseg.device.configure_backends; no effect on CPU)
    allow_tf32: bool = False
    cudnn_benchmark: bool = False
    # node-side bookkeeping
    n_sample: int = 3
    sample_every: int = 100
    log_every: int = 50
    seed: int = 0
    run_id: str = "default"
    # node id -> the site's stable identity (the name its dataset is registered under), set by the
    # researcher from the federation's datasets: it seeds the node's random stream (state.node_seed)
    site_keys: Dict[str, str] = dataclasses.field(default_factory=dict)
    # secure aggregation (robustmedseg.federation.secagg): clipping range of the per-round change of
    # one stored value (0: parameters travel in the clear) and how the nodes' updates are weighted
    secagg_clip: float = 0.0
    secagg_weighting: str = "uniform"

    @classmethod
    def from_model_args(cls, model_args: Optional[Mapping[str, Any]]) -> "FactoryConfig":
        """Validated config from Fed-BioMed ``model_args`` (ValueError on unknown keys / bad values)."""
        args = dict(model_args or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ValueError(f"unknown factory model_args: {', '.join(unknown)}")
        return cls(**args)

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # every number finite (NaN passes every comparison below)
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        super().validate()  # the networks' arguments (model.GeneratorArgs)
        for name in ("r1", "path_regularize"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= int(self.seed) < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if not isinstance(self.run_id, str) or not RUN_ID_RE.fullmatch(self.run_id):
            raise ValueError(f"run_id must be 1-64 letters, digits, '_' or '-' (it names a folder on the nodes), "
                             f"got {self.run_id!r}")
        if not isinstance(self.site_keys, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and 0 < len(v) <= 256 for k, v in self.site_keys.items()):
            raise ValueError("site_keys must map node ids to non-empty names of at most 256 characters")
        for name in ("path_batch_shrink",
                     "d_reg_every", "g_reg_every", "ada_every", "ada_length", "n_sample", "sample_every",
                     "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not -1.0 <= float(self.ada_target) <= 1.0:  # a target of E[sign(D(real))]
            raise ValueError(f"ada_target must be in [-1, 1], got {self.ada_target}")
        for name in ("mixing", "augment_p", "clip_prob"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.clip_weight < 0:
            raise ValueError(f"clip_weight must be >= 0, got {self.clip_weight}")
        if not float(self.secagg_clip) >= 0:
            raise ValueError(f"secagg_clip must be >= 0, got {self.secagg_clip}")
        if self.secagg_weighting not in ("uniform", "samples"):
            raise ValueError(f"secagg_weighting must be 'uniform' or 'samples', got {self.secagg_weighting!r}")

    def generator_args(self) -> GeneratorArgs:
        """The networks' arguments alone (``model.GeneratorArgs``)."""
        return GeneratorArgs(**self.model_kwargs())

    def model_kwargs(self) -> Dict[str, Any]:
        """Constructor arguments shared by Generator and Discriminator (see :func:`network.build_networks`)."""
        return {k: getattr(self, k) for k in MODEL_KEYS}

    def to_model_args(self) -> Dict[str, Any]:
        """Flat dict for Fed-BioMed ``model_args`` (inverse of :meth:`from_model_args`)."""
        return dataclasses.asdict(self)
