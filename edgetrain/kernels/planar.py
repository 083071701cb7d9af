"""Stride-1 convs (one group) as implicit GEMMs vectorised over pixels, on zero-padded NCHW planes.

With stride 1, tap (r, s) of output pixel (oh, ow) reads padded pixel (oh + r*dh, ow + s*dw). On
a padded plane of width Wp = OW + (kw-1)*dw, flattened, that is flat position p + r*dh*Wp + s*dw of
output grid position p = oh*Wp + ow: every (channel, tap) is ONE contiguous run of the plane. So
y[n, m] = sum over (c, tap) of w[m, c, tap] times a shifted run of plane (n, c): the `pointwise`
kernel's loop (four output rows per work item, each loaded input value feeding four multiply-adds,
vectorised over pixels) with K = C * kh * kw shifted rows, and no im2col copy at all. The Wp - OW
"junk" columns of each grid row are computed and dropped (6% at 32x32 3x3, 25% at 8x8).
Backward-data of a stride-1 conv is itself a stride-1 conv: of dy, padded by the kernel's reach less
the forward pads, with the taps flipped and the weights' channel axes swapped.

Exactness: accumulators of the caller's `out_dtype`, int32 only when K * max|a| * max|b| fits int32
(`bounds`). Determinism: each output value is summed by one thread over (c, tap) in order.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgetrain.kernels.pointwise import shifted_codes
from edgetrain.kernels.rescale import image_scale, scale_row, scale_rows
from edgetrain.kernels.threads import pool_threads

_JIT = dict(cache=True, fastmath=False, nogil=True)  # helpers plain @njit: see numba_backend._JIT
PIXEL_TILE = 1024  # grid positions per accumulator tile: four int32 rows (16 KiB) stay in L1
ROWS = 4


def takes(geo, backward: bool) -> bool:
    """True for a conv these kernels take: stride 1, one group, and (backward) pads within the kernel's
    reach, so dy's padding is never negative."""
    if geo.stride_h != 1 or geo.stride_w != 1 or geo.groups != 1:
        return False
    if not backward:
        return True
    reach_h, reach_w = (geo.kernel_h - 1) * geo.dilation_h, (geo.kernel_w - 1) * geo.dilation_w
    return max(geo.pad_top, geo.pad_bottom) <= reach_h and max(geo.pad_left, geo.pad_right) <= reach_w


@njit(**_JIT)
def pad_planes(x, out, pt, pl, wp):
    """out[n, c, (pt + h) * wp + pl + w] = x[n, c, h, w]; out arrives filled with the padding code."""
    n_, c_, h_, w_ = x.shape
    for n in range(n_):
        for c in range(c_):
            dst = out[n, c]
            for h in range(h_):
                row = dst[(pt + h) * wp + pl:]
                src = x[n, c, h]
                for t in range(w_):
                    row[t] = src[t]


