"""The one .npz reader (data files, the shipped digits, checkpoints, the board's uploads): arrays only, never
pickle, and every member read checked against its .npy header and the memory budget (edgetrain.limits)
before NumPy allocates it. It does not go through np.load, whose errors suggest allow_pickle=True.

Each failure is one NpzError whose `kind` the caller words for its own users (a data source, a checkpoint,
an upload); `describe` is the data sources' wording.
"""
from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence

import numpy as np

from edgetrain import limits
from edgetrain.errors import ResourceLimitError

NPY_SUFFIX = ".npy"
NPY_MAGIC = b"\x93NUMPY"
PICKLE_PROTO = b"\x80"  # the first byte of every pickle since protocol 2
NEVER_UNPICKLED = "pickles are never loaded"
SUPPORTED_NPY_VERSIONS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
# NumPy's own words for an object array under allow_pickle=False, which users may already know.
OBJECT_REFUSED = "Object arrays cannot be loaded when allow_pickle=False"
# What went wrong, for the caller's wording:
SINGLE_NPY = "single_npy"  # one .npy array, not an archive
UNREADABLE = "unreadable"  # not a zip, truncated, corrupt (detail: the first line of the parser's error)
NOT_NPY = "not_npy"  # a member that is not a .npy array (member); strict: also by its name
DUPLICATE = "duplicate"  # strict: two members of one name
MISSING = "missing"  # required keys absent (missing, files)
OBJECT = "object"  # an object array, which only pickle could read (member)
VERSION = "version"  # a .npy format version NumPy may not parse safely (member)
SIZE = "size"  # a member's size does not match its header: truncated or corrupt (member)
TOO_LARGE = "too_large"  # a member above the caller's limit, refused before decompressing (member)


class NpzError(Exception):
    """Why an .npz could not be read; see the kinds above. key/member: the array concerned, if one."""

    def __init__(self, kind: str, detail: str, *, key: str | None = None, missing: Sequence[str] = (),
                 files: Sequence[str] = ()):
        super().__init__(detail)
        self.kind, self.detail, self.key = kind, detail, key
        self.member = None if key is None else key if key.endswith(NPY_SUFFIX) else key + NPY_SUFFIX
        self.missing, self.files = tuple(missing), tuple(files)

    def describe(self, archive: str = "an .npz archive") -> str:
        """The data sources' wording; archive: what a single .npy was expected to be."""
        if self.kind == SINGLE_NPY:
            return f"holds a single .npy array, expected {archive}"
        if self.kind == MISSING:
            return f"missing array(s) {', '.join(self.missing)} (has {', '.join(self.files) or 'none'})"
        if self.kind in (NOT_NPY, TOO_LARGE):
            return self.detail if self.kind == NOT_NPY else f"array {self.key} {self.detail}"
        return f"not a readable .npz file ({self.detail})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _first_bytes(source: str | os.PathLike | io.BytesIO, n: int = 8) -> bytes:
    if isinstance(source, io.BytesIO):
        return source.getvalue()[:n]
    with open(source, "rb") as f:
        return f.read(n)


def _not_an_archive(head: bytes) -> NpzError:
    """Why a file that is not a zip is refused, from its first bytes (NumPy's own hints never reach users)."""
    if head.startswith(NPY_MAGIC):
        return NpzError(SINGLE_NPY, "a single .npy array, not an .npz archive")
    if head[:1] == PICKLE_PROTO:
        return NpzError(UNREADABLE, f"a Python pickle, not an .npz archive; {NEVER_UNPICKLED}")
    return NpzError(UNREADABLE, "not a zip archive")


