"""The phase-1 client dataset: slice files -> LMDB folder (writer) and its low-level reader.

Layout of an LMDB folder ``OUT/`` (format version 1):

- ``data.mdb`` (+ ``lock.mdb``): LMDB environment.  For every requested size R and slice i,
  key ``f"{R}-{i:05d}-{label}-{zbin:02d}"`` (ASCII) -> raw little-endian float32 bytes of
  the (R, R, 1) image in C order (R*R*4 bytes), values in [-1, 1].  Key ``length`` -> the
  ASCII decimal number of slices.
- ``labels.npy``: int64 (N,) domain label of each slice (``np.save``, no pickle).
- ``zaxes.npy``: int64 (N,) z-bin of each slice (no pickle).
- ``meta.json``: sizes, length, label, n_domains, n_zbins, key format, source files, the
  resampling method, CLIP model info, format version.
- ``clip_mean.npy``: float32 (1, D) mean unit CLIP embedding (absent with ``--clip-model none``).

Index i is the position of the slice file in :func:`robustmedseg.data.slices.list_slices`
order, the order phase 2 uses too: by volume id, then slice number, then path (files directly
in the folder; with ``recursive``, also in its subfolders, e.g. a target site's
``train/labeled`` and ``train/unlabeled``).  A volume's slices may sit in several subfolders;
its z-bins are computed over all of them.

Resizing rule: all slices of a folder must share one square size S.  A requested size equal
to S is stored bit-exact; a different size requires an explicit resampling method
(``resample``: ``area``, ``bilinear``, ``bicubic``, ``lanczos``, the OpenCV
INTER_AREA/LINEAR/CUBIC/LANCZOS4 kernels on float32), otherwise it is an input error (a
silent resize would hide a preprocessing mistake).  Resized images are clipped to [-1, 1]
because cubic and Lanczos kernels overshoot.  CLIP always encodes the native S x S slice.
"""
from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from model import N_ZBINS, check_image_size
from robustmedseg.errors import InputError
from robustmedseg.io import check_apart, check_new_output

from .slices import list_slices, load_slice

PathLike = Union[str, Path]

FORMAT_VERSION = 1
LENGTH_KEY = b"length"
META_FILE = "meta.json"
LABELS_FILE = "labels.npy"
ZAXES_FILE = "zaxes.npy"
CLIP_MEAN_FILE = "clip_mean.npy"
KEY_FORMAT = "{size}-{index:05d}-{label}-{zbin:02d}"
RESAMPLE_METHODS = ("area", "bilinear", "bicubic", "lanczos")
_COMMIT_EVERY = 64  # slices per write transaction
_PAGE = 4096


def image_key(size: int, index: int, label: int, zbin: int) -> bytes:
    """LMDB key of slice ``index`` at resolution ``size``."""
    return KEY_FORMAT.format(size=size, index=index, label=label, zbin=zbin).encode("ascii")


# --------------------------------------------------------------------------- slice input

def read_slice_data(path: PathLike) -> np.ndarray:
    """Validated ``data`` array (H, W, 1) float32 of one slice file.

    The checks (keys, dtypes, shapes, one-hot mask, corrupt files, finite values in [-1, 1])
    are those of :func:`robustmedseg.data.slices.load_slice`; every violation is one
    InputError naming the file.
    """
    return load_slice(path)["data"]


def resize_image(image: np.ndarray, size: int, method: str) -> np.ndarray:
    """Resize an (H, W, 1) float32 image to (size, size, 1) with OpenCV, clipped to [-1, 1]."""
    import cv2

    flags = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR,
             "bicubic": cv2.INTER_CUBIC, "lanczos": cv2.INTER_LANCZOS4}
    out = cv2.resize(np.ascontiguousarray(image[..., 0]), (size, size), interpolation=flags[method])
    return np.clip(out, -1.0, 1.0).astype(np.float32)[..., None]


@dataclass
class LoadedSlice:
    index: int
    data: np.ndarray                                   # native (S, S, 1) float32
    resized: Dict[int, np.ndarray] = field(default_factory=dict)  # requested sizes != S


def _load_one(item: Tuple[int, str], sizes: Tuple[int, ...], resample: Optional[str]) -> LoadedSlice:
    """Worker: read + validate one slice and resize it to the requested sizes when allowed."""
    index, path = item
    data = read_slice_data(path)
    loaded = LoadedSlice(index, data)
    if resample is not None and data.shape[0] == data.shape[1]:
        for size in sizes:
            if size != data.shape[0]:
                loaded.resized[size] = resize_image(data, size, resample)
    return loaded


