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

With `relu`, the kernels are a Relu followed by the pool, in one pass each way (`MaxPool.relu`): every
input value goes through NumPy's `maximum(v, 0)` (NaN stays, -0.0 and negatives become +0.0) before
the compare, and the backward passes a gradient only where the window's maximum is above 0, which is
where the Relu's backward (`g if y > 0 else 0`) would pass it: the forward marks the other windows'
argmax `NO_GRADIENT`, so the backward is the plain one. The same bits as the two ops.

The argmax is int8 (an offset index below 128: `MAX_OFFSETS`): with int64 indices beside float32
values the compare-and-select loops did not vectorise.

Time them on new inputs every call, as a training step meets them: a loop over one input lets the branch
predictor learn its data, and a kernel whose selects became branches then looks 4-5x faster than it is
(`_rows_2x2`).

Planes (row pairs, in the 2x2 case) are independent, so a large input runs them in parallel with no
effect on any value.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from edgetrain.kernels.threads import SMALL_ELEMENTS

# Elementwise-cheap work per output, so the same threshold as the other elementwise kernels.
PARALLEL_MIN_OUTPUTS = SMALL_ELEMENTS
# The argmax is kept as int8: windows of more offsets take the NumPy form.
MAX_OFFSETS = 127
# The argmax of a window whose maximum a folded Relu took to 0: no offset matches it, so the backward
# passes nothing there, which is the Relu's backward (`g if y > 0 else 0`) without reading y again.
NO_GRADIENT = np.int8(-1)
# Parallel chunks per call on the flat 2x2 walk: more than any thread count here, so a slow thread
# does not hold the others up (the split never changes a value).
CHUNKS = 16


@njit(inline="always", cache=True)
def _later_wins(best, v):
    """Whether v, at a later window offset than best, takes its place: NumPy's argmax (NaN beats
    everything, the first NaN stays, a tie keeps the earlier offset)."""
    return (best == best) & ((v > best) | (v != v))


@njit(inline="always", cache=True)
def _in(v, relu, zero):
    """An input value as the pool compares it: with `relu` NumPy's maximum(v, 0) (NaN stays NaN, -0.0
    and every negative become +0.0, the `zero` given), else v."""
    if relu and not ((v > zero) | (v != v)):
        return zero
    return v


@njit(inline="always", cache=True)
def _pool_plane(xp, y, arg, p, kh, kw, sh, sw, dh, dw, relu):
    """Max and argmax of every window of plane p of xp (planes, H, W) into y[p], arg[p].

    Offset by offset over the whole plane: the offset's values first gathered into one contiguous array (a
    strided copy, no select), then compared with each window's best so far in one loop of selects over the
    plane's outputs, which vectorises (the offset index updated by arithmetic: as a select that keeps the old
    index, it kept the loop scalar). Compared where they lie (a stride known only at run time), the selects
    on loaded values compiled to branches, which mispredict on real activations. A 3x3 stride-2 pool of (4,
    64, 65, 65), a ResNet stem's, took 11 ms a call on new inputs (one Zen 3 thread), 2.9 ms this way. A
    window-at-a-time loop waits on each compare (measured 3.5x slower again)."""
    zero = y.dtype.type(0)
    oh, ow = y.shape[1], y.shape[2]
    yp = y[p].reshape(-1)
    ap = arg[p].reshape(-1)
    vals = np.empty(oh * ow, y.dtype)
    for a in range(kh):
        for b in range(kw):
            k = a * kw + b
            off = b * dw
            for i in range(oh):
                src = xp[p, i * sh + a * dh]
                o = i * ow
                for j in range(ow):
                    vals[o + j] = src[j * sw + off]
            if k == 0:
                for q in range(yp.size):
                    yp[q] = _in(vals[q], relu, zero)
                    ap[q] = 0
                continue
            kk = np.int8(k)
            for q in range(yp.size):
                v = vals[q]
                if relu:  # `_in`, written as `_max4` writes it
                    v = v if (v > zero) | (v != v) else zero
                best = yp[q]
                take = _later_wins(best, v)
                yp[q] = v if take else best
                # the offset by arithmetic: as `ap[q] = kk if take else ap[q]`, the loop did not vectorise
                ap[q] = ap[q] + np.int8(take) * (kk - ap[q])
    if relu:
        for q in range(yp.size):
            ap[q] = ap[q] if yp[q] > zero else NO_GRADIENT


