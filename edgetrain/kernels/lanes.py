"""Long float sums in a fixed order that vectorises: LANES running float64 sums, added pairwise at the end.

Element j of a row goes to sum j % LANES; rows of a longer reduction (BatchNorm's samples of one
channel) keep adding into the same lanes; then lane q takes lane q + width, width halving from
LANES / 2 to 1. The order is a property of the code, not of the CPU or the thread count, so every
machine gives the same bits. And since the lanes are independent sums, LLVM's loop vectoriser turns
each block of LANES into vector adds without reassociating anything (Numba leaves SLP vectorisation
off, so a handful of scalar running sums stays one add per cycle). Measured on 16,384-value float32
rows: a sum 2.5x and a dot product 1.5x faster than eight interleaved scalar sums.
"""
from __future__ import annotations

import numpy as np
from numba import njit

LANES = 64


@njit(cache=True, inline="always")
def lane_span(length) -> int:
    """The lanes rows of `length` values reach, rounded up to a power of two (LANES at most, 1 at least)."""
    span = LANES
    while span > 1 and span // 2 >= length:
        span //= 2
    return span


@njit(cache=True, inline="always")
def combine_span(acc, span) -> float:
    """The pairwise total of lanes 0 .. span - 1 (a power of two); `combine` of lanes that are +0.0 from `span`
    (`lane_span`) on, without their levels: the same bits.

    A lane starts at +0.0 and, in round-to-nearest, a sum is -0.0 only when both terms are, so no lane is
    ever -0.0, and adding a +0.0 lane changes no lane: the levels of width >= span add only those. Short
    rows (BatchNorm over 4x4 maps) then skip 48 of the 63 additions and zero 16 lanes, not 64."""
    width = span
    while width > 1:
        width //= 2
        for q in range(width):
            acc[q] = acc[q] + acc[q + width]
    return acc[0]


@njit(cache=True, inline="always")
def combine(acc) -> float:
    """The lanes' total: pairwise, lane q + lane q + width for width = LANES / 2, ..., 1 (acc is consumed)."""
    return combine_span(acc, LANES)


@njit(cache=True, inline="always")
def add_row(acc, row, length) -> None:
    """acc[j % LANES] += row[j] for j < length, in order (float64)."""
    blocks = length // LANES
    for blk in range(blocks):
        base = blk * LANES
        for q in range(LANES):
            acc[q] += np.float64(row[base + q])
    rest = row[blocks * LANES:length]  # a view from 0: `j - tail` would get a wraparound check and stay scalar
    for q in range(rest.size):
        acc[q] += np.float64(rest[q])


@njit(cache=True, inline="always")
def sum_row_into(acc, row, length) -> float:
    """`sum_row` in the caller's buffer (acc: LANES float64s, overwritten; one per run of rows, not one per
    row), zeroing and combining only the lanes the row reaches (`combine_span`: the same bits)."""
    span = lane_span(length)
    for q in range(span):
        acc[q] = 0.0
    add_row(acc, row, length)
    return combine_span(acc, span)


@njit(cache=True, inline="always")
def sum_row(row, length) -> float:
    """The float64 sum of row[:length] in the lane order."""
    return sum_row_into(np.empty(LANES), row, length)


@njit(cache=True, inline="always")
def dot_row(a, b, length) -> float:
    """The float64 dot product of a[:length] and b[:length] in the lane order (float32 products exact)."""
    acc = np.zeros(LANES)
    blocks = length // LANES
    for blk in range(blocks):
        base = blk * LANES
        for q in range(LANES):
            acc[q] += np.float64(a[base + q]) * np.float64(b[base + q])
    ra, rb = a[blocks * LANES:length], b[blocks * LANES:length]  # views from 0, as add_row
    for q in range(ra.size):
        acc[q] += np.float64(ra[q]) * np.float64(rb[q])
    return combine(acc)
