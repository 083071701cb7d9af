"""Integer accumulators back to floats: out = acc * scale[channel], reading acc with any strides.

The GEMM backend returns conv results as views (NCHW values over a buffer with junk columns, see
`im2col`), so the rescale reads them in place instead of copying them to a contiguous array first.
The arithmetic is exactly that of `edgetrain.ops.norm_kernels.rescale_channels`/`rescale_flat` (the
same Numba expression `acc * s` with a float32 s, stored to the float output), so the floats are
identical whichever layout the integers came in.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(inline="always", cache=True, nogil=True)
def scale_row(dst, src, s, n):
    """dst[:n] = src[:n] * s: THE rescaling expression (an integer times a float32 scale, stored to
    the float output); every path that turns accumulators into floats goes through it."""
    for w in range(n):
        dst[w] = src[w] * s


def scale_rows(scale: np.ndarray) -> np.ndarray:
    """A rescale's scales as the kernels read them: C-contiguous (rows, C), one row for every image
    (scale[c]) or one per image (scale[n, c], e.g. DFQ's sample groups, each with its own scale)."""
    scale = np.asarray(scale)
    return np.ascontiguousarray(scale.reshape(1, -1) if scale.ndim == 1 else scale)


@njit(inline="always", cache=True, nogil=True)
def image_scale(scale, n, c):
    """Image n's scale for channel c from `scale_rows` (a single row serves every image)."""
    return scale[n if scale.shape[0] > 1 else 0, c]


@njit(parallel=True, cache=True)
def _rescale_planes(acc, scale, out):
    n_, c_, h_, w_ = acc.shape
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc % c_
        s = image_scale(scale, n, c)
        for h in range(h_):
            scale_row(out[n, c, h], acc[n, c, h], s, w_)


def rescale_planes(acc: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """out[n, c, h, w] = acc[n, c, h, w] * scale[c] (or scale[n, c]) for a 4-D acc of any strides."""
    _rescale_planes(acc, scale_rows(scale), out)


def rescaled(acc: np.ndarray, rescale) -> np.ndarray:
    """acc (N, C, H, W) * scale[c] (or scale[n, c]) as a new array of `dtype`, for rescale = (scale, dtype)."""
    scale, dtype = rescale
    out = np.empty(acc.shape, dtype=dtype)
    rescale_planes(acc, scale, out)
    return out


