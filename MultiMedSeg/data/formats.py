"""Scans in the formats hospitals have, and results written back on each scan's own grid.

Reading (:func:`find_scans`, :func:`read_scan`):

* NIfTI (``.nii``, ``.nii.gz``) through nibabel;
* NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and a DICOM series (a folder of
  slice files) through SimpleITK.

Every scan becomes a ``nibabel.Nifti1Image`` in memory -- the voxel array in (x, y, z) index order and
a RAS affine -- the one representation preprocessing works on.  An ITK image (``sitk``: array in
(z, y, x) order, origin/spacing/direction in LPS millimetres) converts with
``affine = diag(-1, -1, 1, 1) @ [[direction @ diag(spacing), origin], [0, 0, 0, 1]]`` (ITK's
LPS -> NIfTI's RAS), as ITK's own NIfTI writer does; the ITK geometry is kept as read
(:class:`ItkGeometry`).

Writing (:func:`write_result`): NIfTI by default (for a NIfTI input with its own header fields:
:func:`MultiMedSeg.data.restore.write_nifti_like`), or with ``fmt='input'`` the input's format: NRRD
and MetaImage get the input's origin, spacing and direction copied exactly.  DICOM is read only
(labels would need DICOM-SEG): a DICOM series is written as NIfTI, NRRD or MetaImage (``fmt='input'``: NIfTI).

Bad input is one :class:`~robustmedseg.errors.InputError` naming the file: an unknown format, a 2-D
or 4-D image, a multi-component (vector, RGB) image, a DICOM folder holding several series (they are
listed; ``series`` picks one).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np

from robustmedseg.errors import InputError

from .restore import write_nifti_like

NIFTI, NRRD, METAIMAGE, DICOM = "nifti", "nrrd", "metaimage", "dicom"
EXTENSIONS: Tuple[Tuple[str, str], ...] = ((".nii.gz", NIFTI), (".nii", NIFTI), (".nrrd", NRRD), (".nhdr", NRRD),
                                           (".mha", METAIMAGE), (".mhd", METAIMAGE))
#: ``--output_format`` values: NIfTI, the input's own format, or one ITK format for every scan
OUTPUT_FORMATS = ("nifti", "input", "nrrd", "mha")
KNOWN = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a folder holding a DICOM series"
_LPS = np.diag([-1.0, -1.0, 1.0])


# ------------------------------------------------------------------------------------------ discovery


def split_extension(name: str) -> Tuple[str, Optional[str], str]:
    """``(stem, format or None, extension)`` of a file name (``.nii.gz`` counts as one extension)."""
    lower = name.lower()
    for ext, fmt in EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], fmt, name[-len(ext):]
    suffix = Path(name).suffix
    return name[: len(name) - len(suffix)], None, suffix


@dataclass(frozen=True)
class ScanSource:
    """One scan to segment: a file, or a DICOM series (``files`` of ``series`` in the folder ``path``)."""

    id: str
    path: Path
    format: str
    extension: str = ""
    series: Optional[str] = None
    files: Tuple[str, ...] = ()


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM part-10 file ('DICM' after the 128-byte preamble) or a ``.dcm`` file."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's warnings printed on stderr (e.g. GDCM's 'No Series were found')."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def dicom_series(folder: Path) -> Dict[str, Tuple[str, ...]]:
    """``{series instance UID: sorted slice files}`` of the DICOM series directly in ``folder``."""
    folder = Path(folder)
    if not any(p.is_file() and _looks_like_dicom(p) for p in folder.iterdir() if not p.name.startswith(".")):
        return {}
    import SimpleITK as sitk

    with _quiet_itk():
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        return {uid: tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}


def _series_source(folder: Path, series: Dict[str, Tuple[str, ...]], chosen: Optional[str]) -> ScanSource:
    if chosen is not None:
        if chosen not in series:
            raise InputError(f"DICOM series {chosen} (given by --series) is not in this folder, which holds: "
                             f"{', '.join(series)}", folder)
        uid = chosen
    elif len(series) > 1:
        listing = "; ".join(f"{uid} ({len(files)} files)" for uid, files in series.items())
        raise InputError(f"several DICOM series in this folder: {listing}; choose one with --series UID", folder)
    else:
        uid = next(iter(series))
    return ScanSource(id=folder.resolve().name, path=folder, format=DICOM, series=uid, files=series[uid])


def find_scans(inputs: Sequence[Path], series: Optional[str] = None) -> List[ScanSource]:
    """The scans named by ``inputs``: image files, folders of image files, DICOM series folders.

    A folder contributes its image files of a known format (sorted, not recursive), the DICOM series
    stored directly in it, and the DICOM series of its sub-folders (one level); files of other
    formats in a folder are ignored.  A file given by name must be of a known format.  Volume ids
    (output names) are the file names without extension, or the DICOM folder's name; they must be
    unique.
    """
    sources: List[ScanSource] = []
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise InputError("input not found", path)
        if path.is_file():
            stem, fmt, ext = split_extension(path.name)
            if fmt is None:
                hint = "; a DICOM file: give the folder of its series" if _looks_like_dicom(path) else ""
                raise InputError(f"unknown image format {ext or '(no extension)'!r}; known: {KNOWN}{hint}", path)
            sources.append(ScanSource(id=stem, path=path, format=fmt, extension=ext))
            continue
        found: List[ScanSource] = []
        here = dicom_series(path)
        if here:
            found.append(_series_source(path, here, series))
        for child in sorted(path.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_file():
                stem, fmt, ext = split_extension(child.name)
                if fmt is not None:
                    found.append(ScanSource(id=stem, path=child, format=fmt, extension=ext))
            elif child.is_dir():
                sub = dicom_series(child)
                if sub:
                    found.append(_series_source(child, sub, series))
        if not found:
            raise InputError(f"no scan found in this folder (known: {KNOWN})", path)
        sources.extend(found)
    seen: Dict[str, Path] = {}
    for src in sources:
        if src.id in seen:
            raise InputError(f"two inputs give the volume id {src.id!r} (other: {seen[src.id]}); rename one", src.path)
        seen[src.id] = src.path
    return sources


# ------------------------------------------------------------------------------------------ reading


def check_volume_shape(shape: Sequence[int], path: Path) -> Tuple[int, int, int]:
    """The 3-D shape (trailing singleton axes beyond the third dropped); a 2-D image, an image with
    a single slice, and a 4-D image (e.g. a time series) are :class:`InputError`."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or min(shape) < 2:
        raise InputError(f"2-D image (shape {shape}); a 3-D volume is needed", path)
    if len(shape) > 3:
        raise InputError(f"{len(shape)}-D image (shape {shape}); give one 3-D volume (e.g. one time point)", path)
    return shape  # type: ignore[return-value]


