"""Phase-2 training library: run set-up (``setup``), the Coach training loop (``coach``) and the shared
entry point of pretrain.py and train.py (``command``).  Evaluation is :mod:`MultiMedSeg.evaluation`.

Modules are imported by full path (``MultiMedSeg.training.coach`` ...) to keep imports light.
"""
