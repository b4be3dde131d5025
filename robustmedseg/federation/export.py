"""Breakpoint -> ``final_global_model.pt`` (``save_global_model.py``), and the checks of a breakpoint
before ``train.py --resume``.

Reads the breakpoint files directly (JSON state + Fed-BioMed's msgpack parameter file): no
Experiment object, no gRPC server, no researcher-component side effects.  The file itself (its
layout, writer and reader) is :mod:`robustmedseg.factory_file`.

A factory trained with another mapping learning-rate multiplier (``train.py --lr_mlp``) is exported
in the paper's parametrisation (``lr_mlp`` 0.01, :func:`~robustmedseg.factory.network.reparametrize_mapping`):
the same generator, readable by every loader that assumes the paper's value (``meta.trained_lr_mlp``
records the value used in training).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from robustmedseg.errors import InputError
from robustmedseg.factory.config import FactoryConfig
from robustmedseg.factory.network import PAPER_LR_MLP, reparametrize_mapping, split_state_dict
from robustmedseg.factory_file import factory_payload
from robustmedseg.io import first_nonfinite


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
    """The ``final_global_model.pt`` dict (:func:`robustmedseg.factory_file.factory_payload`)."""
    try:
        cfg = FactoryConfig.from_model_args(state.get("model_args") or {})
        nets = split_state_dict(params)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"breakpoint does not hold a data factory ({' '.join(str(err).split())[:200]})",
                         state.get("model_weights_path", "breakpoint")) from None
    args = cfg.generator_args()
    meta = {"experiment_id": str(state.get("id", "")), "round": int(state.get("round_current", 0)),
            "run_id": cfg.run_id}
    if cfg.lr_mlp != PAPER_LR_MLP:  # store the generators in the paper's parametrisation (same function)
        for key in ("g", "g_ema"):
            nets[key] = reparametrize_mapping(nets[key], cfg.n_mlp, cfg.lr_mlp)
        args = dataclasses.replace(args, lr_mlp=PAPER_LR_MLP)
        meta["trained_lr_mlp"] = cfg.lr_mlp
    return factory_payload(nets["g_ema"], args, g=nets["g"], d=nets["d"], meta=meta)
