"""Depthwise conv kernels (groups == in_channels == out_channels): forward, backward-data, backward-weight.

A depthwise conv has one input channel per output channel, so its reduction is only kh * kw taps
long: the GEMM form (`numba_backend.conv2d_forward`, one group of one filter at a time) spends its
time gathering 9-element patches and running 9-term dot products, scalar. Here every plane is
computed in place in NCHW. At stride 1 (the common case) the plane is copied zero-padded into a
scratch (Hp, Wp), on which each tap is ONE contiguous run of (OH - 1) * Wp + OW values (the Wp - OW
"junk" columns per row are computed and dropped): one weight times that run is added to the
accumulator, a loop LLVM vectorises. Backward-data at stride 1 is the same with the taps flipped and dy
padded by the kernel's reach less the pads. Strided convs run tap by tap over output rows, with each
tap's valid column range computed (no padding materialised).

Exactness (the `edgetrain.kernels` contract): the forward and backward-data accumulators have the
caller's `out_dtype`, int32 only when taps * max|a| * max|b| fits int32, so no partial sum can
overflow. The weight gradient (stride 1) is, per image and tap, one dot product of dy's plane laid
on the same Wp-wide grid (zero junk columns) with a shifted run of the padded input, summed in int32
runs of at most `seg` terms (`bounds.segment_length`) and added in int64.

Determinism: every output value is computed by one thread in a fixed order (planes for the forward and
backward-data, channels for the weight gradient, whose reduction runs over images in order), so results
are the same for any thread count; integers only, so on any CPU.

Measured at MobileNetV2-0.35's batch-8 shapes (1 thread, 2-core Zen1 without VNNI, loaded, against the
GEMM-form kernels in the same run): forward 5-19x, backward-data 6-16x, weight gradient (stride 1)
2.3-3.2x. Strided weight gradients stay on the GEMM form, whose long pixel dot products suit them.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from edgetrain.kernels.rescale import image_scale, scale_row, scale_rows

# helpers plain @njit (see numba_backend._JIT); _scratch stays inlined: it reads its caller's 0-d acc_like
_JIT = dict(cache=True, fastmath=False, nogil=True)


def is_depthwise(geo) -> bool:
    """True for a conv these kernels take: one input and one output channel per group."""
    return geo.groups > 1 and geo.in_per_group == 1 and geo.out_per_group == 1


@njit(**_JIT)
def _ceil_div(a, b):
    return -((-a) // b)


@njit(**_JIT)
def _cols(off, stride, width, out_w):
    """Output columns [lo, hi) whose input column ow * stride + off lies in [0, width)."""
    lo = min(out_w, max(0, _ceil_div(-off, stride)))
    hi = max(lo, min(out_w, _ceil_div(width - off, stride)))
    return lo, hi


@njit(**_JIT)
def _pad_into(src, pt, pl, scratch):
    """scratch (Hp, Wp) = src (Hs, Ws) shifted down by pt and right by pl (negative: cropped), zeros elsewhere."""
    hs, ws = src.shape
    hp, wp = scratch.shape
    scratch[:, :] = 0
    j0 = max(0, pl)
    j1 = min(wp, ws + pl)
    for i in range(hp):
        si = i - pt
        if si < 0 or si >= hs or j1 <= j0:
            continue
        srow = src[si, j0 - pl:]
        drow = scratch[i, j0:]
        for t in range(j1 - j0):
            drow[t] = srow[t]


@njit(**_JIT)
def _flat_plane(src, wpl, flip, pt, pl, dh, dw, scratch, acc):
    """Stride-1 conv of one plane src (Hs, Ws) with taps wpl (flipped when `flip`: the transposed conv),
    src padded by pt/pl (negative: cropped), into acc (OH, Wp) whose first OW columns are the output.

    src is copied zero-padded into scratch (Hp, Wp); on that grid every tap is ONE contiguous run of
    (OH - 1) * Wp + OW values, a loop LLVM vectorises, instead of OH runs of OW (the Wp - OW extra
    "junk" columns per row are computed and dropped)."""
    kh, kw = wpl.shape
    hp, wp = scratch.shape
    out_h = acc.shape[0]
    out_w = wp - (kw - 1) * dw
    sflat = scratch.reshape(hp * wp)
    _pad_into(src, pt, pl, scratch)
    length = (out_h - 1) * wp + out_w
    aflat = acc.reshape(out_h * wp)
    aflat[:] = 0
    for r in range(kh):
        for s in range(kw):
            wv = wpl[kh - 1 - r, kw - 1 - s] if flip else wpl[r, s]
            run = sflat[r * dh * wp + s * dw:]
            for t in range(length):
                aflat[t] += wv * run[t]


@njit(**_JIT)
def _forward_plane(xpl, wpl, acc, sh, sw, dh, dw, pt, pl):
    """acc (OH, OW) = the depthwise conv of one input plane xpl (H, W) with its taps wpl (kh, kw)."""
    out_h, out_w = acc.shape
    height, width = xpl.shape
    kh, kw = wpl.shape
    acc[:, :] = 0
    for oh in range(out_h):
        arow = acc[oh]
        for r in range(kh):
            ih = oh * sh + r * dh - pt
            if ih < 0 or ih >= height:
                continue
            xrow = xpl[ih]
            for s in range(kw):
                wv = wpl[r, s]
                off = s * dw - pl
                lo, hi = _cols(off, sw, width, out_w)
                if sw == 1:
                    # slices from 0: the form LLVM vectorises (see numba_backend._run32)
                    src = xrow[lo + off:]
                    dst = arow[lo:]
                    for t in range(hi - lo):
                        dst[t] += wv * src[t]
                else:
                    for t in range(lo, hi):
                        arow[t] += wv * xrow[t * sw + off]


@njit(**_JIT)
def _backward_data_plane(dypl, wpl, acc, sh, sw, dh, dw, pt, pl):
    """acc (H, W) = the transposed depthwise conv of one gradient plane dypl (OH, OW): a scatter of
    each tap's weight times a gradient row into the input row it read."""
    out_h, out_w = dypl.shape
    height, width = acc.shape
    kh, kw = wpl.shape
    acc[:, :] = 0
    for oh in range(out_h):
        grow = dypl[oh]
        for r in range(kh):
            ih = oh * sh + r * dh - pt
            if ih < 0 or ih >= height:
                continue
            arow = acc[ih]
            for s in range(kw):
                wv = wpl[r, s]
                off = s * dw - pl
                lo, hi = _cols(off, sw, width, out_w)
                if sw == 1:
                    src = grow[lo:]
                    dst = arow[lo + off:]
                    for t in range(hi - lo):
                        dst[t] += wv * src[t]
                else:
                    for t in range(lo, hi):
                        arow[t * sw + off] += wv * grow[t]