def iter_slices(files: Sequence[Path], sizes: Sequence[int], resample: Optional[str],
                workers: int = 0) -> Iterator[LoadedSlice]:
    """Load slices in order, in ``workers`` spawned processes (0: in this process)."""
    load = partial(_load_one, sizes=tuple(sizes), resample=resample)
    items = [(i, str(p)) for i, p in enumerate(files)]
    if workers <= 0:
        yield from map(load, items)
        return
    # spawn, not fork: the parent may hold CUDA/OpenMP state that forked children must not inherit
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(load, items, chunksize=4)


# --------------------------------------------------------------------------- writer

@dataclass(frozen=True)
class PrepareOptions:
    """Everything ``prepare_data.py`` asks for (see its --help): its flags are generated from these fields
    (``source`` is the positional PATH, ``sizes`` is ``--size``, ``progress`` is off with ``--quiet``,
    ``clip_model`` None is ``--clip-model none``)."""

    source: Path
    out: Path
    label: int
    sizes: Tuple[int, ...] = (512,)
    n_domains: int = 3
    n_zbins: int = N_ZBINS
    resample: Optional[str] = None
    clip_model: Optional[str] = "ViT-L-14"
    clip_pretrained: Optional[str] = "openai"
    clip_quick_gelu: Optional[bool] = None
    clip_batch: int = 32
    device: str = "auto"
    workers: int = 0
    recursive: bool = False
    overwrite: bool = False
    progress: bool = True


def estimate_map_size(n_slices: int, sizes: Sequence[int]) -> int:
    """LMDB map size for ``n_slices`` images at every size in ``sizes``.

    A value larger than a page goes to overflow pages (its size rounded up to whole pages,
    plus a header); one more page per value covers leaf/branch pages and the small keys.
    The estimate is doubled plus 32 MiB of slack.  The map is sparse, so this reserves
    address space, not disk; it stays bounded (unlike a fixed 1 TiB, which fails on systems
    limiting virtual memory), and the writer grows it if it ever proves short.
    """
    per_slice = sum((math.ceil((s * s * 4 + 64) / _PAGE) + 1) * _PAGE for s in sizes)
    return 2 * n_slices * per_slice + (32 << 20)


def check_options(opts: PrepareOptions) -> None:
    """Argument checks that need no file reading."""
    if opts.n_domains < 1:
        raise InputError(f"--n-domains must be >= 1, got {opts.n_domains}")
    if not 0 <= opts.label < opts.n_domains:
        raise InputError(f"--label {opts.label} out of range: domain labels are 0..{opts.n_domains - 1} "
                         f"(--n-domains {opts.n_domains})")
    if opts.n_zbins < 1:
        raise InputError(f"--n-zbins must be >= 1, got {opts.n_zbins}")
    if not opts.sizes or len(set(opts.sizes)) != len(opts.sizes):
        raise InputError(f"--size must list distinct sizes, got {list(opts.sizes)}")
    for size in opts.sizes:  # the data factory's rule (train.py --size), checked now rather than at training
        try:
            check_image_size(size)
        except ValueError as err:
            raise InputError(f"--size {size}: {err} (train.py would refuse it)") from None
    if opts.resample is not None and opts.resample not in RESAMPLE_METHODS:
        raise InputError(f"--resample must be one of {', '.join(RESAMPLE_METHODS)}, got '{opts.resample}'")
    if not 0 <= opts.workers <= 4 * (os.cpu_count() or 1):
        raise InputError(f"--workers must be in [0, {4 * (os.cpu_count() or 1)}] (4 x the CPU count), "
                         f"got {opts.workers}")
    if opts.clip_batch < 1:
        raise InputError(f"--clip-batch must be >= 1, got {opts.clip_batch}")
    clip_file = opts.clip_pretrained if opts.clip_model and opts.clip_pretrained and \
        os.path.exists(opts.clip_pretrained) else None
    check_apart({"--out": opts.out}, {"PATH": opts.source, "--clip-pretrained": clip_file})
    check_new_output(opts.out, opts.overwrite)


