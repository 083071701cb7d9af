"""Whole-batch patch matrices (im2col) of 8-bit codes, and the fold of a patch-matrix gradient (col2im).

For convs on small maps (`vnni_backend`'s small-map route): there the fused kernels' per-image tiles are
mostly padding (a 4x4 output with 3x3 taps reads 6-wide plane rows, so a tile's 32 columns hold 16
positions) and every image streams the weights again, where one GEMM over the batch's explicit patches
has no junk columns and reads the weights once.

The patch matrix is channel-major, P[(c, r, s), (n, i, j)]: K = C * kH * kW rows in the order of the
weights' (M, C, kH, kW) reshape, one column per output position of the batch. Padding is the code 0,
which is the value 0 in either signedness (int8 or uint8 viewed as bytes). Serial (`nogil`) and exact:
the fold adds int32 values in a fixed order, and its caller bounds every sum (`vnni.RAW_TERMS`).
"""
from __future__ import annotations

from numba import njit

_JIT = dict(cache=True, nogil=True)


@njit(inline="always", **_JIT)
def _first_inside(offset, step, lo):
    """The least j >= 0 with j * step + offset >= lo (step > 0)."""
    need = lo - offset
    return 0 if need <= 0 else (need + step - 1) // step


@njit(**_JIT)
def unfold(x, out, kh, kw, sh, sw, dh, dw, top, left, oh, ow):
    """out (K, N*oh*ow) bytes = the patch matrix of x (N, C, H, W) bytes: out[(c, r, s), (n, i, j)] =
    x[n, c, i*sh + r*dh - top, j*sw + s*dw - left], 0 where that lies outside x."""
    n_, c_, h, w = x.shape
    for c in range(c_):
        for r in range(kh):
            for s in range(kw):
                dst = out[(c * kh + r) * kw + s]
                off_w = s * dw - left
                j0 = min(_first_inside(off_w, sw, 0), ow)  # the columns whose input pixel is inside x
                j1 = max(min(_first_inside(off_w, sw, w), ow), j0)
                p = 0
                for n in range(n_):
                    for i in range(oh):
                        y = i * sh + r * dh - top
                        if 0 <= y < h:
                            src = x[n, c, y]
                            for j in range(j0):
                                dst[p + j] = 0
                            for j in range(j0, j1):
                                dst[p + j] = src[j * sw + off_w]
                            for j in range(j1, ow):
                                dst[p + j] = 0
                        else:
                            for j in range(ow):
                                dst[p + j] = 0
                        p += ow


@njit(**_JIT)
def fold(cols, dx, kh, kw, sh, sw, dh, dw, top, left, oh, ow):
    """dx (N, C, H, W) int32 = the sum, over every patch that reads a pixel, of cols (N*oh*ow, K) int32 at
    that patch and tap: dx[n, c, i*sh + r*dh - top, j*sw + s*dw - left] += cols[(n, i, j), (c, r, s)], taps
    outside dx dropped. Patches in order, then taps in order: a fixed order of exact integer sums."""
    n_, c_, h, w = dx.shape
    dx[...] = 0
    for n in range(n_):
        for i in range(oh):
            for j in range(ow):
                row = cols[(n * oh + i) * ow + j]
                for c in range(c_):
                    plane = dx[n, c]
                    for r in range(kh):
                        y = i * sh + r * dh - top
                        if 0 <= y < h:
                            base = (c * kh + r) * kw
                            for s in range(kw):
                                xx = j * sw + s * dw - left
                                if 0 <= xx < w:
                                    plane[y, xx] += row[base + s]
