"""Compiled 2-D MaxPool forward and backward over NCHW planes (the pools' common case).

The NumPy form in `pool.MaxPool` stacks every window offset into one array and takes an argmax over
it: fine for N-d and odd dtypes, but at a small batch each call costs a few hundred microseconds of
array set-up (LeNet-5 at batch 8: 0.4 ms of a 2.5 ms integer training step). These kernels walk each
plane once and give the very same values and argmax:

* the window of output (i, j) reads the padded input at (i * sh + a * dh, j * sw + b * dw), offset
  index a * kw + b (the order `WindowGeometry.slices` yields them);
* the argmax is NumPy's: the first maximum in offset order, and NaN counts as the largest value
  (the first NaN wins), so a NaN in a window reaches the output as in the NumPy form;
* the backward adds each output's gradient into the input position its argmax names, offset by
  offset in index order (as the NumPy form's `+=` per offset), so the float sums where windows
  overlap come out bit-identical to it.

Planes are independent, so a large input runs its planes in parallel with no effect on any value.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgetrain.kernels.threads import SMALL_ELEMENTS

# Elementwise-cheap work per output, so the same threshold as the other elementwise kernels.
PARALLEL_MIN_OUTPUTS = SMALL_ELEMENTS


@njit(inline="always", cache=True)
def _pool_plane(xp, y, arg, p, kh, kw, sh, sw, dh, dw):
    """Max and argmax of every window of plane p of xp (planes, H, W) into y[p], arg[p].

    Offset by offset over a whole output row, with selects rather than branches: the outputs of a row
    are independent, so the loop pipelines (and vectorises), where a window-at-a-time loop waits on
    each compare and mispredicts on data (measured 3.5x slower)."""
    for i in range(y.shape[1]):
        yr = y[p, i]
        ar = arg[p, i]
        src = xp[p, i * sh]
        for j in range(yr.size):
            yr[j] = src[j * sw]
            ar[j] = 0
        for a in range(kh):
            src = xp[p, i * sh + a * dh]
            for b in range(kw):
                k = a * kw + b
                if k == 0:
                    continue
                off = b * dw
                for j in range(yr.size):
                    v = src[j * sw + off]
                    best = yr[j]
                    # NumPy's argmax: NaN beats everything and the first NaN stays
                    take = (best == best) & ((v > best) | (v != v))
                    yr[j] = v if take else best
                    ar[j] = k if take else ar[j]


@njit(parallel=True, cache=True)
def maxpool2d_forward(xp, kh, kw, sh, sw, dh, dw, y, arg, min_parallel):
    """y, arg (planes, OH, OW) = the max and its offset index over each window of xp (planes, H, W),
    already padded with the dtype's lowest value; parallel over planes from `min_parallel` outputs."""
    if y.size < min_parallel:
        for p in range(xp.shape[0]):
            _pool_plane(xp, y, arg, p, kh, kw, sh, sw, dh, dw)
        return
    for p in prange(xp.shape[0]):
        _pool_plane(xp, y, arg, p, kh, kw, sh, sw, dh, dw)


@njit(inline="always", cache=True)
def _unpool_plane(g, arg, dxp, p, kh, kw, sh, sw, dh, dw):
    zero = g.dtype.type(0)
    for a in range(kh):  # offset-major, as the NumPy form adds its per-offset terms (zeros included)
        for b in range(kw):
            k = a * kw + b
            for i in range(g.shape[1]):
                gr = g[p, i]
                ar = arg[p, i]
                dst = dxp[p, i * sh + a * dh]
                off = b * dw
                for j in range(gr.size):
                    dst[j * sw + off] += gr[j] if ar[j] == k else zero


@njit(parallel=True, cache=True)
def maxpool2d_backward(g, arg, kh, kw, sh, sw, dh, dw, dxp, min_parallel):
    """dxp (planes, H, W; zeros on entry, padded) += each output gradient at its window's argmax."""
    if g.size < min_parallel:
        for p in range(g.shape[0]):
            _unpool_plane(g, arg, dxp, p, kh, kw, sh, sw, dh, dw)
        return
    for p in prange(g.shape[0]):
        _unpool_plane(g, arg, dxp, p, kh, kw, sh, sw, dh, dw)


def compiled_case(x: np.ndarray) -> bool:
    """Whether the compiled kernels take this input: 2-D spatial, float32 or float64."""
    return x.ndim == 4 and x.dtype in (np.float32, np.float64)