class _LmdbWriter:
    """Buffered LMDB writes that grow the map when it fills up."""

    def __init__(self, folder: Path, map_size: int) -> None:
        import lmdb

        self._lmdb = lmdb
        self.env = lmdb.open(str(folder), map_size=map_size, subdir=True, readahead=False, meminit=False)
        self._pending: List[Tuple[bytes, bytes]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self._pending.append((key, value))

    def flush(self) -> None:
        while self._pending:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value)
                self._pending.clear()
            except self._lmdb.MapFullError:
                self.env.set_mapsize(2 * self.env.info()["map_size"])
            except self._lmdb.Error as err:  # a full disk, an I/O error...: an OSError naming the folder
                raise OSError(errno.EIO, f"cannot write the LMDB ({' '.join(str(err).split())})",
                              self.env.path()) from None

    def close(self) -> None:
        """Close without writing what is still pending (call :meth:`flush` first to keep it)."""
        self.env.close()


def _check_size(loaded: LoadedSlice, files: Sequence[Path], first_size: Optional[int],
                opts: PrepareOptions) -> int:
    """Native size of a slice; enforce one square size per folder and the resizing rule."""
    path = files[loaded.index]
    h, w = loaded.data.shape[:2]
    if h != w:
        raise InputError(f"slice is not square ({h}x{w})", path)
    if first_size is not None and h != first_size:
        raise InputError(f"slice size {h} differs from {first_size} (size of {files[0].name}); "
                         "all slices of a folder must have one size", path)
    if opts.resample is None and any(s != h for s in opts.sizes):
        raise InputError(f"slice size {h} differs from --size {','.join(map(str, opts.sizes))}: pass "
                         f"--size {h}, or --resample {{{','.join(RESAMPLE_METHODS)}}} to resize", path)
    return h


def _write_side_files(folder: Path, labels: np.ndarray, zbins: np.ndarray, meta: Dict[str, Any],
                      clip_mean: Optional[np.ndarray]) -> None:
    np.save(folder / LABELS_FILE, labels, allow_pickle=False)
    np.save(folder / ZAXES_FILE, zbins, allow_pickle=False)
    if clip_mean is not None:
        np.save(folder / CLIP_MEAN_FILE, clip_mean, allow_pickle=False)
    (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def prepare_lmdb(opts: PrepareOptions) -> Dict[str, Any]:
    """Build the LMDB folder ``opts.out`` from the slice folder ``opts.source``; return meta.

    Nothing is written at ``opts.out`` unless everything succeeds (temporary folder renamed
    at the end; with ``overwrite`` the old folder is replaced only then).
    """
    from tqdm import tqdm

    from robustmedseg.io import atomic_dir

    from .clip_embed import MeanAccumulator, load_clip_encoder
    from .zbins import zbins_for_files

    check_options(opts)
    files = list_slices(opts.source, opts.recursive)
    if not files:
        raise InputError(f"no slice files ({'**/' if opts.recursive else ''}*.npz) in folder", opts.source)
    zbins = zbins_for_files(files, opts.n_zbins)
    labels = np.full(len(files), opts.label, dtype=np.int64)
    encoder = None
    if opts.clip_model:
        encoder = load_clip_encoder(opts.clip_model, opts.clip_pretrained, opts.device, opts.clip_quick_gelu)
    accumulator = MeanAccumulator()

    def encode(batch: List[np.ndarray]) -> None:
        if encoder is not None and batch:
            import torch

            accumulator.add(encoder.encode(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)))
        batch.clear()

    native: Optional[int] = None
    with atomic_dir(opts.out, overwrite=opts.overwrite) as tmp:
        writer = _LmdbWriter(tmp, estimate_map_size(len(files), opts.sizes))
        slices = iter_slices(files, opts.sizes, opts.resample, opts.workers)
        try:
            batch: List[np.ndarray] = []
            for loaded in tqdm(slices, total=len(files), desc=f"prepare {opts.source.name}", unit="slice",
                               disable=not opts.progress):
                native = _check_size(loaded, files, native, opts)
                for size in opts.sizes:
                    image = loaded.data if size == native else loaded.resized[size]
                    key = image_key(size, loaded.index, opts.label, int(zbins[loaded.index]))
                    writer.put(key, np.ascontiguousarray(image, dtype="<f4").tobytes())
                batch.append(loaded.data)
                if len(batch) >= opts.clip_batch:
                    encode(batch)
                if loaded.index % _COMMIT_EVERY == _COMMIT_EVERY - 1:
                    writer.flush()
            encode(batch)
            writer.put(LENGTH_KEY, str(len(files)).encode("ascii"))
            writer.flush()
            writer.env.sync(True)
        finally:
            slices.close()  # stops the loading processes now, even on error
            writer.close()
        meta = {
            "format": "robustmedseg-slices-lmdb", "version": FORMAT_VERSION, "length": len(files),
            "sizes": list(opts.sizes), "source_size": native, "resample": opts.resample,
            "label": opts.label, "n_domains": opts.n_domains, "n_zbins": opts.n_zbins,
            "key_format": KEY_FORMAT, "dtype": "<f4", "image_shape": "(size, size, 1)",
            "zbin_rule": "floor(rank * n_zbins / D): rank of the slice number within its volume, "
                         "D = slices of that volume",
            "source_dir": str(opts.source.resolve()), "recursive": opts.recursive,
            "files": [p.relative_to(opts.source).as_posix() for p in files],
            "clip": encoder.info if encoder is not None else None,
        }
        _write_side_files(tmp, labels, zbins, meta, accumulator.mean() if encoder is not None else None)
    return meta


