"""Fed-BioMed training plan of the phase-1 data factory (docs/method.md#training-step).

Only the class source below and the lines of ``init_dependencies()`` are shipped to the nodes
(and hashed for plan approval); everything they import must be installed on each node, which
``pip install -e .`` of this project provides. The training logic lives in
:mod:`robustmedseg.factory` (see :mod:`robustmedseg.factory.trainer` for the update rules and the
docs/differences.md fixes); node-local state between rounds is in :mod:`robustmedseg.factory.state`.
"""
from fedbiomed.common.datamanager import DataManager
from fedbiomed.common.training_plans import TorchTrainingPlan

from robustmedseg.data.dataset import fed_slice_dataset
from robustmedseg.factory.config import FactoryConfig
from robustmedseg.factory.network import FactoryModel
from robustmedseg.factory.optim import AlternatingAdam
from robustmedseg.factory.session import begin_round, end_round, prepare_round
from robustmedseg.federation.secagg import NodeRound


class FactoryTrainingPlan(TorchTrainingPlan):
    """Conditional StyleGAN2 (G, D, G_ema) trained with alternating D/G updates on each node.

    model_args: the flat :class:`FactoryConfig` dict. training_args: ``num_updates`` (updates per
    round: even = D, odd = G), ``loader_args.batch_size``, ``optimizer_args.lr``.
    What a node returns: the full state dict of G, D and G_ema (no data, no optimizer state), or,
    under secure aggregation (``train.py --secagg``), its change during the round encoded and masked
    so that only the sum over the sampled nodes can be read (robustmedseg.federation.secagg).
    """

    def init_dependencies(self):
        return [
            "from fedbiomed.common.datamanager import DataManager",
            "from robustmedseg.data.dataset import fed_slice_dataset",
            "from robustmedseg.factory.config import FactoryConfig",
            "from robustmedseg.factory.network import FactoryModel",
            "from robustmedseg.factory.optim import AlternatingAdam",
            "from robustmedseg.factory.session import begin_round, end_round, prepare_round",
            "from robustmedseg.federation.secagg import NodeRound",
        ]

    def init_model(self, model_args):
        return FactoryModel(FactoryConfig.from_model_args(model_args))

    def init_optimizer(self, optimizer_args):
        cfg = FactoryConfig.from_model_args(self.model_args())
        nets = self.model()
        return AlternatingAdam(nets.discriminator.parameters(), nets.generator.parameters(),
                               lr=float(optimizer_args.get("lr", 0.002)),
                               d_reg_every=cfg.d_reg_every, g_reg_every=cfg.g_reg_every)

    def training_data(self):
        prepare_round(self)  # before Fed-BioMed's random split: reproducible batch order
        self._slices = fed_slice_dataset(FactoryConfig.from_model_args(self.model_args()).size)
        return DataManager(dataset=self._slices, shuffle=True, drop_last=True)

    def training_routine(self, history_monitor=None, node_args=None):
        self._session = begin_round(self, self._slices, history_monitor)
        self._secagg = NodeRound.start(self.model(), self.model_args())
        samples = super().training_routine(history_monitor=history_monitor, node_args=node_args)
        if self._secagg is not None:
            self._secagg.report_clipping(self._session.trainer, self.model())
        end_round(self._session)
        if self._secagg is not None:
            self._secagg.finish(self)
        return samples

    def after_training_params(self, flatten=False):
        # Fed-BioMed flattens the parameters only to encrypt them: a node then sends its encoded change
        if flatten and getattr(self, "_secagg", None) is not None:
            self._secagg.encode_model(self.model())
        return super().after_training_params(flatten=flatten)

    def training_step(self, data, target):
        return self._session.trainer.training_step(data, target)
