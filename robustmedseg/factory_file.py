"""``final_global_model.pt``, the factory file: its one writer (:func:`factory_payload`,
:func:`write_factory_file`) and its one reader (:func:`read_factory_file`, :func:`load_factory_file`),
this project's ``load_network_pkl``.  Phase 1 writes it from a breakpoint
(``save_global_model.py``, :func:`robustmedseg.federation.export.build_export`); phase 2, the
synthetic-volume generator, the fidelity evaluator, the demo and the benches read it.  No Fed-BioMed.

The file = ``{"g", "d", "g_ema"}`` state dicts with the model's own key names
(docs/method.md#state-dict, i.e. without the ``generator.`` / ``discriminator.`` / ``g_ema.`` prefixes), plus
``"args"`` (``model.GeneratorArgs`` as a dict) and ``"meta"`` (experiment id, round, run id). Only
tensors and plain Python values: loadable with ``torch.load(..., weights_only=True)``.

Reading also accepts files written by other tools: a ``module.`` key prefix is removed, and ``args``
may be incomplete or use the original code's names (:data:`ARG_ALIASES`: ``latent`` for
``style_dim``, ``output_size`` for ``size``); the missing geometry is read from the ``g_ema``
tensors (:func:`infer_generator_args`), the rest takes ``GeneratorArgs``' defaults.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from model import GENERATOR_KEYS, N_ZBINS, Generator, GeneratorArgs, channel_table
from robustmedseg.errors import InputError
from robustmedseg.io import load_torch_file, save_torch_atomic, strip_module_prefix

FILE_WHAT = "phase-1 generator file"
# canonical name -> other names found in ``args`` of files written by the original code
ARG_ALIASES = {"size": ("output_size",), "style_dim": ("latent",)}

StateOrModule = Union[Mapping[str, torch.Tensor], torch.nn.Module]


# ------------------------------------------------------------------------------------------ writing
def _state(net: Optional[StateOrModule]) -> Dict[str, torch.Tensor]:
    if net is None:
        return {}
    return dict(net.state_dict() if isinstance(net, torch.nn.Module) else net)


def factory_payload(g_ema: StateOrModule, args: Union[GeneratorArgs, Mapping[str, Any]],
                    g: Optional[StateOrModule] = None, d: Optional[StateOrModule] = None,
                    meta: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The dict a factory file holds.  ``args`` is a ``GeneratorArgs`` or a mapping completed as the
    reader would (:func:`factory_file_args`); ``g`` defaults to ``g_ema``, ``d`` to no tensors."""
    state = _state(g_ema)
    if not isinstance(args, GeneratorArgs):
        args = GeneratorArgs.from_mapping(factory_file_args(args, state))
    payload: Dict[str, Any] = {"g": _state(g) if g is not None else dict(state), "d": _state(d), "g_ema": state,
                               "args": args.as_dict()}
    if meta is not None:
        payload["meta"] = dict(meta)
    return payload