@njit(**_JIT)
def _plane_into(data, w, acc, scratch, n, c, backward, sh, sw, dh, dw, pt, pl):
    """acc[:, :OW] = plane (n, c) of the forward conv (backward: of the transposed conv) of `data`."""
    kh, kw = w.shape[2:]
    if sh == 1 and sw == 1:
        if backward:  # dx is the stride-1 conv of dy, padded by the kernel's reach less pt, with flipped taps
            _flat_plane(data[n, c], w[c, 0], True, (kh - 1) * dh - pt, (kw - 1) * dw - pl, dh, dw, scratch, acc)
        else:
            _flat_plane(data[n, c], w[c, 0], False, pt, pl, dh, dw, scratch, acc)
    elif backward:
        _backward_data_plane(data[n, c], w[c, 0], acc, sh, sw, dh, dw, pt, pl)
    else:
        _forward_plane(data[n, c], w[c, 0], acc, sh, sw, dh, dw, pt, pl)


@njit(inline="always", **_JIT)
def _scratch(out_h, out_w, kh, kw, sh, sw, dh, dw, acc_like):
    """A work item's accumulator (OH, Wp) and padded-plane scratch (Hp, Wp); Wp = OW off the flat path."""
    if sh == 1 and sw == 1:
        wp = out_w + (kw - 1) * dw
        return np.empty((out_h, wp), acc_like.dtype), np.empty((out_h + (kh - 1) * dh, wp), np.int16)
    return np.empty((out_h, out_w), acc_like.dtype), np.empty((1, 1), np.int16)


