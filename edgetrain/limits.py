"""The memory budget: how much one file may make edgetrain allocate, checked before the allocation.

A 150-byte ONNX file can fold to a 4 TiB constant, a 500-byte .npz can claim 10^12 floats in its header
and a small .gz can inflate to gigabytes. Every reader that learns a size from a file (the importer's
constant folding, declared input and value shapes, .npy headers, decompressed streams) asks `check` or
a `Tally` first, and refuses with one line naming the node, input or member when the size is over budget.

The budget, in bytes, comes from (first found wins):
  1. `set_max_memory` (the CLI's `--max-memory SIZE`, which also exports it to child processes);
  2. the environment variable EDGETRAIN_MAX_MEMORY (SIZE: bytes, or with a K/M/G/T suffix, powers of 1024);
  3. the default: half of the memory this process may use, the smallest of physical RAM, the cgroup
     limit (containers) and RLIMIT_AS (`ulimit -v`), like a JVM's container-aware default heap.
Invariant: a size that passes `check` is at most `budget().max_bytes`; a Tally's total likewise.
"""
from __future__ import annotations

import math
import os
import re
import resource
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from edgetrain.errors import ResourceLimitError

ENV_VAR = "EDGETRAIN_MAX_MEMORY"
FLAG = "--max-memory"
DEFAULT_FRACTION = 0.5  # of the memory available to the process: the rest is for the engine's own work
FALLBACK_AVAILABLE = 4 << 30  # when the platform tells us nothing about its memory
CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)

_override: int | None = None


@dataclass(frozen=True)
class Budget:
    """The byte budget in force and where it came from (for the error message)."""

    max_bytes: int
    source: str


def parse_size(text: str) -> int:
    """Bytes of a SIZE such as 1073741824, 512M, 1.5G or 2GiB (K/M/G/T are powers of 1024); ValueError if not."""
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise ValueError(f"expected a size such as 512M, 2G or a byte count, got {text!r}")
    value = float(m.group(1)) * UNITS[m.group(2).upper()]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"a memory budget must be at least 1 byte, got {text!r}")
    return int(value)


def format_size(nbytes: int) -> str:
    """A byte count for people: 3.64 TiB, 512 MiB, 100 bytes."""
    for unit, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if nbytes >= unit:
            return f"{nbytes / unit:.3g} {name}"
    return f"{nbytes} bytes"


def set_max_memory(text: str | None) -> None:
    """Set the budget for this process and its children (the CLI's --max-memory); None clears it."""
    global _override
    if text is None:
        _override = None
        return
    _override = parse_size(text)
    os.environ[ENV_VAR] = str(_override)  # a simulated board's agent inherits it


def available_memory() -> int:
    """Bytes this process may use: the smallest of physical RAM, the cgroup limit and RLIMIT_AS."""
    candidates = []
    try:
        candidates.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in CGROUP_LIMIT_FILES:
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number mean no limit
            candidates.append(int(text))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft not in (resource.RLIM_INFINITY, -1) and soft > 0:
        candidates.append(soft)
    return min(candidates) if candidates else FALLBACK_AVAILABLE


def budget() -> Budget:
    """The budget in force now (read each time, so a changed environment variable counts)."""
    if _override is not None:
        return Budget(_override, f"set by {FLAG}")
    text = os.environ.get(ENV_VAR)
    if text:
        try:
            return Budget(parse_size(text), f"set by {ENV_VAR}")
        except ValueError as exc:
            raise ResourceLimitError(f"{ENV_VAR}: {exc}") from None
    available = available_memory()
    return Budget(max(1, int(available * DEFAULT_FRACTION)),
                  f"the default: half of the {format_size(available)} this process may use")


def nbytes(shape: Iterable[int | None], dtype: np.dtype | type | str) -> int:
    """Exact bytes of an array of this shape and dtype (Python ints: no overflow); unknown dims count as 1."""
    return math.prod(max(int(d), 0) if d is not None else 1 for d in shape) * np.dtype(dtype).itemsize


def refusal(what: str, size: int, limit: Budget) -> ResourceLimitError:
    """The one-line error for `what` needing `size` bytes over `limit`."""
    return ResourceLimitError(f"{what} would need {format_size(size)}, above the memory budget of "
                              f"{format_size(limit.max_bytes)} ({limit.source}; raise it with {FLAG} or {ENV_VAR})")


def check(size: int, what: str, limit: Budget | None = None) -> None:
    """Refuse (ResourceLimitError) a single allocation of `size` bytes over the budget (`limit`, default the one
    in force now); `what` names it."""
    limit = limit or budget()
    if size > limit.max_bytes:
        raise refusal(what, size, limit)


class Tally:
    """Bytes charged so far for one file (a model's constants, an archive's members), against one budget."""

    def __init__(self) -> None:
        self.limit = budget()
        self.total = 0

    def charge(self, size: int, what: str) -> None:
        """Add `size` bytes for `what`, refusing if the file's total would pass the budget."""
        if size > self.limit.max_bytes:
            raise refusal(what, size, self.limit)
        if self.total + size > self.limit.max_bytes:
            raise refusal(f"{what}, with the {format_size(self.total)} of constants before it,", self.total + size,
                          self.limit)
        self.total += size
