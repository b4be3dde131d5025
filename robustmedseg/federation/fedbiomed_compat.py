"""Every use of a Fed-BioMed 6.4.1 internal, in one place (``tests/test_fedbiomed_compat.py`` checks
that each one still exists with the expected signature, so an upgrade fails there, loudly, first).

Fed-BioMed has no public name for these; the rest of the project calls the functions below and never
reaches into a Fed-BioMed object itself:

* the ``logging.Logger`` wrapped by Fed-BioMed's ``FedLogger`` (``_logger``): to filter its INFO banners;
* the hash a node computes of a training-plan source (``TrainingPlanSecurityManager._create_hash``): the
  local tool records it when it approves the plan;
* a strategy's settings and sampling history (``Strategy._parameters``, ``Strategy._sampling_node_history``):
  the only state ``Experiment.load_breakpoint`` restores into a strategy rebuilt with ``cls()``, so
  :class:`~robustmedseg.federation.strategy.SampleAtMostK` keeps its settings there;
* the ``Requests`` object of an experiment (``Experiment._reqs``, read through the ``requests``
  property): :class:`~robustmedseg.federation.experiment.FactoryExperiment` wraps it to record the
  nodes' error messages.

:class:`~robustmedseg.federation.experiment.FactoryExperiment` also overrides one protected hook,
:data:`ENCRYPTED_AGGREGATION_HOOK` (the decoding of a securely aggregated round); its signature is
checked by the same test.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List

FEDBIOMED_VERSION = "6.4.1"  # the version these internals were read from
ENCRYPTED_AGGREGATION_HOOK = "_aggregate_encrypted_model_params_and_optim_auxvar"


def filter_fedbiomed_logs(keep: Callable[[logging.LogRecord], bool]) -> None:
    """Add ``keep`` as a filter of Fed-BioMed's logger (records it rejects are dropped)."""
    from fedbiomed.common.logger import logger

    logger._logger.addFilter(keep)  # noqa: SLF001 - FedLogger wraps a logging.Logger


def training_plan_hash(manager: Any, source: str) -> str:
    """The hash a node's ``TrainingPlanSecurityManager`` computes of a plan ``source`` (what approval compares)."""
    return manager._create_hash(source, from_string=True)[0]  # noqa: SLF001 - the node's own hash


def strategy_parameters(strategy: Any) -> Dict[str, Any]:
    """The live settings dict of a Fed-BioMed strategy (saved in and restored from breakpoints)."""
    if strategy._parameters is None:  # noqa: SLF001 - DefaultStrategy() starts with None
        strategy._parameters = {}  # noqa: SLF001
    return strategy._parameters  # noqa: SLF001


def set_strategy_parameters(strategy: Any, parameters: Dict[str, Any]) -> None:
    strategy._parameters = parameters  # noqa: SLF001


def sampling_history(strategy: Any) -> Dict[int, List[str]]:
    """The live ``round -> sampled node ids`` dict of a Fed-BioMed strategy."""
    return strategy._sampling_node_history  # noqa: SLF001


def set_sampling_history(strategy: Any, history: Dict[int, List[str]]) -> None:
    strategy._sampling_node_history = history  # noqa: SLF001


def experiment_requests(exp: Any) -> Any:
    """The ``Requests`` object an experiment sends its requests through."""
    return exp.requests


def replace_experiment_requests(exp: Any, requests: Any) -> None:
    """Make ``exp`` send its requests through ``requests`` (a wrapper of its own)."""
    exp._reqs = requests  # noqa: SLF001 - Experiment keeps it in _reqs, read-only property ``requests``
