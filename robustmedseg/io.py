"""File helpers shared by every phase: the one home of the output policy.

* :func:`check_apart`: an output of a command may not be, contain or lie inside one of its
  inputs (``--overwrite`` must never be able to delete an input);
* atomic writes (:func:`atomic_path`, :func:`atomic_dir`, :func:`save_torch_atomic`,
  :func:`write_text_atomic`): nothing half-written is ever left at the final path, and an
  existing output is replaced only once the new one is complete (:func:`replace_dir`);
* :func:`load_torch_file`: the one way to read a ``.pt`` file (``weights_only=True``, a one-line
  :class:`~robustmedseg.errors.InputError` naming the file when it is missing or unreadable);
* :func:`strip_module_prefix`: state-dict keys without DataParallel's ``module.`` prefix.

Temporary outputs
-----------------
A file or folder is written under a hidden temporary name next to its final path, e.g.
``.lmdb.rmstmp-new-3fa2c1-40211-9b1e0c`` for ``lmdb/``::

    .<final name>.rmstmp-<new|old>-<host>-<pid>-<random>[<suffix>]

(``new``: being written; ``old``: a previous output set aside while the new one takes its
place; ``host``: 6 hex digits of the machine name; ``pid``: the writing process).  The writer
removes it on success, on an error and on Ctrl-C, SIGTERM or SIGHUP (see
:func:`robustmedseg.errors.run_cli`).  After a SIGKILL or a power cut, the next write to the
same final path removes the temporaries of processes that no longer run on this machine
(:func:`clean_stale_temporaries`; an ``old`` one is moved back when the final path is
missing).  Readers never pick one up: hidden files and folders are ignored by every listing
of inputs (:func:`is_hidden`).

Operating-system errors met while writing (permission denied, not a folder, disk full...)
name the final output path, never the temporary one.
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

PathLike = Union[str, os.PathLike]

TEMP_TAG = "rmstmp"
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_TEMP_RE = re.compile(rf"^\.(?P<name>.+)\.{TEMP_TAG}-(?P<kind>new|old)-(?P<host>[0-9a-f]{{6}})-(?P<pid>\d+)-[0-9a-f]+")
# errors that concern the written file when the OS does not name one (write(2) on a full disk...)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


# ----------------------------------------------------------------------------- inputs vs outputs
def _resolve(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_apart(outputs: Mapping[str, Optional[PathLike]], inputs: Mapping[str, Optional[PathLike]]) -> None:
    """Refuse an output that is, contains or lies inside an input of the same command.

    ``outputs`` and ``inputs`` map the flag that gave a path (``"--out"``) to the path (None:
    not given).  Paths are compared after resolving symbolic links.  One-line
    :class:`~robustmedseg.errors.InputError` naming the output.
    """
    from robustmedseg.errors import InputError

    for out_flag, out in outputs.items():
        if out is None:
            continue
        o = _resolve(out)
        for in_flag, src in inputs.items():
            if src is None:
                continue
            i = _resolve(src)
            if o == i:
                how = "is"
            elif o in i.parents:
                how = "contains"
            elif i in o.parents:
                how = "lies inside"
            else:
                continue
            raise InputError(f"{out_flag} {how} the input {in_flag} {src}: an output must be apart from every "
                             "input (it could be replaced or deleted)", out)


def is_hidden(path: PathLike, root: PathLike) -> bool:
    """True when ``path`` or one of its folders below ``root`` starts with '.' (temporaries are hidden)."""
    rel = Path(path).relative_to(root)
    return any(part.startswith(".") for part in rel.parts)


# ----------------------------------------------------------------------------- temporaries
def temp_sibling(path: PathLike, kind: str = "new", suffix: str = "") -> Path:
    """A fresh temporary name next to ``path`` (see the module doc); nothing is created."""
    path = Path(path)
    return path.with_name(f".{path.name}.{TEMP_TAG}-{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(3)}{suffix}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def clean_stale_temporaries(path: PathLike) -> List[Path]:
    """Remove the temporaries of ``path`` left by dead processes of this machine; return them.

    A leftover ``old`` folder (a previous output set aside during a replacement) is moved back
    to ``path`` when ``path`` is missing, so a replacement killed half-way loses nothing.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    prefix = f".{path.name}.{TEMP_TAG}-"
    stale = []
    for name in names:
        if not name.startswith(prefix):
            continue
        match = _TEMP_RE.match(name)
        if match is None or match.group("name") != path.name or match.group("host") != _HOST:
            continue
        if _pid_alive(int(match.group("pid"))):
            continue
        stale.append((match.group("kind"), parent / name))
    removed = []
    for kind, leftover in sorted(stale, key=lambda kp: kp[0] != "old"):  # put an 'old' back first
        if kind == "old" and not os.path.lexists(path):
            try:
                os.rename(leftover, path)
            except OSError:
                pass  # never delete a previous output that could not be put back
            continue
        _remove(leftover)
        removed.append(leftover)
    return removed


def check_parents(path: PathLike) -> None:
    """One-line error when a folder above ``path`` is a file (checked before any work, nothing created)."""
    from robustmedseg.errors import InputError

    path = Path(path)
    for ancestor in path.absolute().parents:
        if ancestor.is_dir():
            return
        if os.path.lexists(ancestor):
            raise InputError(f"cannot create it: {ancestor} is a file, not a folder", path)