@njit(**_JIT)
def _rows_tile(a, xn, offs, m0, rows, p0, plen, acc):
    """acc[i, :plen] = sum over (c, tap) of a[m0 + i, c*T + tap] * xn[c, offs[tap] + p0:][:plen]."""
    taps = offs.size
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
            src = xn[k // taps, offs[k % taps] + p0:]  # a slice from 0: what LLVM vectorises
            for t in range(plen):
                v = src[t]
                a0[t] += w0 * v
                a1[t] += w1 * v
                a2[t] += w2 * v
                a3[t] += w3 * v
    else:
        for k in range(a.shape[1]):
            w0 = a[m0, k]
            src = xn[k // taps, offs[k % taps] + p0:]
            for t in range(plen):
                a0[t] += w0 * src[t]


@njit(parallel=True, **_JIT)
def conv_planes(a, xp, offs, corr, out, scale, acc_like, wp, chunks):
    """out (N, M, OH, OW) = the stride-1 conv of padded planes xp (N, C, Hp*Wp + tail) with a (M, C*T),
    less corr[m]; integers, or with a non-empty scale (rows, M) floats times scale[m] / scale[n, m]
    (`scale_row`)."""
    n_ = xp.shape[0]
    m_ = a.shape[0]
    out_h, out_w = out.shape[2:]
    rows_per_tile = max(1, PIXEL_TILE // wp)
    blocks = m_ // ROWS
    per_image = blocks + m_ % ROWS
    items = n_ * per_image
    scaled = scale.shape[0] > 0
    for ch in prange(chunks):
        acc = np.empty((ROWS, rows_per_tile * wp), acc_like.dtype)
        for item in range(ch * items // chunks, (ch + 1) * items // chunks):
            n = item // per_image
            j = item % per_image
            m0, rows = (j * ROWS, ROWS) if j < blocks else (blocks * ROWS + j - blocks, 1)
            for oh0 in range(0, out_h, rows_per_tile):
                nrows = min(rows_per_tile, out_h - oh0)
                plen = (nrows - 1) * wp + out_w
                _rows_tile(a, xp[n], offs, m0, rows, oh0 * wp, plen, acc)
                for i in range(rows):
                    src = acc[i]
                    cm = corr[m0 + i]
                    if cm != 0:
                        for t in range(plen):
                            src[t] -= cm
                    for r in range(nrows):
                        if scaled:
                            scale_row(out[n, m0 + i, oh0 + r], src[r * wp:], image_scale(scale, n, m0 + i), out_w)
                        else:
                            dst = out[n, m0 + i, oh0 + r]
                            row = src[r * wp:]
                            for t in range(out_w):
                                dst[t] = row[t]


def _run(a: np.ndarray, data: np.ndarray, pads: tuple[int, int, int, int], kernel, dilation, out_shape,
         out_dtype: np.dtype, rescale) -> np.ndarray:
    n, c, h, w = data.shape
    pt, pl, pb, pr = pads
    (kh, kw), (dh, dw) = kernel, dilation
    hp, wp = h + pt + pb, w + pl + pr
    tail = (kw - 1) * dw  # the last grid row's junk columns read this far past the plane
    m = a.shape[0]
    # Planes keep the codes' own width (narrower loads vectorise wider); int8 codes as uint8 + 128 where
    # the bound allows (`pointwise.shifted_codes`), the padding then 128 too: it must encode 0.
    # Weights always int16: a broadcast scalar in the inner loops, so the same times (measured), and
    # half the specialisations Numba compiles on a fresh cache.
    a = np.ascontiguousarray(a, dtype=np.int16)
    codes, corr = shifted_codes(np.ascontiguousarray(data), a, out_dtype)
    shifted = codes.dtype != data.dtype  # int8 -> uint8 (a zero correction alone cannot tell: rows may sum to 0)
    xp = np.full((n, c, hp * wp + tail), 128 if shifted else 0, codes.dtype)
    pad_planes(codes, xp, pt, pl, wp)
    offs = np.array([r * dh * wp + s * dw for r in range(kh) for s in range(kw)], np.int64)
    chunks = max(1, min(n * (m // ROWS + m % ROWS), 4 * pool_threads()))
    acc_like = np.zeros((), out_dtype)
    if rescale is None:
        out = np.empty(out_shape, out_dtype)
        conv_planes(a, xp, offs, corr, out, np.zeros((0, 0), np.float32), acc_like, wp, chunks)
        return out
    scale, dtype = rescale
    out = np.empty(out_shape, dtype)
    conv_planes(a, xp, offs, corr, out, scale_rows(scale), acc_like, wp, chunks)
    return out


def planar_forward(x: np.ndarray, w: np.ndarray, geo, out_dtype: np.dtype, rescale=None) -> np.ndarray:
    """y (N, M, OH, OW) of a stride-1 conv, as integers or rescaled floats."""
    a = np.ascontiguousarray(w.reshape(geo.out_channels, -1))
    return _run(a, x, (geo.pad_top, geo.pad_left, geo.pad_bottom, geo.pad_right), (geo.kernel_h, geo.kernel_w),
                (geo.dilation_h, geo.dilation_w), geo.y_shape, out_dtype, rescale)


def planar_backward_data(dy: np.ndarray, w: np.ndarray, geo, out_dtype: np.dtype, rescale=None) -> np.ndarray:
    """dx (N, C, H, W) of a stride-1 conv (`takes(geo, True)`): dy padded by the kernel's reach less
    the pads, convolved with the flipped taps, channel axes swapped."""
    a = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(geo.in_channels, -1))
    rh, rw = (geo.kernel_h - 1) * geo.dilation_h, (geo.kernel_w - 1) * geo.dilation_w
    pads = (rh - geo.pad_top, rw - geo.pad_left, rh - geo.pad_bottom, rw - geo.pad_right)
    return _run(a, dy, pads, (geo.kernel_h, geo.kernel_w), (geo.dilation_h, geo.dilation_w), geo.x_shape,
                out_dtype, rescale)
