"""Accumulator choice for exact integer reductions, from the worst-case magnitude of a dot product.

A dot product of K terms whose operands satisfy |a| <= A and |b| <= B is bounded by K*A*B, and
so is every partial sum of it, in whatever order the terms are added (SIMD lanes, pairs summed by
`pmaddwd`, threads). Hence:

* if K*A*B <= INT32_MAX the whole reduction, including every intermediate, fits int32 exactly;
* otherwise the result needs int64, and the kernels keep their fast int32 inner loop by summing
  runs ("segments") of S terms in int32, with S*A*B <= INT32_MAX, and adding the segments in int64.
  int64 itself cannot overflow: K*A*B < 2^63 for any K below 2^31, even at full uint16
  magnitudes (`accumulator_dtype` raises beyond that).

A and B are the operands' actual maxima (one cheap pass over the operands, much cheaper than the
product), so low-precision data gets int32 even when stored in a wide dtype.
"""
from __future__ import annotations

import numpy as np

INT32_MAX = int(np.iinfo(np.int32).max)
INT64_MAX = int(np.iinfo(np.int64).max)
# A segment shorter than the whole reduction is rounded down to a multiple of this (whole unrolled
# SIMD steps of 32 int16 lanes), so only the reduction's last segment has a scalar tail.
SEGMENT_ALIGN = 64


def dot_bound(length: int, amax_a: int, amax_b: int) -> int:
    """Largest |partial sum| a dot product of `length` terms with these operand maxima can reach."""
    return int(length) * int(amax_a) * int(amax_b)


def accumulator_dtype(length: int, amax_a: int, amax_b: int) -> np.dtype:
    """int32 when every partial sum of the reduction fits int32, else int64."""
    bound = dot_bound(length, amax_a, amax_b)
    if bound > INT64_MAX:
        raise OverflowError(f"a reduction of {length} terms of |a|<={amax_a}, |b|<={amax_b} can exceed int64")
    return np.dtype(np.int32) if bound <= INT32_MAX else np.dtype(np.int64)


def segment_length(length: int, amax_a: int, amax_b: int) -> int:
    """Longest run of terms whose sum is exact in int32 (>= 1), capped at `length`."""
    per_term = max(1, int(amax_a) * int(amax_b))
    seg = max(1, INT32_MAX // per_term)
    if seg >= length:
        return max(1, int(length))
    if seg >= SEGMENT_ALIGN:
        seg -= seg % SEGMENT_ALIGN
    return seg


def amax_abs(x: np.ndarray) -> int:
    """max |x| as a Python int (no int8 -128 overflow), 0 for an empty array."""
    if x.size == 0:
        return 0
    return max(int(x.max()), -int(x.min()), 0)
