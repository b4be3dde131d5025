"""MultiMedSeg: phase 2 of RobustMedSeg (slice preprocessing, pSp segmentation pretraining,
domain adaptation and inference).  Scripts: ``preprocess.py``, ``pretrain.py``, ``train.py``,
``inference.py``; the slice data library lives in :mod:`MultiMedSeg.data`."""