@dataclass(frozen=True)
class ItkGeometry:
    """Origin, spacing and direction of an ITK image, exactly as read (LPS, mm)."""

    origin: Tuple[float, ...]
    spacing: Tuple[float, ...]
    direction: Tuple[float, ...]

    @classmethod
    def of(cls, image) -> "ItkGeometry":
        return cls(tuple(image.GetOrigin()), tuple(image.GetSpacing()), tuple(image.GetDirection()))

    @classmethod
    def from_affine(cls, affine: np.ndarray) -> "ItkGeometry":
        """The ITK geometry of a NIfTI (RAS) affine."""
        lps = _LPS @ np.asarray(affine, dtype=np.float64)[:3]
        spacing = np.sqrt((lps[:, :3] ** 2).sum(axis=0))
        return cls(tuple(lps[:, 3].tolist()), tuple(spacing.tolist()), tuple((lps[:, :3] / spacing).ravel().tolist()))

    def affine(self) -> np.ndarray:
        """The NIfTI (RAS) affine."""
        out = np.eye(4)
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        out[:3, :3] = _LPS @ direction @ np.diag(self.spacing)
        out[:3, 3] = _LPS @ np.asarray(self.origin, dtype=np.float64)
        return out

    def apply(self, image) -> None:
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)


@dataclass
class Scan:
    """A scan in memory: ``image`` (nibabel, RAS affine) for preprocessing; ``itk`` the geometry
    read from an ITK format (None for NIfTI)."""

    source: ScanSource
    image: nib.Nifti1Image
    itk: Optional[ItkGeometry] = None


def probe_scan(src: ScanSource) -> Tuple[int, int, int]:
    """Cheap header check before any work: the 3-D shape (:func:`check_volume_shape`); DICOM series
    are checked when read."""
    if src.format == NIFTI:
        try:
            shape = nib.load(str(src.path)).shape
        except Exception as err:  # noqa: BLE001 - any reader failure is a bad input file
            raise InputError(f"cannot read NIfTI header: {_first_line(err)}", src.path) from None
        return check_volume_shape(shape, src.path)
    if src.format == DICOM:
        return (0, 0, 0)
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(src.path))
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as err:
        raise InputError(f"cannot read {src.format} header: {_first_line(err)}", src.path) from None
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"{reader.GetNumberOfComponents()}-component image (vector/RGB); a scalar volume is needed",
                         src.path)
    return check_volume_shape(reader.GetSize(), src.path)


