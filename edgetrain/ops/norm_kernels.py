"""One-pass Numba loops: BatchNorm's training forward and backward, integer->float rescaling, ReLU backward.

NumPy needs several passes and temporaries per BatchNorm (mean, centred copy, variance, normalised
copy, output); these do each job in one or two sweeps per channel. Sums accumulate in float64, and
every channel is reduced in a fixed order, so results do not depend on thread count. BatchNorm comes
in two builds of the same loops: serial, for the fp32 path, where parallel loops fight OpenBLAS's
spinning workers (measured: 9x slower on 2 cores), and parallel over channels, for BatchNorms fed by
integer layers, where no BLAS runs, from `norm.PARALLEL_MIN_VALUES` values on (a tiny batch's
BatchNorm takes the serial build: the same loops, so the same bits, and no parallel launch).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgetrain.kernels.lanes import LANES, combine_span, lane_span


@njit(cache=True, inline="always")
def affine(af_x, af_m, af_a, af_b):
    """BatchNorm's output (x - mean) * a + bias in x's type, from the mean, a = scale / sqrt(var + eps) and the
    bias rounded once to that type (`in_type`): the one expression the forward's store, its fused codes
    (`bn_codes`) and range (`bn_stats_extrema`) and the backward's recomputed ReLU mask all take, so they
    agree bit for bit. Elementwise work in float32 runs 16 lanes to float64's 8 (a 128 x 16 x 1024 forward
    store: 465 -> 243 us on 2 threads, a copy's time); centring first, as PyTorch's CPU BatchNorm does, keeps
    a channel whose spread is tiny beside its mean exact (x * a + (bias - mean * a) lost a constant channel's
    bias to the rounding of mean * a). (Names prefixed: inlined into parallel loops, where a name shared
    with the caller gave wrong results.)"""
    return (af_x - af_m) * af_a + af_b


@njit(cache=True, inline="always")
def relu_value(bn_x, bn_m, bn_a, bn_b, bn_cap):
    """BatchNorm's output for input bn_x with a folded ReLU capped at bn_cap (6 for a ReLU6, inf for a Relu),
    all in x's type (`affine`)."""
    bn_v = affine(bn_x, bn_m, bn_a, bn_b)
    bn_w = bn_v * (bn_v > 0)  # no branch on data; where v < 0 this is -0.0, a zero all the same
    return bn_cap if bn_w > bn_cap else bn_w  # never true at cap = inf, NaN included: a Relu's bits


@njit(cache=True, inline="always")
def in_type(it_x, it_value):
    """A float64 statistic, coefficient or cap rounded to the type of array it_x, as `affine` takes it."""
    return it_x.dtype.type(it_value)


@njit(cache=True, inline="always")
def moments(mo_sum, mo_squares, mo_count, mo_eps):
    """(mean, population variance, 1 / sqrt(variance + eps)) from a channel's float64 sum and sum of squares over
    mo_count values: the one statement of them (`_bn_stats_channel`, `_bn_forward_short_rows`)."""
    mo_m = mo_sum / mo_count
    mo_var = max(mo_squares / mo_count - mo_m * mo_m, 0.0)
    return mo_m, mo_var, 1.0 / np.sqrt(mo_var + mo_eps)


@njit(cache=True, inline="always")
def apply_row(ar_x, ar_y, ar_len, ar_relu, ar_m, ar_a, ar_b, ar_cap):
    """ar_y[:ar_len] = `affine` of ar_x[:ar_len], through `relu_value` when ar_relu (tested once, outside the loop)."""
    if ar_relu:  # a Relu folded in: one pass instead of two (its backward is masked the same way)
        for ar_j in range(ar_len):
            ar_y[ar_j] = relu_value(ar_x[ar_j], ar_m, ar_a, ar_b, ar_cap)
    else:
        for ar_j in range(ar_len):
            ar_y[ar_j] = affine(ar_x[ar_j], ar_m, ar_a, ar_b)


