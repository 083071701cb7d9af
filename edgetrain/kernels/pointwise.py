"""Pointwise convs (1x1, stride 1, no padding, one group) as per-image GEMMs vectorised over pixels, in NCHW.

Such a conv is y[n] = W (M, K) @ x[n] (K, P) for every image: its reduction is only K = C channels
(8 to 32 in MobileNetV2-0.35's expansions), too short for `numba_backend`'s 4x4 tiles of dot
products, which also need x relaid out as NHWC. Here a work item takes four output rows of one image:
for each k, four weights times the contiguous pixel row x[n, k] are added into four accumulator rows,
a loop over pixels that LLVM vectorises, each loaded x value feeding four multiply-adds. Backward-data
is the same kernel with W^T (dx[n] = W^T dy[n]).

Exactness: the accumulators have the caller's `out_dtype`, int32 only when K * max|a| * max|b| fits
int32 (`bounds`), so no partial sum can overflow. Determinism: each output value is summed by one
thread over k in order; integers only.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgetrain.kernels.bounds import INT32_MAX
from edgetrain.kernels.rescale import image_scale, scale_row, scale_rows
from edgetrain.kernels.threads import pool_threads

_JIT = dict(cache=True, fastmath=False, nogil=True)  # helpers plain @njit: see numba_backend._JIT
# Pixels per accumulator tile: four int32 rows of it (16 KiB) stay in a 32 KiB L1 with the x row.
PIXEL_TILE = 1024
ROWS = 4  # output rows per work item: each x load feeds this many multiply-adds


def is_pointwise(geo) -> bool:
    """True for a conv these kernels take: 1x1, stride 1, no padding, one group."""
    return (geo.kernel_h == geo.kernel_w == 1 and geo.stride_h == geo.stride_w == 1 and geo.groups == 1
            and geo.pad_top == geo.pad_left == geo.pad_bottom == geo.pad_right == 0)


@njit(**_JIT)
def _rows_tile(a, xn, m0, rows, p0, plen, acc):
    """acc[i, :plen] = sum over k of a[m0 + i, k] * xn[k, p0:p0 + plen], for i < rows (1 or ROWS)."""
    acc[:, :plen] = 0
    a0 = acc[0]
    if rows == ROWS:
        a1 = acc[1]
        a2 = acc[2]
        a3 = acc[3]
        for k in range(a.shape[1]):
            w0 = a[m0, k]
            w1 = a[m0 + 1, k]
            w2 = a[m0 + 2, k]
            w3 = a[m0 + 3, k]
            src = xn[k, p0:]  # a slice from 0: the loop form LLVM vectorises (numba_backend._run32)
            for t in range(plen):
                v = src[t]
                a0[t] += w0 * v
                a1[t] += w1 * v
                a2[t] += w2 * v
                a3[t] += w3 * v
    else:
        for k in range(a.shape[1]):
            w0 = a[m0, k]
            src = xn[k, p0:]
            for t in range(plen):
                a0[t] += w0 * src[t]


@njit(inline="always", **_JIT)
def _correct(acc, corr, m0, rows, plen):
    """acc[i, :plen] -= corr[m0 + i]: the shift of int8 codes stored as uint8 (`shifted_codes`) taken off."""
    for i in range(rows):
        cm = corr[m0 + i]
        if cm != 0:
            row = acc[i]
            for t in range(plen):
                row[t] -= cm


@njit(inline="always", **_JIT)
def _item(m_, n_, item):
    """Work item -> (image, first output row, rows): ROWS-row blocks, then the leftover rows one by one."""
    blocks = m_ // ROWS
    per_image = blocks + m_ % ROWS
    n = item // per_image
    j = item % per_image
    if j < blocks:
        return n, j * ROWS, ROWS
    return n, blocks * ROWS + (j - blocks), 1


@njit(parallel=True, **_JIT)
def gemm_planes(a, x, corr, out, acc_like, chunks):
    """out (N, M, P) integers = a (M, K) @ x[n] (K, P) - corr[m] for every image n."""
    n_, _, p_ = x.shape
    m_ = a.shape[0]
    items = n_ * (m_ // ROWS + m_ % ROWS)
    for ch in prange(chunks):
        acc = np.empty((ROWS, PIXEL_TILE), acc_like.dtype)
        for item in range(ch * items // chunks, (ch + 1) * items // chunks):
            n, m0, rows = _item(m_, n_, item)
            for p0 in range(0, p_, PIXEL_TILE):
                plen = min(PIXEL_TILE, p_ - p0)
                _rows_tile(a, x[n], m0, rows, p0, plen, acc)
                _correct(acc, corr, m0, rows, plen)
                for i in range(rows):
                    dst = out[n, m0 + i, p0:]
                    src = acc[i]
                    for t in range(plen):
                        dst[t] = src[t]


@njit(parallel=True, **_JIT)
def gemm_planes_scaled(a, x, corr, out, scale, acc_like, chunks):
    """`gemm_planes` into a float out, each exact integer times scale[m] (or scale[n, m]) by
    `rescale.scale_row` (one rounding: the bits of rescaling the integers afterwards)."""
    n_, _, p_ = x.shape
    m_ = a.shape[0]
    items = n_ * (m_ // ROWS + m_ % ROWS)
    for ch in prange(chunks):
        acc = np.empty((ROWS, PIXEL_TILE), acc_like.dtype)
        for item in range(ch * items // chunks, (ch + 1) * items // chunks):
            n, m0, rows = _item(m_, n_, item)
            for p0 in range(0, p_, PIXEL_TILE):
                plen = min(PIXEL_TILE, p_ - p0)
                _rows_tile(a, x[n], m0, rows, p0, plen, acc)
                _correct(acc, corr, m0, rows, plen)
                for i in range(rows):
                    scale_row(out[n, m0 + i, p0:], acc[i], image_scale(scale, n, m0 + i), plen)


def shifted_codes(x: np.ndarray, a: np.ndarray, out_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes x as uint8 x + 128 and the per-row correction 128 * sum(a[m]) to take off a @ x, when
    K * 255 * max|a| keeps every partial sum inside the accumulator; else x as it is and no correction.
    LLVM widens uint8 loads far more cheaply than int8 on this Zen1 (measured 1.5x on these kernels)."""
    no_shift = np.zeros(a.shape[0], np.int64)
    if x.dtype != np.int8:
        return x, no_shift
    wide = a.astype(np.int64)
    if np.dtype(out_dtype) != np.int64 and a.shape[1] * 255 * int(np.abs(wide).max(initial=0)) > INT32_MAX:
        return x, no_shift
    return (x.view(np.uint8) ^ np.uint8(0x80)), wide.sum(axis=1) * 128


