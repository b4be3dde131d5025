"""File helpers shared by every phase.

* atomic writes (:func:`atomic_path`, :func:`atomic_dir`, :func:`save_torch_atomic`,
  :func:`write_text_atomic`): nothing half-written is ever left at the final path;
* :func:`load_torch_file`: the one way to read a ``.pt`` file (``weights_only=True``, a one-line
  :class:`~robustmedseg.errors.InputError` naming the file when it is missing or unreadable);
* :func:`strip_module_prefix`: state-dict keys without DataParallel's ``module.`` prefix.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` keeps its old content.
    ``suffix`` lets writers that infer the format from the extension (``np.savez`` adds
    ``.npz``, nibabel looks at ``.nii.gz``) see the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; move it to ``path`` on success.

    If ``path`` exists and ``overwrite`` is False, :class:`FileExistsError` is raised
    before anything is written.  With ``overwrite`` the old folder is replaced only after
    the new one is complete.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; give the folder ordinary permissions
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch_atomic(obj, path: PathLike) -> None:
    """``torch.save`` through a temporary file and rename."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def load_torch_file(path: PathLike, what: str = "file", mapping: bool = False) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)``; never unpickles code.

    ``what`` names the file in the messages (e.g. ``"phase-2 checkpoint"``).  A missing file, a
    corrupt or foreign pickle, or (with ``mapping``) content that is not a dict is an
    :class:`~robustmedseg.errors.InputError` naming the file, in one line.
    """
    import torch

    from robustmedseg.errors import InputError

    if not os.path.isfile(path):
        raise InputError(f"{what} not found", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad or foreign file
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise InputError(f"cannot read {what} ({type(err).__name__}: {first})", path) from None
    if mapping and not isinstance(payload, Mapping):
        raise InputError(f"{what} is not a dict payload", path)
    return payload


def strip_module_prefix(state: Mapping[str, Any]) -> Dict[str, Any]:
    """Remove a DataParallel ``module.`` prefix from every key that has it."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
