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


@njit(inline="always", cache=True, nogil=True)
def scale_pair(dst, a, b, s, n):
    """dst[2w] = a[w] * s, dst[2w + 1] = b[w] * s for w < n: two stride phases of one output row
    interleaved, with `scale_row`'s expression (so the same floats); one loop, which LLVM vectorises as
    an interleaved store where two strided ones were scalar."""
    for w in range(n):
        dst[2 * w] = a[w] * s
        dst[2 * w + 1] = b[w] * s


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


@njit(inline="always", cache=True, nogil=True)
def _rescale_channel_run(acc, scale, out, rc_ch):
    """Channel rc_ch of every image: its run of acc's row, rescaled into out[image, rc_ch] (the one loop body of
    both branches below; names prefixed, as it is inlined into a parallel loop)."""
    rc_len = out.shape[2]
    for rc_img in range(out.shape[0]):
        scale_row(out[rc_img, rc_ch], acc[rc_ch, rc_img * rc_len:(rc_img + 1) * rc_len],
                  image_scale(scale, rc_img, rc_ch), rc_len)


@njit(parallel=True, cache=True)
def _rescale_channel_major(acc, scale, out, min_parallel):
    if acc.size < min_parallel:
        for ch in range(acc.shape[0]):
            _rescale_channel_run(acc, scale, out, ch)
        return
    for ch in prange(acc.shape[0]):
        _rescale_channel_run(acc, scale, out, ch)


def rescaled_channel_major(acc: np.ndarray, shape: tuple, rescale) -> np.ndarray:
    """`rescaled` of a GEMM's (C, N*H*W) accumulator (a 1x1 conv over the batch) as (N, C, H, W) floats: each
    image's run of a channel's row is one `scale_row` loop, where the NCHW view's planes went row by row
    (MobileNetV2's (336, 8 x 4x4) 53 -> 14 us)."""
    scale, dtype = rescale
    n, c = shape[:2]
    out = np.empty(shape, dtype=dtype)
    _rescale_channel_major(np.ascontiguousarray(acc).reshape(c, -1), scale_rows(scale), out.reshape(n, c, -1),
                           SMALL_ELEMENTS)
    return out


def rescaled(acc: np.ndarray, rescale) -> np.ndarray:
    """acc (N, C, H, W) * scale[c] (or scale[n, c]) as a new array of `dtype`, for rescale = (scale, dtype)."""
    scale, dtype = rescale
    out = np.empty(acc.shape, dtype=dtype)
    rescale_planes(acc, scale, out)
    return out


MATRIX_TILE = 64  # a 64 x 64 tile of a transposed accumulator and its output stay in L1 together


@njit(inline="always", cache=True, nogil=True)
def _matrix_value(a, s, b, dst, r, c, cast_first, biased, relu):
    """One output value: `cast_first`, the output type's conversion of a times s in that type (NumPy's
    `acc.astype(dtype) * scale`, QuantLinear's forward); else `scale_row`'s a * s (every other rescale).
    Then, in the output's type, + b where `biased` (a Gemm's `y + c`) and the Relu where `relu`: 0 where the
    value is <= 0, NaN kept, as np.maximum(v, 0) gives it (-0.0 becomes +0.0)."""
    if cast_first:
        dst[r, c] = a
        dst[r, c] = dst[r, c] * s
    else:
        dst[r, c] = a * s
    if biased:
        dst[r, c] = dst[r, c] + b
    if relu:
        zero = dst.dtype.type(0)
        dst[r, c] = zero if dst[r, c] <= zero else dst[r, c]


@njit(inline="always", cache=True, nogil=True)
def _matrix_rows(acc, scale, bias, out, cast_first, relu, row):
    per_col = scale.size > 1
    biased = bias.size > 0
    for c in range(out.shape[1]):
        b = bias[c] if biased else out.dtype.type(0)
        _matrix_value(acc[row, c], scale[c if per_col else 0], b, out, row, c, cast_first, biased, relu)


