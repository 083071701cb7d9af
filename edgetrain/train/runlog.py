"""The run's JSON-lines log (run_dir/log.jsonl): one object per step and one per evaluation."""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgetrain.errors import EdgetrainError, EdgetrainWarning
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
            for line, entry in parse_log(self.path):
                if entry.get("step", 0) <= step:
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


class LogError(EdgetrainError):
    """A log.jsonl line that is not what edgetrain writes (not JSON, or a field of the wrong type)."""


class TruncatedLogWarning(EdgetrainWarning):
    """The log's last line is half-written (a killed run); it is skipped."""


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


# The fields readers use, per entry type, and what each must be; other fields and types are left alone.
ENTRY_FIELDS: dict[str, dict[str, tuple[str, Callable[[Any], bool]]]] = {
    "step": {"loss": ("a number", _number), "percent_of_fp32": ("a number", _number)},
    "eval": {"accuracy": ("a number", _number)},
    "layers": {"layers": ("a table of layer = \"bits\"", lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(b, str) for k, b in v.items()))},
}
OPTIONAL_NUMBERS = ("dfq_percent", "dfq_target", "loss", "lr", "time")


def _check_entry(entry: Any) -> str | None:
    """What is wrong with one parsed line, or None."""
    if not isinstance(entry, dict):
        return f"expected a JSON object, got {type(entry).__name__}"
    step = entry.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"'step' must be an integer >= 0, got {json.dumps(step)}"
    for name, (want, ok) in ENTRY_FIELDS.get(entry.get("type"), {}).items():
        if name not in entry or not ok(entry[name]):
            return f"'{name}' must be {want}, got {json.dumps(entry.get(name))}"
    for name in OPTIONAL_NUMBERS:
        if name in entry and not _number(entry[name]):
            return f"'{name}' must be a number, got {json.dumps(entry[name])}"
    return None


def parse_log(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """(line, entry) of every line of a log file, each checked (ENTRY_FIELDS).

    A half-written last line (no newline after it: a run killed mid-write) is skipped with a
    TruncatedLogWarning; anything else that is not a whole, well-typed entry raises LogError naming the
    file and line.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise LogError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        number = exc.object[: exc.start].count(b"\n") + 1
        raise LogError(f"{path}: line {number}: not UTF-8 text") from None
    lines = text.split("\n")
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = number == len(lines)  # the text after the final newline: what a killed writer left
        try:
            entry = json.loads(line)
        except ValueError as exc:
            if last:
                warnings.warn(f"{path}: line {number} is half-written (a run stopped mid-write); skipped",
                              TruncatedLogWarning, stacklevel=2)
                continue
            raise LogError(f"{path}: line {number}: not JSON ({exc.msg}, column {exc.colno})") from None
        problem = _check_entry(entry)
        if problem:
            raise LogError(f"{path}: line {number}: {problem}")
        out.append((line, entry))
    return out


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every entry of a log file (see parse_log)."""
    return [entry for _, entry in parse_log(path)]
