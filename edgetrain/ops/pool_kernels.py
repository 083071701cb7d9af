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
                    take = _later_wins(best, v)
                    yr[j] = v if take else best
                    ar[j] = k if take else ar[j]


@njit(inline="always", cache=True)
def _later_wins(best, v):
    """Whether v, at a later window offset than best, takes its place: NumPy's argmax (NaN beats
    everything, the first NaN stays, a tie keeps the earlier offset)."""
    return (best == best) & ((v > best) | (v != v))


@njit(inline="always", cache=True)
def _pool_plane_2x2(xp, y, arg, p, sh, sw, dh, dw):
    """_pool_plane for a 2x2 window: the four offsets of an output compared in registers, each row
    pair first and then the rows (the row-0 winner's offset is always the earlier one, so NumPy's
    tie rule holds), and every output written once.

    Why not the general loop: it updates y and arg in place, offset by offset, and those masked
    read-after-write vector stores run up to 4x slower whenever the kernel has not run for a while
    (measured inside a LeNet-5 step, 1 thread: 110 us on a call after the step's other work, warming
    to 26 us over five back-to-back calls); this form takes 33-37 us every time."""
    for i in range(y.shape[1]):
        yr = y[p, i]
        ar = arg[p, i]
        top = xp[p, i * sh]
        bottom = xp[p, i * sh + dh]
        for j in range(yr.size):
            v0 = top[j * sw]
            v1 = top[j * sw + dw]
            t1 = _later_wins(v0, v1)
            va = v1 if t1 else v0
            ka = 1 if t1 else 0
            v2 = bottom[j * sw]
            v3 = bottom[j * sw + dw]
            t3 = _later_wins(v2, v3)
            vb = v3 if t3 else v2
            kb = 3 if t3 else 2
            take = _later_wins(va, vb)
            yr[j] = vb if take else va
            ar[j] = kb if take else ka


@njit(inline="always", cache=True)
def _pool_any(xp, y, arg, p, kh, kw, sh, sw, dh, dw):
    if kh == 2 and kw == 2:
        _pool_plane_2x2(xp, y, arg, p, sh, sw, dh, dw)
    else:
        _pool_plane(xp, y, arg, p, kh, kw, sh, sw, dh, dw)


@njit(parallel=True, cache=True)
def maxpool2d_forward(xp, kh, kw, sh, sw, dh, dw, y, arg, min_parallel):
    """y, arg (planes, OH, OW) = the max and its offset index over each window of xp (planes, H, W),
    already padded with the dtype's lowest value; parallel over planes from `min_parallel` outputs."""
    if y.size < min_parallel:
        for p in range(xp.shape[0]):
            _pool_any(xp, y, arg, p, kh, kw, sh, sw, dh, dw)
        return
    for p in prange(xp.shape[0]):
        _pool_any(xp, y, arg, p, kh, kw, sh, sw, dh, dw)


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


@njit(inline="always", cache=True)
def _unpool_plane_2x2(g, arg, dxp, p):
    """_unpool_plane for 2x2 windows at stride 2 (no dilation): the windows tile the input, so every
    position takes exactly one term, written once (no read-modify-write; see _pool_plane_2x2). The
    sum 0 + term is kept, so a -0.0 gradient lands as +0.0, as the general form's += on zeros gives."""
    zero = g.dtype.type(0)
    for i in range(g.shape[1]):
        gr = g[p, i]
        ar = arg[p, i]
        top = dxp[p, 2 * i]
        bottom = dxp[p, 2 * i + 1]
        for j in range(gr.size):
            v = gr[j]
            k = ar[j]
            top[2 * j] = zero + (v if k == 0 else zero)
            top[2 * j + 1] = zero + (v if k == 1 else zero)
            bottom[2 * j] = zero + (v if k == 2 else zero)
            bottom[2 * j + 1] = zero + (v if k == 3 else zero)


@njit(inline="always", cache=True)
def _unpool_any(g, arg, dxp, p, kh, kw, sh, sw, dh, dw):
    if kh == 2 and kw == 2 and sh == 2 and sw == 2 and dh == 1 and dw == 1:
        _unpool_plane_2x2(g, arg, dxp, p)
    else:
        _unpool_plane(g, arg, dxp, p, kh, kw, sh, sw, dh, dw)


@njit(parallel=True, cache=True)
def maxpool2d_backward(g, arg, kh, kw, sh, sw, dh, dw, dxp, min_parallel):
    """dxp (planes, H, W; zeros on entry, padded) += each output gradient at its window's argmax."""
    if g.size < min_parallel:
        for p in range(g.shape[0]):
            _unpool_any(g, arg, dxp, p, kh, kw, sh, sw, dh, dw)
        return
    for p in prange(g.shape[0]):
        _unpool_any(g, arg, dxp, p, kh, kw, sh, sw, dh, dw)


def compiled_case(x: np.ndarray) -> bool:
    """Whether the compiled kernels take this input: 2-D spatial, float32 or float64."""
    return x.ndim == 4 and x.dtype in (np.float32, np.float64)
