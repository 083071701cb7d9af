"""Files we write are never half-written: temporary file in the same folder, fsync, rename.

Every write edgetrain makes goes through here, so every failure (a read-only or missing folder, a full
disk, a folder where a file was meant) reaches the user as one WriteError line naming the path.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from edgetrain.errors import OutputError

FILE_MODE = 0o644


class WriteError(OutputError):
    """A file or folder edgetrain had to write could not be written (an OutputError, named for the path)."""


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or str(exc)


def write_error(path: str | os.PathLike, exc: OSError, what: str = "cannot write") -> WriteError:
    """The one-line error for an OSError met while writing path."""
    return WriteError(f"{os.fspath(path)}: {what} ({_reason(exc)})")


def check_file_target(path: str | os.PathLike) -> str:
    """Refuse a path that cannot name a file we write: empty, a folder, or in a folder that does not exist."""
    path = os.fspath(path)
    if not path:
        raise WriteError("an empty path names no file")
    if os.path.isdir(path):
        raise WriteError(f"{path}: is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise WriteError(f"{path}: folder {folder} does not exist")
    return path


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in folder durable (best effort: not every OS lets us open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_with(path: str | os.PathLike, writer: Callable[[BinaryIO], None]) -> None:
    """Let writer fill a temporary file beside path, then rename it over path; OSError -> WriteError."""
    path = check_file_target(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise write_error(path, exc) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to path so that readers see the old file or the whole new one, nothing between."""
    write_with(path, lambda f: f.write(data))


def make_folder(path: str | os.PathLike) -> None:
    """Create a folder and its parents (fine if it exists); OSError -> WriteError naming it."""
    path = os.fspath(path)
    if not path:
        raise WriteError("an empty path names no folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise WriteError(f"{path}: exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc, "cannot create the folder") from None
