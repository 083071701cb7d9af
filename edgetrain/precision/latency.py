"""Measured per-layer latency as DFQ's cost: the table `edgetrain profile --latency-table` writes.

    {"<layer>": {"<precision>": {"forward_s": 0.00012, "backward_s": 0.00034}}}

A layer's cost at a precision is its forward plus backward seconds per profiled step. With such a
table DFQ's cost target means a share of the board's fp32 training time of the gated layers
instead of a share of their BitOPs, so every gated layer needs an entry at each candidate's
precision and at fp32.
"""
from __future__ import annotations

import json
import math
import os

from edgetrain.errors import EdgetrainError
from edgetrain.precision.spec import parse_precision


def _canonical(where: str, layer: str, precision: str) -> str:
    """One spelling per precision ("4/8:w4" and "4/8" are the same), as str(LayerPrecision) writes it."""
    try:
        return str(parse_precision(precision))
    except EdgetrainError:
        raise EdgetrainError(f"{where}: layer '{layer}': '{precision}' is not a precision "
                             "(FW/BW[:wW] or fp32)") from None


def read_cost_table(path: str | os.PathLike, backward_share: float = 1.0) -> dict[str, dict[str, float]]:
    """{layer: {precision: seconds per step}} from a latency-table file; one-line errors name the entry.
    backward_share: the share of the samples whose backward an integer layer runs (DFQConfig.backward_share),
    which scales its backward seconds; fp32, the reference, keeps its own whole."""
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise EdgetrainError(f"{where}: no such latency table") from None
    except (OSError, ValueError) as exc:
        raise EdgetrainError(f"{where}: not a readable latency table ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise EdgetrainError(f"{where}: a latency table is a JSON object {{layer: {{precision: ...}}}}")
    table: dict[str, dict[str, float]] = {}
    for layer, entries in raw.items():
        if not isinstance(entries, dict):
            raise EdgetrainError(f"{where}: layer '{layer}' must map precisions to timings")
        row = {}
        for precision, times in entries.items():
            if not isinstance(times, dict) or not isinstance(times.get("forward_s"), (int, float)):
                raise EdgetrainError(f"{where}: '{layer}' at '{precision}' needs a number 'forward_s'")
            back = times.get("backward_s") or 0.0
            if not isinstance(back, (int, float)):
                raise EdgetrainError(f"{where}: '{layer}' at '{precision}': 'backward_s' must be a number or null")
            if not all(math.isfinite(t) and t >= 0 for t in (float(times["forward_s"]), float(back))):
                raise EdgetrainError(f"{where}: '{layer}' at '{precision}': timings must be finite and >= 0")
            key = _canonical(where, layer, str(precision))
            row[key] = float(times["forward_s"]) + float(back) * (1.0 if key == "fp32" else backward_share)
        table[str(layer)] = row
    return table
