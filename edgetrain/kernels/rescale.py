"""Integer accumulators back to floats: out = acc * scale[channel], reading acc with any strides.

The GEMM backend returns conv results as views (NCHW values over a buffer with junk columns, see
`im2col`), so the rescale reads them in place instead of copying them to a contiguous array first.
The arithmetic is exactly that of `edgetrain.ops.norm_kernels.rescale_channels`/`rescale_flat` (the
same Numba expression `acc * s` with a float32 s, stored to the float output), so the floats are
identical whichever layout the integers came in. Below `threads.SMALL_ELEMENTS` values the kernels run
a serial loop of the same body: elementwise, so the same floats on either branch.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgetrain.kernels.threads import SMALL_ELEMENTS


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


@njit(inline="always", cache=True, nogil=True)
def _rescale_plane(acc, scale, out, nc):
    """Plane nc (image nc // C, channel nc % C): the one loop body of both branches below."""
    c_, h_, w_ = acc.shape[1:]
    n = nc // c_
    c = nc % c_
    s = image_scale(scale, n, c)
    for h in range(h_):
        scale_row(out[n, c, h], acc[n, c, h], s, w_)


@njit(parallel=True, cache=True)
def _rescale_planes(acc, scale, out, min_parallel):
    planes = acc.shape[0] * acc.shape[1]
    if acc.size < min_parallel:  # small: no parallel launch (see threads.SMALL_ELEMENTS)
        for nc in range(planes):
            _rescale_plane(acc, scale, out, nc)
        return
    for nc in prange(planes):
        _rescale_plane(acc, scale, out, nc)


def rescale_planes(acc: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """out[n, c, h, w] = acc[n, c, h, w] * scale[c] (or scale[n, c]) for a 4-D acc of any strides."""
    _rescale_planes(acc, scale_rows(scale), out, SMALL_ELEMENTS)


def rescaled(acc: np.ndarray, rescale) -> np.ndarray:
    """acc (N, C, H, W) * scale[c] (or scale[n, c]) as a new array of `dtype`, for rescale = (scale, dtype)."""
    scale, dtype = rescale
    out = np.empty(acc.shape, dtype=dtype)
    rescale_planes(acc, scale, out)
    return out


