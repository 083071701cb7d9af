"""Whether a workload's step timings say the board was busy with something else while they were taken.

Every timed step of a workload does the same work on the same shapes, so on a quiet board the
step times cluster just above the fastest one. Two rules, either flags the timings:

* median / min above BUSY_MEDIAN_OVER_MIN: most steps were slower than the board can go;
* (p90 - p10) / median above BUSY_SPREAD_OVER_MEDIAN: steps alternated between fast and slow.

Only the summary (min, median) reaches the host when a workload has too many steps to send
each one, so the first rule works from the summary alone; the second needs the step times.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["BUSY_MEDIAN_OVER_MIN", "BUSY_SPREAD_OVER_MEDIAN", "MIN_STEPS_FOR_PERCENTILES", "assess_timing"]

BUSY_MEDIAN_OVER_MIN = 1.5
"""Median step over the fastest step above which the board counts as busy.

On an idle board the median sits within 1.0-1.2x the minimum (cache and allocator state, timer
and scheduler jitter); 1.5x means the typical step lost a third of its time to something that is
not the workload: another process, a frequency drop, swapping. The MLP of issue 17 (min 2.4 ms,
median 109 ms) is at 45x.
"""

BUSY_SPREAD_OVER_MEDIAN = 0.5
"""(p90 - p10) / median above which the board counts as busy.

A spread of half the median between the fastest and slowest tenth of identical steps means the
steps were intermittently interrupted; a quiet board stays well under 0.2.
"""

MIN_STEPS_FOR_PERCENTILES = 5
"""Fewer steps than this give no meaningful p10/p90, so only the median/min rule applies."""


def _percentiles(times: Sequence[float]) -> tuple[float, float]:
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return deciles[0], deciles[-1]


def assess_timing(
    step_times: Sequence[float] | None, summary: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Return the spread figures of a workload's step times and whether they flag a busy board (None: unknown)."""
    times = [t for t in (step_times or []) if t is not None]
    minimum = min(times) if times else (summary or {}).get("min")
    median = statistics.median(times) if times else (summary or {}).get("median")
    result: dict[str, Any] = {
        "busy": None,
        "median_over_min": None,
        "p90_minus_p10_over_median": None,
        "rule": f"median/min > {BUSY_MEDIAN_OVER_MIN:g} or (p90-p10)/median > {BUSY_SPREAD_OVER_MEDIAN:g}",
        "warning": None,
    }
    if minimum is None or median is None or minimum <= 0 or median <= 0:
        return result
    ratio = median / minimum
    result["median_over_min"] = ratio
    reasons = []
    if ratio > BUSY_MEDIAN_OVER_MIN:
        reasons.append(f"median step {median * 1000:.3g} ms is {ratio:.1f}x the fastest ({minimum * 1000:.3g} ms)")
    if len(times) >= MIN_STEPS_FOR_PERCENTILES:
        p10, p90 = _percentiles(times)
        spread = (p90 - p10) / median
        result["p90_minus_p10_over_median"] = spread
        if spread > BUSY_SPREAD_OVER_MEDIAN:
            reasons.append(f"p10-p90 spread is {spread:.0%} of the median")
    result["busy"] = bool(reasons)
    if reasons:
        result["warning"] = (
            "step times vary too much for identical steps, the board was busy with something else: "
            + "; ".join(reasons) + ". Treat the timings as unreliable; re-run on an idle board."
        )
    return result
