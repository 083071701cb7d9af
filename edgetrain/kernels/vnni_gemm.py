"""Exact u8 x s8 GEMMs on the VNNI tiles of `vnni` (the linear layers, and 1x1 convs on small maps).

C (R, L) = S (R, K) @ U (L, K)^T: the int8 operand S gives the tiles' broadcast rows (used in place
when its rows are C-contiguous whole words, MT of them a tile; else copied, zero-padded), the other
the lanes, in VNNI layout: words[i, l] = the bytes U[l, 4i..4i+3] (`pack_words`; `transpose_u32` for
rows of whole words, a word transpose). A U of the other signedness than the tiles' lanes (unsigned, or
signed for `sdot`) is coded with XOR 0x80 and its zero-point term, 128 times S's row sums (negated for a
signed U on unsigned lanes; `vnni.lane_coding`), starts the accumulators. Every output tile is summed by one thread in
one fixed order, so neither the thread count nor the path changes a bit; exact while K <= RAW_TERMS.

Only compiled where `vnni.available()` (see `vnni`).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgetrain.kernels.vnni import LANES, MT, gemm_tile, gemm_tile_count, gemm_tiles

_JIT = dict(cache=True, fastmath=False, nogil=True)

@njit(**_JIT)
def pack_words(u, out, xor):
    """The unsigned operand of a GEMM in VNNI layout: out[i, l] (uint32) = the bytes u[l, 4i..4i+3] ^ xor
    for u (L, K) bytes of any strides (K need not be a multiple of 4: bytes beyond it are 0, and the
    signed rows are 0 there too); lanes l >= L of out are left as they are. The loops follow u's
    layout: along k where its rows are contiguous, else along l (a transposed view: 4 rows of the
    storage per word, read contiguously)."""
    lanes, k = u.shape
    whole = k // 4
    x8 = np.uint8(xor)
    if u.strides[1] == 1:
        for ln in range(lanes):
            row = u[ln]
            for i in range(whole):
                out[i, ln] = (np.uint32(row[4 * i] ^ x8) | (np.uint32(row[4 * i + 1] ^ x8) << np.uint32(8))
                              | (np.uint32(row[4 * i + 2] ^ x8) << np.uint32(16))
                              | (np.uint32(row[4 * i + 3] ^ x8) << np.uint32(24)))
    else:
        for i in range(whole):
            r0, r1, r2, r3 = u[:, 4 * i], u[:, 4 * i + 1], u[:, 4 * i + 2], u[:, 4 * i + 3]
            d = out[i]
            for ln in range(lanes):
                d[ln] = (np.uint32(r0[ln] ^ x8) | (np.uint32(r1[ln] ^ x8) << np.uint32(8))
                         | (np.uint32(r2[ln] ^ x8) << np.uint32(16)) | (np.uint32(r3[ln] ^ x8) << np.uint32(24)))
    if k > 4 * whole:
        for ln in range(lanes):
            word = np.uint32(0)
            for j in range(k - 4 * whole):
                word |= np.uint32(u[ln, 4 * whole + j] ^ x8) << np.uint32(8 * j)
            out[whole, ln] = word


@njit(**_JIT)
def transpose_u32(u32, out, xor):
    """`pack_words` for rows of whole words (u32 (L, k4), a uint32 view of C-contiguous bytes): out is
    u32's transpose, each word XORed with xor in every byte. Along out's rows, gathering u32's columns:
    LLVM vectorises that order (4 us for 128 x 196 words, against 24 to 59 us for the others)."""
    x32 = np.uint32(xor) * np.uint32(0x01010101)
    for i in range(u32.shape[1]):
        d = out[i]
        for ln in range(u32.shape[0]):
            d[ln] = u32[ln, i] ^ x32


@njit(inline="always", **_JIT)
def _gemm_shape(s, u):
    """k4, Rpad, Lpad of s (R, K) @ u (L, K)^T on the tiles."""
    return (s.shape[1] + 3) // 4, -((-s.shape[0]) // MT) * MT, -((-u.shape[0]) // LANES) * LANES


@njit(inline="always", **_JIT)
def _pack(u, words, xor):
    """u in VNNI layout: u is bytes (L, K), or (L, k4) words of whole-word rows (`transpose_u32`)."""
    if u.itemsize == 4:
        transpose_u32(u, words, xor)
    else:
        pack_words(u, words, xor)


@njit(inline="always", **_JIT)
def _gemm_operands(s, u, xor, zp, sp, words, init):
    """The tiles' operands for s (R, K) int8 @ u (L, K)^T bytes (or words, `_pack`), written into the buffers of
    `_gemm_shape`: s as zero-padded rows sp (Rpad, 4*k4), u in `pack_words`' layout (words) and the
    accumulators' start init (zp * s's row sums where u is coded with the XOR, u = code + zp: `vnni.lane_coding`;
    an s8 u on `vpdpbusd`: sum s (u + 128) = sum s u + 128 sum s, so zp = -128)."""
    rows, k = s.shape
    if sp.shape[0] == 0:  # s is used in place (`_rows_in_place`): only the start values
        for r in range(rows):
            total = np.int32(0)
            if xor:
                src = s[r]
                for t in range(k):
                    total += np.int32(src[t])
            init[r] = zp * total
        _pack(u, words, xor)
        return
    for r in range(sp.shape[0]):
        dst = sp[r]
        if r >= rows:
            dst[:] = 0
            init[r] = 0
            continue
        src = s[r]
        for t in range(k):  # a gather where s is a transposed view (a weight gradient's dy^T): vectorised
            dst[t] = src[t]
        dst[k:] = 0
        total = np.int32(0)
        if xor:
            for t in range(k):
                total += np.int32(dst[t])
        init[r] = zp * total
    _pack(u, words, xor)  # lanes beyond L are left as they are: computed and dropped


@njit(inline="always", **_JIT)
def _rows_in_place(s):
    """s can be the tiles' row operand as it is: C-contiguous rows of whole words, MT of them a tile."""
    return s.shape[0] % MT == 0 and s.shape[1] % 4 == 0 and s.strides[1] == 1 and s.strides[0] == s.shape[1]


