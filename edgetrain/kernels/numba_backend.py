"""Numba backend: exact integer GEMM and conv2d with int16 operands and int32 SIMD inner loops.

The compute core is `_run4x4`, sixteen int16 dot products over the same range held in
registers; LLVM vectorises its loop into `vpmaddwd`/`vpdpwssd` (int16 pairs multiplied and summed
into int32 lanes). `_block_dots` tiles any two row-major operands with it. There are only two
heavy kernels, so JIT time stays low (each costs seconds to compile):

* `conv2d_forward`: an implicit GEMM. A thread gathers the patches of a few output rows from
  zero-padded NHWC input (each tap's channels are one contiguous copy) into a buffer that stays in
  L1/L2 (no full im2col matrix), then tiles patches x packed weights. GEMM is the same kernel
  on 1x1 "images", and backward-data is the same kernel once per stride phase of dx.
* `conv2d_backward_weight`: per chunk of images, gradients and input rows are laid out pixel-major
  and tiled over long pixel blocks, each chunk adding into its own int64 partial dW.

Small GEMMs with a short reduction (a small batch's Linear layers) take `gemm_rows` instead, a
serial kernel vectorised along the output row (see `NumbaBackend.gemm_nt`).

Three shapes of conv go to kernels of their own, vectorised over pixels in NCHW instead (see the
routing comment in `NumbaBackend`): depthwise convs (`depthwise`), pointwise convs (`pointwise`) and
other stride-1 convs on images of at least `PLANAR_MIN_PIXELS` (`planar`).

Exactness: `seg` (from `bounds.segment_length`) is the longest run of terms whose sum cannot
overflow int32; longer reductions are split into such runs and added in int64. Results never
depend on the thread count or the chunking, because every output element is computed by one
thread in a fixed order over exact integers, and partial sums are integers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from edgetrain.kernels import depthwise, planar, pointwise, threads
from edgetrain.kernels.threads import SMALL_ELEMENTS, pool_threads, threads_for

# fastmath is off on purpose: integer code doesn't need it and it must never leak into float paths.
_JIT = dict(cache=True, fastmath=False, nogil=True)
# Large helpers of the parallel kernels are plain @njit, not inline="always": Numba then compiles each once per
# type signature instead of once inside every parallel caller (measured: 20-30% less compile CPU on a fresh
# cache, the same step times). The short inner-loop helpers (_run32, _dot, _run4x4, _copy) stay inlined.
# Work items per thread for prange: enough to balance uneven rows, few enough to amortise the
# per-chunk scratch allocation.
CHUNKS_PER_THREAD = 4
# Pixels per weight-gradient work item: long enough that a dot product amortises its horizontal
# sum, short enough that the gathered block (taps x channels x pixels int16) stays in L2.
WGRAD_TARGET_PIXELS = 2048
# Pixel block of the weight-gradient dot products: long, so the 16 horizontal sums of a 4x4 tile
# are amortised (256 -> 1024 measured +20%), while four gathered rows of it (8 KiB) stay in L1.
WGRAD_PIXEL_BLOCK = 1024
# Forward gathers whole output rows until a block has at least this many pixels (4x4 tiles).
FORWARD_MIN_PIXELS = 32


def n_chunks(items: int) -> int:
    """How many prange work items to cut `items` rows into."""
    return max(1, min(items, CHUNKS_PER_THREAD * pool_threads()))


@njit(inline="always", **_JIT)
def _run32(a, b, n):
    """sum(a[:n] * b[:n]) in int32; the caller guarantees it cannot overflow."""
    acc = np.int32(0)
    for k in range(n):
        # The explicit int32 wrap (never taken, by the caller's bound) is what lets LLVM use 32-bit
        # lanes and vpmaddwd; the loop must also start at 0 on a slice, not at a variable offset,
        # or LLVM vectorises the wrong loop (measured: 10x slower).
        acc = np.int32(acc + a[k] * b[k])
    return acc


@njit(inline="always", **_JIT)
def _dot(a, b, n, seg):
    """sum(a[:n] * b[:n]) exactly: int32 runs of at most `seg` terms, added in int64."""
    if n <= seg:
        return np.int64(_run32(a, b, n))
    total = np.int64(0)
    for start in range(0, n, seg):
        stop = min(start + seg, n)
        total += _run32(a[start:stop], b[start:stop], stop - start)
    return total


@njit(inline="always", **_JIT)
def _run4x4(a0, a1, a2, a3, b0, b1, b2, b3, n):
    """The 16 int32 dot products a_i[:n] . b_j[:n], as (a0.b0, a0.b1, ..., a3.b3).

    A 4x4 register tile: each loaded vector feeds four multiply-adds, which is what lifts the
    kernel from load-bound (1x1: ~75 GOP/s per core) to ~120-160 GOP/s per core (measured).
    """
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = np.int32(0)
    c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = np.int32(0)
    for k in range(n):
        y0 = b0[k]
        y1 = b1[k]
        y2 = b2[k]
        y3 = b3[k]
        x = a0[k]
        c00 = np.int32(c00 + x * y0)
        c01 = np.int32(c01 + x * y1)
        c02 = np.int32(c02 + x * y2)
        c03 = np.int32(c03 + x * y3)
        x = a1[k]
        c10 = np.int32(c10 + x * y0)
        c11 = np.int32(c11 + x * y1)
        c12 = np.int32(c12 + x * y2)
        c13 = np.int32(c13 + x * y3)
        x = a2[k]
        c20 = np.int32(c20 + x * y0)
        c21 = np.int32(c21 + x * y1)
        c22 = np.int32(c22 + x * y2)
        c23 = np.int32(c23 + x * y3)
        x = a3[k]
        c30 = np.int32(c30 + x * y0)
        c31 = np.int32(c31 + x * y1)
        c32 = np.int32(c32 + x * y2)
        c33 = np.int32(c33 + x * y3)
    return (c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33)


@njit(**_JIT)
def _block_dots(a, a0, a_count, b, b0, b_count, k0, n, seg, res, acc):
    """res[p, f] = a[a0 + p, k0:k0 + n] . b[b0 + f, k0:k0 + n] exactly, in int64.

    a and b are C-contiguous 2-D int16 arrays (rows must be contiguous for SIMD); `acc` is a
    16-element int64 scratch. 4x4 tiles with b rows outermost, so each group of four b rows stays
    in L1 while every a row streams past; leftovers fall back to single dot products.
    """
    p_main = a_count - a_count % 4
    f_main = b_count - b_count % 4
    for f in range(0, f_main, 4):
        fb = b0 + f
        for p in range(0, p_main, 4):
            pa = a0 + p
            for t in range(16):
                acc[t] = 0
            for start in range(0, n, seg):
                o = k0 + start
                m = min(seg, n - start)
                r = _run4x4(a[pa, o:], a[pa + 1, o:], a[pa + 2, o:], a[pa + 3, o:],
                            b[fb, o:], b[fb + 1, o:], b[fb + 2, o:], b[fb + 3, o:], m)
                for t in range(16):
                    acc[t] += r[t]
            for i in range(4):
                for j in range(4):
                    res[p + i, f + j] = acc[4 * i + j]
        for p in range(p_main, a_count):
            for j in range(4):
                res[p, f + j] = _dot(a[a0 + p, k0:], b[fb + j, k0:], n, seg)
    for f in range(f_main, b_count):
        for p in range(a_count):
            res[p, f] = _dot(a[a0 + p, k0:], b[b0 + f, k0:], n, seg)


@njit(inline="always", **_JIT)
def _copy(dst, src, n):
    """dst[:n] = src[:n] (a loop from 0 over slices, which LLVM turns into wide moves)."""
    for t in range(n):
        dst[t] = src[t]


# --------------------------------------------------------------------------------------- layout


@njit(inline="always", **_JIT)
def _nhwc_row(x, out, pad_top, pad_left, nh):
    n_, c_, h_, w_ = x.shape
    n = nh // h_
    h = nh % h_
    dst = out[n, pad_top + h]
    for c in range(c_):
        src = x[n, c, h]
        for w in range(w_):
            dst[pad_left + w, c] = src[w]


@njit(parallel=True, **_JIT)
def to_padded_nhwc(x, out, pad_top, pad_left, min_parallel):
    """out[n, pad_top + h, pad_left + w, c] = x[n, c, h, w]; out arrives zeroed (the padding). A copy
    of fewer than `min_parallel` values (`threads.SMALL_ELEMENTS`) runs serially: no parallel launch."""
    rows = x.shape[0] * x.shape[2]
    if x.size < min_parallel:
        for nh in range(rows):
            _nhwc_row(x, out, pad_top, pad_left, nh)
        return
    for nh in prange(rows):
        _nhwc_row(x, out, pad_top, pad_left, nh)


@njit(inline="always", **_JIT)
def _nchw_plane(x, out, pad_top, pad_left, nc):
    c_, h_, w_ = x.shape[1:]
    n = nc // c_
    c = nc % c_
    for h in range(h_):
        _copy(out[n, c, pad_top + h, pad_left:], x[n, c, h], w_)


@njit(parallel=True, **_JIT)
def to_padded_nchw(x, out, pad_top, pad_left, min_parallel):
    """out[n, c, pad_top + h, pad_left + w] = x[n, c, h, w]; out arrives zeroed (the padding); serial
    below `min_parallel` values, as `to_padded_nhwc`."""
    planes = x.shape[0] * x.shape[1]
    if x.size < min_parallel:
        for nc in range(planes):
            _nchw_plane(x, out, pad_top, pad_left, nc)
        return
    for nc in prange(planes):
        _nchw_plane(x, out, pad_top, pad_left, nc)


# --------------------------------------------------------------------------------- conv forward


@njit(parallel=True, **_JIT)
def conv2d_forward(xp, wp, out, oh_, ow_, off_h, off_w, step_h, step_w, k_len, stride_h, stride_w, dil_h, dil_w,
                   kernel_h, kernel_w, rows_per_block, seg, chunks):
    """y from zero-padded NHWC int16 x, flattened to (N, Hp, Wp*C), and weights packed
    (G, M/G, Kpad) in (kh, kw, c) order; output pixel (oh, ow) of the (oh_, ow_) result lands at
    out[n, m, off_h + oh*step_h, off_w + ow*step_w] (a strided placement is how backward-data
    writes one phase of dx). Output rows are gathered `rows_per_block` at a time, so a small
    image still gives the 4x4 tiles enough pixels to reuse each weight row."""
    n_ = xp.shape[0]
    groups, m_g, k_pad = wp.shape
    c_g = k_len // (kernel_h * kernel_w)
    c_ = c_g * groups
    # With one group and no horizontal dilation a kernel row's taps are one contiguous run of
    # kw*C values in NHWC: one copy instead of kw.
    run = kernel_w * c_ if groups == 1 and dil_w == 1 else 0
    rows = n_ * oh_
    for ch in prange(chunks):
        buf = np.empty((groups, rows_per_block * ow_, k_pad), np.int16)
        res = np.empty((rows_per_block * ow_, m_g), np.int64)
        acc = np.empty(16, np.int64)
        r1 = (ch + 1) * rows // chunks
        for rb in range(ch * rows // chunks, r1, rows_per_block):
            nrows = min(rows_per_block, r1 - rb)
            for i in range(nrows):
                n = (rb + i) // oh_
                oh = (rb + i) % oh_
                for r in range(kernel_h):
                    src = xp[n, oh * stride_h + r * dil_h]
                    for ow in range(ow_):
                        at = ow * stride_w * c_
                        if run:
                            _copy(buf[0, i * ow_ + ow, r * run:], src[at:], run)
                        else:
                            for s in range(kernel_w):
                                for g in range(groups):
                                    _copy(buf[g, i * ow_ + ow, (r * kernel_w + s) * c_g:],
                                          src[at + s * dil_w * c_ + g * c_g:], c_g)
            for g in range(groups):
                _block_dots(buf[g], 0, nrows * ow_, wp[g], 0, m_g, 0, k_len, seg, res, acc)
                for i in range(nrows):
                    n = (rb + i) // oh_
                    oh = (rb + i) % oh_
                    for f in range(m_g):
                        dst = out[n, g * m_g + f, off_h + oh * step_h, off_w:]
                        for ow in range(ow_):
                            dst[ow * step_w] = res[i * ow_ + ow, f]


# ------------------------------------------------------------------------------- small GEMM


@njit(**_JIT)
def gemm_rows(a, b, out, seg):
    """out[m, :] = sum_k a[m, k] * b[k, :] exactly: row m is a sum of K rows of b scaled by a[m, k].

    a (M, K) and b (K, N) C-contiguous int16, out (M, N) int32 or int64. The inner loop is over N (contiguous, no
    horizontal sums), int32 runs of at most `seg` terms (bounds.segment_length) added into `out`.
    Serial: the caller only sends products below `threads.SMALL_WORK`, which run on one thread anyway.
    """
    m_, k_ = a.shape
    n_ = b.shape[1]
    acc = np.empty(n_, np.int32)
    for m in range(m_):
        row = out[m]
        for j in range(n_):
            row[j] = 0
        for s in range(0, k_, seg):
            for j in range(n_):
                acc[j] = 0
            for k in range(s, min(s + seg, k_)):
                av = np.int32(a[m, k])
                bk = b[k]
                for j in range(n_):
                    acc[j] = np.int32(acc[j] + av * bk[j])  # never wraps (seg bounds it): int32 SIMD lanes
            for j in range(n_):
                row[j] += acc[j]


# ------------------------------------------------------------------------- conv backward weight


@njit(parallel=True, **_JIT)
def conv2d_backward_weight(xp, dy, partial, out_h, out_w, kernel_h, kernel_w, stride_h, stride_w,
                           dil_h, dil_w, images_per_chunk, seg):
    """partial[chunk, m, (c, r, s)] += this chunk of images' share of dW, in int64.

    xp (N, C, Hp, Wp) is the zero-padded int16 input and dy (N, M, OH*OW) int16: a chunk's dy rows
    are its images' planes back to back, and each gathered input row (c, r, s) is a (strided)
    copy of the padded plane, so neither side needs a bounds check.
    """
    n_, c_ = xp.shape[0], xp.shape[1]
    m_ = dy.shape[1]
    chunks, _, k_g = partial.shape
    taps = kernel_h * kernel_w
    c_g = k_g // taps
    groups = c_ // c_g
    m_g = m_ // groups
    plane = out_h * out_w
    for ch in prange(chunks):
        n0 = ch * images_per_chunk
        n1 = min(n0 + images_per_chunk, n_)
        pix = (n1 - n0) * plane
        dyt = np.empty((m_, pix), np.int16)
        cols = np.empty((c_ * taps, pix), np.int16)
        for n in range(n0, n1):
            off = (n - n0) * plane
            for m in range(m_):
                _copy(dyt[m, off:], dy[n, m], plane)
            for c in range(c_):
                for r in range(kernel_h):
                    for s in range(kernel_w):
                        crow = cols[c * taps + r * kernel_w + s]
                        for oh in range(out_h):
                            src = xp[n, c, oh * stride_h + r * dil_h, s * dil_w:]
                            dst = crow[off + oh * out_w:]
                            if stride_w == 1:
                                _copy(dst, src, out_w)
                            else:
                                for ow in range(out_w):
                                    dst[ow] = src[ow * stride_w]
        res = np.empty((m_g, k_g), np.int64)
        acc = np.empty(16, np.int64)
        for b0 in range(0, pix, WGRAD_PIXEL_BLOCK):
            blen = min(WGRAD_PIXEL_BLOCK, pix - b0)
            for g in range(groups):
                _block_dots(dyt, g * m_g, m_g, cols, g * k_g, k_g, b0, blen, seg, res, acc)
                for f in range(m_g):
                    for kk in range(k_g):
                        partial[ch, g * m_g + f, kk] += res[f, kk]


# ------------------------------------------------------------------------------ backend object

# Packed rows are padded to a multiple of this many int16 (64 bytes) so every row starts on a
# cache line; dot products still run over the true length (measured faster than zero-padding).
K_ALIGN = 32


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _padded_nhwc(x: np.ndarray, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """x (N, C, H, W) -> zero-padded int16 (N, H + top + bottom, W + left + right, C)."""
    n, c, h, w = x.shape
    out = np.zeros((n, h + top + bottom, w + left + right, c), np.int16)
    to_padded_nhwc(np.ascontiguousarray(x), out, top, left, SMALL_ELEMENTS)
    return out


def _padded_nchw(x: np.ndarray, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """x (N, C, H, W) -> zero-padded int16 (N, C, H + top + bottom, W + left + right)."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, h + top + bottom, w + left + right), np.int16)
    to_padded_nchw(np.ascontiguousarray(x), out, top, left, SMALL_ELEMENTS)
    return out