def check_scan(src: ScanSource) -> Tuple[int, int, int]:
    """Read a scan completely -- header *and* voxel data -- and return its 3-D shape: the check run on
    every input before any work, so that a truncated or corrupt file is refused at once
    (:class:`InputError` naming it).  The data are not kept (the scan is read again when segmented)."""
    probe_scan(src)
    scan = read_scan(src)
    try:
        data = np.asanyarray(scan.image.dataobj)  # NIfTI is read lazily: this reads every voxel
    except Exception as err:  # noqa: BLE001 - truncated or corrupt voxel data
        raise InputError(f"cannot read the voxel data: {_first_line(err)}", src.path) from None
    return tuple(int(n) for n in data.shape[:3])  # type: ignore[return-value]


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] if text else type(err).__name__


def itk_to_nifti(image, path: Path) -> Tuple[nib.Nifti1Image, ItkGeometry]:
    """A 3-D scalar ITK image as an in-memory NIfTI (x, y, z array, RAS affine, q/sform code 1)."""
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{image.GetNumberOfComponentsPerPixel()}-component image (vector/RGB); a scalar volume is "
                         "needed", path)
    check_volume_shape(image.GetSize(), path)
    geometry = ItkGeometry.of(image)
    array = np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)))
    affine = geometry.affine()
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img, geometry


def read_scan(src: ScanSource) -> Scan:
    """Load a scan (:class:`InputError` naming it when unreadable or not a 3-D scalar volume)."""
    if src.format == NIFTI:
        try:
            img = nib.load(str(src.path))
        except Exception as err:  # noqa: BLE001
            raise InputError(f"cannot read NIfTI file: {_first_line(err)}", src.path) from None
        check_volume_shape(img.shape, src.path)
        return Scan(src, img)
    import SimpleITK as sitk

    try:
        with _quiet_itk():
            if src.format == DICOM:
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(list(src.files))
                image = reader.Execute()
            else:
                image = sitk.ReadImage(str(src.path))
    except RuntimeError as err:
        raise InputError(f"cannot read {src.format} image: {_first_line(err)}", src.path) from None
    if image.GetDimension() != 3:
        check_volume_shape(image.GetSize(), src.path)  # 2-D and 4-D get their own message
        size = list(image.GetSize())  # a 4-D image with one time point: its 3-D volume
        image = sitk.Extract(image, size[:3] + [0] * (len(size) - 3), [0] * len(size))
    img, geometry = itk_to_nifti(image, src.path)
    return Scan(src, img, geometry)


# ------------------------------------------------------------------------------------------ writing


def output_extension(src: ScanSource, fmt: str) -> str:
    """File extension of a result for ``--output_format fmt``; under ``input`` a DICOM series (which cannot
    be written back: labels would need DICOM-SEG) is written as NIfTI."""
    if fmt == "nifti":
        return ".nii.gz"
    if fmt in ("nrrd", "mha"):
        return f".{fmt}"
    if fmt != "input":
        raise ValueError(f"unknown output format {fmt!r}")
    if src.format == DICOM:  # labels would need DICOM-SEG: the documented fallback is NIfTI
        return ".nii.gz"
    return src.extension


def nifti_to_itk(array: np.ndarray, geometry: ItkGeometry):
    """An (x, y, z) or (x, y, z, c) array as an ITK image (c: vector components) with ``geometry``."""
    import SimpleITK as sitk

    array = np.asarray(array)
    order = (2, 1, 0) if array.ndim == 3 else (2, 1, 0, 3)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, order)), isVector=array.ndim == 4)
    geometry.apply(image)
    return image


def write_result(array: np.ndarray, scan: Scan, volume_meta: dict, path: Path) -> Path:
    """Write ``array`` (the scan's stored grid, optionally with a 4th channel axis) to ``path``; the
    format follows the extension: NIfTI with the scan's header (:func:`write_nifti_like`), NRRD or
    MetaImage with the scan's ITK geometry (exactly as read; from its affine for a NIfTI scan)."""
    path = Path(path)
    _, fmt, _ = split_extension(path.name)
    if fmt == NIFTI:
        return write_nifti_like(array, volume_meta, path)
    if fmt not in (NRRD, METAIMAGE):
        raise ValueError(f"cannot write {path.name}: unknown format")
    import SimpleITK as sitk

    array = np.asarray(array)
    if array.dtype == np.bool_ or (np.issubdtype(array.dtype, np.integer) and array.size and array.min() >= 0
                                   and array.max() < 256):
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    geometry = scan.itk if scan.itk is not None else ItkGeometry.from_affine(scan.image.affine)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(nifti_to_itk(array, geometry), str(path), True)
    return path
