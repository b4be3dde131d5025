"""``final_global_model.pt``, the factory file: written from a breakpoint (``save_global_model.py``)
and read back by every tool that needs the phase-1 generator (:func:`load_factory_file`).

Reads the breakpoint files directly (JSON state + Fed-BioMed's msgpack parameter file): no
Experiment object, no gRPC server, no researcher-component side effects.

``final_global_model.pt`` = ``{"g", "d", "g_ema"}`` state dicts with the model's own key names
(docs/method.md#state-dict, i.e. without the ``generator.`` / ``discriminator.`` / ``g_ema.`` prefixes), plus
``"args"`` (the model constructor arguments) and ``"meta"`` (experiment id, round, run id). Only
tensors and plain Python values: loadable with ``torch.load(..., weights_only=True)``.

A factory trained with another mapping learning-rate multiplier (``train.py --lr_mlp``) is exported
in the paper's parametrisation (``lr_mlp`` 0.01, :func:`~robustmedseg.factory.network.reparametrize_mapping`):
the same generator, readable by every loader that assumes the paper's value (``meta.trained_lr_mlp``
records the value used in training).

Reading (:func:`read_factory_file`, :func:`load_factory_file`) also accepts files written by
other tools: a ``module.`` key prefix is removed, and ``args`` may be incomplete or use the
original code's names (``latent`` for ``style_dim``, ``output_size`` for ``size``); the missing
geometry is read from the ``g_ema`` tensors (:func:`infer_generator_args`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from robustmedseg.errors import InputError
from robustmedseg.factory.config import MODEL_KEYS, FactoryConfig
from robustmedseg.factory.network import PAPER_LR_MLP, reparametrize_mapping, split_state_dict
from robustmedseg.io import first_nonfinite, load_torch_file, strip_module_prefix

FILE_WHAT = "phase-1 generator file"
# canonical name -> other names found in ``args`` of files written by the original code
ARG_ALIASES = {"size": ("output_size",), "style_dim": ("latent",)}


def experiments_dir(researcher_root: Path) -> Path:
    return Path(researcher_root) / "var" / "experiments"


_BREAKPOINT_RE = re.compile(r"^breakpoint_(\d+)$")
_STATE_RE = re.compile(r"^breakpoint_\d*\.json$")


def _breakpoints(experiment: Path) -> List[Path]:
    """Breakpoint folders of one experiment folder, oldest first."""
    found = [(int(m.group(1)), p) for p in experiment.iterdir()
             if p.is_dir() and (m := _BREAKPOINT_RE.match(p.name))] if experiment.is_dir() else []
    return [p for _, p in sorted(found)]


def find_breakpoint(researcher_root: Optional[Path], breakpoint: Optional[Path]) -> Tuple[Path, Path]:
    """(breakpoint folder, its JSON state file): ``breakpoint`` itself, or the newest breakpoint of the
    newest experiment that has one.  One-line :class:`InputError` naming the folder when there is none
    (no Fed-BioMed import: nothing is created)."""
    if breakpoint is None:
        if researcher_root is None:
            raise InputError("give --breakpoint DIR or --researcher-dir DIR")
        if not Path(researcher_root).is_dir():
            raise InputError("researcher component folder not found (nothing to resume or export)", researcher_root)
        base = experiments_dir(researcher_root)
        experiments = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        with_breakpoints = [p for p in experiments if _breakpoints(p)]
        if not with_breakpoints:
            raise InputError("no breakpoint in this researcher component (no round of any experiment completed)",
                             base)
        folder = _breakpoints(with_breakpoints[-1])[-1]
    else:
        folder = Path(breakpoint)
        if not folder.is_dir():
            raise InputError("breakpoint folder not found" if not folder.exists() else
                             "is a file; a breakpoint folder is expected here", folder)
    states = sorted(p for p in folder.iterdir() if _STATE_RE.match(p.name))
    if len(states) != 1:
        raise InputError(f"not a breakpoint folder: expected one breakpoint_NNNN.json, found {len(states)}", folder)
    return folder, states[0]


def _breakpoint_files(value: Any) -> List[str]:
    """Every string of a breakpoint state that names a Fed-BioMed file (.mpk parameters, .py plan)."""
    if isinstance(value, Mapping):
        return [f for v in value.values() for f in _breakpoint_files(v)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _breakpoint_files(v)]
    if isinstance(value, str) and value.endswith((".mpk", ".py")):
        return [value]
    return []


def check_breakpoint(researcher_root: Optional[Path], breakpoint: Optional[Path]) -> Path:
    """Before a resume: the breakpoint exists, its JSON reads, its parameters deserialise (finite), and
    every file it references is there and readable.  Returns the breakpoint folder; each problem is
    one :class:`InputError` naming the file."""
    from fedbiomed.common.serializer import Serializer

    folder, state_file = find_breakpoint(researcher_root, breakpoint)
    _, state = load_breakpoint_params(folder, state_file)
    for name in _breakpoint_files(state):
        path = Path(name) if Path(name).is_absolute() else folder / name
        if not path.is_file():
            raise InputError(f"file named by the breakpoint is missing (see {state_file.name})", path)
        if path.suffix == ".mpk" and path.name != Path(state.get("model_weights_path", "")).name:
            try:
                Serializer.load(str(path))
            except Exception as err:  # noqa: BLE001 - msgpack errors of a truncated file
                raise InputError(f"cannot read breakpoint file (truncated or corrupt? "
                                 f"{' '.join(str(err).split())[:160] or type(err).__name__})", path) from None
    return folder


def load_breakpoint_params(breakpoint: Path, state_file: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The aggregated parameters saved in the breakpoint and its JSON state."""
    from fedbiomed.common.serializer import Serializer

    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read breakpoint state: {err}", state_file) from None
    if not isinstance(state, dict):
        raise InputError("breakpoint state is not a JSON object", state_file)
    weights = state.get("model_weights_path")
    if not weights:
        raise InputError("breakpoint has no model_weights_path", state_file)
    path = Path(weights)
    if not path.is_absolute() and not path.exists():
        path = breakpoint / path.name
    if not path.is_file():
        path = breakpoint / Path(weights).name
    if not path.is_file():
        raise InputError("breakpoint parameter file not found", weights)
    try:
        params = Serializer.load(str(path))
        if not isinstance(params, Mapping):
            raise TypeError(f"{type(params).__name__}, not a parameter dict")
        tensors = {str(k): torch.as_tensor(v).detach().cpu().clone() for k, v in params.items()}
    except Exception as err:  # noqa: BLE001 - msgpack/Fed-BioMed errors of a truncated or foreign file
        msg = " ".join(str(err).split())[:200] or type(err).__name__
        raise InputError(f"cannot read breakpoint parameters (truncated or corrupt file? {msg})", path) from None
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise InputError(f"breakpoint parameters hold NaN or inf (in {bad}): the federated training diverged",
                         path)
    return tensors, state


