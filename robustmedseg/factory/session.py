"""Round-level glue between the Fed-BioMed training plan and :class:`FactoryTrainer` (node side).

:func:`prepare_round` runs when the plan builds its training data, i.e. before Fed-BioMed's random
train/test split: it restores the node's random stream (or seeds a fresh node), so that a round is
reproducible from the seed, the site's stable identity (``site_keys``) and the node-local state.
:func:`begin_round` runs before Fed-BioMed's training loop of a round: it reads the config from the
plan's ``model_args``, restores the node-local state of the previous round (or seeds a fresh node
from ``(seed, site)``), loads ``clip_mean`` from the node's dataset and, if needed, the frozen
CLIP model (cached for the life of the node process), and builds the trainer. :func:`end_round`
flushes the metrics and saves the state (only after a successful round).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..device import configure_backends, seed_everything
from .config import FactoryConfig
from .state import load_state, node_seed, rng_state, run_dir, save_state, set_rng_state, site_of
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


def prepare_round(plan: Any) -> Tuple[Path, Optional[Dict[str, Any]]]:
    """Load this node's state of the previous round and restore (or seed) its random stream.

    Called from the plan's ``training_data()``: Fed-BioMed draws a random permutation of the
    dataset (its train/test split) before ``training_routine``, so seeding later would leave the
    batch order to chance. Returns (state folder, state or None), kept on the plan for
    :func:`begin_round`."""
    cfg = FactoryConfig.from_model_args(plan.model_args())
    node_id = plan.node_id()
    directory = run_dir(cfg.run_id, node_id)
    state = load_state(directory, plan.round())
    if state is not None:
        set_rng_state(state["rng"])
    else:
        seed_everything(node_seed(cfg.seed, site_of(cfg.site_keys, node_id)), deterministic_cudnn=False)
    plan._factory_round_state = (directory, state)
    return directory, state


def begin_round(plan: Any, dataset: Any, history_monitor: Any = None) -> RoundSession:
    """Prepare the trainer of this round (see module docstring). ``dataset`` exposes ``clip_mean()``."""
    cfg = FactoryConfig.from_model_args(plan.model_args())
    configure_backends(cfg.allow_tf32, cfg.cudnn_benchmark)
    round_ = plan.round()
    prepared = getattr(plan, "_factory_round_state", None)
    directory, state = prepared if prepared is not None else prepare_round(plan)
    plan._factory_round_state = None
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
