"""argparse value types shared by every edgetrain command line: a number in a range, or a clear refusal.

Floats are finite: no setting means anything at inf or NaN, and a value that would not serialise into a run's
config and checkpoints must be refused before the run starts, not when it first saves.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def bounded(kind: type, what: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: kind(text) within [low, high] (open ends where asked); the message says `what`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = math.isfinite(value)
        if low is not None:
            ok = ok and (value > low if low_open else value >= low)
        if high is not None:
            ok = ok and (value < high if high_open else value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


POSITIVE_INT = bounded(int, "a positive integer", low=1)
NON_NEGATIVE_INT = bounded(int, "an integer >= 0", low=0)
FINITE_FLOAT = bounded(float, "a finite number")
NON_NEGATIVE_FLOAT = bounded(float, "a number >= 0", low=0.0)
POSITIVE_SECONDS = bounded(float, "a positive number of seconds", low=0.0, low_open=True, high=math.inf,
                           high_open=True)
PROBABILITY = bounded(float, "a probability in [0, 1)", low=0.0, high=1.0, high_open=True)


def comma_list(kind: Callable[[str], object], what: str) -> Callable[[str], list]:
    """An argparse type: comma-separated values of kind, at least one, none empty ('3/6,,4/6' and ',' refused)."""
    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if not any(parts) or not all(parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        try:
            return [kind(part) for part in parts]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    return parse


def path_text(what: str) -> Callable[[str], str]:
    """An argparse type: a path, refusing '' (which would quietly mean the current folder)."""
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return text
    return parse


def memory_size(text: str) -> str:
    """An argparse type: a byte count with an optional K/M/G/T suffix (edgetrain.limits), kept as given."""
    from edgetrain import limits

    try:
        limits.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
