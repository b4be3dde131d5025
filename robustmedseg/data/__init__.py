"""Phase-1 client data: slice folder -> LMDB (``prepare_data.py``) and its readers.

Import the submodules directly (``robustmedseg.data.dataset`` pulls in torch and
fedbiomed): :mod:`.lmdb_store` (layout, writer), :mod:`.zbins`, :mod:`.clip_embed`,
:mod:`.dataset` (:class:`LMDBSlices`, :class:`FedSliceDataset`, :func:`fed_slice_dataset`).
"""