def _check_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, max_bytes: int | None,
                  tally: limits.Tally, where: str) -> None:
    """Refuse a member before NumPy allocates it: not a .npy, a claimed size over max_bytes or the memory
    budget (from its header, before reading the data), object dtype, or a size its header does not explain."""
    if max_bytes is not None and info.file_size > max_bytes:
        raise NpzError(TOO_LARGE, f"unpacks to {info.file_size} bytes, above {max_bytes}", key=key)
    with zf.open(info) as f:
        head = f.read(len(NPY_MAGIC))
        if head != NPY_MAGIC:
            what = f"a Python pickle, not a .npy array; {NEVER_UNPICKLED}" if head[:1] == PICKLE_PROTO else \
                "not a .npy array"
            raise NpzError(NOT_NPY, f"member '{info.filename}' is {what}", key=key)
        version = tuple(f.read(2))
        if version not in SUPPORTED_NPY_VERSIONS:
            raise NpzError(VERSION, f"has .npy format version {version}", key=key)
        shape, _, dtype = SUPPORTED_NPY_VERSIONS[version](f)
        header_len = f.tell()
    if dtype.hasobject:
        raise NpzError(OBJECT, OBJECT_REFUSED, key=key)
    claimed = limits.nbytes(shape, dtype)
    if max_bytes is not None and claimed > max_bytes:
        raise NpzError(TOO_LARGE, f"claims {claimed} bytes, above {max_bytes}", key=key)
    tally.charge(claimed, f"{where}: member '{info.filename}' {shape} {dtype}")
    expected = header_len + claimed
    if info.file_size != expected:
        raise NpzError(SIZE, f"is {info.file_size} bytes, its header says {expected}", key=key)


def read_npz(source: str | os.PathLike | bytes, required: Sequence[str] | None = None,
             optional: Sequence[str] = (), *, strict: bool = False,
             max_member_bytes: int | None = None, where: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (a path) or blob (bytes): `required` and those of `optional` present, or
    every array when required is None. strict: every member must be a .npy array, each name once (a file
    only we write). Anything else raises NpzError; a damaged file can fail anywhere in zipfile, zlib or
    NumPy, so every parser error becomes UNREADABLE. Arrays whose headers claim more than the memory budget
    together (edgetrain.limits) raise ResourceLimitError naming `where` (default: the path) and the member,
    before their data is read. Nothing is ever unpickled (allow_pickle=False)."""
    opened = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source
    where = where or (os.fspath(source) if isinstance(opened, (str, os.PathLike)) else "<memory>")
    try:
        if not zipfile.is_zipfile(opened):
            raise _not_an_archive(_first_bytes(opened))
        zf = zipfile.ZipFile(opened)
    except NpzError:
        raise
    except Exception as exc:
        raise NpzError(UNREADABLE, _first_line(exc)) from None
    with zf:
        try:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if strict:
                odd = [n for n in names if not n.endswith(NPY_SUFFIX)]
                if odd:
                    raise NpzError(NOT_NPY, f"member '{odd[0]}' is not a .npy array", key=odd[0])
                if len(set(names)) != len(names):
                    raise NpzError(DUPLICATE, "duplicate members")
            # NumPy's NpzFile keys: a member's name without its .npy suffix
            files = [n[: -len(NPY_SUFFIX)] if n.endswith(NPY_SUFFIX) else n for n in names]
            if required is None:
                keys = list(dict.fromkeys(files))
            else:
                missing = [k for k in required if k not in files]
                if missing:
                    raise NpzError(MISSING, f"missing array(s) {', '.join(missing)}", missing=missing, files=files)
                keys = list(required) + [k for k in optional if k in files]
            by_name = {i.filename: i for i in infos}
            tally = limits.Tally()
            arrays = {}
            for key in keys:
                arrays[key] = _read_member(zf, by_name.get(key + NPY_SUFFIX) or by_name[key], key,
                                           max_member_bytes, tally, where)
            return arrays
        except (NpzError, ResourceLimitError):
            raise
        except Exception as exc:
            raise NpzError(UNREADABLE, _first_line(exc)) from None


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, max_bytes: int | None,
                 tally: limits.Tally, where: str) -> np.ndarray:
    try:
        _check_member(zf, info, key, max_bytes, tally, where)
        with zf.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (NpzError, ResourceLimitError):
        raise
    except Exception as exc:
        raise NpzError(UNREADABLE, _first_line(exc), key=key) from None
