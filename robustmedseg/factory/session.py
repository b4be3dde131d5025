"""Round-level glue between the Fed-BioMed training plan and :class:`FactoryTrainer` (node side).

:func:`begin_round` runs before Fed-BioMed's training loop of a round: it reads the config from the
plan's ``model_args``, restores the node-local state of the previous round (or seeds a fresh node
from ``(seed, node id)``), loads ``clip_mean`` from the node's dataset and, if needed, the frozen
CLIP model (cached for the life of the node process), and builds the trainer. :func:`end_round`
flushes the metrics and saves the state (only after a successful round).

Data order: Fed-BioMed splits the node's dataset with ``torch.utils.data.random_split`` *before* the
round starts, i.e. from whatever the node process's random stream is at that moment (a fresh process
after a restart, another one in a long-running node). :func:`begin_round` puts the training subset
back in dataset order once the node's stream is restored, so the loader's own shuffle (drawn from the
restored stream) is the only source of order: a round's data order, like everything else it does,
depends only on the global model and the node state (a resumed run reproduces the uninterrupted one,
checked in ``tests/test_values_resume.py``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..device import configure_backends, seed_everything
from .config import FactoryConfig
from .state import load_state, node_seed, rng_state, run_dir, save_state, set_rng_state
from .trainer import FactoryTrainer

log = logging.getLogger(__name__)
_CLIP_CACHE: Dict[Tuple[str, Optional[str]], Any] = {}


@dataclass
class RoundSession:
    trainer: FactoryTrainer
    directory: Path
    round: int
    resumed_from: Optional[int]


def _clip_loss(cfg: FactoryConfig) -> Any:
    from .clip_loss import load_clip_loss

    key = (cfg.clip_model, cfg.clip_pretrained)
    if key not in _CLIP_CACHE:
        _CLIP_CACHE[key] = load_clip_loss(cfg.clip_model, cfg.clip_pretrained)
    return _CLIP_CACHE[key]


def _reporter(history_monitor: Any, num_updates: int, batch_size: int, total: int):
    if history_monitor is None:
        return None

    def send(metrics: Dict[str, float], iteration: int) -> None:
        history_monitor.add_scalar(metric=metrics, iteration=iteration, epoch=None, total_samples=total,
                                   batch_samples=batch_size, num_batches=num_updates,
                                   num_samples_trained=iteration * batch_size, train=True)

    return send


def canonical_order(loader: Any) -> None:
    """Sort the indices of the loader's training subset (see the module docstring); no-op otherwise."""
    subset = getattr(loader, "dataset", None)
    indices = getattr(subset, "indices", None)
    if indices is not None:
        subset.indices = sorted(int(i) for i in indices)


def begin_round(plan: Any, dataset: Any, history_monitor: Any = None) -> RoundSession:
    """Prepare the trainer of this round (see module docstring). ``dataset`` exposes ``clip_mean()``."""
    cfg = FactoryConfig.from_model_args(plan.model_args())
    configure_backends(cfg.allow_tf32, cfg.cudnn_benchmark)
    node_id, round_ = plan.node_id(), plan.round()
    directory = run_dir(cfg.run_id, node_id)
    state = load_state(directory, round_)
    if state is not None:
        set_rng_state(state["rng"])
    else:
        seed_everything(node_seed(cfg.seed, node_id), deterministic_cudnn=False)
    canonical_order(getattr(plan, "training_data_loader", None))
    mean = dataset.clip_mean() if hasattr(dataset, "clip_mean") else None
    clip_mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
    clip_loss = _clip_loss(cfg) if cfg.clip_weight > 0 and clip_mean is not None else None
    if cfg.clip_weight > 0 and clip_mean is None:
        log.warning("clip_weight > 0 but this node's dataset has no clip_mean.npy: CLIP loss disabled")
    batch = int(plan.loader_args().get("batch_size", 1))
    num_updates = int(plan.training_args().get("num_updates") or 0)
    trainer = FactoryTrainer(plan.model(), plan.optimizer().optimizer, cfg, clip_mean=clip_mean,
                             clip_loss=clip_loss, sample_dir=directory / "samples",
                             reporter=_reporter(history_monitor, num_updates, batch, num_updates * batch))
    if state is not None:
        trainer.load_state_dict(state["trainer"])
    if round_ is None:
        round_ = 0 if state is None else int(state["round"]) + 1
    return RoundSession(trainer, directory, int(round_), None if state is None else int(state["round"]))


def end_round(session: RoundSession) -> Path:
    """Flush metrics and persist the node-local state of this round."""
    session.trainer.report()
    session.trainer._apply_pending_optimizer_state()  # a round with 0 updates keeps the old moments
    return save_state(session.directory, session.round,
                      {"trainer": session.trainer.state_dict(), "rng": rng_state()})