def write_factory_file(path: Path, g_ema: StateOrModule, args: Union[GeneratorArgs, Mapping[str, Any]],
                       g: Optional[StateOrModule] = None, d: Optional[StateOrModule] = None,
                       meta: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a factory file atomically (see :func:`factory_payload`); returns ``path``."""
    save_torch_atomic(factory_payload(g_ema, args, g=g, d=d, meta=meta), path)
    return Path(path)


# ------------------------------------------------------------------------------------------ reading
def infer_generator_args(state: Mapping[str, Any]) -> Dict[str, Any]:
    """Generator geometry read from a ``g_ema`` state dict: ``size``, ``style_dim``, ``n_mlp``,
    ``clip_dim``, ``channel_multiplier``, ``channel_cap`` and ``n_cond`` (= n_domains + n_zbins),
    each only when the tensors tell it."""
    state = strip_module_prefix(state)
    out: Dict[str, Any] = {}
    emb = state.get("label_embed.weight")
    if isinstance(emb, torch.Tensor) and emb.ndim == 2:
        out["style_dim"], out["n_cond"] = int(emb.shape[0]), int(emb.shape[1])
    enc = state.get("encoding_embed.0.weight")
    if isinstance(enc, torch.Tensor) and enc.ndim == 2:
        out["clip_dim"] = int(enc.shape[1])
    mlp = {k.split(".")[1] for k in state if k.startswith("style.")}
    if mlp:
        out["n_mlp"] = len(mlp)
    n_rgb = len({k.split(".")[1] for k in state if k.startswith("to_rgbs.")})
    if n_rgb:
        size = 2 ** (n_rgb + 2)
        out["size"] = size
        chans = {4: None}
        const = state.get("input.input")
        if isinstance(const, torch.Tensor):
            chans[4] = int(const.shape[1])
        for i in range(n_rgb):
            w = state.get(f"to_rgbs.{i}.conv.weight")
            if isinstance(w, torch.Tensor):
                chans[2 ** (i + 3)] = int(w.shape[2])
        for cm in (2, 1, 4):
            for cap in (None, chans[4]):
                table = channel_table(size, cm, cap)
                if all(v is None or table.get(r) == v for r, v in chans.items()):
                    out.setdefault("channel_multiplier", cm)
                    out.setdefault("channel_cap", cap)
    return out


def factory_file_args(stored: Mapping[str, Any], g_ema: Mapping[str, Any]) -> Dict[str, Any]:
    """The generator's constructor arguments: the file's ``args`` (canonical names first, then the
    original code's aliases) completed from the ``g_ema`` tensors, then ``GeneratorArgs``' defaults.

    Returns every key of ``stored`` plus the canonical ones (``model.GENERATOR_KEYS``).
    """
    args = dict(stored)
    for key, aliases in ARG_ALIASES.items():
        for alias in aliases:
            if args.get(key) is None and args.get(alias) is not None:
                args[key] = args[alias]
    inferred = infer_generator_args(g_ema)
    n_cond = inferred.pop("n_cond", None)
    for key, value in inferred.items():
        if args.get(key) is None:
            args[key] = value
    if n_cond is not None:  # condition width = n_domains + n_zbins
        if args.get("n_domains") is None and args.get("n_zbins") is not None:
            args["n_domains"] = n_cond - int(args["n_zbins"])
        elif args.get("n_domains") is None:
            args["n_zbins"], args["n_domains"] = N_ZBINS, n_cond - N_ZBINS
        elif args.get("n_zbins") is None:
            args["n_zbins"] = n_cond - int(args["n_domains"])
    defaults = GeneratorArgs()
    for key in GENERATOR_KEYS:
        if args.get(key) is None:
            args[key] = getattr(defaults, key)
        elif key == "lr_mlp":
            args[key] = float(args[key])
        else:
            args[key] = int(args[key])
    return args


def read_factory_file(path: Path, what: str = FILE_WHAT) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(g_ema state dict, generator args)`` of a ``final_global_model.pt`` (read once, weights only).

    The state dict has no ``module.`` prefixes; the args are :func:`factory_file_args`.  A missing
    or unreadable file, or one without a ``g_ema`` state dict, is an :class:`InputError`.
    """
    payload = load_torch_file(path, what, mapping=True)
    if not isinstance(payload.get("g_ema"), Mapping):
        raise InputError(f"not a {what} (no 'g_ema' state dict)", path)
    state = strip_module_prefix(payload["g_ema"])
    stored = payload.get("args")
    try:
        args = factory_file_args(stored if isinstance(stored, Mapping) else {}, state)
    except (TypeError, ValueError) as err:
        raise InputError(f"invalid generator args in this file ({err})", path) from None
    return state, args


def load_factory_file(path: Path, what: str = FILE_WHAT) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """``(g_ema, args)``: the ``model.Generator`` of a factory file, loaded strictly, in eval mode on the
    CPU, and its constructor arguments.  The one loader of this file for every tool."""
    state, args = read_factory_file(path, what)
    try:
        g = Generator.from_args({k: args[k] for k in GENERATOR_KEYS})
        g.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        msg = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise InputError(f"cannot build the generator from this file ({msg})", path) from None
    return g.eval(), args