def build_export(params: Dict[str, torch.Tensor], state: Dict[str, Any]) -> Dict[str, Any]:
    """The ``final_global_model.pt`` dict (see module docstring)."""
    try:
        cfg = FactoryConfig.from_model_args(state.get("model_args") or {})
        nets = split_state_dict(params)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"breakpoint does not hold a data factory ({' '.join(str(err).split())[:200]})",
                         state.get("model_weights_path", "breakpoint")) from None
    args = {k: getattr(cfg, k) for k in MODEL_KEYS}
    meta = {"experiment_id": str(state.get("id", "")), "round": int(state.get("round_current", 0)),
            "run_id": cfg.run_id}
    if cfg.lr_mlp != PAPER_LR_MLP:  # store the generators in the paper's parametrisation (same function)
        for key in ("g", "g_ema"):
            nets[key] = reparametrize_mapping(nets[key], cfg.n_mlp, cfg.lr_mlp)
        args["lr_mlp"] = PAPER_LR_MLP
        meta["trained_lr_mlp"] = cfg.lr_mlp
    return {"g": nets["g"], "d": nets["d"], "g_ema": nets["g_ema"], "args": args, "meta": meta}


def infer_generator_args(state: Mapping[str, Any]) -> Dict[str, Any]:
    """Generator geometry read from a ``g_ema`` state dict: ``size``, ``style_dim``, ``n_mlp``,
    ``clip_dim``, ``channel_multiplier``, ``channel_cap`` and ``n_cond`` (= n_domains + n_zbins),
    each only when the tensors tell it."""
    from model import channel_table

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
    original code's aliases) completed from the ``g_ema`` tensors, then the paper's defaults.

    Returns every key of ``stored`` plus the canonical ones (``MODEL_KEYS``).
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
            args["n_zbins"], args["n_domains"] = 29, n_cond - 29
        elif args.get("n_zbins") is None:
            args["n_zbins"] = n_cond - int(args["n_domains"])
    defaults = FactoryConfig()
    for key in MODEL_KEYS:
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
    from model import Generator

    state, args = read_factory_file(path, what)
    try:
        g = Generator.from_args({k: args[k] for k in MODEL_KEYS})
        g.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        msg = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise InputError(f"cannot build the generator from this file ({msg})", path) from None
    return g.eval(), args
