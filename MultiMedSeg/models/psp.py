"""pSp segmentation-adaptation model (docs/method.md#psp): encoder + phase-1 generator + interpreter.

``PSP(config)(x, label)`` encodes an (B, 1, S, S) slice with its (B, 2) one-hot [source, target]
label, synthesises through ``model.Generator`` with the encoder's content injected, segments the
generator features with the label's head and returns (B, 1 + L, ·, ·): the reconstructed image
followed by class probabilities.  Passing the flipped label (:func:`flip_label`) performs
translation: the other DSBN branch and label modulation, the other domain's mean latent and the
other head.

Determinism (docs/differences.md#d9-36): with ``noise=None`` the generator noise is random in ``train()`` and the
generator's fixed noise buffers in ``eval()`` (``eval_noise='random'``: random in ``eval()`` too, as the
original); with ``bn_mode='running'`` every BN uses stored
statistics in ``eval()``.  An eval-mode prediction is therefore reproducible and independent of the
rest of the batch.

Checkpoints (see :meth:`PSP.checkpoint_payload`) hold only tensors and plain types and load with
``torch.load(weights_only=True)``.  Loading rules (docs/differences.md#d9-37/#d9-38, decided here):

* every encoder/decoder/interpreter tensor is loaded when shapes match, otherwise a one-line
  :class:`InputError` names the file and the first incompatible key;
* going from a 1-domain (pretraining) checkpoint to a 2-domain model keeps the pretrained encoder
  (the original silently discarded it) and initialises every DSBN target branch from its source
  branch; the label modulation and both heads are loaded as stored;
* ``latent_avg`` rows are matched by phase-1 domain id: rows of domains present in the checkpoint
  are kept, the others are marked missing and recomputed by :meth:`PSP.compute_latent_avg`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from model import GENERATOR_KEYS, Generator, GeneratorArgs
from MultiMedSeg.options import EVAL_NOISE_MODES
from robustmedseg.errors import InputError
from robustmedseg.factory_file import read_factory_file
from robustmedseg.io import load_torch_file, save_torch_atomic, strip_module_prefix

from .dsbn import check_bn_mode, domain_norms
from .encoder import FeatureStyleEncoder, GeneratorLayout
from .interpreter import Interpreter
from .iresnet import DEPTHS, load_arcface_weights

CHECKPOINT_FORMAT = "multimedseg-psp/1"
NoiseArg = Union[None, str, List[torch.Tensor]]


_GEN = GeneratorArgs()  # the decoder's defaults are the generator's (model.GeneratorArgs)
_DECODER_FIELDS = tuple(k for k in GENERATOR_KEYS if k != "size")  # stored under their own names


@dataclass
class PSPConfig:
    """Architecture of a :class:`PSP`; JSON-friendly through :meth:`to_dict` / :meth:`from_dict`.

    The first nine fields are the decoder's ``model.GeneratorArgs``, flat as phase-2 checkpoints store
    them, with ``size`` under pSp's name ``output_size`` (:meth:`generator_args`,
    :meth:`from_generator_args`)."""

    output_size: int = _GEN.size
    style_dim: int = _GEN.style_dim
    n_mlp: int = _GEN.n_mlp
    n_domains: int = _GEN.n_domains
    n_zbins: int = _GEN.n_zbins
    clip_dim: int = _GEN.clip_dim
    channel_multiplier: int = _GEN.channel_multiplier
    channel_cap: Optional[int] = _GEN.channel_cap
    lr_mlp: float = _GEN.lr_mlp
    src_tgt_domains: List[int] = field(default_factory=lambda: [0])
    label_nc: int = 3
    encoder_depth: int = 50
    encoder_base_channels: int = 64
    encoder_input_size: int = 256
    residual: bool = True
    dsbn: bool = True
    invert_intensity: bool = False
    start_from_latent_avg: bool = True
    bn_mode: str = "running"
    eval_noise: str = "fixed"  # synthesis noise in eval() when none is given: 'fixed' buffers or 'random'

    def __post_init__(self) -> None:
        self.src_tgt_domains = [int(d) for d in self.src_tgt_domains]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on an inconsistent configuration."""
        s = self.output_size
        try:
            self.generator_args()
        except ValueError as err:
            raise _decoder_error(err) from None
        if not 1 <= len(self.src_tgt_domains) <= 2:
            raise ValueError(f"src_tgt_domains must hold 1 (source) or 2 (source, target) ids, got {self.src_tgt_domains}")
        if len(set(self.src_tgt_domains)) != len(self.src_tgt_domains):
            raise ValueError(f"source and target domain ids must differ, got {self.src_tgt_domains}")
        if any(not 0 <= d < self.n_domains for d in self.src_tgt_domains):
            raise ValueError(f"domain ids {self.src_tgt_domains} must lie in [0, n_domains={self.n_domains})")
        if self.label_nc < 2:
            raise ValueError(f"label_nc must be >= 2, got {self.label_nc}")
        if self.encoder_depth not in DEPTHS:
            raise ValueError(f"encoder_depth must be one of {sorted(DEPTHS)}, got {self.encoder_depth}")
        e = self.encoder_input_size
        if e < 16 or e & (e - 1) or e > s:
            raise ValueError(f"encoder_input_size must be a power of two in [16, output_size={s}], got {e}")
        check_bn_mode(self.bn_mode)
        if self.eval_noise not in EVAL_NOISE_MODES:
            raise ValueError(f"eval_noise must be one of {EVAL_NOISE_MODES}, got {self.eval_noise!r}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def generator_args(self) -> GeneratorArgs:
        """The decoder's arguments (``model.Generator.from_args``), as in a factory file's ``args``."""
        return GeneratorArgs(size=self.output_size, **{k: getattr(self, k) for k in _DECODER_FIELDS})

    @classmethod
    def from_generator_args(cls, generator: Union[GeneratorArgs, Mapping[str, Any]], **rest: Any) -> "PSPConfig":
        """A config whose decoder is ``generator`` (a ``GeneratorArgs`` or a factory file's ``args``); invalid
        ``args`` are a ValueError worded as :meth:`validate` words them."""
        try:
            gen = generator if isinstance(generator, GeneratorArgs) else GeneratorArgs.from_mapping(generator)
        except ValueError as err:
            raise _decoder_error(err) from None
        return cls(output_size=gen.size, **{k: getattr(gen, k) for k in _DECODER_FIELDS}, **rest)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PSPConfig":
        """Build from a dict; unknown keys raise ValueError (a config from another version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown PSPConfig keys {unknown}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "PSPConfig":
        return dataclasses.replace(self, **changes)


def _decoder_error(err: ValueError) -> ValueError:
    """The decoder's rule broken, named with PSPConfig's field name (``size`` is ``output_size`` here)."""
    return ValueError(f"output_{err}" if str(err).startswith("size ") else str(err))


def flip_label(label: torch.Tensor) -> torch.Tensor:
    """[source, target] one-hot -> the other domain's one-hot (translation)."""
    return label.flip(1)


def _plain(obj: Any) -> Any:
    """Recursively convert to types ``torch.load(weights_only=True)`` accepts (no custom classes)."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy scalars and arrays
        return _plain(obj.tolist())
    if hasattr(obj, "__dict__") and not isinstance(obj, type):  # argparse.Namespace and the like
        return _plain(vars(obj))
    return str(obj)


def _describe_generator(state: Mapping[str, torch.Tensor]) -> str:
    """Human summary of a generator state dict (size, style_dim, condition width)."""
    n_rgb = len({k.split(".")[1] for k in state if k.startswith("to_rgbs.")})
    emb = state.get("label_embed.weight")
    desc = f"{2 ** (n_rgb + 2)} px"
    if isinstance(emb, torch.Tensor) and emb.ndim == 2:
        desc += f", style_dim {emb.shape[0]}, condition width {emb.shape[1]} (n_domains + n_zbins)"
    return desc


def _first_mismatch(own: Mapping[str, torch.Tensor], other: Mapping[str, Any],
                    optional: Sequence[str] = ()) -> Optional[str]:
    """First missing / unexpected / wrongly shaped key between two state dicts, or None."""
    def is_optional(k: str) -> bool:
        return any(k.endswith(o) for o in optional)

    for k, v in own.items():
        if k not in other:
            if not is_optional(k):
                return f"missing '{k}'"
        elif not isinstance(other[k], torch.Tensor) or other[k].shape != v.shape:
            got = tuple(other[k].shape) if isinstance(other[k], torch.Tensor) else type(other[k]).__name__
            return f"'{k}' has shape {got}, expected {tuple(v.shape)}"
    for k in other:
        if k not in own and not is_optional(k):
            return f"unexpected '{k}'"
    return None


_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


class PSP(nn.Module):
    """Encoder (``encoder``), generator (``decoder``), interpreter, face pool and mean latents.

    Args:
        config: architecture.
        arcface_weights: optional ArcFace ``backbone.pth`` for the encoder backbone (random init if None).
    """

    def __init__(self, config: PSPConfig, arcface_weights: Optional[Union[str, os.PathLike]] = None):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.decoder = Generator.from_args(c.generator_args())
        self.layout = GeneratorLayout.from_generator(self.decoder)
        self.encoder = FeatureStyleEncoder(self.layout, c.style_dim, c.encoder_input_size, c.encoder_depth,
                                           c.encoder_base_channels, c.residual, c.dsbn, c.bn_mode)
        load_arcface_weights(self.encoder.backbone, arcface_weights)
        self.interpreter = Interpreter(self.layout.feature_channels, c.label_nc, c.invert_intensity, c.bn_mode)
        self.face_pool = nn.AdaptiveAvgPool2d(c.encoder_input_size)
        n = len(c.src_tgt_domains)
        self.register_buffer("latent_avg", torch.zeros(n, c.style_dim))
        self.register_buffer("latent_avg_valid", torch.zeros(n, dtype=torch.bool))
        self.load_info: Dict[str, Any] = {}

    # ------------------------------------------------------------------ forward
    @property
    def n_styles(self) -> int:
        return self.layout.n_latent

    def _noise_args(self, noise: NoiseArg) -> Tuple[Optional[List[torch.Tensor]], bool]:
        """Map the ``noise`` argument to (noise list, randomize_noise) for ``g_synthesis``."""
        if noise is None:
            noise = "random" if self.training or self.config.eval_noise == "random" else "fixed"
        if isinstance(noise, str):
            if noise not in ("random", "fixed"):
                raise ValueError(f"noise must be None, 'random', 'fixed' or a list of tensors, got {noise!r}")
            return None, noise == "random"
        return list(noise), False

    def add_latent_avg(self, codes: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """codes + latent_avg[domain of label] broadcast over the styles."""
        idx = label.argmax(1)
        if int(idx.max()) >= self.latent_avg.shape[0]:
            raise ValueError("a target label was given to a model with a single (source) domain")
        if not bool(self.latent_avg_valid.all()):
            raise RuntimeError("latent_avg is not computed; call PSP.compute_latent_avg() after loading the generator")
        return codes + self.latent_avg[idx].unsqueeze(1).to(codes.dtype)

    def forward(self, x: torch.Tensor, label: torch.Tensor, resize: bool = True, return_latents: bool = False,
                feature_scale: float = 1.0, return_mask: bool = True, ex_seg: bool = False,
                is_semi: Optional[torch.Tensor] = None, noise: NoiseArg = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """(B,1,S,S) slices + (B,2) labels -> (B, 1+L, R', R') [image, probabilities].

        R' = encoder input size S if ``resize`` else the generator size.  Without ``return_mask``
        only the image channel is returned.  ``noise``: None (random in train; in eval the config's
        ``eval_noise``: fixed by default),
        'random', 'fixed' or an explicit list.  ``ex_seg``/``is_semi``: gradient routing into the
        heads (see ``interpreter.head_features``).  Returns (out, codes) with ``return_latents``.
        """
        codes, content = self.encoder(x, label)
        if self.config.start_from_latent_avg:
            codes = self.add_latent_avg(codes, label)
        features_in = self.encoder.convert_content(content) if content is not None else None
        noise_list, randomize = self._noise_args(noise)
        image, probs = self.interpreter(codes, label, self.decoder, features_in=features_in,
                                        feature_scale=feature_scale, noise=noise_list, randomize_noise=randomize,
                                        return_mask=return_mask, ex_seg=ex_seg, is_semi=is_semi)
        out = image if probs is None else torch.cat([image, probs.to(image.dtype)], 1)
        if resize:
            out = self.face_pool(out)
        return (out, codes) if return_latents else out

    # ------------------------------------------------------------------ latent averages
    @torch.no_grad()
    def compute_latent_avg(self, n: int = 100_000, force: bool = False, seed: Optional[int] = None) -> List[int]:
        """Fill missing ``latent_avg`` rows with ``decoder.mean_latent`` (docs/method.md#psp: n z per middle z-bin).

        ``force`` recomputes every row; ``seed`` makes the draw reproducible.  Returns the domain ids computed.
        """
        rows = [i for i in range(len(self.config.src_tgt_domains)) if force or not bool(self.latent_avg_valid[i])]
        if not rows:
            return []
        domains = [self.config.src_tgt_domains[i] for i in rows]
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.latent_avg.device).manual_seed(int(seed))
        means = self.decoder.mean_latent(n, domains, generator=gen)
        for i, m in zip(rows, means):
            self.latent_avg[i] = m.to(self.latent_avg)
            self.latent_avg_valid[i] = True
        return domains

    # ------------------------------------------------------------------ parameters
    def encoder_parameters(self, train_decoder: bool = False) -> List[nn.Parameter]:
        """Parameters for the Ranger/Adam optimiser (encoder, plus the decoder if trained)."""
        params = list(self.encoder.parameters())
        return params + list(self.decoder.parameters()) if train_decoder else params

    def classifier_parameters(self) -> List[nn.Parameter]:
        """Trainable parameters of both heads (a frozen source head is left out)."""
        return [p for p in self.interpreter.parameters() if p.requires_grad]

    def set_decoder_trainable(self, flag: bool) -> None:
        self.decoder.requires_grad_(flag)

    def freeze_source_classifier(self) -> None:
        """Adaptation: the source head stays as pretrained (docs/method.md#psp)."""
        self.interpreter.classifiers["source"].requires_grad_(False)

    # ------------------------------------------------------------------ loading
    def load_generator(self, path: Union[str, os.PathLike]) -> Dict[str, Any]:
        """Load ``g_ema`` of a phase-1 ``final_global_model.pt`` strictly; returns its generator ``args``
        (:func:`robustmedseg.factory_file.read_factory_file`)."""
        state, args = read_factory_file(Path(path))
        own = self.decoder.state_dict()
        problem = _first_mismatch(own, state)
        if problem is not None:
            raise InputError(f"generator in file is {_describe_generator(state)} but the model needs "
                             f"{_describe_generator(own)} (check --output-size/--n-domains/--style-dim against "
                             f"phase 1): {problem}", path)
        self.decoder.load_state_dict(state)
        self.latent_avg_valid.zero_()
        return args

    def load_checkpoint(self, path: Union[str, os.PathLike], payload: Optional[Mapping[str, Any]] = None
                        ) -> Dict[str, Any]:
        """Load a phase-2 checkpoint (see module docstring for the compatibility rules).

        Returns (and stores in ``self.load_info``) what was done: ``dsbn_target_from_source``,
        ``bn_stats_missing`` (checkpoint saved with bn_mode 'batch'), ``latent_avg_kept`` and
        ``latent_avg_missing`` (domain ids).
        """
        if payload is None:
            payload = load_torch_file(path, "phase-2 checkpoint")
        if not isinstance(payload, Mapping) or not isinstance(payload.get("state_dict"), Mapping):
            raise InputError("not a phase-2 checkpoint (no 'state_dict')", path)
        state = strip_module_prefix(payload["state_dict"])
        ckpt_domains = self._checkpoint_domains(payload, state, path)
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("latent_avg")}
        body = {k: v for k, v in state.items() if not k.startswith("latent_avg")}
        problem = _first_mismatch(own, body, optional=_BN_STATS)
        if problem is not None:
            raise InputError(f"checkpoint does not fit this model configuration: {problem}", path)
        self.load_state_dict(body, strict=False)
        # A 'batch'-mode checkpoint has no running statistics: a 'running'-mode model keeps fresh ones.
        info: Dict[str, Any] = {"dsbn_target_from_source": False,
                                "bn_stats_missing": any(k.endswith("running_mean") and k not in body for k in own)}
        if len(ckpt_domains) < len(self.config.src_tgt_domains) and self.config.dsbn:
            for bn in domain_norms(self.encoder):
                bn.copy_source_to_target()
            info["dsbn_target_from_source"] = True
        info.update(self._load_latent_avg(state, ckpt_domains))
        self.load_info = info
        return info

    def reinitialise_encoder(self, arcface_weights: Optional[Union[str, os.PathLike]] = None) -> None:
        """A fresh encoder (ArcFace backbone weights if given, the rest random) and no valid mean latent:
        what the original did when adapting a pretraining checkpoint to two domains (docs/differences.md#d9-38),
        where only
        the decoder and the interpreter carry over."""
        c = self.config
        device = self.latent_avg.device
        self.encoder = FeatureStyleEncoder(self.layout, c.style_dim, c.encoder_input_size, c.encoder_depth,
                                           c.encoder_base_channels, c.residual, c.dsbn, c.bn_mode).to(device)
        load_arcface_weights(self.encoder.backbone, arcface_weights)
        with torch.no_grad():
            self.latent_avg.zero_()
            self.latent_avg_valid.zero_()
        self.load_info.update(encoder_reinitialised=True, latent_avg_kept=[],
                              latent_avg_missing=list(c.src_tgt_domains))

    def _checkpoint_domains(self, payload: Mapping[str, Any], state: Mapping[str, Any], path: Any) -> List[int]:
        config = payload.get("config")
        if isinstance(config, Mapping) and "src_tgt_domains" in config:
            return [int(d) for d in config["src_tgt_domains"]]
        opts = payload.get("opts")
        if isinstance(opts, Mapping) and "src_tgt_domains" in opts:
            return [int(d) for d in opts["src_tgt_domains"]]
        raise InputError("checkpoint lacks its domain list (config['src_tgt_domains'])", path)

    def _load_latent_avg(self, state: Mapping[str, Any], ckpt_domains: Sequence[int]) -> Dict[str, List[int]]:
        avg = state.get("latent_avg")
        valid = state.get("latent_avg_valid")
        if isinstance(avg, torch.Tensor) and valid is None:  # older payload: every stored row valid
            valid = torch.ones(avg.shape[0], dtype=torch.bool)
        kept, missing = [], []
        with torch.no_grad():
            self.latent_avg_valid.zero_()
            for i, d in enumerate(self.config.src_tgt_domains):
                j = ckpt_domains.index(d) if d in ckpt_domains else None
                ok = (isinstance(avg, torch.Tensor) and j is not None and j < avg.shape[0]
                      and avg.shape[-1] == self.latent_avg.shape[-1] and bool(valid[j]))
                if ok:
                    self.latent_avg[i] = avg[j].to(self.latent_avg)
                    self.latent_avg_valid[i] = True
                    kept.append(d)
                else:
                    missing.append(d)
        return {"latent_avg_kept": kept, "latent_avg_missing": missing}

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], payload: Optional[Mapping[str, Any]] = None,
                        **overrides: Any) -> "PSP":
        """Build a PSP from a checkpoint's stored config (fields in ``overrides`` replace it) and load it.

        E.g. ``PSP.from_checkpoint(pretrained, src_tgt_domains=[0, 1])`` starts adaptation from a
        pretraining checkpoint.  ``payload`` is the already-read file content (the file is then not
        read again).  Call :meth:`compute_latent_avg` afterwards if ``load_info['latent_avg_missing']``
        is not empty.
        """
        if payload is None:
            payload = load_torch_file(path, "phase-2 checkpoint")
        if not isinstance(payload, Mapping) or not isinstance(payload.get("config"), Mapping):
            raise InputError("not a MultiMedSeg phase-2 checkpoint (no 'config')", path)
        try:
            config = PSPConfig.from_dict(payload["config"]).replace(**overrides)
        except (TypeError, ValueError) as err:
            raise InputError(f"invalid model configuration: {err}", path) from err
        net = cls(config)
        net.load_checkpoint(path, payload)
        return net

    # ------------------------------------------------------------------ saving
    def checkpoint_payload(self, global_step: int, opts: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """{'format', 'state_dict', 'config', 'opts', 'global_step', 'latent_avg'}: tensors and plain types only."""
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        opts = dict(_plain(opts or {}))
        opts.setdefault("src_tgt_domains", list(self.config.src_tgt_domains))
        opts.setdefault("n_styles", self.n_styles)
        return {
            "format": CHECKPOINT_FORMAT,
            "state_dict": state,
            "config": self.config.to_dict(),
            "opts": opts,
            "global_step": int(global_step),
            "latent_avg": self.latent_avg.detach().cpu().clone(),
        }

    def save_checkpoint(self, path: Union[str, os.PathLike], global_step: int,
                        opts: Optional[Mapping[str, Any]] = None) -> Path:
        """Atomically write :meth:`checkpoint_payload` to ``path``."""
        save_torch_atomic(self.checkpoint_payload(global_step, opts), path)
        return Path(path)
