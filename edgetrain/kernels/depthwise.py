"""Depthwise conv kernels (groups == in_channels == out_channels): forward, backward-data, backward-weight.

A depthwise conv has one input channel per output channel, so its reduction is only kh * kw taps
long: the GEMM form (`numba_backend.conv2d_forward`, one group of one filter at a time) spends its
time gathering 9-element patches and running 9-term dot products, scalar. Here every plane is
computed in place in NCHW. The plane is copied zero-padded into a scratch (Hp, Wp), on which each tap
is ONE contiguous run of (OH - 1) * Wp + OW values (the Wp - OW "junk" columns per row are computed
and dropped): one weight times that run is added to the accumulator, a loop LLVM vectorises (3x3
kernels on larger planes sum all nine runs at once, in registers). A strided conv first splits the
padded plane into its stride phases (sh * sw planes, phase (a, b) holding rows a, a + sh, ... and
columns b, b + sw, ...), on which each tap is again one contiguous run. Backward-data at stride 1 is
the forward with the taps flipped and dy padded by the kernel's reach less the pads; strided, each tap
adds its weight times dy (laid on the phase grid) to a run of the phase it read, and the phases are
interleaved back. Measured at MobileNetV2-0.35's batch-8 strided shapes (1 thread): forward 2.6-3x,
backward-data 1.7-2.2x faster than the earlier row-by-row strided loops.

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
2.3-3.2x; strided weight gradients take the same dot products on the stride phases.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgetrain.kernels.rescale import image_scale, scale_row, scale_rows
from edgetrain.kernels.threads import pool_threads

# From this many outputs per plane (a 16x16 plane's 286) the nine taps are summed in registers
# (_runs_3x3); below it the tap-at-a-time loop measured faster (8x8 planes: 270 against 310-430 us).
RUNS_3X3_MIN = 256

# helpers plain @njit (see numba_backend._JIT); _scratch stays inlined: it reads its caller's 0-d acc_like
_JIT = dict(cache=True, fastmath=False, nogil=True)


def is_depthwise(geo) -> bool:
    """True for a conv these kernels take: one input and one output channel per group."""
    return geo.groups > 1 and geo.in_per_group == 1 and geo.out_per_group == 1


@njit(**_JIT)
def _ceil_div(a, b):
    return -((-a) // b)


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


@njit(inline="always", **_JIT)
def _row_start(r, sh, sw, dh, hq, wq):
    """The row part of tap (r, .)'s run start in a flat array of phase planes (see _phase_pad_into):
    padded input row r * dh = sh * qr + a lies in phase row a, qr rows down. No division at stride 1
    (a per-plane divide per tap cost as much as a 4x4 plane's arithmetic)."""
    if sh == 1:
        return r * dh * wq
    a, qr = (r * dh) % sh, (r * dh) // sh
    return (a * sw * hq + qr) * wq


@njit(inline="always", **_JIT)
def _col_start(s, sw, dw, hq, wq):
    """The column part of tap (., s)'s run start: column s * dw = sw * qs + b, in phase column b."""
    if sw == 1:
        return s * dw
    b, qs = (s * dw) % sw, (s * dw) // sw
    return b * hq * wq + qs


@njit(inline="always", **_JIT)
def _tap_start(r, s, sh, sw, dh, dw, hq, wq):
    """Where tap (r, s)'s run starts: phase plane (a, b) = (r * dh % sh, s * dw % sw), then qr rows
    and qs columns into it."""
    return _row_start(r, sh, sw, dh, hq, wq) + _col_start(s, sw, dw, hq, wq)


@njit(**_JIT)
def _phase_pad_into(src, pt, pl, sh, sw, scratch):
    """scratch (sh * sw * Hq, Wq) = the stride phases of src (Hs, Ws) padded by pt/pl (negative:
    cropped): phase (a, b), rows [(a * sw + b) * Hq, + Hq), holds the padded input at
    (sh * i + a, sw * j + b) at (i, j), zeros outside src. At stride 1 the one phase is the padded plane."""
    if sh == 1 and sw == 1:
        _pad_into(src, pt, pl, scratch)
        return
    hs, ws = src.shape
    wq = scratch.shape[1]
    hq = scratch.shape[0] // (sh * sw)
    scratch[:, :] = 0
    for a in range(sh):
        for b in range(sw):
            base = (a * sw + b) * hq
            j0 = min(wq, max(0, _ceil_div(pl - b, sw)))  # sw * j + b - pl within [0, ws)
            j1 = max(j0, min(wq, _ceil_div(ws + pl - b, sw)))
            for i in range(hq):
                si = sh * i + a - pt
                if si < 0 or si >= hs:
                    continue
                srow = src[si]
                drow = scratch[base + i]
                for j in range(j0, j1):
                    drow[j] = srow[sw * j + b - pl]


@njit(**_JIT)
def _flat_plane(src, wpl, flip, pt, pl, sh, sw, dh, dw, scratch, acc):
    """Conv of one plane src (Hs, Ws) with taps wpl (flipped when `flip`: the stride-1 transposed conv),
    src padded by pt/pl (negative: cropped), into acc (OH, Wq) whose first OW columns are the output.

    src is copied into its stride phases (_phase_pad_into; at stride 1 just zero-padded), on which every
    tap is ONE contiguous run of (OH - 1) * Wq + OW values, a loop LLVM vectorises, instead of OH
    strided runs of OW (the Wq - OW extra "junk" columns per row are computed and dropped)."""
    kh, kw = wpl.shape
    wq = scratch.shape[1]
    strided = sh != 1 or sw != 1
    hq = scratch.shape[0] // (sh * sw) if strided else scratch.shape[0]  # no divide per plane at stride 1
    out_h = acc.shape[0]
    out_w = wq - ((kw - 1) * dw) // sw if strided else wq - (kw - 1) * dw
    sflat = scratch.reshape(scratch.shape[0] * wq)
    _phase_pad_into(src, pt, pl, sh, sw, scratch)
    length = (out_h - 1) * wq + out_w
    aflat = acc.reshape(out_h * wq)
    if kh == 3 and kw == 3 and length >= RUNS_3X3_MIN:
        _runs_3x3(sflat, wpl, flip, sh, sw, dh, dw, hq, wq, aflat, length)
        return
    aflat[:] = 0
    for r in range(kh):
        for s in range(kw):
            wv = wpl[kh - 1 - r, kw - 1 - s] if flip else wpl[r, s]
            run = sflat[_tap_start(r, s, sh, sw, dh, dw, hq, wq):]
            for t in range(length):
                aflat[t] += wv * run[t]


@njit(**_JIT)
def _runs_3x3(sflat, wpl, flip, sh, sw, dh, dw, hq, wq, aflat, length):
    """aflat[t] = the nine taps' products summed at once (tap (r, s) reads its run from _tap_start):
    the sum stays in registers, where the general loop loads and stores the accumulator once per tap
    (measured at MobileNetV2-0.35's batch-8 shapes, 1 thread: 1.5x faster at 32x32; see RUNS_3X3_MIN).
    Integers: exact in any order."""
    if flip:
        w0, w1, w2, w3, w4, w5, w6, w7, w8 = (wpl[2, 2], wpl[2, 1], wpl[2, 0], wpl[1, 2], wpl[1, 1], wpl[1, 0],
                                              wpl[0, 2], wpl[0, 1], wpl[0, 0])
    else:
        w0, w1, w2, w3, w4, w5, w6, w7, w8 = (wpl[0, 0], wpl[0, 1], wpl[0, 2], wpl[1, 0], wpl[1, 1], wpl[1, 2],
                                              wpl[2, 0], wpl[2, 1], wpl[2, 2])
    r0, r1, r2 = _row_start(0, sh, sw, dh, hq, wq), _row_start(1, sh, sw, dh, hq, wq), _row_start(2, sh, sw, dh, hq, wq)
    c0, c1, c2 = _col_start(0, sw, dw, hq, wq), _col_start(1, sw, dw, hq, wq), _col_start(2, sw, dw, hq, wq)
    s0, s1, s2 = sflat[r0 + c0:], sflat[r0 + c1:], sflat[r0 + c2:]
    s3, s4, s5 = sflat[r1 + c0:], sflat[r1 + c1:], sflat[r1 + c2:]
    s6, s7, s8 = sflat[r2 + c0:], sflat[r2 + c1:], sflat[r2 + c2:]
    for t in range(length):
        aflat[t] = (w0 * s0[t] + w1 * s1[t] + w2 * s2[t] + w3 * s3[t] + w4 * s4[t] + w5 * s5[t]
                    + w6 * s6[t] + w7 * s7[t] + w8 * s8[t])


@njit(**_JIT)
def _scatter_plane(dypl, wpl, sh, sw, dh, dw, pt, pl, grid, phases, acc):
    """acc (H, W) = the strided transposed conv of one gradient plane dypl (OH, OW).

    dy is laid on the forward's phase grid (Wq wide, zero junk columns); each tap adds its weight
    times that grid to ONE contiguous run of the phase plane it read in the forward (the same
    _tap_start), so the scatter vectorises; then the phases are interleaved back into dx, less the
    pads (input positions no tap read get 0)."""
    fh, fw = dypl.shape
    kh, kw = wpl.shape
    wq = grid.shape[1]
    hq = phases.shape[0] // (sh * sw)
    grid[:, :] = 0
    for i in range(fh):
        src = dypl[i]
        dst = grid[i]
        for j in range(fw):
            dst[j] = src[j]
    gflat = grid.reshape(fh * wq)
    pflat = phases.reshape(phases.shape[0] * wq)
    pflat[:] = 0
    length = (fh - 1) * wq + fw
    for r in range(kh):
        for s in range(kw):
            wv = wpl[r, s]
            run = pflat[_tap_start(r, s, sh, sw, dh, dw, hq, wq):]
            for t in range(length):
                run[t] += wv * gflat[t]
    height, width = acc.shape
    for ih in range(height):
        arow = acc[ih]
        arow[:] = 0
        y = ih + pt
        if y < 0 or y // sh >= hq:
            continue
        a, i = y % sh, y // sh
        for b in range(sw):  # input column sw * j + b - pl comes from phase column j
            prow = phases[(a * sw + b) * hq + i]
            j0 = min(wq, max(0, _ceil_div(pl - b, sw)))
            j1 = max(j0, min(wq, _ceil_div(width + pl - b, sw)))
            for j in range(j0, j1):
                arow[sw * j + b - pl] = prow[j]


@njit(**_JIT)
def _plane_into(data, w, acc, scratch, phases, n, c, backward, sh, sw, dh, dw, pt, pl):
    """acc[:, :OW] = plane (n, c) of the forward conv (backward: of the transposed conv) of `data`."""
    kh, kw = w.shape[2:]
    if not backward:
        _flat_plane(data[n, c], w[c, 0], False, pt, pl, sh, sw, dh, dw, scratch, acc)
    elif sh == 1 and sw == 1:  # dx is the stride-1 conv of dy, padded by the kernel's reach less pt, with flipped taps
        _flat_plane(data[n, c], w[c, 0], True, (kh - 1) * dh - pt, (kw - 1) * dw - pl, 1, 1, dh, dw, scratch, acc)
    else:
        _scatter_plane(data[n, c], w[c, 0], sh, sw, dh, dw, pt, pl, scratch, phases, acc)


@njit(inline="always", **_JIT)
def _scratch(in_h, in_w, out_h, out_w, kh, kw, sh, sw, dh, dw, backward, acc_like):
    """A work item's accumulator, int16 scratch and accumulator phase planes (a stub unless used).

    Forward (any stride) and stride-1 backward: acc (OH, Wq), scratch the source's phases (sh * sw *
    Hq, Wq), Hq = OH + (kh - 1) * dh // sh, Wq = OW + (kw - 1) * dw // sw. Strided backward (data = dy,
    out = dx): acc (H, W), scratch dy's grid (OH, Wq) and the phases of dx, sized from dy (the
    forward's output) as the forward's are."""
    if backward and not (sh == 1 and sw == 1):
        hq = in_h + ((kh - 1) * dh) // sh
        wq = in_w + ((kw - 1) * dw) // sw
        acc = np.empty((out_h, out_w), acc_like.dtype)
        return acc, np.empty((in_h, wq), np.int16), np.empty((sh * sw * hq, wq), acc.dtype)
    hq = out_h + ((kh - 1) * dh) // sh
    wq = out_w + ((kw - 1) * dw) // sw
    acc = np.empty((out_h, wq), acc_like.dtype)
    return acc, np.empty((sh * sw * hq, wq), np.int16), np.empty((1, 1), acc.dtype)


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
        acc, scratch, phases = _scratch(data.shape[2], data.shape[3], out_h, out_w, kh, kw, sh, sw, dh, dw, backward,
                                        acc_like)
        for p in range(ch * count // chunks, (ch + 1) * count // chunks):
            n = p // c_
            c = p % c_
            _plane_into(data, w, acc, scratch, phases, n, c, backward, sh, sw, dh, dw, pt, pl)
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
        acc, scratch, phases = _scratch(data.shape[2], data.shape[3], out_h, out_w, kh, kw, sh, sw, dh, dw, backward,
                                        acc_like)
        for p in range(ch * count // chunks, (ch + 1) * count // chunks):
            n = p // c_
            c = p % c_
            _plane_into(data, w, acc, scratch, phases, n, c, backward, sh, sw, dh, dw, pt, pl)
            s = image_scale(scale, n, c)
            for oh in range(out_h):
                scale_row(out[n, c, oh], acc[oh], s, out_w)


@njit(parallel=True, **_JIT)
def backward_weight(dy, x, out, sh, sw, dh, dw, pt, pl, seg, chunks):
    """out (C, kh, kw) int64 = sum over images and output pixels of dy times the input each tap read.
    Per image, x's plane is split into its stride phases (_phase_pad_into: at stride 1, padded) and
    dy's plane laid on the same Wq-wide grid with zero junk columns, so each tap is one dot product
    of (OH - 1) * Wq + OW terms with the run the forward read (_tap_start), summed in int32 runs of
    at most `seg` terms and added in int64 (exact; bounds module)."""
    n_, c_ = x.shape[:2]
    out_h, out_w = dy.shape[2:]
    kh, kw = out.shape[1:]
    hq = out_h + ((kh - 1) * dh) // sh
    wq = out_w + ((kw - 1) * dw) // sw
    length = (out_h - 1) * wq + out_w
    for ch in prange(chunks):
        scratch = np.empty((sh * sw * hq, wq), np.int16)
        sflat = scratch.reshape(sh * sw * hq * wq)
        grid = np.zeros(out_h * wq, np.int16)  # junk columns stay 0: they add nothing
        for c in range(ch * c_ // chunks, (ch + 1) * c_ // chunks):
            for n in range(n_):
                _phase_pad_into(x[n, c], pt, pl, sh, sw, scratch)
                for oh in range(out_h):
                    src = dy[n, c, oh]
                    dst = grid[oh * wq:]
                    for t in range(out_w):
                        dst[t] = src[t]
                for r in range(kh):
                    for s in range(kw):
                        run = sflat[_tap_start(r, s, sh, sw, dh, dw, hq, wq):]
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


# Planes of at most SMALL_PLANE_MAX output positions (forward geometry) run channels-last (below): per
# plane the padded-phase kernels cost more than the arithmetic there (MobileNetV2-0.35 at 32x32 ends on
# 4x4 maps of 336 channels: 92 ns a plane for 144 multiply-accumulates). Measured, batch 8, 2 threads,
# 3x3, forward / backward-data / weight gradient in us, phases against channels-last: 336 channels 4x4
# 247/243/244 against 47/46/76; 192 channels 8x8 -> 4x4 413/510/373 against 65/71/96; 96 channels 8x8
# 85/86/85 against 44/43/56; 96 channels 16x16 -> 8x8 175/261/168 against 64/65/83. At 16x16 outputs the
# phases win (48 channels: 64/56/56 against 79/77/152), so they keep the larger planes.
SMALL_PLANE_MAX = 64


@njit(inline="always", **_JIT)
def _channels_last(src, dst):
    """dst (H, W, C) = src (C, H, W): one image's planes, channel innermost."""
    c_, h_, w_ = src.shape
    for c in range(c_):
        for i in range(h_):
            row = src[c, i]
            for j in range(w_):
                dst[i, j, c] = row[j]


@njit(**_JIT)
def _tap_table(fh, fw, in_h, in_w, kh, kw, sh, sw, dh, dw, pt, pl):
    """Every (output position, input position, tap) of the forward geometry whose tap lands inside the
    input, as flat indices (T, 3): fh x fw outputs, in_h x in_w inputs, kh x kw taps. `small_planes`
    walks it once per image instead of testing the bounds again each time."""
    table = np.empty((fh * fw * kh * kw, 3), np.int64)
    count = 0
    for oh in range(fh):
        for r in range(kh):
            i = oh * sh - pt + r * dh
            if i < 0 or i >= in_h:
                continue
            for ow in range(fw):
                for q in range(kw):
                    j = ow * sw - pl + q * dw
                    if 0 <= j < in_w:
                        table[count, 0], table[count, 1], table[count, 2] = oh * fw + ow, i * in_w + j, r * kw + q
                        count += 1
    return table[:count]


@njit(**_JIT)
def _small_image(data, wt, out, scale, acc, src, taps, n, backward):
    """Image n of `small_planes` (acc and src: its channels-last scratch, flat over positions)."""
    c_ = data.shape[1]
    _channels_last(data[n], src.reshape(data.shape[2], data.shape[3], c_))
    acc[:, :] = 0
    for t in range(taps.shape[0]):
        p, u, k = taps[t, 0], taps[t, 1], taps[t, 2]
        wv = wt[k]
        # the forward adds w * x[u] to y[p]; backward-data, w * dy[p] to dx[u]
        a, d = (acc[u], src[p]) if backward else (acc[p], src[u])
        for c in range(c_):
            a[c] += wv[c] * d[c]
    oh_, ow_ = out.shape[2:]
    for c in range(c_):
        for h in range(oh_):
            dst, row = out[n, c, h], acc[h * ow_:(h + 1) * ow_]
            if scale.size > 0:
                sc = image_scale(scale, n, c)
                for x in range(ow_):
                    dst[x] = row[x, c] * sc
            else:  # integers stay integers
                for x in range(ow_):
                    dst[x] = row[x, c]


@njit(parallel=True, **_JIT)
def small_planes(data, w, out, scale, acc_like, backward, sh, sw, dh, dw, pt, pl):
    """`planes` / `planes_scaled` (an empty scale: integers) for small planes, channels-last: for every
    output position of the forward geometry and every tap that lands inside the input (`_tap_table`), the
    forward adds w[c] * x[c] to y, the backward-data w[c] * dy[c] to dx, a loop over channels that
    vectorises however small the plane. Integer sums (exact in any order), each value then rescaled by
    `scale_row`'s expression: the same integers and floats as the phase kernels. Parallel over images."""
    n_, c_ = data.shape[:2]
    kh, kw = w.shape[2:]
    grid, image = (data.shape[2:], out.shape[2:]) if backward else (out.shape[2:], data.shape[2:])
    taps = _tap_table(grid[0], grid[1], image[0], image[1], kh, kw, sh, sw, dh, dw, pt, pl)
    wt = np.empty((kh * kw, c_), np.int32)
    for ch in range(c_):
        for r in range(kh):
            for q in range(kw):
                wt[r * kw + q, ch] = w[ch, 0, r, q]
    for n in prange(n_):
        src = np.empty((data.shape[2] * data.shape[3], c_), np.int32)
        acc = np.empty((out.shape[2] * out.shape[3], c_), acc_like.dtype)
        # np.int64: passed on bare, the parfor index reached image_scale typed float64 (a Numba typing error)
        _small_image(data, wt, out, scale, acc, src, taps, np.int64(n), backward)


SMALL_WEIGHT_BLOCK = 16  # channels per work item of small_backward_weight (16: 2 threads balance; 64 lost to phases)


@njit(**_JIT)
def _small_weight_block(dy, x, out, c0, cb, sh, sw, dh, dw, pt, pl):
    """Channels c0 .. c0 + cb of `small_backward_weight`."""
    n_ = x.shape[0]
    in_h, in_w = x.shape[2:]
    fh, fw = dy.shape[2:]
    kh, kw = out.shape[1:]
    xs = np.empty((in_h, in_w, cb), np.int64)
    ds = np.empty((fh, fw, cb), np.int64)
    acc = np.zeros((kh, kw, cb), np.int64)
    for n in range(n_):
        _channels_last(x[n, c0:c0 + cb], xs)
        _channels_last(dy[n, c0:c0 + cb], ds)
        for oh in range(fh):
            for r in range(kh):
                i = oh * sh - pt + r * dh
                if i < 0 or i >= in_h:
                    continue
                for ow in range(fw):
                    g = ds[oh, ow]
                    for q in range(kw):
                        j = ow * sw - pl + q * dw
                        if j < 0 or j >= in_w:
                            continue
                        a, v = acc[r, q], xs[i, j]
                        for c in range(cb):
                            a[c] += g[c] * v[c]
    for c in range(cb):
        for r in range(kh):
            for q in range(kw):
                out[c0 + c, r, q] += acc[r, q, c]


@njit(parallel=True, **_JIT)
def small_backward_weight(dy, x, out, sh, sw, dh, dw, pt, pl):
    """`backward_weight` for small planes, channels-last: out[c, r, s] += dy[c] * the input tap (r, s)
    read, in int64 (exact, so the same integers), a loop over channels. Parallel over channel blocks.
    Its own loops rather than `_tap_table`'s: with each dy row hoisted over the taps they measured
    faster than walking the table (96 channels of 8x8: 61 against 81 us; 192 of 8x8 -> 4x4: 90 against 115)."""
    c_ = x.shape[1]
    for blk in prange((c_ + SMALL_WEIGHT_BLOCK - 1) // SMALL_WEIGHT_BLOCK):
        c0 = blk * SMALL_WEIGHT_BLOCK
        _small_weight_block(dy, x, out, c0, min(c_, c0 + SMALL_WEIGHT_BLOCK) - c0, sh, sw, dh, dw, pt, pl)


def _small(geo) -> bool:
    return geo.out_h * geo.out_w <= SMALL_PLANE_MAX


def _chunks(items: int) -> int:
    """prange work items: a few per thread, at most one per item."""
    return max(1, min(items, 4 * pool_threads()))


def _geo_args(geo) -> tuple[int, ...]:
    return (geo.stride_h, geo.stride_w, geo.dilation_h, geo.dilation_w, geo.pad_top, geo.pad_left)


def _operand(a: np.ndarray) -> np.ndarray:
    """C-contiguous, in a dtype the kernels take as is (8- and 16-bit codes; no widening copy)."""
    return np.ascontiguousarray(a)


def _run(data: np.ndarray, w: np.ndarray, geo, shape, backward: bool, out_dtype: np.dtype, rescale) -> np.ndarray:
    # Weights always int16: a broadcast scalar in the inner loops, so the same times (measured), and
    # half the specialisations Numba compiles on a fresh cache.
    data, w = _operand(data), np.ascontiguousarray(w, dtype=np.int16)
    acc_like = np.zeros((), out_dtype)
    if _small(geo):
        out = np.empty(shape, out_dtype if rescale is None else rescale[1])
        scale = np.zeros((0, 0), out.dtype) if rescale is None else scale_rows(rescale[0])
        small_planes(data, w, out, scale, acc_like, backward, *_geo_args(geo))
        return out
    chunks = _chunks(geo.batch * geo.in_channels)
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
    """dW (C, 1, kh, kw) of `out_dtype` for a depthwise conv; `seg` bounds the int32 runs."""
    dy, x = _operand(dy), _operand(x)
    out = np.zeros((geo.in_channels, geo.kernel_h, geo.kernel_w), np.int64)
    if _small(geo):
        small_backward_weight(dy, x, out, *_geo_args(geo))
    else:
        backward_weight(dy, x, out, *_geo_args(geo), max(1, int(seg)), _chunks(geo.in_channels))
    return out.astype(out_dtype, copy=False).reshape(geo.w_shape)
