"""Breakpoint -> ``final_global_model.pt`` (used by ``save_global_model.py``).

Reads the breakpoint files directly (JSON state + Fed-BioMed's msgpack parameter file): no
Experiment object, no gRPC server, no researcher-component side effects.

``final_global_model.pt`` = ``{"g", "d", "g_ema"}`` state dicts with the model's own key names
(SPEC §4.7, i.e. without the ``generator.`` / ``discriminator.`` / ``g_ema.`` prefixes), plus
``"args"`` (the model constructor arguments) and ``"meta"`` (experiment id, round, run id). Only
tensors and plain Python values: loadable with ``torch.load(..., weights_only=True)``.

A factory trained with another mapping learning-rate multiplier (``train.py --lr_mlp``) is exported
in the paper's parametrisation (``lr_mlp`` 0.01, :func:`~robustmedseg.factory.network.reparametrize_mapping`):
the same generator, readable by every loader that assumes the paper's value (``meta.trained_lr_mlp``
records the value used in training).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from robustmedseg.errors import InputError
from robustmedseg.factory.config import MODEL_KEYS, FactoryConfig
from robustmedseg.factory.network import PAPER_LR_MLP, reparametrize_mapping, split_state_dict


def experiments_dir(researcher_root: Path) -> Path:
    return Path(researcher_root) / "var" / "experiments"


def find_breakpoint(researcher_root: Optional[Path], breakpoint: Optional[Path]) -> Tuple[Path, Path]:
    """(breakpoint folder, its JSON state file); the latest breakpoint of the latest experiment if None."""
    from fedbiomed.researcher.filetools import find_breakpoint_path  # no component side effect

    if breakpoint is None:
        if researcher_root is None:
            raise InputError("give --breakpoint DIR or --researcher-dir DIR")
        base = experiments_dir(researcher_root)
        if not base.is_dir():
            raise InputError("no experiments in this researcher component", base)
    else:
        base = Path(breakpoint)
        if not base.is_dir():
            raise InputError("breakpoint folder not found", base)
    try:
        folder, state_file = find_breakpoint_path(str(base), None if breakpoint is None else str(breakpoint))
    except (FileNotFoundError, OSError) as err:
        raise InputError(f"no breakpoint found ({err})", base) from err
    return Path(folder), Path(folder) / state_file


def load_breakpoint_params(breakpoint: Path, state_file: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The aggregated parameters saved in the breakpoint and its JSON state."""
    from fedbiomed.common.serializer import Serializer

    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read breakpoint state: {err}", state_file) from err
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
    params = Serializer.load(str(path))
    return {k: torch.as_tensor(v).detach().cpu().clone() for k, v in params.items()}, state


def build_export(params: Dict[str, torch.Tensor], state: Dict[str, Any]) -> Dict[str, Any]:
    """The ``final_global_model.pt`` dict (see module docstring)."""
    cfg = FactoryConfig.from_model_args(state.get("model_args") or {})
    nets = split_state_dict(params)
    args = {k: getattr(cfg, k) for k in MODEL_KEYS}
    meta = {"experiment_id": str(state.get("id", "")), "round": int(state.get("round_current", 0)),
            "run_id": cfg.run_id}
    if cfg.lr_mlp != PAPER_LR_MLP:  # store the generators in the paper's parametrisation (same function)
        for key in ("g", "g_ema"):
            nets[key] = reparametrize_mapping(nets[key], cfg.n_mlp, cfg.lr_mlp)
        args["lr_mlp"] = PAPER_LR_MLP
        meta["trained_lr_mlp"] = cfg.lr_mlp
    return {"g": nets["g"], "d": nets["d"], "g_ema": nets["g_ema"], "args": args, "meta": meta}


def load_generator(path: Path, which: str = "g_ema") -> torch.nn.Module:
    """Rebuild ``model.Generator`` from a ``final_global_model.pt`` and load ``which`` strictly."""
    from model import Generator

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    a = ckpt["args"]
    g = Generator(a["size"], style_dim=a["style_dim"], n_mlp=a["n_mlp"], n_domains=a["n_domains"],
                  channel_multiplier=a["channel_multiplier"], lr_mlp=a["lr_mlp"], n_zbins=a["n_zbins"],
                  clip_dim=a["clip_dim"], channel_cap=a["channel_cap"])
    g.load_state_dict(ckpt[which], strict=True)
    return g.eval()