def _run(a: np.ndarray, x: np.ndarray, out_shape, out_dtype: np.dtype, rescale) -> np.ndarray:
    n, k = x.shape[:2]
    # Weights always int16: a broadcast scalar in the inner loops, so the same times (measured), and
    # half the specialisations Numba compiles on a fresh cache.
    a = np.ascontiguousarray(a, dtype=np.int16)
    x, corr = shifted_codes(np.ascontiguousarray(x), a, out_dtype)
    x3 = x.reshape(n, k, -1)
    m = a.shape[0]
    items = n * (m // ROWS + m % ROWS)
    chunks = max(1, min(items, 4 * pool_threads()))
    acc_like = np.zeros((), out_dtype)
    if rescale is None:
        out = np.empty(out_shape, out_dtype)
        gemm_planes(a, x3, corr, out.reshape(n, m, -1), acc_like, chunks)
        return out
    scale, dtype = rescale
    out = np.empty(out_shape, dtype)
    gemm_planes_scaled(a, x3, corr, out.reshape(n, m, -1), scale_rows(scale), acc_like, chunks)
    return out


def pointwise_forward(x: np.ndarray, w: np.ndarray, geo, out_dtype: np.dtype, rescale=None) -> np.ndarray:
    """y (N, M, H, W) of `out_dtype` integers, or with rescale = (scale, dtype) the floats y * scale."""
    return _run(w.reshape(geo.out_channels, geo.in_channels), x, geo.y_shape, out_dtype, rescale)


def pointwise_backward_data(dy: np.ndarray, w: np.ndarray, geo, out_dtype: np.dtype, rescale=None) -> np.ndarray:
    """dx (N, C, H, W) = W^T dy per image, as integers or rescaled floats."""
    return _run(w.reshape(geo.out_channels, geo.in_channels).T, dy, geo.x_shape, out_dtype, rescale)
