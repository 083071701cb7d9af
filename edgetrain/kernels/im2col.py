"""Byte-level layout kernels of the GEMM backend: patch matrices (im2col) and transposes.

Every kernel moves bytes (uint8 views of int8/uint8 data) and may XOR each one with 0x80 on the
way: that maps a uint8 value u to the int8 value u - 128 and an int8 value s to the uint8 value
s + 128, the re-encoding a u8 x s8 GEMM with zero points needs (see `ort_backend`). Padding is
written as the byte that encodes 0 (0 ^ xor), so it contributes exactly nothing after the
zero-point correction.

Patch rows without gathers ("phase planes"): for one (image, channel) the kernel first copies the
zero-padded input into `stride_h * stride_w` phase planes of `hq x wq` bytes (plane (a, b) holds
input rows a, a + stride_h, ... and columns b, b + stride_w, ...). A tap (r, s) of the conv then
reads one plane at a fixed offset, and if the output grid is `out_h x wq` (the `wq - out_w` extra
"junk" columns at the end of each output row are computed and ignored) its whole patch row is ONE
contiguous copy of `out_h * wq` bytes from that plane. This turns im2col from many short row copies
into a few long ones; the price is `wq / out_w` more GEMM columns (6% for 32x32 at 3x3, 25% for 8x8).

The kernels are serial (`nogil`): the backend runs them on image chunks from several threads,
each followed by the GEMM of its chunk while the chunk is still in cache.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from edgetrain.kernels.rescale import image_scale, scale_row

_JIT = dict(cache=True, fastmath=False, nogil=True)


@njit(inline="always", **_JIT)
def _ceil_div(a, b):
    return -((-a) // b)


@njit(inline="always", **_JIT)
def _fill(dst, n, value):
    for t in range(n):
        dst[t] = value


@njit(inline="always", **_JIT)
def channel_planes(src, planes, used, stride_h, stride_w, off_h, off_w, lo_h, hi_h, lo_w, hi_w, hq, wq, x8):
    """Write one channel's pixels into its phase planes (phases, hq*wq): plane (a, b), row i, column j
    takes src[i*stride_h + a + off_h, j*stride_w + b + off_w] ^ x8 inside [lo_h, hi_h) x [lo_w, hi_w);
    the rest (the padding) is left as it is: the caller fills the planes with the padding code once,
    since the valid region is the same for every channel and image. Loops run from 0 over slices
    and carry no branch: that is what LLVM vectorises (measured 20x faster than indexing flat arrays
    or filling pads row by row)."""
    for a in range(stride_h):
        i0 = min(hq, max(0, _ceil_div(lo_h - a - off_h, stride_h)))
        i1 = max(i0, min(hq, _ceil_div(hi_h - a - off_h, stride_h)))
        for b in range(stride_w):
            ph = a * stride_w + b
            if not used[ph]:
                continue
            base_w = b + off_w
            j0 = min(wq, max(0, _ceil_div(lo_w - base_w, stride_w)))
            j1 = max(j0, min(wq, _ceil_div(hi_w - base_w, stride_w)))
            dst_plane = planes[ph]
            for i in range(i0, i1):
                srow = src[i * stride_h + a + off_h]
                dst = dst_plane[i * wq + j0:i * wq + j1]
                if stride_w == 1:
                    seg = srow[j0 + base_w:j1 + base_w]
                    for t in range(j1 - j0):
                        dst[t] = seg[t] ^ x8
                else:
                    seg = srow[j0 * stride_w + base_w:]
                    for t in range(j1 - j0):
                        dst[t] = seg[t * stride_w] ^ x8


@njit(**_JIT)
def patches(x, out, n0, n1, per_block, used, tap_phase, tap_off, stride_h, stride_w, off_h, off_w,
            lo_h, hi_h, lo_w, hi_w, hq, wq, out_h, xor):
    """Patch matrix of images n0..n1-1 of x (N, C, H, W) bytes into out (blocks, C*taps, per_block*out_h*wq).

    Image n lands in block (n - n0) // per_block at column ((n - n0) % per_block) * out_h * wq; its
    row c*taps + t is plane `tap_phase[t]` of channel c read from flat offset `tap_off[t]`. Phase
    plane (a, b), row i, column j holds x[n, c, i*stride_h + a + off_h, j*stride_w + b + off_w] ^ xor
    inside [lo_h, hi_h) x [lo_w, hi_w), else the padding byte `xor`; `used[a*stride_w + b]` says
    which planes any tap reads. per_block = 1 gives (images, K, P): the B operand of W @ patches,
    whose result is NCHW; one block of several images is the transposed patch matrix of a weight
    gradient's reduction.
    """
    c_ = x.shape[1]
    taps = tap_phase.size
    plane = out_h * wq
    x8 = np.uint8(xor)
    planes = np.empty((stride_h * stride_w, hq * wq), np.uint8)
    for ph in range(stride_h * stride_w):
        if used[ph]:
            _fill(planes[ph], hq * wq, x8)  # padding everywhere; valid pixels are overwritten
    for n in range(n0, n1):
        blk = (n - n0) // per_block
        col0 = ((n - n0) % per_block) * plane
        for c in range(c_):
            channel_planes(x[n, c], planes, used, stride_h, stride_w, off_h, off_w, lo_h, hi_h, lo_w, hi_w, hq, wq, x8)
            for t in range(taps):
                o = tap_off[t]
                s = planes[tap_phase[t]][o:o + plane]
                d = out[blk, c * taps + t][col0:col0 + plane]
                for q in range(plane):
                    d[q] = s[q]


@njit(**_JIT)
def pixel_rows(dy, out, n0, n1, out_h, out_w, wq, xor):
    """dy (N, M, out_h*out_w) bytes -> out ((n1-n0)*out_h*wq, M): row (n, oh, j) = dy[n, :, oh*out_w + j] ^ xor
    for j < out_w, the code of 0 (`xor`) for the junk columns j >= out_w (they must add nothing)."""
    m_ = dy.shape[1]
    x8 = np.uint8(xor)
    tile = 16
    for n in range(n0, n1):
        r0 = (n - n0) * out_h * wq
        src = dy[n]
        for oh in range(out_h):
            rbase = r0 + oh * wq
            for ow0 in range(0, out_w, tile):
                ow1 = min(out_w, ow0 + tile)
                for m in range(m_):
                    srow = src[m, oh * out_w:]
                    for ow in range(ow0, ow1):
                        out[rbase + ow, m] = srow[ow] ^ x8
            for ow in range(out_w, wq):
                _fill(out[rbase + ow], m_, x8)


_M1 = np.uint64(0x00FF00FF00FF00FF)
_M2 = np.uint64(0x0000FFFF0000FFFF)
_M4 = np.uint64(0x00000000FFFFFFFF)
_S8, _S16, _S32 = np.uint64(8), np.uint64(16), np.uint64(32)


@njit(inline="always", **_JIT)
def _swap(lo, hi, shift, mask):
    t = ((lo >> shift) ^ hi) & mask
    return lo ^ (t << shift), hi ^ t


@njit(inline="always", **_JIT)
def _transpose8(a0, a1, a2, a3, a4, a5, a6, a7):
    """An 8x8 byte block held as eight 64-bit words (one row each), transposed: three rounds of swaps."""
    a0, a1 = _swap(a0, a1, _S8, _M1)
    a2, a3 = _swap(a2, a3, _S8, _M1)
    a4, a5 = _swap(a4, a5, _S8, _M1)
    a6, a7 = _swap(a6, a7, _S8, _M1)
    a0, a2 = _swap(a0, a2, _S16, _M2)
    a1, a3 = _swap(a1, a3, _S16, _M2)
    a4, a6 = _swap(a4, a6, _S16, _M2)
    a5, a7 = _swap(a5, a7, _S16, _M2)
    a0, a4 = _swap(a0, a4, _S32, _M4)
    a1, a5 = _swap(a1, a5, _S32, _M4)
    a2, a6 = _swap(a2, a6, _S32, _M4)
    a3, a7 = _swap(a3, a7, _S32, _M4)
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit(**_JIT)
def pixel_rows8(dy64, out64, n0, n1, out_h, out_w, wq, xor):
    """`pixel_rows` for out_w and M multiples of 8, on 64-bit words: dy64 (N, M, P/8) and out64
    (rows, M/8) are uint64 views, and each 8x8 block of bytes is transposed in registers (three
    rounds of masked swaps) instead of byte by byte (measured ~8x faster)."""
    m_ = dy64.shape[1]
    x64 = np.uint64(0x8080808080808080) if xor else np.uint64(0)
    groups = out_w // 8
    for n in range(n0, n1):
        r0 = (n - n0) * out_h * wq
        src = dy64[n]
        for oh in range(out_h):
            rbase = r0 + oh * wq
            for g in range(groups):
                p = oh * groups + g
                row = rbase + 8 * g
                for h in range(m_ // 8):
                    m = 8 * h
                    a0, a1, a2, a3, a4, a5, a6, a7 = _transpose8(
                        src[m, p] ^ x64, src[m + 1, p] ^ x64, src[m + 2, p] ^ x64, src[m + 3, p] ^ x64,
                        src[m + 4, p] ^ x64, src[m + 5, p] ^ x64, src[m + 6, p] ^ x64, src[m + 7, p] ^ x64)
                    out64[row, h] = a0
                    out64[row + 1, h] = a1
                    out64[row + 2, h] = a2
                    out64[row + 3, h] = a3
                    out64[row + 4, h] = a4
                    out64[row + 5, h] = a5
                    out64[row + 6, h] = a6
                    out64[row + 7, h] = a7
            for ow in range(out_w, wq):
                dst = out64[rbase + ow]
                for h in range(m_ // 8):
                    dst[h] = x64


@njit(**_JIT)
def place_phase(y, out, n0, first_h, first_w, step_h, step_w, out_w, wq):
    """out[n0 + i, c, first_h + oh*step_h, first_w + ow*step_w] = y[i, c, oh*wq + ow] for ow < out_w:
    one stride phase of a transposed conv (computed with junk columns) into its place in dx."""
    cnt, c_, cols = y.shape
    out_h = cols // wq
    for i in range(cnt):
        for c in range(c_):
            src = y[i, c]
            dst_plane = out[n0 + i, c]
            for oh in range(out_h):
                s = src[oh * wq:oh * wq + out_w]
                d = dst_plane[first_h + oh * step_h, first_w:]
                for ow in range(out_w):
                    d[ow * step_w] = s[ow]


@njit(**_JIT)
def rescale_chunk(y, out, n0, scale, out_w, wq):
    """out[n0 + i, c, oh, :] = y[i, c, oh*wq:oh*wq + out_w] * scale[c] (the junk columns dropped);
    scale as `rescale.scale_rows` gives it (one row, or one per image)."""
    cnt, c_, cols = y.shape
    out_h = cols // wq
    for i in range(cnt):
        for c in range(c_):
            src = y[i, c]
            s = image_scale(scale, n0 + i, c)
            for oh in range(out_h):
                scale_row(out[n0 + i, c, oh], src[oh * wq:oh * wq + out_w], s, out_w)


@njit(**_JIT)
def place_phase_scaled(y, out, n0, first_h, first_w, step_h, step_w, out_w, wq, scale):
    """`place_phase` into a float dx, each value times scale[c] or scale[n, c] (`scale_row`'s arithmetic)."""
    cnt, c_, cols = y.shape
    out_h = cols // wq
    row = np.empty(out_w, out.dtype)
    for i in range(cnt):
        for c in range(c_):
            src = y[i, c]
            s = image_scale(scale, n0 + i, c)
            dst_plane = out[n0 + i, c]
            for oh in range(out_h):
                scale_row(row, src[oh * wq:oh * wq + out_w], s, out_w)
                d = dst_plane[first_h + oh * step_h, first_w:]
                for ow in range(out_w):
                    d[ow * step_w] = row[ow]


@njit(**_JIT)
def copy_xor(src, dst, xor):
    """dst (C-contiguous) = src ^ xor for 2-D byte arrays of any strides (e.g. a transposed view),
    in 32x32 tiles so both the strided reads and the writes stay in cache lines."""
    rows, cols = src.shape
    x8 = np.uint8(xor)
    for i0 in range(0, rows, 32):
        i1 = min(rows, i0 + 32)
        for j0 in range(0, cols, 32):
            j1 = min(cols, j0 + 32)
            for i in range(i0, i1):
                d = dst[i]
                s = src[i]
                for j in range(j0, j1):
                    d[j] = s[j] ^ x8


@njit(**_JIT)
def transpose_words(src64, dst64, xor):
    """dst = (src ^ xor)^T for byte matrices src (R, C) and dst (C, R), R and C multiples of 8,
    passed as uint64 views (R, C/8) and (C, R/8): 8x8 byte blocks transposed in registers (the
    rounds of masked swaps of `pixel_rows8`), ~8x faster than a byte-by-byte transpose."""
    rows = src64.shape[0]
    x64 = np.uint64(0x8080808080808080) if xor else np.uint64(0)
    for g in range(src64.shape[1]):
        for r0 in range(0, rows, 8):
            a0, a1, a2, a3, a4, a5, a6, a7 = _transpose8(
                src64[r0, g] ^ x64, src64[r0 + 1, g] ^ x64, src64[r0 + 2, g] ^ x64, src64[r0 + 3, g] ^ x64,
                src64[r0 + 4, g] ^ x64, src64[r0 + 5, g] ^ x64, src64[r0 + 6, g] ^ x64, src64[r0 + 7, g] ^ x64)
            c = 8 * g
            q = r0 // 8
            dst64[c, q] = a0
            dst64[c + 1, q] = a1
            dst64[c + 2, q] = a2
            dst64[c + 3, q] = a3
            dst64[c + 4, q] = a4
            dst64[c + 5, q] = a5
            dst64[c + 6, q] = a6
            dst64[c + 7, q] = a7


@njit(**_JIT)
def channel_major(t, out):
    """out[c, n*P + p] = t[n, c, p]: (N, C, P) bytes -> (C, N*P), each channel's positions over the whole
    batch in one row (a 1x1 conv's weight gradient reduces along it). One contiguous run per (c, n):
    NumPy's transposed copy, its inner loop a few bytes long, took 1.4-2.5x as long on MobileNetV2's
    maps at batch 8 ((8, 336, 2, 2): 9.2 against 5.2 us)."""
    n_, c_, p_ = t.shape
    for c in range(c_):
        row = out[c]
        for n in range(n_):
            src = t[n, c]
            dst = row[n * p_:(n + 1) * p_]
            for p in range(p_):
                dst[p] = src[p]


@njit(**_JIT)
def position_major(t, out):
    """out[n*P + p, c] = t[n, c, p]: (N, C, P) bytes -> (N*P, C), one row per position of the batch with
    its channels contiguous (a 1x1 conv's forward and backward-data as one GEMM). `pixel_rows` writes
    the same rows, but walks each row's positions inside the channel loop, 1.7x slower on 2x2 maps
    ((8, 336, 2, 2) forward 15 -> 25 us); this loop runs along the channels."""
    n_, c_, p_ = t.shape
    for n in range(n_):
        src = t[n]
        for p in range(p_):
            dst = out[n * p_ + p]
            for c in range(c_):
                dst[c] = src[c, p]