@njit(**_JIT)
def gemm_small(s, u, xor, zp):
    """s (R, K) int8 @ u (L, K)^T (bytes, coded to the tiles' lane type with `xor`, zero point zp) as int32
    (Rpad, Lpad), exact for K <= RAW_TERMS, on this thread: one compiled call from the operands to the result."""
    k4, rpad, lpad = _gemm_shape(s, u)
    # One name per array, no tuple unpacking: Numba 0.68 lost writes to arrays bound that way (see
    # dfq.kernels.sample_sums).
    init = np.empty(rpad, np.int32)
    words = np.empty((k4, lpad), np.uint32)
    c = np.empty((rpad, lpad), np.int32)
    if _rows_in_place(s):
        _gemm_operands(s, u, xor, zp, np.empty((0, 4 * k4), np.int8), words, init)  # s may be read-only
        gemm_words(s, words, c, init)
    else:
        sp = np.empty((rpad, 4 * k4), np.int8)
        _gemm_operands(s, u, xor, zp, sp, words, init)
        gemm_words(sp, words, c, init)
    return c


@njit(**_JIT)
def gemm_large(s, u, xor, zp, workers, sp, words, init, c):
    """`gemm_small` into the caller's buffers (shapes from `_gemm_shape`: kept between calls, fresh
    ones of this size cost page faults), its tiles dealt to `workers` threads (`gemm_words_parallel`)."""
    if _rows_in_place(s):
        _gemm_operands(s, u, xor, zp, sp[:0], words, init)
        gemm_words_parallel(s, words, c, init, workers)
    else:
        _gemm_operands(s, u, xor, zp, sp, words, init)
        gemm_words_parallel(sp, words, c, init, workers)


@njit(inline="always", **_JIT)
def _row_table(words):
    """The address of each of words' rows (a GEMM step's unsigned operand), for the tiles."""
    brows = np.empty(words.shape[0], np.int64)
    for i in range(words.shape[0]):
        brows[i] = words.ctypes.data + i * words.strides[0]
    return brows


@njit(**_JIT)
def gemm_words(a, words, c, init):
    """c (Rpad, Lpad) int32 = init[row] + a (Rpad, 4*k4) int8 rows @ words (k4, Lpad), the unsigned
    operand in `pack_words`' layout, on this thread (`vnni.gemm_tiles`); Rpad a multiple of MT, Lpad of
    LANES. Returns words' size: the tiles read words through raw addresses, and Numba frees an array
    after the last use of its name, so words is used after them (a GEMM once read freed memory here)."""
    gemm_tiles(a, _row_table(words), c, words.shape[0], init)
    return words.size


@njit(parallel=True, **_JIT)
def gemm_words_parallel(a, words, c, init, workers):
    """`gemm_words` with its output tiles dealt round-robin to `workers` threads (each tile is summed by
    one thread in the same order, so the thread count cannot change a bit)."""
    brows = _row_table(words)
    tiles = gemm_tile_count(c)
    for w in prange(workers):
        for t in range(w, tiles, workers):
            gemm_tile(a, brows, c, words.shape[0], init, t)
    return words.size