@njit(inline="always", cache=True)
def _row_2x2(top, bottom, yr, ar, sw, dw, relu):
    """One output row of a 2x2 pool from its two input rows (window columns j*sw and j*sw + dw): the four
    offsets of an output compared in registers, each input row first and then the two (the top winner's
    offset is always the earlier one, so NumPy's tie rule holds), every output written once. For 2x2 windows
    that do not tile the input (padded, dilated, overlapping); tiling ones take `_rows_2x2`. Its selects
    compile to branches, which mispredict on real activations (the tiled case ran 5x slower on new inputs
    than on one repeated input this way, `_rows_2x2`); the two-pass form avoids that, and this rarer case
    has not been moved to it yet."""
    zero = yr.dtype.type(0)
    for j in range(yr.size):
        v0 = _in(top[j * sw], relu, zero)
        v1 = _in(top[j * sw + dw], relu, zero)
        t1 = _later_wins(v0, v1)
        va = v1 if t1 else v0
        ka = np.int8(1) if t1 else np.int8(0)
        v2 = _in(bottom[j * sw], relu, zero)
        v3 = _in(bottom[j * sw + dw], relu, zero)
        t3 = _later_wins(v2, v3)
        vb = v3 if t3 else v2
        kb = np.int8(3) if t3 else np.int8(2)
        take = _later_wins(va, vb)
        best = vb if take else va
        yr[j] = best
        ar[j] = (kb if take else ka) if not relu or best > zero else NO_GRADIENT


@njit(inline="always", cache=True)
def _pool_plane_2x2(xp, y, arg, p, sh, sw, dh, dw, relu):
    """_pool_plane for a 2x2 window at any stride and dilation, row by row (`_row_2x2`)."""
    for i in range(y.shape[1]):
        _row_2x2(xp[p, i * sh], xp[p, i * sh + dh], y[p, i], arg[p, i], sw, dw, relu)


@njit(inline="always", cache=True)
def _max4(v0, v1, v2, v3, y, arg, relu):
    """y, arg = the max and its offset over the four offsets v0..v3 of each window, as `_row_2x2` compares them,
    in one pass over contiguous arrays: every choice a select on a vector, none a branch. The offset is built
    by arithmetic (bottom row: 2, plus the column the row's winner took), not picked from four constants."""
    zero = y.dtype.type(0)
    for j in range(y.size):
        a0, a1, a2, a3 = v0[j], v1[j], v2[j], v3[j]
        if relu:
            a0 = a0 if (a0 > zero) | (a0 != a0) else zero
            a1 = a1 if (a1 > zero) | (a1 != a1) else zero
            a2 = a2 if (a2 > zero) | (a2 != a2) else zero
            a3 = a3 if (a3 > zero) | (a3 != a3) else zero
        t1 = _later_wins(a0, a1)
        va = a1 if t1 else a0
        t3 = _later_wins(a2, a3)
        vb = a3 if t3 else a2
        take = _later_wins(va, vb)
        best = vb if take else va
        y[j] = best
        k = np.int8(2) * np.int8(take) + np.int8(t3 if take else t1)
        arg[j] = k if not relu or best > zero else NO_GRADIENT


@njit(inline="always", cache=True)
def _rows_2x2(x, y, arg, ow, r0, r1, relu):
    """Output rows r0..r1 of a 2x2 pool at stride 2 whose windows tile the input exactly, over the flat
    arrays (output row r reads input rows 2r, 2r + 1 of 2*ow values): the four offsets of every window
    gathered into four contiguous arrays, then compared in one pass (`_max4`).

    Why two passes: compared where they lie, each window's loads feed its selects, which the compiler
    turns into branches (on x86 a select on a loaded value becomes a jump), and on real activations those
    mispredict: LeNet-5's (8, 6, 28, 28) pool took 170 us a call inside a training step against 31 us in a
    loop over one input, whose branches the predictor had learnt. Gathered first, the compare vectorises:
    16-21 us on new inputs every call, one thread of a Zen 3. The four arrays hold one copy of the input's
    values (per chunk on the parallel branch), freed on return."""
    n = (r1 - r0) * ow
    w = 2 * ow
    v0, v1, v2, v3 = np.empty(n, x.dtype), np.empty(n, x.dtype), np.empty(n, x.dtype), np.empty(n, x.dtype)
    for r in range(r0, r1):
        top, o = 2 * r * w, (r - r0) * ow
        for j in range(ow):  # one input row per loop: two streams each, which the compiler vectorises
            v0[o + j] = x[top + 2 * j]
            v1[o + j] = x[top + 2 * j + 1]
        for j in range(ow):
            v2[o + j] = x[top + w + 2 * j]
            v3[o + j] = x[top + w + 2 * j + 1]
    _max4(v0, v1, v2, v3, y[r0 * ow:r1 * ow], arg[r0 * ow:r1 * ow], relu)