# --------------------------------------------------------------------------- reader primitives

# One read-only environment per (folder files, process): py-lmdb refuses to open the same
# files twice in a process, and an environment inherited through fork must be closed in the
# child before the files can be opened again there.
_READ_ENVS: Dict[Tuple[str, int, int], Tuple[int, Any]] = {}


def open_readonly_env(folder: PathLike) -> Any:
    """The process's read-only LMDB environment of ``folder`` (no locks/readahead/meminit).

    Shared by every reader of the folder in this process; re-opened after a fork (the
    inherited handles are closed in the child only).  A folder replaced on disk (new
    ``data.mdb``) gets a fresh environment; readers of the old one keep theirs.
    """
    import lmdb

    folder = Path(folder)
    data_file = folder / "data.mdb"
    try:
        stat = data_file.stat()
    except OSError as err:
        raise InputError(f"cannot open LMDB (no readable data.mdb: {err.strerror})", folder) from err
    key = (str(folder.resolve()), stat.st_dev, stat.st_ino)
    pid = os.getpid()
    cached = _READ_ENVS.get(key)
    if cached is not None and cached[0] == pid:
        return cached[1]
    for other in [k for k, (owner, _) in _READ_ENVS.items() if owner != pid]:  # inherited through fork
        _READ_ENVS.pop(other)[1].close()
    try:
        env = lmdb.open(str(folder), readonly=True, lock=False, readahead=False, meminit=False, subdir=True)
    except lmdb.Error as err:
        raise InputError(f"cannot open LMDB ({err})", folder) from err
    _READ_ENVS[key] = (pid, env)
    return env


def load_int_array(path: Path, length: int) -> np.ndarray:
    """Load an int64 (length,) side file written without pickle."""
    if not path.is_file():
        raise InputError("missing LMDB side file", path)
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:
        raise InputError(f"cannot read ({type(err).__name__}: {err})", path) from err
    if array.shape != (length,) or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"expected an integer array of shape ({length},), got {array.dtype} {array.shape}",
                         path)
    return array.astype(np.int64)


def load_meta(folder: Path) -> Dict[str, Any]:
    path = folder / META_FILE
    if not path.is_file():
        raise InputError(f"missing {META_FILE} (not a prepare_data.py output?)", folder)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read ({err})", path) from err
    if not isinstance(meta, dict) or not isinstance(meta.get("sizes"), list) or not meta["sizes"]:
        raise InputError("no 'sizes' list in metadata", path)
    return meta


def load_clip_mean(folder: PathLike) -> Optional[np.ndarray]:
    """``clip_mean.npy`` of an LMDB folder as float32 (1, D), or None when absent."""
    path = Path(folder) / CLIP_MEAN_FILE
    if not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:
        raise InputError(f"cannot read ({type(err).__name__}: {err})", path) from err
    if array.ndim != 2 or array.shape[0] != 1 or array.shape[1] < 1 or not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"expected a float (1, D) array, got {array.dtype} {array.shape}", path)
    if not np.isfinite(array).all():
        raise InputError("contains NaN or inf", path)
    return array.astype(np.float32)
