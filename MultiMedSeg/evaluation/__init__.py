"""Phase-2 evaluation library: scoring segmentations against ground truth (``metrics``), a run's
evaluation settings (``settings``: ``checkpoints/evaluation.json``, chosen on validation by
``selection``) and the segmentation of a preprocessed site's test volumes into NIfTI files with
their metrics (``test_volumes``, the library of ``MultiMedSeg/inference.py``).

It sits below :mod:`MultiMedSeg.training` (training validates with these metrics and records the
settings) and above :mod:`MultiMedSeg.ensemble`; it never imports ``MultiMedSeg.training``.
"""
