"""Phase-1 data factory: GAN training logic run on the Fed-BioMed nodes.

Modules: :mod:`.config` (hyper-parameters shipped as ``model_args``), :mod:`.network` (G/D/G_ema
container), :mod:`.optim` (alternating lazy-regularised Adam), :mod:`.ada` (adaptive augmentation),
:mod:`.losses`, :mod:`.clip_loss`, :mod:`.trainer` (one update), :mod:`.state` (node-local state
between rounds), :mod:`.session` (round begin/end), :mod:`.samples` (grids).
"""
