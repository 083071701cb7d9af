"""The run's JSON-lines log (run_dir/log.jsonl): one object per step and one per evaluation."""
from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgetrain.fileio import write_atomic, write_error
from edgetrain.precision.spec import LayerPrecision

LOG_NAME = "log.jsonl"


def precision_summary(precision: Mapping[str, LayerPrecision]) -> str:
    """Bit-widths in force, most common first: '8/8 x4, fp32 x1'."""
    counts = Counter(str(p) for p in precision.values())
    return ", ".join(f"{spec} x{n}" for spec, n in counts.most_common()) or "no MAC layers"


class RunLog:
    """Appends JSON objects, one a line; reopening for a resume drops what came after the checkpoint."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(run_dir) / LOG_NAME
        self.kept: list[dict[str, Any]] = []  # entries of the run before the resume
        if resume_step is None:
            write_atomic(self.path, b"")
        else:
            self._truncate_after(resume_step)
        # The per-layer precision last written: "layers" entries appear only when it changes.
        self.last_layers: dict[str, str] | None = next(
            (e["layers"] for e in reversed(self.kept) if e.get("type") == "layers"), None)
        try:
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def _truncate_after(self, step: int) -> None:
        # A killed run logged steps past its last checkpoint; the resumed run logs them again.
        lines: list[str] = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # the half-written last line of a killed run
                if isinstance(entry, dict) and entry.get("step", 0) <= step:
                    lines.append(line)
                    self.kept.append(entry)
        write_atomic(self.path, "".join(k + "\n" for k in lines).encode())

    def logged_evals(self) -> set[int]:
        """Steps whose evaluation the log already holds (from before a resume)."""
        return {e["step"] for e in self.kept if e.get("type") == "eval"}

    def write(self, entry: Mapping[str, Any]) -> None:
        """Append one entry and flush, so a killed run leaves every finished step on disk."""
        try:
            self._file.write(json.dumps(entry, allow_nan=True) + "\n")
            self._file.flush()
        except OSError as exc:  # a full disk: one line naming the log, not a traceback
            raise write_error(self.path, exc) from None

    def close(self) -> None:
        """Close the file (a flush that fails here was reported by write already)."""
        with contextlib.suppress(OSError):
            self._file.close()


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every entry of a log file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
