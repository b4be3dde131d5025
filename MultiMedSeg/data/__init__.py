"""Slice data library: file format, NIfTI preprocessing and mapping predictions back.

* :mod:`robustmedseg.data.slices` (shared with phase 1, re-exported here) -- ``<volume>_slice<NNN>.npz``
  files: :func:`load_slice`, :func:`save_slice`, :func:`volume_id`, :func:`slice_index`,
  :func:`list_slices`, :func:`group_slices_by_volume`.
* :mod:`.volumes_to_slices` -- NIfTI -> slices pipeline (:func:`preprocess`, :class:`PreprocessConfig`).
* :mod:`.restore` -- ``metadata.json`` schema, :func:`load_metadata`, :func:`restore_volume`,
  :func:`write_nifti_like`.
* :mod:`.resample` -- image and mask resampling: the one home of the mask resizing rule.
* :mod:`.orientation` -- canonical orientation (default RAS) of every volume, undone on restore.
* :mod:`.preprocessing_plan` -- a run's preprocessing plan (``plan.json``) and :func:`prepare_scan` for new scans.
* :mod:`.formats` -- reading NIfTI, NRRD, MetaImage and DICOM series, writing on the input's grid.
"""
from robustmedseg.data.slices import (  # noqa: F401
    group_slices_by_volume,
    list_slices,
    load_slice,
    save_slice,
    slice_index,
    slice_name,
    volume_id,
)
from .volumes_to_slices import PreprocessConfig, preprocess  # noqa: F401
from .restore import load_metadata, restore_volume, volume_meta, write_nifti_like  # noqa: F401