def _prepare_parent(path: Path) -> None:
    """Create the folders above ``path``; one-line error when one of them is a file."""
    check_parents(path)
    path.parent.mkdir(parents=True, exist_ok=True)


def _named(err: OSError, tmp: Path, final: Path) -> OSError:
    """``err`` with the temporary path replaced by the final one (or the final one added)."""
    name = err.filename
    reason = err.strerror or " ".join(str(err).split()) or type(err).__name__
    if name is None:
        # the OS names no file: a failed write(2) (full disk, file-size limit, numpy's "N requested and M
        # written"); a compressed input that is corrupt also names none, but inputs are read through
        # InputError-raising readers, so here it concerns the output
        if err.errno not in _WRITE_ERRNOS and (err.errno is not None or isinstance(err, gzip.BadGzipFile)):
            return err
        if err.errno is None:
            reason = f"write failed ({reason}): disk full or file-size limit?"
        name = str(final)
    name = str(name)
    if name == str(tmp) or name.startswith(str(tmp) + os.sep):
        name = str(final) + name[len(str(tmp)):]
    if name == err.filename:
        return err
    new = type(err)(err.errno, reason, name)
    new.__cause__ = err
    return new


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` keeps its old content.
    ``suffix`` lets writers that infer the format from the extension (``np.savez`` adds
    ``.npz``, nibabel looks at ``.nii.gz``) see the right one.
    """
    from robustmedseg.errors import InputError

    path = Path(path)
    if path.is_dir():
        raise InputError("is a folder; a file path is expected here", path)
    _prepare_parent(path)
    clean_stale_temporaries(path)
    tmp = temp_sibling(path, "new", suffix or ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise _named(err, tmp, path) from None
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def replace_dir(new: PathLike, path: PathLike) -> None:
    """Move the complete folder ``new`` to ``path``, replacing an existing ``path`` only now.

    The old folder is renamed aside (an ``old`` temporary), ``new`` takes its place, then the
    old one is deleted; a failed rename puts the old one back.
    """
    new, path = Path(new), Path(path)
    if not os.path.lexists(path):
        os.rename(new, path)
        return
    old = temp_sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        raise
    _remove(old)


def check_new_output(path: PathLike, overwrite: bool) -> None:
    """The rule for an output folder: refused when it exists unless ``overwrite``, and then it must
    be a folder (one-line :class:`~robustmedseg.errors.InputError`)."""
    from robustmedseg.errors import InputError

    path = Path(path)
    if os.path.lexists(path):
        if not overwrite:
            raise InputError("output already exists (pass --overwrite to replace it)", path)
        if not path.is_dir():
            raise InputError("output exists and is not a folder", path)
    check_parents(path)


@contextlib.contextmanager
def atomic_dir(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; move it to ``path`` on success.

    If ``path`` exists and ``overwrite`` is False, a one-line
    :class:`~robustmedseg.errors.InputError` is raised before anything is written.  With
    ``overwrite`` the old folder is replaced only after the new one is complete
    (:func:`replace_dir`).  The temporary folder is removed on any error or interruption.
    """
    path = Path(path)
    check_new_output(path, overwrite)
    _prepare_parent(path)
    clean_stale_temporaries(path)
    tmp = temp_sibling(path, "new")
    try:
        tmp.mkdir()
        yield tmp
        replace_dir(tmp, path)
    except OSError as err:
        raise _named(err, tmp, path) from None
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def save_torch_atomic(obj, path: PathLike) -> None:
    """``torch.save`` through a temporary file and rename (a failed write names ``path``)."""
    import torch

    with atomic_path(path) as tmp:
        # created here first, so that a folder we may not write in (read-only mount, immutable folder) is an
        # OSError naming the file, not the RuntimeError torch's zip writer raises for a failed open
        open(tmp, "xb").close()
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch's zip writer reports a full disk as a RuntimeError
            if "write" not in str(err).lower() and "open file failed" not in str(err):
                raise
            raise OSError(errno.EIO, f"cannot write the file ({' '.join(str(err).split())[-120:]})",
                          str(path)) from None


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

    if os.path.isdir(path):
        raise InputError(f"is a folder; expected a {what}", path)
    if not os.path.isfile(path):
        raise InputError(f"{what} not found", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad or foreign file
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise InputError(f"cannot read {what} ({type(err).__name__}: {first})", path) from None
    if mapping and not isinstance(payload, Mapping):
        raise InputError(f"{what} is not a dict payload", path)
    bad = first_nonfinite(payload)
    if bad is not None:
        raise InputError(f"{what} holds NaN or inf values (in {bad}): a diverged or corrupt run", path)
    return payload


def first_nonfinite(obj: Any, where: str = "") -> Optional[str]:
    """Key path of the first floating-point tensor holding NaN or inf in a nested dict/list, else None."""
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
            return where or "the tensor"
        return None
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = first_nonfinite(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def strip_module_prefix(state: Mapping[str, Any]) -> Dict[str, Any]:
    """Remove a DataParallel ``module.`` prefix from every key that has it."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
