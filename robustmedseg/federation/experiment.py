"""The Fed-BioMed Experiment of the data factory (researcher side; import after
:func:`robustmedseg.federation.researcher.use_researcher_component`, since importing
``fedbiomed.researcher`` creates/loads the researcher component).

:class:`FactoryExperiment` is Fed-BioMed 6.4.1's ``Experiment`` with one change: under secure
aggregation it decodes the nodes' masked, encoded round updates with
:mod:`robustmedseg.federation.secagg` (exact integer sums, uniform or sample-count weights)
instead of Fed-BioMed's own decoder, which treats the sums as weights and truncates their average.
Breakpoints are Fed-BioMed's: ``FactoryExperiment.load_breakpoint`` reloads any of them.

It also keeps the error messages nodes answer with (Fed-BioMed only logs them and drops the
node), so that a failed round names each node with its own error
(:class:`~robustmedseg.federation.strategy.NodeFailureError`).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
from fedbiomed.common.constants import SecureAggregationSchemes
from fedbiomed.researcher.federated_workflows import Experiment
from fedbiomed.researcher.secagg import SecureAggregation

from . import fedbiomed_compat as fbm
from . import secagg as codec


def lom_secure_aggregation() -> SecureAggregation:
    """A fresh LOM secure-aggregation controller (new keys are agreed at its first round)."""
    return SecureAggregation(scheme=SecureAggregationSchemes.LOM, active=True,
                             clipping_range=codec.FBM_CLIPPING_RANGE)


class _NodeErrors:
    """``Requests`` seen through a recorder of the error messages of each request (node id -> text)."""

    def __init__(self, requests: Any):
        self._requests = requests
        self.errors: Dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._requests, name)

    def send(self, *args: Any, **kwargs: Any) -> Any:
        return _RecordedRequest(self._requests.send(*args, **kwargs), self.errors)


class _RecordedRequest:
    def __init__(self, request: Any, sink: Dict[str, str]):
        self._request, self._sink = request, sink

    def __enter__(self) -> Any:
        self._inner = self._request.__enter__()
        return self._inner

    def __exit__(self, *exc: Any) -> Any:
        try:
            for node, error in (self._inner.errors() or {}).items():
                text = " ".join(f"{getattr(error, 'errnum', '')} {getattr(error, 'extra_msg', '')}".split())
                self._sink[node] = text or type(error).__name__
        except Exception:  # noqa: BLE001 - recording must never break a round
            pass
        return self._request.__exit__(*exc)


class FactoryExperiment(Experiment):
    """Fed-BioMed Experiment whose secure aggregation decodes the factory's encoded updates, and
    whose failed rounds name each node's own error."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(fbm.experiment_requests(self), _NodeErrors):
            fbm.replace_experiment_requests(self, _NodeErrors(fbm.experiment_requests(self)))

    def run_once(self, *args: Any, **kwargs: Any) -> int:
        from .strategy import NodeFailureError

        recorder = fbm.experiment_requests(self)
        recorder.errors.clear()
        try:
            return super().run_once(*args, **kwargs)
        except NodeFailureError as err:
            err.add_node_errors(recorder.errors)
            raise

    # Fed-BioMed's hook fbm.ENCRYPTED_AGGREGATION_HOOK (its signature is checked by tests/test_fedbiomed_compat.py)
    def _aggregate_encrypted_model_params_and_optim_auxvar(self, model_params: Dict[str, List[int]],
                                                           optim_auxvar: Any,
                                                           encryption_factors: Optional[Dict[str, Any]],
                                                           total_sample_size: int):
        clip = float(self.model_args().get("secagg_clip") or 0.0)
        if clip <= 0:  # not our encoding: Fed-BioMed's own decoder
            return super()._aggregate_encrypted_model_params_and_optim_auxvar(
                model_params, optim_auxvar, encryption_factors, total_sample_size)
        if optim_auxvar:
            raise codec.SecaggDecodeError("optimizer auxiliary variables cannot be aggregated securely here")
        return secure_mean(self, model_params, encryption_factors, total_sample_size, clip), None


def secure_mean(exp: Experiment, model_params: Mapping[str, List[int]], encryption_factors: Optional[Mapping],
                total_sample_size: int, clip: float) -> Dict[str, torch.Tensor]:
    """New global state from the nodes' masked vectors (see :mod:`robustmedseg.federation.secagg`)."""
    secagg = exp.secagg
    if secagg.scheme != SecureAggregationSchemes.LOM:
        raise codec.SecaggDecodeError(f"the factory's secure aggregation uses LOM, not {secagg.scheme.name}")
    if secagg.train_arguments().get("secagg_random") is not None:
        # Fed-BioMed's consistency check ([security] secagg_insecure_validation of the researcher):
        # the sampled nodes also encrypted a random number; it must decode to itself
        secagg.aggregate(round_=exp.round_current(), model_params=dict(encryption_factors or {}),
                         encryption_factors=dict(encryption_factors or {}), total_sample_size=total_sample_size,
                         num_expected_params=1)
    sums = codec.unmask_sum(model_params.values())
    mean = codec.decode_mean(sums, total_sample_size, clip)
    plan = exp.training_plan()
    exclude_buffers = not exp.training_args()["share_persistent_buffers"]
    # the weights in the order Fed-BioMed flattens them on the nodes (TorchModel.flatten)
    current = plan.get_model_wrapper_class().get_weights(only_trainable=False, exclude_buffers=exclude_buffers,
                                                        local_params=plan.local_params)
    return codec.apply_mean(current, mean)
