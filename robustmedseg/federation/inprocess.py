"""Run one node round of a training plan in this process, without gRPC (tests and benchmarks).

Mirrors what a Fed-BioMed 6.4.1 node does for a train request (``fedbiomed.node.round.Round``):
ship the plan source to a file and re-import it (so ``init_dependencies`` is exercised), call
``post_init`` with the node id and round, load the global parameters, build the data manager on the
dataset folder, run ``training_routine`` and collect ``after_training_params()`` (what the node
would send back).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Type

import torch


def instantiate_plan(plan_class: Type[Any], workdir: Optional[Path] = None) -> Any:
    """Instantiate ``plan_class`` the way nodes do: from its shipped source (deps + class)."""
    from fedbiomed.common.utils import import_class_object_from_file

    folder = Path(tempfile.mkdtemp(prefix="tp_", dir=workdir))
    path = folder / f"plan_{plan_class.__name__.lower()}.py"
    plan_class().save_code(str(path))
    _, plan = import_class_object_from_file(str(path), plan_class.__name__)
    return plan


def run_node_round(plan_class: Type[Any], model_args: Mapping[str, Any], training_args: Mapping[str, Any],
                   dataset_path: Path, node_id: str = "NODE_local", round_: int = 0,
                   params: Optional[Mapping[str, torch.Tensor]] = None, history_monitor: Any = None,
                   workdir: Optional[Path] = None) -> Tuple[Any, Dict[str, torch.Tensor], int]:
    """One round on one node. Returns (plan, parameters the node would send, samples seen)."""
    from fedbiomed.common.training_args import TrainingArgs

    plan = instantiate_plan(plan_class, workdir)
    args = TrainingArgs(dict(training_args), only_required=False)
    plan.post_init(model_args=dict(model_args), training_args=args, node_id=node_id, round=round_)
    if params is not None:
        plan.set_model_params(dict(params))
    data_manager = plan.training_data()
    data_manager.extend_loader_args(args.loader_arguments())
    data_manager.load(tp_type=plan.type())
    data_manager.load_dataset(root=str(dataset_path))
    train_loader, test_loader = data_manager.split(test_ratio=0.0, test_batch_size=None,
                                                   is_shuffled_testing_dataset=False)
    plan.set_data_loaders(train_data_loader=train_loader, test_data_loader=test_loader)
    seen = plan.training_routine(history_monitor=history_monitor, node_args={})
    return plan, plan.after_training_params(), int(seen)