def _i16(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.int16)


def pack_forward_weights(w: np.ndarray, groups: int, k_align: int = K_ALIGN) -> np.ndarray:
    """(M, C/G, kh, kw) -> int16 (G, M/G, Kpad) with the reduction in (kh, kw, c) order, zero-padded."""
    m, c_g, kh, kw = w.shape
    k = c_g * kh * kw
    packed = np.zeros((groups, m // groups, _round_up(k, k_align)), np.int16)
    m_g = m // groups
    packed[:, :, :k] = w.reshape(groups, m_g, c_g, kh, kw).transpose(0, 1, 3, 4, 2).reshape(groups, m_g, k)
    return packed


@dataclass(frozen=True)
class PhasePlan:
    """One phase of a strided conv's transpose along one axis: input pixels first, first+stride,
    ... (`count` of them) receive dy only through `taps` (ascending), which makes that phase a
    stride-1 conv of dy (cropped to [crop_lo, crop_hi), then zero-padded by pad_lo/pad_hi) with
    the reversed taps at `dilation`."""

    first: int
    count: int
    taps: tuple[int, ...]
    crop_lo: int
    crop_hi: int
    pad_lo: int
    pad_hi: int
    dilation: int


def phase_plans(size: int, out_size: int, kernel: int, stride: int, dilation: int, pad_begin: int) -> list[PhasePlan]:
    """Split one axis of a conv transpose into its stride phases (stride 1: one phase)."""
    plans = []
    for first in range(min(stride, size)):
        count = len(range(first, size, stride))
        taps = tuple(r for r in range(kernel) if (first + pad_begin - r * dilation) % stride == 0)
        if not taps:
            plans.append(PhasePlan(first, count, taps, 0, 0, 0, 0, 1))
            continue
        # Input pixel first + i*stride meets dy row i - q[t] through tap taps[t] (exact division).
        q = [(r * dilation - first - pad_begin) // stride for r in taps]
        lo, hi = -q[-1], count - 1 - q[0]  # dy rows the phase reads, padding included
        step = (taps[1] - taps[0]) * dilation // stride if len(taps) > 1 else 1
        crop_lo, crop_hi = max(lo, 0), min(hi + 1, out_size)
        plans.append(PhasePlan(first, count, taps, crop_lo, crop_hi, max(0, -lo), max(0, hi + 1 - out_size), step))
    return plans


class NumbaBackend:
    """The portable CPU backend; see `edgetrain.kernels.KernelBackend` for the contract."""

    name = "numba"

    # Small GEMMs with a short reduction (a small batch's Linear layers: dW = dy^T x reduces over the
    # batch) take `gemm_rows`: the 4x4 tiles' K loop is then too short to vectorise, and packing, padding
    # and dispatch cost ~30 us a call. Measured, 1 thread, int16 codes: (M, N, K) = (120, 400, 8) 403 ->
    # 85 us, (84, 120, 8) 116 -> 20 us, (8, 84, 120) 48 -> 21 us, (128, 128, 128) 520 -> 379 us; with
    # long reductions and few columns the tiles win ((8, 16, 2048) 78 against 139 us), hence the limits.
    ROWS_MAX_K = 256
    ROWS_MIN_N = 8

    def gemm_nt(self, a: np.ndarray, bt: np.ndarray, out_dtype: np.dtype, seg: int, amax=None) -> np.ndarray:
        m, k = a.shape
        n = bt.shape[0]
        # threads.SMALL_WORK is read at the call: a test lowers it to force the parallel tiles
        if k <= self.ROWS_MAX_K and n >= self.ROWS_MIN_N and m * n * k < threads.SMALL_WORK:
            out = np.empty((m, n), out_dtype)
            gemm_rows(_i16(a), _i16(bt.T), out, seg)  # both C: one Numba specialisation per out dtype
            return out
        with threads_for(m * k * n):
            return self._gemm_nt(a, bt, out_dtype, seg)

    # Depthwise convs (one channel per group) take `depthwise`'s in-place NCHW kernels: their 9-term
    # reductions leave the GEMM form's 4x4 tiles empty (measured 5-19x slower there). Pointwise convs
    # with at least POINTWISE_MIN_PIXELS per image take `pointwise`'s pixel-vectorised GEMMs (1.4-6x;
    # at 4x4 images, 16-pixel rows, the tiles here were faster: 0.6-1.3x). Those kernels also fuse
    # `rescale`; the GEMM-form kernels return integers and the caller rescales. Other stride-1 convs
    # with at least PLANAR_MIN_PIXELS per image take `planar`'s pixel-vectorised implicit GEMM (measured
    # at batch 8, 1 thread: 1.3-3.5x at 16x16 and up; at 8x8, 0.7-0.8x: left here).
    POINTWISE_MIN_PIXELS = 64
    PLANAR_MIN_PIXELS = 128
    # A depthwise multiply-accumulate costs about this many GEMM ones (short 9-tap sums over small
    # planes), so depthwise convs count that much work toward `threads.SMALL_WORK`: at MobileNetV2's
    # batch-8 shapes, 2 threads took 111 us where 1 took 231 (8 x 96 x 16 x 16, 1.8 M MACs).
    DEPTHWISE_WORK_PER_MAC = 16

    def _work(self, geo) -> int:
        return geo.macs * (self.DEPTHWISE_WORK_PER_MAC if depthwise.is_depthwise(geo) else 1)

    def conv2d_forward(self, x: np.ndarray, w: np.ndarray, geo, out_dtype: np.dtype, seg: int, amax=None,
                       rescale=None) -> np.ndarray:
        with threads_for(self._work(geo)):
            if depthwise.is_depthwise(geo):
                return depthwise.depthwise_forward(x, w, geo, out_dtype, rescale)
            if self._pointwise(geo):
                return pointwise.pointwise_forward(x, w, geo, out_dtype, rescale)
            if planar.takes(geo, False) and geo.out_h * geo.out_w >= self.PLANAR_MIN_PIXELS:
                return planar.planar_forward(x, w, geo, out_dtype, rescale)
            return self._conv2d_forward(x, w, geo, out_dtype, seg)

    def conv2d_backward_data(self, dy: np.ndarray, w: np.ndarray, geo, out_dtype: np.dtype, seg: int, amax=None,
                             rescale=None) -> np.ndarray:
        with threads_for(self._work(geo)):
            if depthwise.is_depthwise(geo):
                return depthwise.depthwise_backward_data(dy, w, geo, out_dtype, rescale)
            if self._pointwise(geo):
                return pointwise.pointwise_backward_data(dy, w, geo, out_dtype, rescale)
            if planar.takes(geo, True) and geo.height * geo.width >= self.PLANAR_MIN_PIXELS:
                return planar.planar_backward_data(dy, w, geo, out_dtype, rescale)
            return self._conv2d_backward_data(dy, w, geo, out_dtype, seg)

    def conv2d_backward_weight(self, dy: np.ndarray, x: np.ndarray, geo, out_dtype: np.dtype, seg: int,
                               amax=None) -> np.ndarray:
        with threads_for(self._work(geo)):
            if depthwise.is_depthwise(geo):
                return depthwise.depthwise_backward_weight(dy, x, geo, out_dtype, seg)
            return self._conv2d_backward_weight(dy, x, geo, out_dtype, seg)

    def _pointwise(self, geo) -> bool:
        return pointwise.is_pointwise(geo) and geo.out_h * geo.out_w >= self.POINTWISE_MIN_PIXELS

    def _gemm_nt(self, a: np.ndarray, bt: np.ndarray, out_dtype: np.dtype, seg: int) -> np.ndarray:
        # A GEMM is a 1x1 conv over M one-pixel images with K channels: one compiled kernel serves
        # both (each kernel costs seconds of JIT), and its 4x4 tiles apply unchanged.
        m, k = a.shape
        out = np.empty((m, bt.shape[0], 1, 1), out_dtype)
        wp = pack_forward_weights(bt.reshape(bt.shape[0], k, 1, 1), 1)
        self._forward_into(out, _i16(a).reshape(m, 1, 1, k), wp, (1, 1), (0, 0), (1, 1), (1, 1), (1, 1), (1, 1), seg)
        return out.reshape(m, bt.shape[0])

    def _conv2d_forward(self, x: np.ndarray, w: np.ndarray, geo, out_dtype: np.dtype, seg: int) -> np.ndarray:
        out = np.empty(geo.y_shape, out_dtype)
        xp = _padded_nhwc(x, geo.pad_top, geo.pad_left, geo.pad_bottom, geo.pad_right)
        self._forward_into(out, xp, pack_forward_weights(w, geo.groups), (geo.out_h, geo.out_w), (0, 0), (1, 1),
                           (geo.stride_h, geo.stride_w), (geo.dilation_h, geo.dilation_w), w.shape[2:], seg)
        return out

    @staticmethod
    def _forward_into(out, xp, wp, out_hw, offset, step, stride, dilation, kernel, seg) -> None:
        """Run the forward kernel on padded NHWC xp, placing pixel (i, j) at offset + (i, j) * step."""
        n, hp, wp_, c = xp.shape
        k_len = (c // wp.shape[0]) * kernel[0] * kernel[1]
        conv2d_forward(xp.reshape(n, hp, wp_ * c), wp, out, out_hw[0], out_hw[1], offset[0], offset[1],
                       step[0], step[1], k_len, stride[0], stride[1], dilation[0], dilation[1], kernel[0], kernel[1],
                       max(1, -(-FORWARD_MIN_PIXELS // out_hw[1])), seg, n_chunks(xp.shape[0] * out_hw[0]))

    def _conv2d_backward_data(self, dy: np.ndarray, w: np.ndarray, geo, out_dtype: np.dtype, seg: int) -> np.ndarray:
        """dx as stride_h * stride_w stride-1 convs of dy, one per phase of dx (see `phase_plans`)."""
        out = np.empty(geo.x_shape, out_dtype)
        m_g, c_g = geo.out_per_group, geo.in_per_group
        # (G, M/G, C/G, kh, kw) -> (G, C/G, M/G, kh, kw): dx's channels are the convs' outputs.
        wt = w.reshape(geo.groups, m_g, c_g, geo.kernel_h, geo.kernel_w).transpose(0, 2, 1, 3, 4)
        for ph in phase_plans(geo.height, geo.out_h, geo.kernel_h, geo.stride_h, geo.dilation_h, geo.pad_top):
            for pw in phase_plans(geo.width, geo.out_w, geo.kernel_w, geo.stride_w, geo.dilation_w, geo.pad_left):
                if ph.count == 0 or pw.count == 0:
                    continue
                if ph.crop_lo >= ph.crop_hi or pw.crop_lo >= pw.crop_hi:  # no tap reaches dy
                    out[:, :, ph.first::geo.stride_h, pw.first::geo.stride_w] = 0
                    continue
                taps = wt[:, :, :, list(ph.taps[::-1]), :][:, :, :, :, list(pw.taps[::-1])]
                wp = pack_forward_weights(taps.reshape(geo.in_channels, m_g, len(ph.taps), len(pw.taps)), geo.groups)
                dyp = _padded_nhwc(dy[:, :, ph.crop_lo:ph.crop_hi, pw.crop_lo:pw.crop_hi],
                                   ph.pad_lo, pw.pad_lo, ph.pad_hi, pw.pad_hi)
                self._forward_into(out, dyp, wp, (ph.count, pw.count), (ph.first, pw.first),
                                   (geo.stride_h, geo.stride_w), (1, 1), (ph.dilation, pw.dilation),
                                   (len(ph.taps), len(pw.taps)), seg)
        return out

    def _conv2d_backward_weight(self, dy: np.ndarray, x: np.ndarray, geo, out_dtype: np.dtype, seg: int) -> np.ndarray:
        plane = geo.out_h * geo.out_w
        per_chunk = max(1, WGRAD_TARGET_PIXELS // max(1, plane))
        # Keep at least two work items per thread when the batch allows, for load balance.
        per_chunk = min(per_chunk, max(1, -(-geo.batch // (2 * pool_threads()))))
        chunks = -(-geo.batch // per_chunk)
        k_g = geo.in_per_group * geo.taps
        partial = np.zeros((chunks, geo.out_channels, k_g), np.int64)
        xp = _padded_nchw(x, geo.pad_top, geo.pad_left, geo.pad_bottom, geo.pad_right)
        conv2d_backward_weight(xp, _i16(dy).reshape(geo.batch, geo.out_channels, plane), partial,
                               geo.out_h, geo.out_w, geo.kernel_h, geo.kernel_w, geo.stride_h, geo.stride_w,
                               geo.dilation_h, geo.dilation_w, per_chunk, seg)
        return partial.sum(axis=0).astype(out_dtype, copy=False).reshape(geo.w_shape)
