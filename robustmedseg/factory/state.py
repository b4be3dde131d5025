"""Node-local training state that survives Fed-BioMed rounds (FIX docs/differences.md#d9-7).

Fed-BioMed builds a new training-plan object for every round, and its native-torch optimizer
wrapper does not save optimizer state. Without help, the step counter, the Adam moments, the ADA
probability, the path-length mean and the random stream would restart every round (the reference
code even replayed ``torch.manual_seed(0)``).

What is persisted, per (run id, node id), after every round the node trained in:

* ``step``: the node-local update counter (even = D update, odd = G update);
* the two Adam states (moments + step counts);
* the ADA controller (p, accumulators) and the path-length running mean;
* the RNG states (torch CPU, CUDA if any, Python ``random``, NumPy), so the random stream
  continues instead of replaying;
* the round number the state was saved at.

Where: ``<root>/<run_id>/<node_id>/state_r<round>.pt`` where ``<root>`` is, in order,
``$ROBUSTMEDSEG_NODE_STATE_DIR``, ``$FBM_NODE_COMPONENT_ROOT/var/robustmedseg`` (set by
``fedbiomed node -p DIR start`` and by our local federation tool), else ``./robustmedseg-node-state``.
The node operator owns this folder; nothing in it leaves the node.

Which state is loaded: the newest file whose round is **strictly before** the current round. So
when a round is re-run after a failure (``train.py --resume`` from the breakpoint of round r - 1),
a node that had already finished round r continues from its round r - 1 state, consistent with the
global model it receives. The newest ``KEEP`` (2) files are kept: at 512 px one file holds the Adam
moments of G and D (~0.5 GB).

Files are written atomically and read with ``torch.load(weights_only=True)`` (tensors and plain
Python values only).
"""
from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from robustmedseg.io import load_torch_file, save_torch_atomic

STATE_VERSION = 1
KEEP = 2  # the current round's state and the one before (needed to re-run a failed round)
_STATE_RE = re.compile(r"^state_r(\d{6})\.pt$")
_SAFE_RE = re.compile(r"[^A-Za-z0-9_.-]")


def node_state_root() -> Path:
    """The node's folder for robustmedseg state (see module docstring)."""
    explicit = os.environ.get("ROBUSTMEDSEG_NODE_STATE_DIR")
    if explicit:
        return Path(explicit)
    component = os.environ.get("FBM_NODE_COMPONENT_ROOT")
    if component:
        return Path(component) / "var" / "robustmedseg"
    return Path.cwd() / "robustmedseg-node-state"


def safe_name(text: Optional[str], default: str) -> str:
    """``text`` as one harmless path component: characters other than letters, digits, '_', '-' and
    '.' become '_', and a name starting with '.' (``..``, hidden) gets a '_' prefix."""
    name = _SAFE_RE.sub("_", text or default)[:128]
    return f"_{name}" if name.startswith(".") else name


def run_dir(run_id: str, node_id: Optional[str], root: Optional[Path] = None) -> Path:
    """``<root>/<run_id>/<node_id>`` with path-safe names (never outside ``<root>``, whatever the
    researcher sends: the node does not trust ``model_args``)."""
    root = node_state_root() if root is None else Path(root)
    return root / safe_name(run_id, "default") / safe_name(node_id, "local")


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def node_seed(seed: int, site: Optional[str]) -> int:
    """The seed of one node's generators, from ``(seed, site)``: distinct, reproducible streams per site.

    ``site`` is the site's stable identity (its key in :attr:`FactoryConfig.site_keys`, i.e. the name its
    dataset was registered under), never an id drawn when a node component is created, so the same
    seed and data give the same streams in every deployment (docs/phase1.md#reproducibility)."""
    digest = hashlib.sha256(f"{int(seed)}:{site or 'local'}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % (2 ** 31)


def site_of(site_keys: Mapping[str, str], node_id: Optional[str]) -> str:
    """The stable identity of the node ``node_id`` (its own id when the researcher sent none)."""
    return str(site_keys.get(node_id or "", node_id or "local"))


def list_states(directory: Path) -> List[Tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _STATE_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def load_state(directory: Path, current_round: Optional[int]) -> Optional[Dict[str, Any]]:
    """The newest saved state with round < ``current_round`` (any round if None), or None."""
    candidates = [(r, p) for r, p in list_states(directory) if current_round is None or r < current_round]
    if not candidates:
        return None
    _, path = candidates[-1]
    state = load_torch_file(path, "node state", mapping=True)
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: unsupported node state version {state.get('version')}")
    return state


def save_state(directory: Path, round_: int, state: Dict[str, Any]) -> Path:
    """Write ``state_r<round>.pt`` atomically; drop states of later rounds and keep the newest KEEP."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"state_r{int(round_):06d}.pt"
    save_torch_atomic({**state, "version": STATE_VERSION, "round": int(round_)}, path)
    for r, old in list_states(directory):
        if r > round_:  # stale future states from an abandoned attempt
            old.unlink(missing_ok=True)
    kept = list_states(directory)
    for _, old in kept[:-KEEP]:
        old.unlink(missing_ok=True)
    return path
