"""A small Linear layer's training step: one compiled call quantises, float32 BLAS multiplies the codes exactly.

At batch 8 a Linear such as LeNet-5's (8, 400) x (400, 120) is a few microseconds of arithmetic, but the
general path (`mac.QuantLinear`) reaches it through a dozen Python-level steps and about ten compiled
calls a step (the input's, the gradient's and the weights' quantisation, three integer products, three
rescales, the bias gradient's sum), each of which, inside a training step, finds its code and data gone
from cache: LeNet-5's two hidden Linears took 450 us a step that way, the same calls run back to back 164 us.

Here the forward is one compiled call (`forward_codes`: the input's codes, the weights' per row and per
tensor, from the same compiled quantisers as `quantize` and `quantize_weights`, so the same codes, written
as float32) and one float32 GEMM; the backward one call (`backward_codes`: the gradient's stochastic
codes, the bias gradient) and two GEMMs. No int8 copy of the codes is made: nothing else reads them.

Why float32 BLAS gives the exact integer products: the codes are small integers held exactly as float32,
and `fits` admits a layer only when every sum the products can form is below 2^24 in magnitude (reduction
length x the two codes' bounds). Every partial sum, in any order, blocking or thread split BLAS picks,
and with or without fused multiply-adds, is then an integer below 2^24: exactly representable, so no
operation rounds. The result is the exact integer product on every CPU, as the integer kernels' is.

The rescales give the general path's floats bit for bit (tests/test_small_linear.py): its forward casts
the int32 sum to float32 and multiplies by the float32 scale in float32, which is what a float32 product
of the (exact) float32 sum does; its backward multiplies the integer by the float32 scale in float64 and
rounds once to float32, and the exact product of a 24-bit integer and a 24-bit scale fits float64's
53 bits, so that too is one rounding of the exact product: a float32 multiply.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from edgetrain.kernels.extrema import KEY_VIEWS
from edgetrain.kernels.threads import blas_one_thread, ensure_pool
from edgetrain.quant.qtensor import QuantStats, qrange
from edgetrain.quant.quantizer import PARALLEL_MIN_ELEMENTS, non_finite, quantize_both_kernel, quantize_flat_kernel
from edgetrain.quant.rng import stream_seed

# Up to this many multiply-accumulates per product a Linear takes this path; larger ones keep the tiled
# integer GEMMs, whose per-call set-up no longer dominates there and whose 8-bit products run at four times
# float32's rate on a VNNI core. Chosen, not measured at a crossover: LeNet-5's (8, 400) x (400, 120) is
# 384,000; the MLP's (128, 784) x (784, 512), 51 million, stays on the integer kernels.
SMALL_LINEAR_MACS = 1 << 20
EXACT_FLOAT32 = 1 << 24  # integers up to this magnitude are exact in float32 (24-bit significand)


@njit(cache=True, nogil=True)
def forward_codes(x3, xbits3, exp_mask, mag_mask, sign, x_signed, xqmin, xqmax, w3, wbits3, wqmin, wqmax, pow2,
                  min_parallel, xf, wf, vf, w_scales, x_out, w_ext):
    """x's codes, nearest per tensor, into xf (x_out = [scale, min, max]), and the weights' per row and per
    tensor into wf, vf (w_scales = the rows' then the tensor's, w_ext = [min, max]): the compiled
    quantisers of `quantize` and `quantize_weights`, writing their codes as float32. Returns (x's saturated
    count, the weights'); a negative count is the quantiser's refusal (-1: NaN or infinity)."""
    x_sat = quantize_flat_kernel(x3, xbits3, exp_mask, mag_mask, sign, 0.0, x_signed, xqmin, xqmax, pow2, False,
                                 np.uint64(0), np.int64(0), min_parallel, xf, x_out)
    if x_sat < 0:
        return x_sat, 0
    w_sat = quantize_both_kernel(w3, wbits3, exp_mask, mag_mask, sign, wqmin, wqmax, pow2, min_parallel, wf, vf,
                                 w_scales, w_ext)
    return x_sat, w_sat


@njit(cache=True, nogil=True)
def backward_codes(g3, gbits3, exp_mask, mag_mask, sign, gqmin, gqmax, pow2, seed, min_parallel, gf, g_out, rows,
                   db):
    """The gradient's codes, stochastic per tensor, into gf as float32 (g_out = [scale, min, max]); with db
    non-empty, db = the fixed-order float64 sum of g's `rows` rows (`detfloat.sum_`), rounded once. Returns
    the saturated count (negative: the quantiser refused the gradient)."""
    sat = quantize_flat_kernel(g3, gbits3, exp_mask, mag_mask, sign, 0.0, True, gqmin, gqmax, pow2, True, seed,
                               np.int64(0), min_parallel, gf, g_out)
    if sat < 0 or not db.size:
        return sat
    g = g3.reshape(rows, db.size)
    total = np.zeros(db.size)
    for i in range(rows):
        for o in range(db.size):
            total[o] += np.float64(g[i, o])
    for o in range(db.size):
        db[o] = total[o]
    return sat


def fits(rows: int, inner: int, outs: int, x_bits: int, w_bits: int, g_bits: int, dtype: np.dtype) -> bool:
    """Whether a Linear of (rows, inner) x (outs, inner) takes this path: float32, at most SMALL_LINEAR_MACS
    products, and every sum of its three products exact in float32 (module doc)."""
    if dtype != np.float32 or rows * inner * outs > SMALL_LINEAR_MACS:
        return False
    x, w, g = 1 << x_bits, 1 << (w_bits - 1), 1 << (g_bits - 1)  # bounds on |code| (unsigned x: 2^bits - 1)
    return max(inner * x * w, rows * g * x, outs * g * w) < EXACT_FLOAT32


class Codes(NamedTuple):
    """What the backward needs of a forward: the input's and the per-tensor weights' codes, held as float32
    (exact: small integers, see `fits`), and their scales."""

    x: np.ndarray
    v: np.ndarray
    x_scale: np.float32
    v_scale: np.float32


def forward(x2: np.ndarray, w_rows: np.ndarray, bias: np.ndarray | None, x_bits: int, x_signed: bool, w_bits: int,
            pow2: bool) -> tuple[np.ndarray, QuantStats, Codes]:
    """y of (rows, inner) floats x2 and (outs, inner) weights (+ bias), the input quantisation's stats, and
    the codes the backward needs."""
    n, k = x2.shape
    m = w_rows.shape[0]
    ints, exp_mask, mag_mask, sign = KEY_VIEWS[x2.dtype]
    x3, w3 = x2.reshape(1, 1, n * k), w_rows.reshape(1, m, k)
    xqmin, xqmax = qrange(x_bits, x_signed)
    wqmin, wqmax = qrange(w_bits, True)
    xf, wf, vf = np.empty((n, k), np.float32), np.empty((m, k), np.float32), np.empty((m, k), np.float32)
    w_scales, x_out, w_ext = np.empty(m + 1, np.float32), np.empty(3), np.empty(2)
    ensure_pool()  # serial kernels calling parallel ones (threads.ensure_pool)
    x_sat, w_sat = forward_codes(x3, x3.view(ints), exp_mask, mag_mask, sign, x_signed, xqmin, xqmax, w3,
                                 w3.view(ints), wqmin, wqmax, pow2, PARALLEL_MIN_ELEMENTS, xf.reshape(x3.shape),
                                 wf.reshape(w3.shape), vf.reshape(1, 1, m * k), w_scales, x_out, w_ext)
    if x_sat < 0:
        raise non_finite(x3)
    if w_sat < 0:
        raise non_finite(w3)
    x_scale = np.float32(x_out[0])
    with blas_one_thread():  # exact integers (module doc), whatever BLAS's threads; one spares the cores
        y = np.matmul(xf, wf.T)
    y *= x_scale * w_scales[:-1]  # float32: the general path's per-column scale and its rounding
    if bias is not None:
        y += bias
    stats = QuantStats(n * k, int(x_sat), max(abs(float(x_out[2])), abs(float(x_out[1]))))
    return y, stats, Codes(xf, vf, x_scale, np.float32(w_scales[-1]))


def backward(g2: np.ndarray, g_bits: int, pow2: bool, key: tuple[int, int, int], codes: Codes, need_dx: bool,
             need_bias: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """dW, dx (need_dx) and the bias gradient (need_bias) of a Linear whose forward made `codes`, from the
    output gradient g2 (its codes: stochastic, drawn from the stream of `key`)."""
    n, m = g2.shape
    ints, exp_mask, mag_mask, sign = KEY_VIEWS[g2.dtype]
    g3 = g2.reshape(1, 1, n * m)
    gqmin, gqmax = qrange(g_bits, True)
    gf = np.empty((n, m), np.float32)
    g_out = np.empty(3)
    db = np.empty(m, g2.dtype) if need_bias else _NO_BIAS
    ensure_pool()
    sat = backward_codes(g3, g3.view(ints), exp_mask, mag_mask, sign, gqmin, gqmax, pow2, np.uint64(stream_seed(key)),
                         PARALLEL_MIN_ELEMENTS, gf.reshape(g3.shape), g_out, n, db)
    if sat < 0:
        raise non_finite(g3)
    g_scale = np.float32(g_out[0])
    dx = None
    with blas_one_thread():
        dw = np.matmul(gf.T, codes.x)  # exact integers (module doc), then one float32 rounding of each product
        if need_dx:
            dx = np.matmul(gf, codes.v)
    dw *= g_scale * codes.x_scale
    if dx is not None:
        dx *= g_scale * codes.v_scale
    return dw, dx, db if need_bias else None


_NO_BIAS = np.empty(0, np.float32)
