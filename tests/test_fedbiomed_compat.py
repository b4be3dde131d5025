"""Fed-BioMed's internals this project relies on (robustmedseg/federation/fedbiomed_compat.py) still
exist with the expected signatures: an upgrade of Fed-BioMed fails here first, naming what moved.

Fast: classes and signatures only, no federation, no researcher component (importing
``fedbiomed.researcher`` would create one: only modules that do not are imported, and the Experiment's
source is read without importing it)."""
from __future__ import annotations

import ast
import importlib.util
import inspect
from pathlib import Path

from robustmedseg.federation import fedbiomed_compat as fbm


def _params(func) -> list:
    return [p for p in inspect.signature(func).parameters if p != "self"]


def _source_tree(module: str) -> ast.Module:
    """The parsed source of a Fed-BioMed module, read without importing it."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"Fed-BioMed module {module} is gone"
    return ast.parse(Path(spec.origin).read_text())


def _method(tree: ast.Module, cls: str, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    raise AssertionError(f"Fed-BioMed's {cls}.{name} is gone")


def test_the_pinned_fedbiomed_version():
    from importlib.metadata import version

    assert version("fedbiomed") == fbm.FEDBIOMED_VERSION


def test_the_logger_wraps_a_logging_logger():
    import logging

    from fedbiomed.common.logger import logger

    assert isinstance(logger._logger, logging.Logger)  # noqa: SLF001 - what filter_fedbiomed_logs uses


def test_the_node_hashes_a_plan_source():
    from fedbiomed.node.training_plan_security_manager import TrainingPlanSecurityManager as M

    assert _params(M._create_hash)[:2] == ["source", "from_string"]  # noqa: SLF001
    assert _params(M.__init__)[:5] == ["db", "node_id", "node_name", "hashing", "tp_approval"]
    for name in ("check_training_plan_status", "approve_training_plan", "register_training_plan"):
        assert callable(getattr(M, name)), name


def test_a_strategy_keeps_its_settings_and_history_where_breakpoints_restore_them():
    from fedbiomed.researcher.strategies import DefaultStrategy

    from robustmedseg.federation.strategy import SampleAtMostK

    stock = DefaultStrategy()
    assert stock._parameters is None and stock._sampling_node_history == {}  # noqa: SLF001
    state = stock.save_state_breakpoint()
    assert state["parameters"] is None
    restored = SampleAtMostK()  # Experiment.load_breakpoint rebuilds it with cls(), then restores the state
    restored.load_state_breakpoint({**SampleAtMostK(3, 7, "samples").save_state_breakpoint(),
                                    "sampling_history": {"0": ["a", "b"]}})
    assert restored.settings() == {"max_nodes": 3, "seed": 7, "weighting": "samples", "site_keys": {}}
    assert restored.history() == {0: ["a", "b"]} and restored.sampled(0) == ["a", "b"]
    restored.update_settings(max_nodes=1)
    restored.set_site_keys({"a": "site0"})
    assert restored.max_nodes == 1 and restored.settings()["site_keys"] == {"a": "site0"}


def test_the_experiment_keeps_its_requests_and_the_encrypted_aggregation_hook():
    tree = _source_tree("fedbiomed.researcher.federated_workflows._federated_workflow")
    requests = _method(tree, "FederatedWorkflow", "requests")
    assert "self._reqs" in ast.unparse(requests), "FederatedWorkflow.requests no longer returns self._reqs"
    hook = _method(_source_tree("fedbiomed.researcher.federated_workflows._experiment"), "Experiment",
                   fbm.ENCRYPTED_AGGREGATION_HOOK)
    assert [a.arg for a in hook.args.args] == ["self", "model_params", "optim_auxvar", "encryption_factors",
                                               "total_sample_size"]
    ours = Path(fbm.__file__).with_name("experiment.py").read_text()  # FactoryExperiment overrides it
    assert f"def {fbm.ENCRYPTED_AGGREGATION_HOOK}(self, model_params" in ours


def test_the_compat_module_is_the_only_one_touching_these_internals():
    """Outside fedbiomed_compat.py, no project module names one of the internals it wraps."""
    internals = ("._logger", "._create_hash", "._parameters", "._sampling_node_history", "._reqs",
                 "._get_file_writer")
    repo = Path(fbm.__file__).resolve().parents[2]
    files = [repo / "train.py", repo / "training_plan.py", *sorted((repo / "robustmedseg").rglob("*.py"))]
    offenders = [f"{path.relative_to(repo)}: {word}" for path in files if path.name != "fedbiomed_compat.py"
                 for word in internals if word in path.read_text()]
    assert not offenders, offenders
