"""The agent's content-addressed blob cache: models and data sets named by their SHA-256.

File names are built only from a validated 64-hex-digit hash and a suffix from a fixed table,
never from anything else a peer sends, so nothing can be written outside the cache folder.
Writes are atomic (temporary file in the folder, fsync, rename); reads are re-hashed, and a file
whose content no longer matches its name is deleted rather than trusted.

An upload is spooled to a temporary file in the folder as its chunks arrive and hashed on the
way (`Upload`), so the agent holds no more than a chunk of it in memory until the commit, and
the verified file is renamed into place rather than copied.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from edgetrain.fileio import fsync_dir, write_atomic
from firmware_bridge.wire.errors import ProtocolError
from firmware_bridge.wire.messages import BLOB_FORMATS, MAX_BLOB_SIZE, BlobAssembler, Chunk

__all__ = ["BlobCache", "CacheError", "Upload", "default_cache_dir"]

SUFFIXES = {fmt: f".{fmt}" for fmt in BLOB_FORMATS}
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# write_atomic's temporary files: ".<final name>.<random>.tmp"; uploads' spools: ".upload.<random>.tmp".
_STALE_TEMP = re.compile(r"\.([0-9a-f]{64}\.[a-z]+|upload)\..+\.tmp")
_SPOOL_PREFIX, _SPOOL_SUFFIX = ".upload.", ".tmp"


class CacheError(ValueError):
    """A hash or format that cannot name a cache entry."""


def default_cache_dir() -> Path:
    """Return $XDG_CACHE_HOME/edgetrain-agent (~/.cache/edgetrain-agent by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgetrain-agent"


class BlobCache:
    """Verified blobs in one folder, each named `<sha256 hex>.<format>`."""

    def __init__(self, root: str | os.PathLike[str], *, max_blob: int = MAX_BLOB_SIZE) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_blob = max_blob
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        # A crash mid-write leaves a temporary file behind; the final name never existed half-written.
        for entry in self.root.iterdir():
            if _STALE_TEMP.fullmatch(entry.name) and entry.is_file():
                with contextlib.suppress(OSError):
                    entry.unlink()

    def path(self, sha256: str, fmt: str) -> Path:
        """Return the file that holds blob `sha256` of format `fmt`; raise CacheError for bad names."""
        if not isinstance(sha256, str) or not _SHA256_HEX.fullmatch(sha256):
            raise CacheError(f"not a SHA-256 hex digest: {sha256!r}")
        if fmt not in SUFFIXES:
            raise CacheError(f"unknown blob format {fmt!r}")
        path = self.root / f"{sha256}{SUFFIXES[fmt]}"
        # Belt and braces: the name pattern already rules out separators and "..".
        if path.parent != self.root:
            raise CacheError(f"{path} is outside the cache")
        return path

    def read_verified(self, sha256: str, fmt: str) -> bytes | None:
        """Return the blob if cached and its content still hashes to its name; None otherwise."""
        path = self.path(sha256, fmt)
        try:
            if not path.is_file() or path.stat().st_size > self.max_blob:
                return None
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            with contextlib.suppress(OSError):
                path.unlink()  # corrupted on disk: forget it so the host uploads it again
            return None
        return data

    def has(self, sha256: str, fmt: str) -> int | None:
        """Return the verified blob's size if cached, else None."""
        data = self.read_verified(sha256, fmt)
        return None if data is None else len(data)

    def put(self, sha256: str, fmt: str, blob: bytes) -> Path:
        """Store a blob the caller has verified against `sha256`, atomically."""
        path = self.path(sha256, fmt)
        if len(blob) > self.max_blob:
            raise CacheError(f"blob of {len(blob)} bytes exceeds the cache limit of {self.max_blob}")
        write_atomic(path, blob)
        return path

    def free_bytes(self) -> int | None:
        """Return the bytes free to this user on the cache's file system, or None if it cannot be read."""
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return None

    def begin_upload(self, total: int) -> Upload:
        """Start spooling a blob of `total` bytes into a temporary file in the cache folder."""
        if total > self.max_blob:
            raise CacheError(f"blob of {total} bytes exceeds the cache limit of {self.max_blob}")
        return Upload(self.root, total)

    def adopt(self, sha256: str, fmt: str, spooled: Path) -> Path:
        """Move a finished, verified upload into place under its hash."""
        path = self.path(sha256, fmt)
        os.replace(spooled, path)
        fsync_dir(self.root)
        return path


class Upload:
    """A blob arriving in order, chunk by chunk, written to a spool file and hashed as it comes."""

    def __init__(self, folder: Path, total: int) -> None:
        self.total = total
        fd, name = tempfile.mkstemp(prefix=_SPOOL_PREFIX, suffix=_SPOOL_SUFFIX, dir=folder)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._sha = hashlib.sha256()
        # The wire's own assembler checks order, overlaps and totals; its data goes to the spool, not to memory.
        self._assembler = BlobAssembler(total, sink=self._spool)

    def _spool(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)

    @property
    def done(self) -> bool:
        """Return True once every byte has arrived."""
        return self._assembler.done

    def add(self, chunk: Chunk) -> None:
        """Append `chunk`, refusing gaps, overlaps, overruns and a changed total."""
        if chunk.total != self.total:
            raise ProtocolError(f"chunk says the blob is {chunk.total} bytes, earlier chunks said {self.total}")
        self._assembler.add(chunk)

    def finish(self) -> str:
        """Flush the spool to disk and return the SHA-256 of what arrived."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._sha.hexdigest()

    def discard(self) -> None:
        """Close and remove the spool (an abandoned or refused upload)."""
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