@njit(parallel=True, **_JIT)
def planes(data, w, out, acc_like, backward, sh, sw, dh, dw, pt, pl, chunks):
    """out (N, C, OH, OW) integers = the depthwise conv of data (N, C, H, W) with w (C, 1, kh, kw),
    or with `backward` the transposed conv (data = dy, out = dx); `acc_like` (0-d) gives the
    accumulator's dtype (out's)."""
    n_, c_ = data.shape[:2]
    out_h, out_w = out.shape[2:]
    kh, kw = w.shape[2:]
    count = n_ * c_
    for ch in prange(chunks):
        acc, scratch = _scratch(out_h, out_w, kh, kw, sh, sw, dh, dw, acc_like)
        for p in range(ch * count // chunks, (ch + 1) * count // chunks):
            n = p // c_
            c = p % c_
            _plane_into(data, w, acc, scratch, n, c, backward, sh, sw, dh, dw, pt, pl)
            for oh in range(out_h):
                dst = out[n, c, oh]
                src = acc[oh]
                for t in range(out_w):
                    dst[t] = src[t]


@njit(parallel=True, **_JIT)
def planes_scaled(data, w, out, scale, acc_like, backward, sh, sw, dh, dw, pt, pl, chunks):
    """`planes` into a float out, each exact integer times scale[c] (or scale[n, c]) by
    `rescale.scale_row` (one rounding, the bits of rescaling the integers afterwards)."""
    n_, c_ = data.shape[:2]
    out_h, out_w = out.shape[2:]
    kh, kw = w.shape[2:]
    count = n_ * c_
    for ch in prange(chunks):
        acc, scratch = _scratch(out_h, out_w, kh, kw, sh, sw, dh, dw, acc_like)
        for p in range(ch * count // chunks, (ch + 1) * count // chunks):
            n = p // c_
            c = p % c_
            _plane_into(data, w, acc, scratch, n, c, backward, sh, sw, dh, dw, pt, pl)
            s = image_scale(scale, n, c)
            for oh in range(out_h):
                scale_row(out[n, c, oh], acc[oh], s, out_w)


@njit(parallel=True, **_JIT)
def backward_weight(dy, x, out, dh, dw, pt, pl, seg, chunks):
    """out (C, kh, kw) int64 = sum over images and output pixels of dy times the input each tap read,
    for a stride-1 conv. Per image, x's plane is padded into scratch (Hp, Wp) and dy's plane laid on
    the same Wp-wide grid with zero junk columns, so each tap is one dot product of (OH - 1) * Wp + OW
    terms, summed in int32 runs of at most `seg` terms and added in int64 (exact; bounds module)."""
    n_, c_ = x.shape[:2]
    out_h, out_w = dy.shape[2:]
    kh, kw = out.shape[1:]
    wp = out_w + (kw - 1) * dw
    hp = out_h + (kh - 1) * dh
    length = (out_h - 1) * wp + out_w
    for ch in prange(chunks):
        scratch = np.empty((hp, wp), np.int16)
        sflat = scratch.reshape(hp * wp)
        grid = np.zeros(out_h * wp, np.int16)  # junk columns stay 0: they add nothing
        for c in range(ch * c_ // chunks, (ch + 1) * c_ // chunks):
            for n in range(n_):
                _pad_into(x[n, c], pt, pl, scratch)
                for oh in range(out_h):
                    src = dy[n, c, oh]
                    dst = grid[oh * wp:]
                    for t in range(out_w):
                        dst[t] = src[t]
                for r in range(kh):
                    for s in range(kw):
                        run = sflat[r * dh * wp + s * dw:]
                        total = np.int64(0)
                        for start in range(0, length, seg):
                            a = grid[start:]
                            b = run[start:]
                            acc = np.int32(0)
                            for t in range(min(seg, length - start)):
                                # never wraps (seg bounds it); int32 lanes for vpmaddwd, as numba_backend._run32
                                acc = np.int32(acc + a[t] * b[t])
                            total += acc
                        out[c, r, s] += total


def _chunks(items: int) -> int:
    """prange work items: a few per thread, at most one per item."""
    return max(1, min(items, 4 * numba.get_num_threads()))


def _geo_args(geo) -> tuple[int, ...]:
    return (geo.stride_h, geo.stride_w, geo.dilation_h, geo.dilation_w, geo.pad_top, geo.pad_left)


def _operand(a: np.ndarray) -> np.ndarray:
    """C-contiguous, in a dtype the kernels take as is (8- and 16-bit codes; no widening copy)."""
    return np.ascontiguousarray(a)


def _run(data: np.ndarray, w: np.ndarray, geo, shape, backward: bool, out_dtype: np.dtype, rescale) -> np.ndarray:
    # Weights always int16: a broadcast scalar in the inner loops, so the same times (measured), and
    # half the specialisations Numba compiles on a fresh cache.
    data, w = _operand(data), np.ascontiguousarray(w, dtype=np.int16)
    chunks = _chunks(geo.batch * geo.in_channels)
    acc_like = np.zeros((), out_dtype)
    if rescale is None:
        out = np.empty(shape, out_dtype)
        planes(data, w, out, acc_like, backward, *_geo_args(geo), chunks)
        return out
    scale, dtype = rescale
    out = np.empty(shape, dtype)
    planes_scaled(data, w, out, scale_rows(scale), acc_like, backward, *_geo_args(geo), chunks)
    return out


def depthwise_forward(x: np.ndarray, w: np.ndarray, geo, out_dtype: np.dtype, rescale=None) -> np.ndarray:
    """y (N, C, OH, OW) of `out_dtype` integers, or with rescale = (scale, dtype) the floats y * scale."""
    return _run(x, w, geo, geo.y_shape, False, out_dtype, rescale)


def depthwise_backward_data(dy: np.ndarray, w: np.ndarray, geo, out_dtype: np.dtype, rescale=None) -> np.ndarray:
    """dx (N, C, H, W) of `out_dtype` integers, or with rescale the floats dx * scale."""
    return _run(dy, w, geo, geo.x_shape, True, out_dtype, rescale)


def depthwise_backward_weight(dy: np.ndarray, x: np.ndarray, geo, out_dtype: np.dtype, seg: int) -> np.ndarray:
    """dW (C, 1, kh, kw) of `out_dtype` for a stride-1 depthwise conv; `seg` bounds the int32 runs."""
    dy, x = _operand(dy), _operand(x)
    out = np.zeros((geo.in_channels, geo.kernel_h, geo.kernel_w), np.int64)
    backward_weight(dy, x, out, geo.dilation_h, geo.dilation_w, geo.pad_top, geo.pad_left, max(1, int(seg)),
                    _chunks(geo.in_channels))
    return out.astype(out_dtype, copy=False).reshape(geo.w_shape)
