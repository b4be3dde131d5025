"""The memory allocator of the processes a run starts (``--allocator``, ``RMS_ALLOCATOR``).

Training on a CPU at the demo's sizes spends a large part of each step outside arithmetic: every op of an
eager PyTorch step allocates and frees its output and autograd's bookkeeping, hundreds of times per update.
glibc's ``malloc`` serves those requests more slowly than a thread-caching allocator; preloading TCMalloc
(Debian/Ubuntu package ``libtcmalloc-minimal4``) or jemalloc (``libjemalloc2``) made the demo's data-factory
node update 1.15-1.35x faster here, with bit-identical results (BENCHMARKS.md, "The memory allocator";
``python -m bench.bench_allocator``). An allocator can only be chosen when a process starts, so it is given
to the commands a run launches, through ``LD_PRELOAD`` in their environment (:func:`allocator_env`).

Choices: ``auto`` (the first of :data:`CANDIDATES` found on this machine, else the system's), ``system``
(glibc's ``malloc``: nothing preloaded), or the path of a shared library. ``RMS_ALLOCATOR`` sets the
choice where no flag is given.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

from robustmedseg.errors import InputError

#: libraries tried by ``auto``, in order (file names as the Debian/Ubuntu packages install them)
CANDIDATES: Sequence[str] = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2")
#: where those packages put them
SEARCH_DIRS: Sequence[str] = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                              "/usr/local/lib")
ENV_VAR = "RMS_ALLOCATOR"
#: the short names of the allocators this module knows, as they appear in a library's file name
KNOWN: Sequence[str] = ("tcmalloc", "jemalloc")
#: TCMalloc prints a line for every allocation above 1 GiB by default (a paper-size batch makes several)
QUIET_TCMALLOC = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def find_library(name: str) -> Optional[Path]:
    """The path of a shared library file name such as ``libjemalloc.so.2``, or None."""
    for folder in SEARCH_DIRS:
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    return None


def short_name(text: str) -> Optional[str]:
    """The known allocator named in ``text`` (a library's file name, a memory map), or None."""
    return next((short for short in KNOWN if short in text), None)


def resolve(choice: Optional[str] = None) -> Optional[Path]:
    """The library to preload for ``choice`` (``auto`` / ``system`` / a path; None: ``$RMS_ALLOCATOR`` or
    ``auto``); None means the system allocator. A path that is not a file is an :class:`InputError`."""
    choice = (choice if choice is not None else os.environ.get(ENV_VAR, "auto")).strip() or "auto"
    if choice == "system":
        return None
    if choice == "auto":
        for name in CANDIDATES:
            path = find_library(name)
            if path is not None:
                return path
        return None
    path = Path(choice)
    if not path.is_file():
        raise InputError(f"--allocator: no such shared library (use auto, system or the path of "
                         f"libtcmalloc_minimal.so.4 / libjemalloc.so.2)", path)
    return path


def allocator_env(env: Mapping[str, str], choice: Optional[str] = None) -> Dict[str, str]:
    """``env`` with the chosen allocator preloaded (prepended to any ``LD_PRELOAD`` already there) and its
    choice recorded in ``RMS_ALLOCATOR`` for the processes that those start in turn. ``choice`` None: the
    ``RMS_ALLOCATOR`` of ``env``, else ``auto``."""
    out = dict(env)
    lib = resolve(choice if choice is not None else env.get(ENV_VAR, "auto"))
    out[ENV_VAR] = "system" if lib is None else str(lib)
    if lib is None:
        return out
    preload = [p for p in out.get("LD_PRELOAD", "").split(":") if p and p != str(lib)]
    out["LD_PRELOAD"] = ":".join([str(lib), *preload])
    if short_name(lib.name) == "tcmalloc":
        for key, value in QUIET_TCMALLOC.items():
            out.setdefault(key, value)
    return out


def describe(choice: Optional[str] = None) -> str:
    """One word for logs: ``tcmalloc``, ``jemalloc``, ``system`` or the library's file name."""
    lib = resolve(choice)
    if lib is None:
        return "system"
    return short_name(lib.name) or lib.name


def loaded_in_this_process() -> str:
    """Which allocator this process runs with (read from its memory map): ``tcmalloc``, ``jemalloc`` or
    ``system``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return short_name(maps) or "system"
