"""RobustMedSeg helper library: data I/O, federation tooling and shared utilities.

The user-facing entry points live at the repository top level (``prepare_data.py``,
``train.py``, ``save_global_model.py``, ``generate_volumes.py``); they parse flags and
call into this package.
"""
