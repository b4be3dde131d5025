"""Phase-2 training and inference library: options, run set-up (``setup``), the Coach training loop,
checkpoints with a JSON best-k index, MedPy metrics and ensemble inference back to NIfTI.

Modules are imported by full path (``MultiMedSeg.training.coach`` ...) to keep imports light.
"""
