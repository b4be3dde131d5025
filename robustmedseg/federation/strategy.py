"""Node selection and aggregation weights for the data factory (researcher side).

:class:`SampleAtMostK` draws at most ``max_nodes`` distinct nodes per round, uniformly, from a
random stream derived from ``(seed, round)`` (reproducible, and identical after a resume). The draw
and the order in which the replies are averaged follow each node's stable site identity
(``site_keys``: node id -> the name its dataset is registered under, set by the researcher), never the
node ids drawn when the node components were created, so the same seed gives the same schedule in
every deployment of the same sites. Its
settings live in the Fed-BioMed strategy's parameter dict and the class in an importable module, because
``Experiment.load_breakpoint`` rebuilds strategies with ``cls()`` and no arguments, then restores
that dict and the sampling history (both reached through :mod:`.fedbiomed_compat`); the researcher
reads and changes them through the public methods (:meth:`SampleAtMostK.settings`,
:meth:`~SampleAtMostK.update_settings`, :meth:`~SampleAtMostK.set_site_keys`, :meth:`~SampleAtMostK.history`).

Aggregation weights: ``uniform`` (1 / number of replying nodes, as the paper's Fed-BioMed fork,
docs/method.md#factory-cli) or ``samples`` (Fed-BioMed's default, proportional to each node's dataset size).

A sampled node that does not reply (died, disconnected) or replies with an error aborts the round
with :class:`NodeFailureError`, whose one-line message names the node(s): aggregating a subset
silently would change the experiment. The last breakpoint is intact; ``train.py --resume`` then
continues with the nodes that are still up.
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Optional

from fedbiomed.common.exceptions import FedbiomedStrategyError
from fedbiomed.researcher.strategies import DefaultStrategy

from . import fedbiomed_compat as fbm

WEIGHTINGS = ("uniform", "samples")
NO_REPLY = "no training reply (node stopped or disconnected)"


class NodeFailureError(FedbiomedStrategyError):
    """One or more sampled nodes failed during a round. ``nodes``: ids; ``reasons``: id -> text."""

    def __init__(self, round_i: int, reasons: Dict[str, str]):
        self.round = round_i
        self.nodes = sorted(reasons)
        self.reasons = dict(reasons)
        super().__init__(self._message())

    def _message(self) -> str:
        detail = "; ".join(f"node {n}: {self.reasons[n]}" for n in self.nodes)
        return f"round {self.round + 1} failed: {detail}"

    def add_node_errors(self, errors: Dict[str, str]) -> None:
        """Replace "no training reply" by the error message the node answered with, when it sent one."""
        for node in self.nodes:
            if node in errors and self.reasons[node] == NO_REPLY:
                self.reasons[node] = f"the node answered with an error: {errors[node]}"
        self.args = (self._message(),)


class SampleAtMostK(DefaultStrategy):
    """Sample at most ``max_nodes`` nodes per round; weights ``uniform`` or by ``samples``."""

    def __init__(self, max_nodes: int = 2, seed: int = 0, weighting: str = "uniform",
                 site_keys: Optional[Dict[str, str]] = None):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if int(max_nodes) < 1:
            raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
        fbm.set_strategy_parameters(self, {"max_nodes": int(max_nodes), "seed": int(seed), "weighting": weighting,
                                           "site_keys": dict(site_keys or {})})

    # -- the settings (kept where breakpoints save and restore them)
    def settings(self) -> Dict[str, Any]:
        """A copy of the settings: ``max_nodes``, ``seed``, ``weighting``, ``site_keys``."""
        return dict(fbm.strategy_parameters(self))

    def update_settings(self, **changes: Any) -> None:
        """Change settings of a resumed run (``max_nodes``, ``weighting``)."""
        fbm.strategy_parameters(self).update(changes)

    def set_site_keys(self, keys: Dict[str, str]) -> None:
        """Node id -> site identity (the draw and the averaging order follow it)."""
        fbm.strategy_parameters(self)["site_keys"] = dict(keys)

    @property
    def max_nodes(self) -> int:
        return int(fbm.strategy_parameters(self).get("max_nodes", 2))

    @property
    def weighting(self) -> str:
        return str(fbm.strategy_parameters(self).get("weighting", "uniform"))

    def history(self) -> Dict[int, List[str]]:
        """A copy of the sampling history: (0-based) round -> node ids sampled."""
        return {int(r): list(n) for r, n in fbm.sampling_history(self).items()}

    def site_order(self, nodes: Any) -> List[str]:
        """``nodes`` ordered by their site identity (node id for a node without one)."""
        keys = fbm.strategy_parameters(self).get("site_keys") or {}
        return sorted(nodes, key=lambda n: (str(keys.get(n, n)), n))

    def sample_nodes(self, from_nodes: List[str], round_i: int) -> List[str]:
        k = min(self.max_nodes, len(from_nodes))
        rng = random.Random(int(fbm.strategy_parameters(self)["seed"]) * 1_000_003 + int(round_i))
        chosen = self.site_order(rng.sample(self.site_order(from_nodes), k))
        # a copy: Fed-BioMed's training job removes the nodes that fail from the list it is given
        fbm.sampling_history(self)[round_i] = list(chosen)
        return chosen

    def sampled(self, round_i: int) -> Optional[List[str]]:
        """Node ids sampled in (0-based) round ``round_i``, from the history kept in breakpoints."""
        return fbm.sampling_history(self).get(int(round_i))

    def refine(self, training_replies: Dict[str, Any], round_i: int):
        reasons: Dict[str, str] = {}
        for node in fbm.sampling_history(self).get(round_i, []):
            reply = training_replies.get(node)
            if reply is None:
                reasons[node] = NO_REPLY
            elif reply.get("success") is not True:
                reasons[node] = f"training failed on the node: {reply.get('msg') or 'no message'}"
        if reasons:
            raise NodeFailureError(round_i, reasons)
        model_params, weights, total_rows, encryption = super().refine(training_replies, round_i)
        if self.weighting == "uniform" and weights:
            weights = {node: 1.0 / len(weights) for node in weights}
        # replies arrive in the order the nodes finish: average them in site order (a float sum of
        # three or more terms depends on its order)
        model_params = {node: model_params[node] for node in self.site_order(model_params)}
        weights = {node: weights[node] for node in self.site_order(weights)}
        return model_params, weights, total_rows, encryption

    def save_state_breakpoint(self) -> Dict[str, Any]:
        """Parameters plus the sampling history (the stock strategy does not keep the history)."""
        state = super().save_state_breakpoint()
        state["parameters"] = self.settings()
        state["sampling_history"] = {str(r): n for r, n in self.history().items()}
        return state

    def load_state_breakpoint(self, state: Dict[str, Any]) -> None:
        super().load_state_breakpoint(state)
        fbm.set_sampling_history(self, {int(r): list(n) for r, n in state.get("sampling_history", {}).items()})