@njit(inline="always", cache=True, nogil=True)
def _matrix_tile(acc_t, scale, bias, out, cast_first, relu, tile):
    """Tile `tile` of out: acc_t's rows (out's columns) rescaled into the rows of a padded buffer, then
    transposed out of it row by row. Written straight into out, a column walk strides by out's row
    length, and at a power of two (512 float32) every value of it lands in one cache set: (128, 512)
    took 250 us, 14x the per-value time of (512, 784). The buffer's rows are MATRIX_TILE + 1 long, so a
    walk down its columns spreads over the sets."""
    rows, cols = out.shape
    col_tiles = (cols + MATRIX_TILE - 1) // MATRIX_TILE
    r0 = (tile // col_tiles) * MATRIX_TILE
    c0 = (tile % col_tiles) * MATRIX_TILE
    r1 = min(rows, r0 + MATRIX_TILE)
    c1 = min(cols, c0 + MATRIX_TILE)
    per_col = scale.size > 1
    biased = bias.size > 0
    buf = np.empty((MATRIX_TILE, MATRIX_TILE + 1), out.dtype)
    for c in range(c1 - c0):  # rescaled along acc_t's rows: contiguous both sides, so it vectorises
        s = scale[c0 + c if per_col else 0]
        b = bias[c0 + c] if biased else out.dtype.type(0)
        src = acc_t[c0 + c, r0:r1]
        for r in range(r1 - r0):
            _matrix_value(src[r], s, b, buf, c, r, cast_first, biased, relu)
    for r in range(r1 - r0):  # then transposed out of the buffer
        dst = out[r0 + r, c0:c1]
        for c in range(c1 - c0):
            dst[c] = buf[c, r]


@njit(inline="always", cache=True, nogil=True)
def _matrix_item(acc, scale, bias, out, cast_first, relu, transposed, item):
    """Work item `item` of `_rescale_matrix`: a tile of a transposed acc, else a row."""
    if transposed:
        _matrix_tile(acc.T, scale, bias, out, cast_first, relu, item)
    else:
        _matrix_rows(acc, scale, bias, out, cast_first, relu, item)


@njit(parallel=True, cache=True)
def _rescale_matrix(acc, scale, bias, out, cast_first, relu, transposed, min_parallel):
    """out (R, C) = acc * scale[c] (a length-1 scale: every column's) [+ bias[c]] [then the Relu], acc read
    with any strides; a `transposed` acc (its columns contiguous) is walked in tiles, along its columns, so
    neither side is read or written a cache line per value (a transposed (512, 784) accumulator took 570 us
    row by row). An empty bias adds nothing."""
    rows, cols = out.shape
    items = ((rows + MATRIX_TILE - 1) // MATRIX_TILE) * ((cols + MATRIX_TILE - 1) // MATRIX_TILE) if transposed \
        else rows
    if out.size < min_parallel:
        for item in range(items):
            _matrix_item(acc, scale, bias, out, cast_first, relu, transposed, item)
        return
    for item in prange(items):
        _matrix_item(acc, scale, bias, out, cast_first, relu, transposed, item)


def rescale_matrix(acc: np.ndarray, scale, dtype, cast_first: bool = False,
                   out: np.ndarray | None = None, bias: np.ndarray | None = None, relu: bool = False) -> np.ndarray:
    """A 2-D integer accumulator (any strides; a GEMM may return a transposed view) times a per-column
    scale (or one scale) as a C-contiguous array of `dtype` (into `out` if given); cast_first: see
    `_matrix_value`. With `bias` (one value per column, of `dtype`), + bias in `dtype` after the product, and
    with `relu`, then max(., 0): the bits of `y + bias` and np.maximum(y, 0) after the rescale, in its pass."""
    out = np.empty(acc.shape, dtype) if out is None else out
    scale = np.ascontiguousarray(np.asarray(scale, dtype=dtype).reshape(-1))
    bias = _NO_BIAS[np.dtype(dtype).char] if bias is None else np.ascontiguousarray(bias, dtype=dtype).reshape(-1)
    transposed = acc.ndim == 2 and acc.shape[0] > 1 and acc.strides[0] < acc.strides[1]
    _rescale_matrix(acc, scale, bias, out, cast_first, bool(relu), transposed, SMALL_ELEMENTS)
    return out


_NO_BIAS = {np.dtype(t).char: np.empty(0, t) for t in (np.float32, np.float64)}
