"""Fake sysfs/procfs trees for telemetry tests: the files a board would have, below a temporary root."""

from __future__ import annotations

from pathlib import Path


def make_tree(root: Path, files: dict[str, str | int]) -> Path:
    """Write a fake sysfs tree: absolute-looking paths below `root`, one value per file."""
    for relative, value in files.items():
        path = root / relative.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    return root