@njit(cache=True, inline="always")
def dx_coefficients(dc_x, dc_scale, dc_r, dc_count, dc_ds, dc_sg):
    """The input gradient's coefficients in x's type from a channel's float64 sums: dx = k * (count * g - sum g
    - (x - m) * r * sum(g * xhat)), k = scale * r / count, taken as g * scale * r - (x - m) * kx - k0 with
    kx = k r ds and k0 = k sg (`dx_row`; the sums stay float64, the elementwise work is in x's type)."""
    dc_k = dc_scale * dc_r / dc_count
    return in_type(dc_x, dc_k * dc_r * dc_ds), in_type(dc_x, dc_k * dc_sg)


@njit(cache=True, inline="always")
def dx_row(dr_g, dr_x, dr_dx, dr_len, dr_a, dr_m, dr_kx, dr_k0):
    """One row of the input gradient (`dx_coefficients`) from g, already masked where a Relu was folded in
    (the callers write the masked g out first: `_bn_backward_channel`)."""
    for dr_j in range(dr_len):
        dr_dx[dr_j] = dr_g[dr_j] * dr_a - (dr_x[dr_j] - dr_m) * dr_kx - dr_k0


@njit(cache=True)
def _bn_stats_channel(x, ch, scale, bias, eps, mean, var, inv, extremes, lanes_lo, lanes_hi, acc, acc2):
    """Channel ch's batch mean, (population) variance and 1/sqrt(var + eps) into mean, var, inv; returns the
    coefficient a = scale / sqrt(var + eps) of its output, y = (x - mean) * a + bias (`affine`). With
    `extremes`, the same pass also keeps each lane's min and max of x (lanes_lo, lanes_hi: LANES slots, for
    `bn_stats_extrema`); the sums are the same statements either way. acc, acc2: the caller's LANES-long
    buffers for the two sums (one pair per run of channels: allocated per channel, they cost 4x4 maps 40% on
    one thread)."""
    n, _, length = x.shape
    count = n * length
    span = lane_span(length)
    for q in range(span):  # sum and sum of squares, in lanes.py's order
        acc[q] = 0.0
        acc2[q] = 0.0
    tail = (length // LANES) * LANES
    for i in range(n):
        row = x[i, ch]
        rest = row[tail:]  # a view from 0 (see _bn_backward_channel)
        # Two copies of the loops rather than a test per value: such a test kept BatchNorm's loops from
        # vectorising before (_bn_backward_channel), and the plain forward must not pay for the extremes.
        if extremes:
            for base in range(0, tail, LANES):
                for q in range(LANES):
                    v = np.float64(row[base + q])
                    acc[q] += v
                    acc2[q] += v * v
                    lanes_lo[q] = min(lanes_lo[q], v)
                    lanes_hi[q] = max(lanes_hi[q], v)
            for q in range(rest.size):
                v = np.float64(rest[q])
                acc[q] += v
                acc2[q] += v * v
                lanes_lo[q] = min(lanes_lo[q], v)
                lanes_hi[q] = max(lanes_hi[q], v)
        else:
            for base in range(0, tail, LANES):
                for q in range(LANES):
                    v = np.float64(row[base + q])
                    acc[q] += v
                    acc2[q] += v * v
            for q in range(rest.size):
                v = np.float64(rest[q])
                acc[q] += v
                acc2[q] += v * v
    total = combine_span(acc, span)
    mean[ch], var[ch], inv[ch] = moments(total, combine_span(acc2, span), count, eps)
    return scale[ch] * inv[ch]


@njit(cache=True)
def _bn_apply_channel(x, ch, m, a, b, y, relu, cap):
    """y[:, ch] = (x[:, ch] - m) * a + b (`affine`, in x's type), with a folded ReLU (relu_value) when relu."""
    n, _, length = x.shape
    mx, ax, bx, capx = in_type(x, m), in_type(x, a), in_type(x, b), in_type(x, cap)
    for i in range(n):
        apply_row(x[i, ch], y[i, ch], length, relu, mx, ax, bx, capx)


@njit(cache=True)
def _bn_forward_channels(x, first, stop, scale, bias, eps, y, mean, var, inv, relu, cap):
    """Channels first..stop-1 of the training forward (see bn_train_forward); with relu, max(y, 0) as it is
    stored, and no more than cap (a ReLU6 folded in: cap 6; np.inf for a plain Relu)."""
    if x.shape[2] <= LANES:
        _bn_forward_short_rows(x, first, stop, scale, bias, eps, y, mean, var, inv, relu, cap)
        return
    acc, acc2 = np.empty(LANES), np.empty(LANES)
    for ch in range(first, stop):
        a = _bn_stats_channel(x, ch, scale, bias, eps, mean, var, inv, False, mean, mean, acc, acc2)
        _bn_apply_channel(x, ch, mean[ch], a, bias[ch], y, relu, cap)


@njit(cache=True)
def _lane_totals(sums, row, span, buf) -> float:
    """`combine_span` of one channel's lane sums sums[row] (its rows no longer than LANES: element j was lane j),
    the lanes beyond them +0.0 as `combine_span` has them."""
    length = sums.shape[1]
    for q in range(span):
        buf[q] = sums[row, q] if q < length else 0.0
    return combine_span(buf, span)


@njit(cache=True)
def _bn_forward_short_rows(x, first, stop, scale, bias, eps, y, mean, var, inv, relu, cap):
    """`_bn_forward_channels` where a channel's rows are no longer than LANES (maps of 8x8 and less): sample by
    sample over the run of channels, each row's element j into lane j as `_bn_stats_channel` adds it, so the
    same sums and bits, without a short loop's set-up per row per channel. Paired against the channel-by-channel
    loops, 2 threads, with a folded ReLU6: (8, 1280, 4x4) 136 -> 110 us, (8, 144, 8x8) 38 -> 28, and with a Relu
    (128, 64, 8x8) 220 -> 155."""
    n, _, length = x.shape
    count = n * length
    runs = stop - first
    acc, acc2 = np.zeros((runs, length)), np.zeros((runs, length))
    for i in range(n):
        for c in range(runs):
            row, s1, s2 = x[i, first + c], acc[c], acc2[c]
            for j in range(length):
                v = np.float64(row[j])
                s1[j] += v
                s2[j] += v * v
    span = lane_span(length)
    buf = np.empty(LANES)
    coeff = np.empty(runs)
    for c in range(runs):
        ch = first + c
        total = _lane_totals(acc, c, span, buf)
        mean[ch], var[ch], inv[ch] = moments(total, _lane_totals(acc2, c, span, buf), count, eps)
        coeff[c] = scale[ch] * inv[ch]
    capx = in_type(x, cap)
    for i in range(n):
        for c in range(runs):
            ch = first + c
            mx, ax, bx = in_type(x, mean[ch]), in_type(x, coeff[c]), in_type(x, bias[ch])
            apply_row(x[i, ch], y[i, ch], length, relu, mx, ax, bx, capx)


# ---- BatchNorm writing the next MAC layer's codes instead of its floats (norm.BatchNormalization.codes_for)


@njit(parallel=True, cache=True)
def bn_stats_extrema(x, scale, bias, eps, cap, mean, var, inv, a_out, ylo_out, yhi_out, chunks):
    """The training forward's statistics (the same loops as bn_train_forward, so the same mean, var and inv)
    and its coefficient a_out (`affine`'s a), without writing y; and y (with the folded ReLU capped at cap)
    at each channel's min and max of x, taken in the same pass, as the forward would store it: y is monotone
    in x within a channel, so these are y's extremes there. A NaN or infinity in x makes them NaN or
    infinite (the caller checks). Parallel over `chunks` runs of channels (one pair of lane buffers each:
    per channel they cost small maps 30%)."""
    c_ = x.shape[1]
    for k in prange(chunks):
        lanes_lo = np.empty(LANES)
        lanes_hi = np.empty(LANES)
        sums = np.empty(LANES)
        squares = np.empty(LANES)
        for ch in range(k * c_ // chunks, (k + 1) * c_ // chunks):
            lanes_lo[:] = np.inf
            lanes_hi[:] = -np.inf
            ca = _bn_stats_channel(x, ch, scale, bias, eps, mean, var, inv, True, lanes_lo, lanes_hi, sums, squares)
            a_out[ch] = ca
            mx, ax, bx, capx = in_type(x, mean[ch]), in_type(x, ca), in_type(x, bias[ch]), in_type(x, cap)
            ylo_out[ch] = relu_value(in_type(x, lanes_lo.min()), mx, ax, bx, capx)
            yhi_out[ch] = relu_value(in_type(x, lanes_hi.max()), mx, ax, bx, capx)


@njit(cache=True, inline="always")
def _stored_y(st_v, st_m, st_a, st_b, st_zero, st_bound):
    """The y the forward stores for the value st_v, with a folded ReLU capped at st_bound, all in x's type:
    bn_codes' one statement of it (names prefixed, as it is inlined into a parallel loop)."""
    return min(max(affine(st_v, st_m, st_a, st_b), st_zero), st_bound)


@njit(parallel=True, cache=True, error_model="numpy")
def bn_codes(x, mean, a, bias, cap, scale, qmax, codes, near_half, narrow_half, block):
    """codes = the unsigned nearest codes of the y the training forward stores (relu_value, rounded to x's
    type), for a per-tensor scale, y never stored: rint(y / scale) by the quantiser's rule
    (`quantizer._nearest_item`): multiplied by 1 / scale, and a row that holds a value within `near_half` of
    a half-integer divided instead; with narrow_half > 0 (float32 y, codes of at most 8 bits:
    `quantizer._nearest_narrow`) multiplied in float32, and a block of `block` values divided where one lies
    within narrow_half of a half-integer. The ReLU and cap are applied after the rounding to x's type: both
    bounds are representable, so that rounding commutes with them and the codes are the same (where y would
    be -0.0 this gives +0.0: code 0 either way). The caller has the range from y's extremes, so nothing
    saturates. Parallel over rows."""
    n, c_, length = x.shape
    s = np.float64(scale)
    r = 1.0 / s
    top = np.float64(qmax)
    zero = x.dtype.type(0)
    bound = x.dtype.type(cap)
    r_narrow = x.dtype.type(r)
    top_narrow = x.dtype.type(qmax)
    for row in prange(n * c_):
        img, ch = row // c_, row % c_
        src, dst = x[img, ch], codes[img, ch]
        cm, ca, cb = in_type(x, mean[ch]), in_type(x, a[ch]), in_type(x, bias[ch])
        if narrow_half > 0:
            for b0 in range(0, length, block):
                sv = src[b0:min(length, b0 + block)]  # views from 0 (the kernel rules)
                dv = dst[b0:]
                close = False
                for j in range(sv.size):
                    yn = _stored_y(sv[j], cm, ca, cb, zero, bound)
                    tn = yn * r_narrow
                    qn = np.rint(tn)
                    close |= abs(tn - qn) > narrow_half
                    dv[j] = min(qn, top_narrow)
                if close:
                    for j in range(sv.size):
                        yn = _stored_y(sv[j], cm, ca, cb, zero, bound)
                        dv[j] = min(np.rint(np.float64(yn) / s), top)
            continue
        near = False
        for j in range(length):
            yv = _stored_y(src[j], cm, ca, cb, zero, bound)
            t = np.float64(yv) * r
            q = np.rint(t)
            near |= abs(t - q) > near_half
            dst[j] = min(q, top)
        if near:
            for j in range(length):
                yv = _stored_y(src[j], cm, ca, cb, zero, bound)
                dst[j] = min(np.rint(np.float64(yv) / s), top)


@njit(parallel=True, cache=True)
def bn_apply(x, mean, a, bias, relu, cap, y):
    """y = what the training forward would have stored, from its mean, coefficient a and bias (parallel over
    channels)."""
    for ch in prange(x.shape[1]):
        _bn_apply_channel(x, ch, mean[ch], a[ch], bias[ch], y, relu, cap)


@njit(cache=True, inline="always")
def _kept(g, x, j, m, a, b, zero, cap, unbounded):
    """A folded Relu's backward: g[j] where the BatchNorm's output at j was positive (and, under a cap,
    below it: a folded ReLU6's Clip passes 0 < y < 6), else 0. That output is recomputed from x exactly
    as the forward stored it (`affine`: a, b and cap in x's type), so y need not be read back: the backward
    over a 128 x 16 x 1024 batch, memory-bound, went from 1.12 to 0.83 ms."""
    v = affine(x[j], m, a, b)
    return g[j] if (v > 0) & (unbounded | (v < cap)) else zero


@njit(cache=True)
def _bn_backward_channel(x, g, relu, cap, ch, scale, bias, mean, inv, dx, dscale, dbias, acc_g, acc_gx, kept):
    """One channel of the training backward: both mean terms included (every sample moves them). With
    relu, g is first masked where the folded Relu's output was not positive, into `kept`.

    The relu test sits outside every loop (a test per element kept the remainder from vectorising),
    and a row's remainder is walked through views from 0: an index like j - tail might be negative
    as far as Numba knows, and its wraparound check made this 15x slower where rows are shorter than
    LANES (MobileNetV2's 4x4 maps: 1.05 -> 0.15 ms for 336 channels of 8 x 16). acc_g, acc_gx: the
    caller's LANES-long buffers for the sum of g and of g * (x - mean), in lanes.py's order; kept: the
    caller's (N, L) buffer for the masked g (relu only).

    With relu the masked g is written out first, in a loop of its own, and both passes then read it as
    the plain g: the mask's selects vectorise there and nowhere else (within the lanes loop they did
    not: a (8, 48, 32x32) backward with a folded ReLU6 took 2.5x the plain one's time). The same values,
    so the same sums and bits."""
    n, _, length = x.shape
    count = n * length
    m = mean[ch]
    r = inv[ch]
    # the forward's `affine`, its coefficients computed and rounded as it did them
    mx, ax, bx, capx = in_type(x, m), in_type(x, scale[ch] * r), in_type(x, bias[ch]), in_type(x, cap)
    zero = g.dtype.type(0)
    unbounded = cap == np.inf  # a plain Relu: positive outputs pass, +inf included
    span = lane_span(length)
    for q in range(span):
        acc_g[q] = 0.0
        acc_gx[q] = 0.0
    tail = (length // LANES) * LANES
    if relu:
        for i in range(n):
            grow, xrow, krow = g[i, ch], x[i, ch], kept[i]
            for j in range(length):
                krow[j] = _kept(grow, xrow, j, mx, ax, bx, zero, capx, unbounded)
    for i in range(n):
        grow, xrow = kept[i] if relu else g[i, ch], x[i, ch]  # rows, both C-contiguous: one type, loops vectorise
        for base in range(0, tail, LANES):
            for q in range(LANES):
                gv = np.float64(grow[base + q])
                acc_g[q] += gv
                acc_gx[q] += gv * (xrow[base + q] - m)
        gt, xt = grow[tail:], xrow[tail:]  # the row's remainder, in lanes 0, 1, ...
        for q in range(gt.size):
            gv = np.float64(gt[q])
            acc_g[q] += gv
            acc_gx[q] += gv * (xt[q] - m)
    sg = combine_span(acc_g, span)
    ds = combine_span(acc_gx, span) * r  # sum of g * xhat
    dscale[ch] = ds
    dbias[ch] = sg
    kx, k0 = dx_coefficients(x, scale[ch], r, count, ds, sg)  # and scale * r in x's type: ax
    for i in range(n):
        dx_row(kept[i] if relu else g[i, ch], x[i, ch], dx[i, ch], length, ax, mx, kx, k0)


# Two builds, two functions: Numba's cache keys on the function, so one function compiled both ways
# would hand the serial caller the parallel build.
@njit(cache=True)
def bn_train_forward(x, scale, bias, eps, y, mean, var, inv, relu=False, cap=np.inf):
    """x (N, C, L) -> y; per channel the batch mean, (population) variance and 1/sqrt(var + eps).

    One pass gathers sum and sum of squares: in float64 the cancellation in E[x^2] - E[x]^2 costs
    float32 data nothing unless |mean| exceeds the spread by about 10^4.
    """
    _bn_forward_channels(x, 0, x.shape[1], scale, bias, eps, y, mean, var, inv, relu, cap)


@njit(parallel=True, cache=True)
def bn_train_forward_parallel(x, scale, bias, eps, y, mean, var, inv, relu=False, cap=np.inf, chunks=0):
    """bn_train_forward with `chunks` runs of channels spread over threads (0: one channel each); a few runs
    per thread share a buffer pair (see _bn_stats_channel)."""
    c_ = x.shape[1]
    chunks = c_ if chunks <= 0 else max(1, min(chunks, c_))
    for k in prange(chunks):
        _bn_forward_channels(x, k * c_ // chunks, (k + 1) * c_ // chunks, scale, bias, eps, y, mean, var, inv, relu,
                             cap)


@njit(cache=True)
def _bn_backward_short_rows(x, g, relu, cap, first, stop, scale, bias, mean, inv, dx, dscale, dbias):
    """`_bn_backward_channels` where a channel's rows are no longer than LANES: sample by sample over the run of
    channels, element j of a row into lane j as `_bn_backward_channel` adds it, so the same sums and bits.
    Paired against the channel-by-channel loops, one thread, with a folded ReLU6: (8, 1280, 4x4) 212 -> 168 us,
    (8, 144, 8x8) 60 -> 45, (128, 64, 8x8) 387 -> 257."""
    n, _, length = x.shape
    count = n * length
    runs = stop - first
    zero = g.dtype.type(0)
    unbounded = cap == np.inf
    capx = in_type(x, cap)
    mx, ax, bx = np.empty(runs, x.dtype), np.empty(runs, x.dtype), np.empty(runs, x.dtype)
    for c in range(runs):  # the forward's `affine`, its coefficients computed and rounded as it did them
        ch = first + c
        mx[c], ax[c], bx[c] = in_type(x, mean[ch]), in_type(x, scale[ch] * inv[ch]), in_type(x, bias[ch])
    kept = np.empty((n, runs, length) if relu else (0, 0, 0), g.dtype)  # the masked g (`_bn_backward_channel`)
    if relu:
        for i in range(n):
            for c in range(runs):
                grow, xrow, krow = g[i, first + c], x[i, first + c], kept[i, c]
                for j in range(length):
                    krow[j] = _kept(grow, xrow, j, mx[c], ax[c], bx[c], zero, capx, unbounded)
    acc_g, acc_gx = np.zeros((runs, length)), np.zeros((runs, length))
    for i in range(n):
        for c in range(runs):
            m = mean[first + c]
            grow, xrow, sg, sgx = kept[i, c] if relu else g[i, first + c], x[i, first + c], acc_g[c], acc_gx[c]
            for j in range(length):
                g64 = np.float64(grow[j])
                sg[j] += g64
                sgx[j] += g64 * (xrow[j] - m)
    span = lane_span(length)
    buf = np.empty(LANES)
    kx, k0 = np.empty(runs, x.dtype), np.empty(runs, x.dtype)
    for c in range(runs):
        ch = first + c
        r = inv[ch]
        sum_g = _lane_totals(acc_g, c, span, buf)
        ds = _lane_totals(acc_gx, c, span, buf) * r
        dscale[ch] = ds
        dbias[ch] = sum_g
        kx[c], k0[c] = dx_coefficients(x, scale[ch], r, count, ds, sum_g)
    for i in range(n):
        for c in range(runs):
            ch = first + c
            dx_row(kept[i, c] if relu else g[i, ch], x[i, ch], dx[i, ch], length, ax[c], mx[c], kx[c], k0[c])


@njit(cache=True)
def _bn_backward_channels(x, g, relu, cap, first, stop, scale, bias, mean, inv, dx, dscale, dbias):
    """Channels first..stop-1 of the training backward, sharing one buffer pair."""
    if x.shape[2] <= LANES:
        _bn_backward_short_rows(x, g, relu, cap, first, stop, scale, bias, mean, inv, dx, dscale, dbias)
        return
    acc_g, acc_gx = np.empty(LANES), np.empty(LANES)
    kept = np.empty((x.shape[0], x.shape[2]) if relu else (0, 0), g.dtype)
    for ch in range(first, stop):
        _bn_backward_channel(x, g, relu, cap, ch, scale, bias, mean, inv, dx, dscale, dbias, acc_g, acc_gx, kept)


@njit(cache=True)
def bn_train_backward(x, g, relu, scale, bias, mean, inv, dx, dscale, dbias, cap=np.inf):
    """Gradients of a batch-statistics BatchNorm, channel by channel (relu: g masked where the output,
    recomputed from x, scale and bias, was not positive)."""
    _bn_backward_channels(x, g, relu, cap, 0, x.shape[1], scale, bias, mean, inv, dx, dscale, dbias)


@njit(parallel=True, cache=True)
def bn_train_backward_parallel(x, g, relu, scale, bias, mean, inv, dx, dscale, dbias, cap=np.inf, chunks=0):
    """bn_train_backward with `chunks` runs of channels spread over threads, as bn_train_forward_parallel."""
    c_ = x.shape[1]
    chunks = c_ if chunks <= 0 else max(1, min(chunks, c_))
    for k in prange(chunks):
        _bn_backward_channels(x, g, relu, cap, k * c_ // chunks, (k + 1) * c_ // chunks, scale, bias, mean, inv, dx,
                              dscale, dbias)


@njit(cache=True)
def running_stats(mean, var, mu, bvar, momentum, factor, new_mean, new_var):
    """new_mean, new_var = the running statistics after a training batch, in one call with exactly NumPy's
    roundings of `mean * m + mu.astype(t) * (1 - m)` and `var * m + (bvar * factor).astype(t) * (1 - m)` (t the
    statistics' float type, m the momentum rounded to t). 1 - m is exact in float64, so rounding it to t is
    t's own subtraction; each batch value is rounded to t on its store (bvar times factor, the unbiased
    correction, in float64 first); then two products and a sum in t, unfused (`tests/test_deterministic_float`
    checks no contraction). As ten NumPy operations on C-long arrays, BatchNorm's forward in a MobileNetV2-0.35
    step at batch 8 spent 1.9 ms in its own Python (profiled); with this call, 1.2 ms."""
    ms = np.empty(2, mean.dtype)
    ms[0] = momentum
    ms[1] = 1.0 - ms[0]
    m, one_m = ms[0], ms[1]
    for c in range(mean.size):
        new_mean[c] = mu[c]
        new_mean[c] = mean[c] * m + new_mean[c] * one_m
        new_var[c] = bvar[c] * factor
        new_var[c] = var[c] * m + new_var[c] * one_m


@njit(parallel=True, cache=True)
def rescale_channels(acc, scale, out):
    """out (N, C, L) = acc * scale[c]: an integer accumulator back to floats in one pass."""
    n, c, length = acc.shape
    for i in prange(n):
        for ch in range(c):
            s = scale[ch]
            for j in range(length):
                out[i, ch, j] = acc[i, ch, j] * s


RESCALE_CHUNK = 1 << 15  # elements per parallel work item


@njit(parallel=True, cache=True)
def rescale_flat(acc, scale, out, min_parallel):
    """out = acc * scale over flat arrays, split into chunks across threads; below `min_parallel`
    elements (`threads.SMALL_ELEMENTS`) a serial loop of the same expression, with no parallel launch."""
    size = acc.size
    if size < min_parallel:
        for i in range(size):
            out[i] = acc[i] * scale
        return
    chunks = (size + RESCALE_CHUNK - 1) // RESCALE_CHUNK
    for k in prange(chunks):
        start = k * RESCALE_CHUNK
        stop = min(size, start + RESCALE_CHUNK)
        src, dst = acc[start:stop], out[start:stop]  # views from 0: no index wraparound to check, so it vectorises
        for i in range(dst.size):
            dst[i] = src[i] * scale


FLAT_CHUNK = 1 << 15  # elements per parallel work item of the flat loops below


@njit(parallel=True, cache=True)
def add_relu_parallel(a, b, out):
    """out = max(a + b, 0) over flat arrays (NaN stays NaN, as np.maximum), chunks across threads: an
    Add and the Relu that alone reads it in one pass (Model: integer models' residual joins)."""
    size = out.size
    zero = out.dtype.type(0)
    for k in prange((size + FLAT_CHUNK - 1) // FLAT_CHUNK):
        lo, hi = k * FLAT_CHUNK, min(size, (k + 1) * FLAT_CHUNK)
        ca, cb, co = a[lo:hi], b[lo:hi], out[lo:hi]  # views from 0: no index wraparound to check, so it vectorises
        for i in range(co.size):
            v = ca[i] + cb[i]
            co[i] = v if (v > zero or v != v) else zero


@njit(parallel=True, cache=True)
def relu_backward_parallel(y, g, out):
    """relu_backward with chunks across threads (the same values)."""
    size = out.size
    zero = out.dtype.type(0)
    for k in prange((size + FLAT_CHUNK - 1) // FLAT_CHUNK):
        lo, hi = k * FLAT_CHUNK, min(size, (k + 1) * FLAT_CHUNK)
        cy, cg, co = y[lo:hi], g[lo:hi], out[lo:hi]
        for i in range(co.size):
            co[i] = cg[i] if cy[i] > 0 else zero


@njit(parallel=True, cache=True)
def relu_backward_over(y, g):
    """relu_backward_parallel written over g (the same values). A kernel of its own: one array passed as both g
    and out fails LLVM's overlap check, and the loop runs scalar."""
    size = g.size
    zero = g.dtype.type(0)
    for k in prange((size + FLAT_CHUNK - 1) // FLAT_CHUNK):
        lo, hi = k * FLAT_CHUNK, min(size, (k + 1) * FLAT_CHUNK)
        cy, cg = y[lo:hi], g[lo:hi]
        for i in range(cg.size):
            cg[i] = cg[i] if cy[i] > 0 else zero


@njit(cache=True)
def relu_backward(y, g, out):
    """out = g where y > 0, else 0 (a ReLU's output, or Clip's boolean mask): one pass; a masked NaN gives 0."""
    for i in range(y.size):
        out[i] = g[i] if y[i] > 0 else 0


@njit(cache=True)
def clip_forward(x, lo, hi, has_lo, has_hi, y, keep):
    """y = x clipped to [lo, hi] (either bound optional) and keep = lo < x < hi, in one pass instead of
    numpy's seven (measured: MobileNetV2's ReLU6 layers took 5% of a batch-8 step). NaN stays NaN, with
    keep False, as np.maximum/np.minimum and the comparisons give."""
    for i in range(x.size):
        v = x[i]
        k = True
        if has_lo:
            k = v > lo
            if v < lo:
                v = lo
        if has_hi:
            k = k and x[i] < hi
            if v > hi:
                v = hi
        y[i] = v
        keep[i] = k
