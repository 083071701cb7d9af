"""One-pass Numba loops: BatchNorm's training forward and backward, integer->float rescaling, ReLU backward.

NumPy needs several passes and temporaries per BatchNorm (mean, centred copy, variance, normalised
copy, output); these do each job in one or two sweeps per channel. Sums accumulate in float64, and
every channel is reduced in a fixed order, so results do not depend on thread count. BatchNorm comes
in two builds of the same loops: serial, for the fp32 path, where parallel loops fight OpenBLAS's
spinning workers (measured: 9x slower on 2 cores), and parallel over channels, for BatchNorms fed by
integer layers, where no BLAS runs, from `threads.SMALL_ELEMENTS` values on (a small batch's
BatchNorm takes the serial build: the same loops, so the same bits, and no parallel launch).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _bn_forward_channel(x, ch, scale, bias, eps, y, mean, var, inv, relu):
    """One channel of the training forward (see bn_train_forward); with relu, max(y, 0) as it is stored."""
    n, _, length = x.shape
    count = n * length
    s = 0.0
    ss = 0.0
    for i in range(n):
        for j in range(length):
            v = x[i, ch, j]
            s += v
            ss += v * v
    m = s / count
    variance = max(ss / count - m * m, 0.0)
    r = 1.0 / np.sqrt(variance + eps)
    mean[ch] = m
    var[ch] = variance
    inv[ch] = r
    a = scale[ch] * r
    b = bias[ch] - m * a
    if relu:  # a Relu folded in: one pass instead of two (its backward stays a pass of its own, which
        # measured faster than a masked BatchNorm backward, whose sums must keep their order)
        for i in range(n):
            for j in range(length):
                v = x[i, ch, j] * a + b
                y[i, ch, j] = v * (v > 0)  # no branch on data; where v < 0 this is -0.0, a zero all the same
    else:
        for i in range(n):
            for j in range(length):
                y[i, ch, j] = x[i, ch, j] * a + b


@njit(cache=True)
def _bn_backward_channel(x, g, ch, scale, mean, inv, dx, dscale, dbias):
    """One channel of the training backward: both mean terms included (every sample moves them)."""
    n, _, length = x.shape
    count = n * length
    sg = 0.0
    sgx = 0.0
    m = mean[ch]
    for i in range(n):
        for j in range(length):
            gv = g[i, ch, j]
            sg += gv
            sgx += gv * (x[i, ch, j] - m)
    r = inv[ch]
    ds = sgx * r  # sum of g * xhat
    dscale[ch] = ds
    dbias[ch] = sg
    k = scale[ch] * r / count
    for i in range(n):
        for j in range(length):
            xhat = (x[i, ch, j] - m) * r
            dx[i, ch, j] = k * (count * g[i, ch, j] - sg - xhat * ds)


# Two builds, two functions: Numba's cache keys on the function, so one function compiled both ways
# would hand the serial caller the parallel build.
@njit(cache=True)
def bn_train_forward(x, scale, bias, eps, y, mean, var, inv, relu=False):
    """x (N, C, L) -> y; per channel the batch mean, (population) variance and 1/sqrt(var + eps).

    One pass gathers sum and sum of squares: in float64 the cancellation in E[x^2] - E[x]^2 costs
    float32 data nothing unless |mean| exceeds the spread by about 10^4.
    """
    for ch in range(x.shape[1]):
        _bn_forward_channel(x, ch, scale, bias, eps, y, mean, var, inv, relu)


@njit(parallel=True, cache=True)
def bn_train_forward_parallel(x, scale, bias, eps, y, mean, var, inv, relu=False):
    """bn_train_forward with channels spread over threads."""
    for ch in prange(x.shape[1]):
        _bn_forward_channel(x, ch, scale, bias, eps, y, mean, var, inv, relu)


@njit(cache=True)
def bn_train_backward(x, g, scale, mean, inv, dx, dscale, dbias):
    """Gradients of a batch-statistics BatchNorm, channel by channel."""
    for ch in range(x.shape[1]):
        _bn_backward_channel(x, g, ch, scale, mean, inv, dx, dscale, dbias)


@njit(parallel=True, cache=True)
def bn_train_backward_parallel(x, g, scale, mean, inv, dx, dscale, dbias):
    """bn_train_backward with channels spread over threads."""
    for ch in prange(x.shape[1]):
        _bn_backward_channel(x, g, ch, scale, mean, inv, dx, dscale, dbias)


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
        for i in range(start, stop):
            out[i] = acc[i] * scale


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
