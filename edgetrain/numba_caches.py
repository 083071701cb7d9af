"""Numba's on-disk caches beside the sources, dropped when the source of any module that uses Numba changes.

Numba keys a cached function on its own file's timestamp only. A cached kernel that calls a compiled
function of another module keeps that function's old code after the other module changes: after an edit
of `kernels/extrema.py`'s `fold`, the quantiser's cached caller still ran the old `fold`, and after an
edit and a revert of the quantiser a cached caller of one of its parallel kernels crashed the process. A
checkout or pull that changes one kernel module of an editable install would leave callers elsewhere on
stale code, silently.

So before any kernel module is imported (`edgetrain/__init__.py`), `refresh` fingerprints the sources of
every module of the package that mentions Numba (path, size and modification time), and when that
differs from the fingerprint the caches were built with, removes the package's cache files
(`__pycache__/*.nbi`, `*.nbc`) and records the new one. An installed release is never affected (its
files are written anew together), nor are caches Numba keeps elsewhere (`NUMBA_CACHE_DIR`, or its
per-user directory when the package's folder is read-only): those are left to Numba. Concurrent
processes take a lock for the check, so none removes a file another has just written and is loading.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: the check runs without the lock
    fcntl = None

PACKAGE = Path(__file__).resolve().parent
STAMP = "numba-sources.sha256"  # in the package's __pycache__: the fingerprint the caches were built with
CACHE_SUFFIXES = (".nbi", ".nbc")


def fingerprint(root: Path) -> str:
    """The hash of (relative path, size, modification time) of every .py file under root that mentions numba."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        try:
            if b"numba" not in path.read_bytes():
                continue
            st = path.stat()
        except OSError:
            continue
        h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _drop_caches(root: Path) -> int:
    """Remove every Numba cache file in the __pycache__ folders under root; how many went."""
    removed = 0
    for folder in root.rglob("__pycache__"):
        for path in folder.iterdir():
            if path.suffix in CACHE_SUFFIXES:
                try:
                    path.unlink()
                    removed += 1
                except OSError:
                    pass
    return removed


def refresh(root: Path = PACKAGE) -> bool:
    """Drop root's Numba caches if its Numba-using sources changed since they were built; True if dropped.
    Does nothing (False) where root's __pycache__ cannot be written."""
    cache = root / "__pycache__"
    try:
        cache.mkdir(exist_ok=True)
        lock = open(cache / (STAMP + ".lock"), "a")
    except OSError:
        return False
    with lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = cache / STAMP
        current = fingerprint(root)
        try:
            if stamp.read_text().strip() == current:
                return False
        except OSError:
            pass  # no fingerprint yet: caches of unknown origin
        _drop_caches(root)
        partial = stamp.with_suffix(".tmp")
        try:
            partial.write_text(current + "\n")
            os.replace(partial, stamp)
        except OSError:
            pass
        return True
