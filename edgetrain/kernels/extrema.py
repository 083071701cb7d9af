"""Min and max of float tensors as integer reductions over their bit patterns.

A float min/max reduction cannot be vectorised without assuming no NaN (LLVM may not reorder it), but
integer ones can. Read as signed integers, IEEE bit patterns order the non-negative floats by value, and
the negative ones (sign bit set) by magnitude; with the sign bit flipped (XOR), as unsigned integers,
every negative pattern lies above every non-negative one, again ordered by magnitude. Three running
reductions of each row, smax and smin of the patterns and fmax of the flipped ones, therefore give:

* max: smax if smax >= 0 (the largest non-negative value), else smin (all negative: the smallest magnitude);
* min: smin if smin >= 0 (all non-negative), else fmax flipped back (the negative of largest magnitude);
* NaN or infinity (magnitude bits at least the exponent mask) iff one of those two has it: a positive
  NaN or infinity is smax, a negative one the largest magnitude among the negatives.

-0.0 sorts just below +0.0, as in the per-value key form these replaced (`i ^ ((i >> 31) & 0x7FFFFFFF)`,
one transform per value, whose reductions Numba also widened to 64-bit lanes): the quantiser's scan of 2.1
million float32 values on a 2.6 GHz Xeon, 0.77 -> 0.39 ms on one thread, 0.41 -> 0.22 ms on two (a bare
loop of each form: 1.40 -> 0.31 ms). A fourth reduction (fmin) would have made the work symmetric, but
four running values per lane spill LLVM's registers (0.99 ms for that bare loop).

The quantiser takes its ranges this way. (Scanning each row as BatchNorm or the residual join writes it,
while it is in cache, and handing the range on, saved the quantiser's read only at one thread: at two,
a 128 x 16 x 1024 BatchNorm's scans cost 107 us forward and 166 backward against 222 for the separate
scan, and rows of 64 values cost more than they saved. Not kept.)
"""
from __future__ import annotations

import numpy as np
from numba import njit

# Per float width: the integer view, its exponent mask (all ones: NaN or infinity), magnitude mask, sign bit.
KEY_VIEWS = {np.dtype(np.float32): (np.int32, np.int32(0x7F800000), np.int32(0x7FFFFFFF), np.int32(-(1 << 31))),
             np.dtype(np.float64): (np.int64, np.int64(0x7FF0000000000000), np.int64(0x7FFFFFFFFFFFFFFF),
                                    np.int64(-(1 << 63)))}


@njit(cache=True, nogil=True, inline="always")
def start(sign):
    """The three reductions' starting values (smax, smin, fmax): the extremes of sign's integer type."""
    return sign, ~sign, sign


@njit(cache=True, nogil=True, inline="always")
def fold(row, smax, smin, fmax, sign):
    """Fold one row of bit patterns into the running smax, smin and fmax (module doc)."""
    t = row.dtype.type
    for j in range(row.size):
        s = row[j]
        smax = max(smax, s)
        smin = min(smin, s)
        fmax = max(fmax, t(s ^ sign))  # the cast keeps Numba from widening the lanes to 64 bits
    return smax, smin, fmax


@njit(cache=True, nogil=True, inline="always")
def decode(smax, smin, fmax, sign, exp_mask, mag_mask):
    """(min pattern, max pattern, NaN-or-infinity flag) from the three reductions (module doc)."""
    hi = smax if smax >= 0 else smin
    lo = smin if smin >= 0 else fmax ^ sign
    bad = (hi & mag_mask) >= exp_mask or (lo & mag_mask) >= exp_mask
    return lo, hi, bad

