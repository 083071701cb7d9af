"""Small helpers for reading sysfs-style trees that may be rooted anywhere (tests use tmp dirs)."""

from __future__ import annotations

import re
from pathlib import Path

_DIGITS = re.compile(r"(\d+)")


def under(root: str | Path, path: str) -> Path:
    """Return absolute `path` re-rooted below `root`."""
    return Path(root) / path.lstrip("/")


def natural_key(name: str) -> list[object]:
    """Sort key that puts thermal_zone2 before thermal_zone10."""
    return [int(part) if part.isdigit() else part for part in _DIGITS.split(name)]


def glob_sorted(base: Path, pattern: str) -> list[Path]:
    """Return the matches of `pattern` below `base`, in natural order."""
    if not base.is_dir():
        return []
    return sorted(base.glob(pattern), key=lambda p: [natural_key(part) for part in p.relative_to(base).parts])


def read_text(path: Path) -> str | None:
    """Return the stripped contents of `path`, or None if it cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors="strict").strip()
    except (OSError, UnicodeDecodeError):
        # sysfs attributes of a powered-down sensor fail with EINVAL/ENODATA/EAGAIN.
        return None


def read_int(path: Path) -> int | None:
    """Return the integer in `path` (ignoring a trailing unit word), or None."""
    text = read_text(path)
    if not text:
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None