@njit(inline="always", cache=True)
def _pool_any(xp, y, arg, p, kh, kw, sh, sw, dh, dw, relu):
    if kh == 2 and kw == 2:
        _pool_plane_2x2(xp, y, arg, p, sh, sw, dh, dw, relu)
    else:
        _pool_plane(xp, y, arg, p, kh, kw, sh, sw, dh, dw, relu)


def tiles_2x2(kernel, strides, dilations, padded: tuple, out: tuple) -> bool:
    """Whether the windows are 2x2 at stride 2, undilated, and tile the padded input's last two axes
    exactly (every input position in one window): the flat row-pair walk (`_rows_2x2`), whose backward
    writes every input position."""
    return (tuple(kernel) == (2, 2) and tuple(strides) == (2, 2) and tuple(dilations) == (1, 1)
            and padded[-2] == 2 * out[-2] and padded[-1] == 2 * out[-1])


@njit(parallel=True, cache=True)
def _forward_2x2(xp, y, arg, min_parallel, relu):
    x = xp.reshape(-1)
    yf = y.reshape(-1)
    af = arg.reshape(-1)
    ow = y.shape[2]
    rows = y.shape[0] * y.shape[1]
    if y.size < min_parallel:
        _rows_2x2(x, yf, af, ow, 0, rows, relu)
        return
    for c in prange(CHUNKS):
        _rows_2x2(x, yf, af, ow, c * rows // CHUNKS, (c + 1) * rows // CHUNKS, relu)


def maxpool2d_forward(xp, kh, kw, sh, sw, dh, dw, y, arg, min_parallel: int, relu: bool) -> None:
    """y, arg (planes, OH, OW; arg int8) = the max and its offset index over each window of xp (planes,
    H, W; C-contiguous), already padded with the dtype's lowest value, after a Relu with `relu`;
    parallel from `min_parallel` outputs."""
    if tiles_2x2((kh, kw), (sh, sw), (dh, dw), xp.shape, y.shape):
        _forward_2x2(xp, y, arg, min_parallel, relu)
    else:
        _forward_planes(xp, kh, kw, sh, sw, dh, dw, y, arg, min_parallel, relu)


@njit(parallel=True, cache=True)
def _forward_planes(xp, kh, kw, sh, sw, dh, dw, y, arg, min_parallel, relu):
    if y.size < min_parallel:
        for p in range(xp.shape[0]):
            _pool_any(xp, y, arg, p, kh, kw, sh, sw, dh, dw, relu)
        return
    for p in prange(xp.shape[0]):
        _pool_any(xp, y, arg, p, kh, kw, sh, sw, dh, dw, relu)


@njit(inline="always", cache=True)
def _unpool_plane(g, arg, dxp, p, kh, kw, sh, sw, dh, dw):
    """Plane p's output gradients added at their windows' argmax, offset by offset (`_pool_plane`'s two passes
    in reverse: the offset's terms selected over the whole plane into one contiguous array, then added at a
    stride, so no select is a branch). 5.2 -> 2.5 ms a call on (4, 64, 65, 65) at 3x3 stride 2."""
    zero = g.dtype.type(0)
    oh, ow = g.shape[1], g.shape[2]
    gp = g[p].reshape(-1)
    ap = arg[p].reshape(-1)
    terms = np.empty(oh * ow, g.dtype)
    for a in range(kh):  # offset-major, as the NumPy form adds its per-offset terms (zeros included)
        for b in range(kw):
            k = a * kw + b
            for q in range(gp.size):
                terms[q] = gp[q] if ap[q] == k else zero
            off = b * dw
            for i in range(oh):
                dst = dxp[p, i * sh + a * dh]
                o = i * ow
                for j in range(ow):
                    dst[j * sw + off] += terms[o + j]


@njit(inline="always", cache=True)
def _unpool_rows_2x2(g, arg, dx, ow, r0, r1):
    """The backward of `_rows_2x2` on output rows r0..r1 of the flat arrays: every input position takes
    exactly one term, written once (no read-modify-write). The forward's two passes in reverse: the four
    offsets' terms of every output into four contiguous arrays (selects on vectors), then spread to the
    input rows (copies). Written in place, window by window, the selects on the loaded offsets became
    branches: 94 us a call on LeNet-5's first pool with new offsets every call, against 17 for this form
    (one thread of a Zen 3). Four arrays, not the rows of one (4, n) array: with those the select loop
    did not vectorise (76 us). The sum 0 + term is kept, so a -0.0 gradient lands as +0.0, as the general
    form's += on zeros gives."""
    zero = g.dtype.type(0)
    n = (r1 - r0) * ow
    t0, t1, t2, t3 = np.empty(n, g.dtype), np.empty(n, g.dtype), np.empty(n, g.dtype), np.empty(n, g.dtype)
    for j in range(n):
        v, k = g[r0 * ow + j], arg[r0 * ow + j]
        t0[j] = zero + (v if k == 0 else zero)
        t1[j] = zero + (v if k == 1 else zero)
        t2[j] = zero + (v if k == 2 else zero)
        t3[j] = zero + (v if k == 3 else zero)
    w = 2 * ow
    for r in range(r0, r1):
        o, top = (r - r0) * ow, 2 * r * w
        for j in range(ow):
            dx[top + 2 * j] = t0[o + j]
            dx[top + 2 * j + 1] = t1[o + j]
        for j in range(ow):
            dx[top + w + 2 * j] = t2[o + j]
            dx[top + w + 2 * j + 1] = t3[o + j]


@njit(parallel=True, cache=True)
def _backward_2x2(g, arg, dxp, min_parallel):
    gf = g.reshape(-1)
    af = arg.reshape(-1)
    dx = dxp.reshape(-1)
    ow = g.shape[2]
    rows = g.shape[0] * g.shape[1]
    if g.size < min_parallel:
        _unpool_rows_2x2(gf, af, dx, ow, 0, rows)
        return
    for c in prange(CHUNKS):
        _unpool_rows_2x2(gf, af, dx, ow, c * rows // CHUNKS, (c + 1) * rows // CHUNKS)


def maxpool2d_backward(g, arg, kh, kw, sh, sw, dh, dw, padded: tuple, min_parallel: int) -> np.ndarray:
    """dx over the padded input planes (planes, *padded): each output gradient added at its window's argmax
    (none where the argmax is `NO_GRADIENT`). Where the windows tile the input (`tiles_2x2`) every position
    is written once, so the array starts empty; else it starts at zeros."""
    tiled = tiles_2x2((kh, kw), (sh, sw), (dh, dw), padded, g.shape)
    dxp = (np.empty if tiled else np.zeros)((g.shape[0],) + tuple(padded), g.dtype)
    if tiled:
        _backward_2x2(g, arg, dxp, min_parallel)
    else:
        _backward_planes(g, arg, kh, kw, sh, sw, dh, dw, dxp, min_parallel)
    return dxp


@njit(parallel=True, cache=True)
def _backward_planes(g, arg, kh, kw, sh, sw, dh, dw, dxp, min_parallel):
    if g.size < min_parallel:
        for p in range(g.shape[0]):
            _unpool_plane(g, arg, dxp, p, kh, kw, sh, sw, dh, dw)
        return
    for p in prange(g.shape[0]):
        _unpool_plane(g, arg, dxp, p, kh, kw, sh, sw, dh, dw)


def compiled_case(ndim: int, dtype: np.dtype, kernel: tuple) -> bool:
    """Whether the compiled kernels take an input of `ndim` axes and `dtype`: 2-D spatial, float32 or
    float64, windows of at most `MAX_OFFSETS` offsets."""
    return ndim == 4 and dtype in (np.float32, np.float64) and math.prod(kernel) <= MAX_OFFSETS
