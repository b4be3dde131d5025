"""MultiMedSeg: phase 2 of RobustMedSeg (slice preprocessing, pSp segmentation pretraining,
domain adaptation, inference, segmentation of new scans, synthetic source volumes).

The scripts are the top-level modules of this package (``preprocess.py``, ``pretrain.py``,
``train.py``, ``inference.py``, ``predict.py``, ...); the libraries are :mod:`MultiMedSeg.data`
(NIfTI preprocessing and restoring, datasets), :mod:`MultiMedSeg.models` (encoder, interpreter, pSp)
and :mod:`MultiMedSeg.training`.  The phase-1 generator is ``model.Generator``, read from its file by
``robustmedseg.factory_file``; the slice-file format is ``robustmedseg.data.slices``."""
