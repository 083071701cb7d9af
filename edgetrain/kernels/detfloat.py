"""Deterministic float: products, sums and exp/log/tanh that give the same bits on every CPU and thread count.

Why: OpenBLAS picks its sgemm kernel and blocking by CPU (AVX2 on x86_64, NEON on aarch64), numpy's float32
sum blocks its pairwise summation by SIMD width, and numpy's float32 exp/log/tanh are per-platform SIMD
code (measured in issue 16: 3,660 of 4,096 outputs of one sgemm and up to 2 ulp of exp differ between the
x86_64 and arm64 builds). Everything here uses only operations IEEE 754 defines to be correctly rounded,
so any conforming CPU gives the same bits:

* +, -, *, / and sqrt on float64 (numpy ufuncs and Numba loops alike), float32 <-> float64 conversion,
  rint/floor, comparisons, and bit manipulation of the float64 encoding.
* Products of two float32 values are formed in float64, where they are EXACT (24 + 24 significand bits
  fit in 53). So even a fused multiply-add could not change a sum term: fma(a, b, acc) rounds
  a*b + acc once, as the separate multiply (exact) and add do. Numba emits fmul/fadd without the LLVM
  `contract` fast-math flag (no `fastmath=` here; LLVM LangRef, fast-math flags: only `contract` or
  `fast` allow fusing), and LLVM's default TargetOptions (AllowFPOpFusion = Standard) fuse only the
  `llvm.fmuladd` intrinsic, which Numba never emits; tests/test_deterministic_float.py checks the IR
  of every kernel for those flags, and that x86 code has no vfmadd.
* Every sum is taken in float64 in one fixed order (sequentially over the index; a long run's values dealt
  over SUM_LANES partial sums by position, then those added in order: `_mid_sum`), by exactly one thread
  per output (parallel loops split OUTPUTS, never a sum), and rounded once to the output type. LLVM does
  not reorder (vectorise) a float reduction without the `reassoc` flag, which Numba sets only under
  fastmath.
* exp, log, expm1, tanh and sigmoid are polynomials and range reductions in float64, accurate to about
  1 ulp of float64, so float32 results are the correctly rounded value but for rare near-ties (tests
  measure the ulp error). Their reference forms are numpy ufuncs (one IEEE operation per call: nothing to
  fuse); what runs is one compiled map (`_map`) of the same operations in the same order, which the tests
  hold to the reference's bits and, like every kernel here, to IR without contraction flags.

The switch: `active()` says whether the calling op must take this path. A Model turns it on for the
duration of its forward and backward (`using(True)`) when it trains with integer layers, or when its
fp32 run asked for `deterministic` (TrainConfig); otherwise ops keep numpy/BLAS (fast, per-platform).
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from numba import njit, prange

from edgetrain.kernels.threads import threads_for

_state = threading.local()

ROW_TILE = 4  # output rows sharing one pass over a row of b: 4 float64 accumulators rows per loaded b value
COL_BLOCK = 512  # output columns per work item: 4 x 512 float64 accumulators stay in L1/L2
# A product with fewer output columns than NARROW_N (a classifier's 10 classes) and at least
# NARROW_MIN_M rows runs transposed, its rows as the vectorised columns (measured, 2 threads:
# (128, 256) @ (256, 10) 83 -> 52 us; (8, 84) @ (84, 10) stays direct, 8 against 16 us).
NARROW_N = 16
NARROW_MIN_M = 64
# Below this many additions a sum runs a plain loop, no parallel region (a parallel launch on a busy
# machine stalls for milliseconds; measured 15 ms per call for LeNet-5's bias sums, against 0.05 ms;
# and switching the pool to one thread, threads_for, cost more than such a sum: (8, 120) took 13 us)
SUM_PARALLEL_MIN = 1 << 18


def active() -> bool:
    """True while a caller asked for deterministic float (see `using`)."""
    return getattr(_state, "on", False)


@contextlib.contextmanager
def using(on: bool) -> Iterator[None]:
    """Within the block, `active()` is `on` (this thread only; nests, restores on exit)."""
    before = active()
    _state.on = bool(on)
    try:
        yield
    finally:
        _state.on = before


# ------------------------------------------------------------------------------------------- GEMM


@njit(parallel=True, cache=True)
def _gemm(a, b, out):
    """out (M, N) = a (M, K) @ b (K, N): each output a float64 sum over k = 0..K-1 in order, rounded once.

    Work item = (tile of ROW_TILE rows, block of COL_BLOCK columns); an output belongs to one item, so the
    thread count changes who computes it, never how. The j loop (over outputs) is what vectorises. The first
    product starts each sum (0.0 + p, the bits of adding it to a zeroed sum), so no accumulator is zeroed, and
    each row of b is widened to float64 once per k for every row of the tile: a classifier's (128, 10) @ (10, 256)
    input gradient 53 -> 38 us (one thread), where zeroing a whole tile of accumulators per item took the
    difference."""
    m, kk = a.shape
    n = b.shape[1]
    tiles = (m + ROW_TILE - 1) // ROW_TILE
    blocks = (n + COL_BLOCK - 1) // COL_BLOCK
    for item in prange(tiles * blocks):
        i0 = (item // blocks) * ROW_TILE
        j0 = (item % blocks) * COL_BLOCK
        rows = min(m, i0 + ROW_TILE) - i0
        cols = min(n, j0 + COL_BLOCK) - j0
        acc = np.zeros((ROW_TILE, cols)) if kk == 0 else np.empty((ROW_TILE, cols))  # K = 0: sums of nothing
        wide = np.empty(cols)  # b's row k in float64
        for k in range(kk):
            brow = b[k, j0:j0 + cols]
            for j in range(cols):
                wide[j] = np.float64(brow[j])
            for r in range(rows):
                aik = np.float64(a[i0 + r, k])
                ar = acc[r]
                if k == 0:
                    for j in range(cols):
                        ar[j] = 0.0 + aik * wide[j]
                else:
                    for j in range(cols):
                        ar[j] += aik * wide[j]
        for r in range(rows):
            orow = out[i0 + r, j0:j0 + cols]
            ar = acc[r]
            for j in range(cols):
                orow[j] = ar[j]


def _as_float(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=dtype)


def gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (M, K) @ b (K, N) in a's float dtype, each output a fixed-order float64 sum (module doc).

    Exact products need float32 operands: float64 operands are accepted (gradient checks run models in
    float64) and summed in the same order, deterministic but without the exact-product argument."""
    dtype = np.result_type(a.dtype, b.dtype, np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm needs (M, K) @ (K, N), got {a.shape} @ {b.shape}")
    out = np.empty((a.shape[0], b.shape[1]), dtype)
    if out.size:
        if a.shape[1] == 0:
            out[...] = 0
        else:
            with threads_for(a.shape[0] * a.shape[1] * b.shape[1]):  # which thread runs an output changes no bit
                if b.shape[1] < NARROW_N and a.shape[0] >= NARROW_MIN_M:
                    # out^T = b^T a^T: every output the same products (a*b is b*a in IEEE) summed over k
                    # in the same order, so the same bits; the long side becomes the vectorised one
                    out_t = np.empty((b.shape[1], a.shape[0]), dtype)  # C order: the one compiled layout
                    _gemm(_as_float(b.T, dtype), _as_float(a.T, dtype), out_t)
                    out[...] = out_t.T
                else:
                    _gemm(_as_float(a, dtype), _as_float(b, dtype), out)
    return out


# Up to this many multiply-adds a Linear's products (and its bias) run as one serial compiled call per
# direction (`linear_forward`, `linear_backward`): LeNet-5's float classifier (8, 84) x (84, 10) took
# 48 us forward and 80 us backward a batch-8 step through `gemm` and `sum_` (three products, a sum, the
# thread switches around each), each call finding its code cold; the products are 6,720 multiply-adds.
SMALL_LINEAR = 1 << 15


@njit(cache=True, inline="always")
def _ordered_product(p, q, out):
    """out = p @ q (any strides), each output `gemm`'s float64 sum over the inner index in order, rounded once."""
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            acc = 0.0
            for k in range(p.shape[1]):
                acc += np.float64(p[i, k]) * np.float64(q[k, j])
            out[i, j] = acc


@njit(cache=True)
def _linear_forward_small(a, b, c, out):
    """out = a @ b (`_ordered_product`), then + c[j] in out's type (a Gemm's `y + c`) when c is not empty."""
    _ordered_product(a, b, out)
    if c.size:
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                out[i, j] = out[i, j] + c[j]


@njit(cache=True)
def _linear_backward_small(g, a, b, da, db, dc):
    """For y = a @ b: da = g @ b^T, db = a^T @ g (`_ordered_product`) and, when dc is not empty, dc = the rows'
    sum of g (`sum_` over axis 0), each a float64 sum rounded once."""
    _ordered_product(g, b.T, da)
    _ordered_product(a.T, g, db)
    for j in range(dc.size):
        acc = 0.0
        for i in range(g.shape[0]):
            acc += np.float64(g[i, j])
        dc[j] = acc


def _small_linear(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.ndim == 2 and b.ndim == 2 and a.dtype == b.dtype and a.dtype in (np.float32, np.float64)
            and a.shape[0] * a.shape[1] * b.shape[1] <= SMALL_LINEAR and a.shape[1] == b.shape[0])


def linear_forward(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
    """`gemm(a, b)` (+ c of shape (N,)), the same bits; a small product in one serial call (SMALL_LINEAR)."""
    plain_bias = c is None or (c.shape == b.shape[1:] and c.dtype == a.dtype)
    if not (_small_linear(a, b) and plain_bias):
        y = gemm(a, b)
        return y if c is None else y + c
    out = np.empty((a.shape[0], b.shape[1]), a.dtype)
    _linear_forward_small(a, b, _NO_BIAS[a.dtype.char] if c is None else c, out)
    return out


def linear_backward(g: np.ndarray, a: np.ndarray, b: np.ndarray,
                    bias: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(g @ b^T, a^T @ g, the rows' sum of g if bias) as `gemm` and `sum_` give them; one serial call when small."""
    if not (_small_linear(a, b) and g.dtype == a.dtype and g.shape == (a.shape[0], b.shape[1])):
        return gemm(g, b.T), gemm(a.T, g), sum_(g, 0) if bias else None
    da, db = np.empty(a.shape, a.dtype), np.empty(b.shape, a.dtype)
    dc = np.empty(g.shape[1], a.dtype) if bias else _NO_BIAS[a.dtype.char]
    _linear_backward_small(g, a, b, da, db, dc)
    return da, db, dc if bias else None


_NO_BIAS = {np.dtype(t).char: np.empty(0, t) for t in (np.float32, np.float64)}


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """numpy.matmul semantics (1-D operands promoted, batch axes broadcast) on `gemm`, one 2-D product per matrix."""
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    if a2.ndim == 2 and b2.ndim == 2:
        y = gemm(a2, b2)
    elif b2.ndim == 2:  # a stack against one matrix: one product over all its rows
        y = gemm(a2.reshape(-1, a2.shape[-1]), b2).reshape(a2.shape[:-1] + (b2.shape[-1],))
    else:
        batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        ab = np.broadcast_to(a2, batch + a2.shape[-2:]).reshape((-1,) + a2.shape[-2:])
        bb = np.broadcast_to(b2, batch + b2.shape[-2:]).reshape((-1,) + b2.shape[-2:])
        y = np.stack([gemm(ab[p], bb[p]) for p in range(ab.shape[0])]) if ab.shape[0] else \
            np.empty((0, a2.shape[-2], b2.shape[-1]), np.result_type(a.dtype, b.dtype, np.float32))
        y = y.reshape(batch + y.shape[-2:])
    if a.ndim == 1:
        y = y.reshape(y.shape[:-2] + y.shape[-1:])
    if b.ndim == 1:
        y = y.reshape(y.shape[:-1])
    return y


# ------------------------------------------------------------------------------------- reductions


# Partial sums a run is dealt over (`_mid_sum`, written out for eight): independent float64 chains the CPU
# overlaps, where one chain waits out each add's latency (LeNet-5's conv bias gradient, (8, 6, 28x28)).
SUM_LANES = 8
# Runs of channels a parallel `_sum_mid` deals to the threads: more than any thread count here, so a slow
# thread does not hold the others up (a channel's sum is the same in any run).
SUM_RUNS = 64


@njit(cache=True, inline="always")
def _add_lanes(s, v, i):
    """The partial sums s (eight scalars, kept in registers where an array's went through memory) plus v[i:i + 8]."""
    return (s[0] + v[i], s[1] + v[i + 1], s[2] + v[i + 2], s[3] + v[i + 3], s[4] + v[i + 4], s[5] + v[i + 5],
            s[6] + v[i + 6], s[7] + v[i + 7])


@njit(cache=True, inline="always")
def _mid_sum(x3, c, tail):
    """The float64 sum of x3[:, c, :] in its fixed order: value i of each run x3[o, c] (the runs in order of o)
    is added to partial sum i % SUM_LANES, and the partial sums are then added in order, 0 first. A run's
    tail is added through `tail`, the caller's SUM_LANES zeros, of which the first inner % SUM_LANES are
    overwritten (the same count for every run, so the rest stay zero): + 0.0 leaves a partial sum as it is
    (none is ever -0.0: each starts at +0.0, and a round-to-nearest sum is -0.0 only of two -0.0s). Inlined
    into `_mid_sums`, a plain loop compiled on its own: inlined into `_sum_mid`'s parallel loop, the pipeline
    kept the partial sums out of registers (13 -> 22 us at (8, 6, 784)), and called per channel, the call
    and its reference counts cost more than short sums (`_mid_sums`)."""
    s = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    inner = x3.shape[2]
    whole = inner - inner % SUM_LANES
    for o in range(x3.shape[0]):
        row = x3[o, c]
        for i in range(0, whole, SUM_LANES):
            s = _add_lanes(s, row, i)
        if whole < inner:
            tail[:inner - whole] = row[whole:]
            s = _add_lanes(s, tail, 0)
    return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7]


@njit(cache=True)
def _mid_sums(x3, out, first, stop):
    """out[c] = `_mid_sum` of channel c, for c in first..stop-1, with one tail buffer. Allocated per channel,
    with a compiled call per channel, it cost more than short sums themselves: a global average pool of
    (8, 1280, 4x4) took 377 us, 91 with both out of the loop (2 threads, Zen 3)."""
    tail = np.zeros(SUM_LANES)
    for c in range(first, stop):
        out[c] = _mid_sum(x3, c, tail)


@njit(parallel=True, cache=True)
def _sum_mid(x3, out, parallel):
    """out[c] = the float64 sum of x3[o, c, i] over o and i in `_mid_sum`'s order; parallel over runs of c only,
    and only with `parallel` (below SUM_PARALLEL_MIN a plain loop: no parallel region launched)."""
    mid = x3.shape[1]
    if not parallel:
        _mid_sums(x3, out, 0, mid)
        return
    runs = min(mid, SUM_RUNS)
    for k in prange(runs):
        _mid_sums(x3, out, k * mid // runs, (k + 1) * mid // runs)


@njit(cache=True, inline="always")
def _outer_block(x2, out, blk):
    outer, mid = x2.shape
    c0 = blk * COL_BLOCK
    c1 = min(mid, c0 + COL_BLOCK)
    acc = np.zeros(c1 - c0)
    for o in range(outer):
        row = x2[o, c0:c1]
        for c in range(c1 - c0):
            acc[c] += row[c]
    for c in range(c1 - c0):
        out[c0 + c] = acc[c]


@njit(parallel=True, cache=True)
def _sum_outer(x2, out, parallel):
    """out[c] = sum of x2[o, c] over o in order (float64); parallel over blocks of c (with `parallel`),
    vectorised over c."""
    blocks = (x2.shape[1] + COL_BLOCK - 1) // COL_BLOCK
    if not parallel:
        for blk in range(blocks):
            _outer_block(x2, out, blk)
        return
    for blk in prange(blocks):
        _outer_block(x2, out, blk)


def _sum_kept_block(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """float64 sums of x over every axis outside [lo, hi), for axes lo..hi-1 kept (flattened)."""
    outer, mid, inner = math.prod(x.shape[:lo]), math.prod(x.shape[lo:hi]), math.prod(x.shape[hi:])
    out = np.empty(mid, np.float64)
    if mid == 0:
        return out
    if outer * inner == 0:
        out[...] = 0.0
        return out
    parallel = outer * mid * inner >= SUM_PARALLEL_MIN
    if inner == 1:
        _sum_outer(np.ascontiguousarray(x).reshape(outer, mid), out, parallel)
    else:
        _sum_mid(np.ascontiguousarray(x).reshape(outer, mid, inner), out, parallel)
    return out


def sum64(x: np.ndarray, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> np.ndarray:
    """Sum over `axis` (None: all) as float64, each output summed in a fixed order on one thread.

    The order: the reduced axes in C order (row-major over the reduced index), the same on every CPU."""
    x = np.asarray(x)
    axes = tuple(range(x.ndim)) if axis is None else tuple(
        int(a) % x.ndim for a in ((axis,) if np.isscalar(axis) else axis))
    kept = [d for d in range(x.ndim) if d not in axes]
    if not kept:
        total = _sum_kept_block(x.reshape(1, -1), 0, 0) if x.ndim else np.array([float(x)])
        flat = total.reshape(())
    elif kept == list(range(kept[0], kept[-1] + 1)):  # kept axes adjacent: read in place
        flat = _sum_kept_block(x, kept[0], kept[-1] + 1).reshape([x.shape[d] for d in kept])
    else:  # kept axes first, reduced axes after, in their own order: the same C order of the reduced index
        moved = np.moveaxis(x, kept, list(range(len(kept))))
        flat = _sum_kept_block(moved, 0, len(kept)).reshape([x.shape[d] for d in kept])
    if keepdims:
        flat = flat.reshape([1 if d in axes else x.shape[d] for d in range(x.ndim)])
    return flat


def sum_(x: np.ndarray, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> np.ndarray:
    """`sum64` rounded once to x's float dtype (float32 in, float32 out)."""
    return sum64(x, axis, keepdims).astype(_float_type(x), copy=False)


def mean(x: np.ndarray, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> np.ndarray:
    """Fixed-order float64 sum divided by the count in float64, rounded once to x's float dtype."""
    x = np.asarray(x)
    total = sum64(x, axis, keepdims)
    count = x.size // max(total.size, 1) if x.size else 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / np.float64(count)).astype(_float_type(x), copy=False)


def _float_type(x: np.ndarray) -> np.dtype:
    return x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)


# ----------------------------------------------------------------------------- elementwise functions
# float64 numpy ufuncs only: each call is one correctly rounded IEEE operation per element.

_LN2_HI = 6.93147180369123816490e-01  # ln 2 with 32 low significand bits zero: k * _LN2_HI is exact for |k| < 2^20
_LN2_LO = 1.90821492927058770002e-10  # ln 2 - _LN2_HI
_INV_LN2 = 1.44269504088896338700e+00
_EXP_TERMS = 14  # Taylor terms of exp(r) on |r| <= ln2/2: the first left out, r^14/14!, is < 2^-60
_INV_FACT = tuple(1 / math.factorial(i) for i in range(21))  # Python's int / int is correctly rounded
_EXP_COEFFS = _INV_FACT[:_EXP_TERMS]
# fdlibm e_log.c (Sun Microsystems, 1993, freely distributable): log(1+f) = f - hfsq + s*(hfsq + R(z))
_LG = (6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01, 2.222219843214978396e-01,
       1.818357216161805012e-01, 1.531383769920937332e-01, 1.479819860511658591e-01)
_SQRT2 = 1.41421356237309514547
_EXP_CLIP = 1100.0  # beyond, exp is 0 or inf in float64 anyway; keeps k an exact small integer


def _horner(coeffs: Sequence[float], z: np.ndarray) -> np.ndarray:
    """sum coeffs[i] z^i by Horner's rule, highest first (a fixed order of IEEE operations)."""
    acc = np.full_like(z, coeffs[-1])
    for c in coeffs[-2::-1]:
        acc = acc * z + c
    return acc


def _pow2(k: np.ndarray) -> np.ndarray:
    """2.0**k for integer-valued float64 k in [-1022, 1023], built from its bits (exact)."""
    return ((k.astype(np.int64) + 1023) << 52).view(np.float64)


def _exp64(x: np.ndarray) -> np.ndarray:
    """exp of float64 x: k = rint(x / ln2), r = x - k ln2 (Cody-Waite, two parts), exp(r) by Taylor, times 2^k."""
    nan = np.isnan(x)
    xc = np.clip(np.where(nan, 0.0, x), -_EXP_CLIP, _EXP_CLIP)
    k = np.rint(xc * _INV_LN2)
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    p = _horner(_EXP_COEFFS, r)
    half = np.floor(k * 0.5)  # 2^k as two exact factors: each stays a normal float64 for |k| <= 1600
    with np.errstate(over="ignore", under="ignore"):
        y = p * _pow2(half) * _pow2(k - half)
    return np.where(nan, x, y)


def _expm1_64(x: np.ndarray) -> np.ndarray:
    """exp(x) - 1 without cancellation near 0: Taylor's series on |x| < 0.5 (20 terms, error < 2^-60), else exp - 1."""
    small = np.abs(x) < 0.5
    xs = np.where(small, x, 0.0)
    series = xs * _horner(_INV_FACT[1:], xs)  # x * sum x^i / (i + 1)!
    return np.where(small, series, _exp64(np.where(small, 0.0, x)) - 1.0)


def _log_reduced(m, k):
    """log(2^k m) for m in [sqrt2/2, sqrt2) and integral k (fdlibm's polynomial in s = f / (2 + f),
    f = m - 1): arrays (NumPy ufuncs, `_log64`) and floats (compiled, `log64_scalar`) alike."""
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (_LG[1] + w * (_LG[3] + w * _LG[5]))
    t2 = z * (_LG[0] + w * (_LG[2] + w * (_LG[4] + w * _LG[6])))
    hfsq = 0.5 * f * f
    return k * _LN2_HI - ((hfsq - (s * (hfsq + t1 + t2) + k * _LN2_LO)) - f)


def _log64(x: np.ndarray) -> np.ndarray:
    """log of float64 x, fdlibm's method: x = 2^k m, m in [sqrt2/2, sqrt2), log m from s = f / (2 + f)."""
    with np.errstate(all="ignore"):
        tiny = (x > 0) & (x < 2.2250738585072014e-308)
        xs = np.where(tiny, x * 18014398509481984.0, x)  # subnormals times 2^54: normal, exactly
        bits = np.where(xs > 0, xs, 1.0).view(np.int64)
        k = ((bits >> 52) & 0x7FF) - 1023
        m = ((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000).view(np.float64)  # in [1, 2)
        big = m > _SQRT2
        m = np.where(big, m * 0.5, m)
        k = (k + big - np.where(tiny, 54, 0)).astype(np.float64)
        y = _log_reduced(m, k)
        y = np.where(x == 0, -np.inf, y)
        y = np.where(x < 0, np.nan, y)
        y = np.where(np.isposinf(x), np.inf, y)
        return np.where(np.isnan(x), x, y)


def _out(f64: np.ndarray, like: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", under="ignore"):
        return f64.astype(_float_type(like), copy=False)


def _wide(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _exp_array(x: np.ndarray) -> np.ndarray:
    """`exp` as float64 ufunc calls: the reference its compiled map must equal bit for bit."""
    return _out(_exp64(_wide(x)), x)


def _log_array(x: np.ndarray) -> np.ndarray:
    """`log` as float64 ufunc calls (the reference)."""
    return _out(_log64(_wide(x)), x)


def _expm1_array(x: np.ndarray) -> np.ndarray:
    """`expm1` as float64 ufunc calls (the reference)."""
    return _out(_expm1_64(_wide(x)), x)


def _tanh_array(x: np.ndarray) -> np.ndarray:
    """`tanh` as float64 ufunc calls (the reference): e / (e + 2) with e = expm1(2|x|), sign restored."""
    a = np.abs(_wide(x))
    with np.errstate(over="ignore", invalid="ignore"):
        e = _expm1_64(np.minimum(2.0 * a, 80.0))  # tanh(40) is 1 in float64
        t = e / (e + 2.0)
    return _out(np.copysign(np.where(np.isnan(a), a, t), _wide(x)), x)


def _sigmoid_array(x: np.ndarray) -> np.ndarray:
    """`sigmoid` as float64 ufunc calls (the reference): 1 / (1 + exp(-x)), exp's overflow giving exactly 0."""
    with np.errstate(over="ignore"):
        y = 1.0 / (1.0 + _exp64(-_wide(x)))
    return _out(y, x)


def log1p(x: np.ndarray) -> np.ndarray:
    """log(1 + x) elementwise in x's float dtype, portable and without log's loss near 0: with u = 1 + x in
    float64, log(u) * x / (u - 1), which corrects u's rounding (Goldberg, "What every computer scientist
    should know about floating-point arithmetic", 1991, theorem 4), and x itself where u rounds to 1."""
    x = np.asarray(x)
    x64 = _wide(x)
    with np.errstate(all="ignore"):
        u = 1.0 + x64
        y = np.where(u == 1.0, x64, log(u) * x64 / (u - 1.0))
        y = np.where(np.isposinf(u), u, y)  # inf * inf / inf would be nan
    return _out(y, x)


def exp(x: np.ndarray) -> np.ndarray:
    """exp elementwise in x's float dtype, portable (module doc)."""
    return _elementwise(MAP_EXP, _exp_array, x)


def log(x: np.ndarray) -> np.ndarray:
    """log elementwise in x's float dtype, portable; log 0 = -inf, log of a negative = nan."""
    return _elementwise(MAP_LOG, _log_array, x)


def expm1(x: np.ndarray) -> np.ndarray:
    """exp(x) - 1 elementwise in x's float dtype, portable."""
    return _elementwise(MAP_EXPM1, _expm1_array, x)


def tanh(x: np.ndarray) -> np.ndarray:
    """tanh elementwise in x's float dtype, portable: e / (e + 2) with e = expm1(2|x|), sign restored."""
    return _elementwise(MAP_TANH, _tanh_array, x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) elementwise in x's float dtype, portable (exp overflow gives exactly 0)."""
    return _elementwise(MAP_SIGMOID, _sigmoid_array, x)


# Compiled scalar twins of _exp64, _expm1_64 and tanh, for loops that cannot afford a ufunc call per
# operation (a DFQ gate's LSTM cell: 2,048 values a call, where the array form costs 0.1 ms in call
# overhead alone). The same IEEE operations in the same order, so the same bits; tests compare the two.
_EXP_COEFFS_ARRAY = np.array(_EXP_COEFFS)
_EXPM1_COEFFS_ARRAY = np.array(_INV_FACT[1:])


@njit(cache=True)
def exp64_scalar(x: float) -> float:
    """`_exp64` of one float64 (bit for bit)."""
    if x != x:
        return x
    xc = min(max(x, -_EXP_CLIP), _EXP_CLIP)
    k = np.rint(xc * _INV_LN2)
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    coeffs = _EXP_COEFFS_ARRAY
    p = coeffs[coeffs.size - 1]
    for i in range(coeffs.size - 2, -1, -1):
        p = p * r + coeffs[i]
    half = math.floor(k * 0.5)
    return p * math.ldexp(1.0, half) * math.ldexp(1.0, int(k) - half)


_log_reduced_scalar = njit(cache=True, inline="always")(_log_reduced)  # the same source, compiled


@njit(cache=True)
def log64_scalar(x: float) -> float:
    """`_log64` of one float64 (bit for bit): frexp's exact split stands in for the bit masks."""
    if x != x:
        return x
    if x == math.inf:
        return math.inf
    if x < 0.0:
        return math.nan
    if x == 0.0:
        return -math.inf
    tiny = x < 2.2250738585072014e-308
    frac, e = math.frexp(x * 18014398509481984.0 if tiny else x)  # frac in [0.5, 1)
    m = frac * 2.0  # in [1, 2), as the masks give it
    ki = e - 1
    if m > _SQRT2:
        m = m * 0.5
        ki += 1
    if tiny:
        ki -= 54
    return _log_reduced_scalar(m, float(ki))


@njit(cache=True)
def expm1_64_scalar(x: float) -> float:
    """`_expm1_64` of one float64 (bit for bit)."""
    if abs(x) < 0.5:
        coeffs = _EXPM1_COEFFS_ARRAY
        p = coeffs[coeffs.size - 1]
        for i in range(coeffs.size - 2, -1, -1):
            p = p * x + coeffs[i]
        return x * p
    return exp64_scalar(x) - 1.0


@njit(cache=True)
def tanh64_scalar(x: float) -> float:
    """`tanh`'s float64 value before its rounding to the input's dtype (bit for bit)."""
    a = abs(x)
    if a != a:
        return x
    e = expm1_64_scalar(min(2.0 * a, 80.0))
    return math.copysign(e / (e + 2.0), x)


_POW2_TABLE = np.ldexp(1.0, np.arange(64))  # 2^0..2^63: tanh's exp of at most 80 needs 2^k for k <= 115
TANH_SCRATCH_ROWS = 6  # float64 rows of x's length that tanh64_block works in


@njit(cache=True)
def tanh64_block(x, out, scratch):
    """`tanh64_scalar` of every value of a short float64 row (the bits of it), as whole-row passes.

    Both of tanh's branches run on every lane and a select keeps one: no branch per value, so each pass
    vectorises (the scalar form is a chain of dependent operations per value). Measured: 10,000 values
    0.07 ms, one at a time 0.17 ms. scratch: (TANH_SCRATCH_ROWS, n) float64, n = x.size."""
    n = x.size
    coeffs_e, coeffs_m = _EXP_COEFFS_ARRAY, _EXPM1_COEFFS_ARRAY
    t, xs, r, k, series, e = scratch[0], scratch[1], scratch[2], scratch[3], scratch[4], scratch[5]
    for q in range(n):
        v = min(2.0 * abs(x[q]), 80.0)  # tanh(40) is 1 in float64; NaN is restored below
        t[q] = v
        small = v < 0.5
        xs[q] = v if small else 0.0
        xe = 0.0 if small else v
        kq = np.rint(xe * _INV_LN2)
        k[q] = kq
        r[q] = (xe - kq * _LN2_HI) - kq * _LN2_LO
        series[q] = coeffs_m[coeffs_m.size - 1]
        e[q] = coeffs_e[coeffs_e.size - 1]
    for c in range(coeffs_m.size - 2, -1, -1):  # expm1's series on the small lanes (Horner)
        cm = coeffs_m[c]
        for q in range(n):
            series[q] = series[q] * xs[q] + cm
    for c in range(coeffs_e.size - 2, -1, -1):  # exp's on the others, after the range reduction
        ce = coeffs_e[c]
        for q in range(n):
            e[q] = e[q] * r[q] + ce
    for q in range(n):
        ki = int(k[q])
        half = ki >> 1  # k >= 0 here: floor(k / 2)
        m = xs[q] * series[q] if t[q] < 0.5 else e[q] * _POW2_TABLE[half] * _POW2_TABLE[ki - half] - 1.0
        v = x[q]
        out[q] = v if abs(v) != abs(v) else math.copysign(m / (m + 2.0), v)


# ------------------------------------------------------------------- compiled elementwise maps
# exp, log, expm1, tanh and sigmoid of whole arrays in one compiled call: the same IEEE operations in the same
# order as the ufunc forms above (`_exp_array`, ...), so the same bits (tests compare them), where the ufunc
# forms make some twenty passes over float64 temporaries. Measured on one Zen 3 thread: sigmoid of (4, 96,
# 64x64) float32 took 47 ms in ufuncs inside an EfficientNet-B0 step (the model's SiLUs, half its step).
MAP_EXP, MAP_LOG, MAP_EXPM1, MAP_TANH, MAP_SIGMOID = range(5)
MAP_BLOCK = 256  # values per vectorised pass: a block's float64 rows stay in L1
MAP_RUNS = 64  # runs of blocks dealt to the threads (more than any thread count here)
MAP_PARALLEL_MIN = 1 << 15  # below this many values, one serial compiled call (no parallel region)
MAP_SCRATCH_ROWS = max(TANH_SCRATCH_ROWS + 2, 5)  # float64 rows of MAP_BLOCK a run works in
# x + 1.5 * 2^52 holds an integer-valued float64 |x| < 2^51 in its low significand bits: its bits minus this
# constant's are x as an int64, with no float-to-int conversion (which AVX2 has no vector form of for int64)
_ROUND_MAGIC = 6755399441055744.0
_ROUND_MAGIC_BITS = int(np.float64(_ROUND_MAGIC).view(np.int64))


@njit(cache=True, inline="always")
def _pow2_row(t, n):
    """t[q] = 2^t[q] for integer-valued t[q] in [-1022, 1023], exactly (`_pow2`'s bits), in two vectorised passes."""
    bits = t.view(np.int64)
    for q in range(n):
        t[q] = t[q] + _ROUND_MAGIC
    for q in range(n):
        bits[q] = (bits[q] - _ROUND_MAGIC_BITS + 1023) << 52


@njit(cache=True, inline="always")
def _exp_pass(v, e, k, r, h, n):
    """e[:n] = `_exp64` of v[:n] (float64, no NaN, within +-_EXP_CLIP), as passes over the block that vectorise;
    k, r and h are the caller's scratch rows."""
    coeffs = _EXP_COEFFS_ARRAY
    top = coeffs[coeffs.size - 1]
    for q in range(n):
        kq = np.rint(v[q] * _INV_LN2)
        k[q] = kq
        r[q] = (v[q] - kq * _LN2_HI) - kq * _LN2_LO
        e[q] = top
    for c in range(coeffs.size - 2, -1, -1):  # Horner, highest term first (`_horner`)
        cc = coeffs[c]
        for q in range(n):
            e[q] = e[q] * r[q] + cc
    for q in range(n):
        half = np.floor(k[q] * 0.5)  # 2^k as two exact factors, each a normal float64 (`_exp64`)
        h[q] = half
        k[q] = k[q] - half
    _pow2_row(h, n)
    _pow2_row(k, n)
    for q in range(n):
        e[q] = e[q] * h[q] * k[q]


@njit(cache=True)
def _map_run(x, out, lo, hi, kind, scratch):
    """out[lo:hi] = function `kind` (MAP_*) of x[lo:hi], block by block, each value's bits its own. The kinds'
    loops are apart so that no pass tests the kind per value."""
    v, e, k, r, h = scratch[0], scratch[1], scratch[2], scratch[3], scratch[4]
    if kind == MAP_EXP:
        for b0 in range(lo, hi, MAP_BLOCK):
            m = min(MAP_BLOCK, hi - b0)
            for q in range(m):
                a = np.float64(x[b0 + q])
                # NaN computes as 0 and is put back after (`_exp64`'s where), the rest clipped as np.clip
                v[q] = min(max(0.0 if a != a else a, -_EXP_CLIP), _EXP_CLIP)
            _exp_pass(v, e, k, r, h, m)
            for q in range(m):
                a = np.float64(x[b0 + q])
                out[b0 + q] = a if a != a else e[q]
    elif kind == MAP_SIGMOID:
        for b0 in range(lo, hi, MAP_BLOCK):
            m = min(MAP_BLOCK, hi - b0)
            for q in range(m):
                a = -np.float64(x[b0 + q])
                v[q] = min(max(0.0 if a != a else a, -_EXP_CLIP), _EXP_CLIP)
            _exp_pass(v, e, k, r, h, m)
            for q in range(m):
                a = -np.float64(x[b0 + q])
                out[b0 + q] = 1.0 / (1.0 + (a if a != a else e[q]))
    elif kind == MAP_TANH:
        for b0 in range(lo, hi, MAP_BLOCK):
            m = min(MAP_BLOCK, hi - b0)
            for q in range(m):
                v[q] = np.float64(x[b0 + q])
            # rows of its own: tanh64_block writes every row of the scratch it gets while it reads v
            tanh64_block(v[:m], e[:m], scratch[2:])
            for q in range(m):
                out[b0 + q] = e[q]
    elif kind == MAP_LOG:
        for q in range(lo, hi):
            out[q] = log64_scalar(np.float64(x[q]))
    else:
        for q in range(lo, hi):
            out[q] = expm1_64_scalar(np.float64(x[q]))


@njit(parallel=True, cache=True)
def _map(x, out, kind, parallel):
    """out = function `kind` of x (1-D, float32 or float64 alike), parallel over MAP_RUNS runs with `parallel`."""
    n = x.size
    if not parallel:
        _map_run(x, out, 0, n, kind, np.empty((MAP_SCRATCH_ROWS, MAP_BLOCK)))
        return
    runs = min(MAP_RUNS, (n + MAP_BLOCK - 1) // MAP_BLOCK)
    for run in prange(runs):
        _map_run(x, out, n * run // runs, n * (run + 1) // runs, kind, np.empty((MAP_SCRATCH_ROWS, MAP_BLOCK)))


def _elementwise(kind: int, reference, x: np.ndarray) -> np.ndarray:
    """Function `kind` of x in x's float dtype: the compiled map for float32/float64, else the ufunc reference."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64) or x.ndim == 0:
        return reference(x)
    out = np.empty(x.shape, x.dtype)  # C order, whatever x's
    if x.size:
        _map(np.ascontiguousarray(x).reshape(-1), out.reshape(-1), kind, x.size >= MAP_PARALLEL_MIN)
    return out


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """z - max - log(sum exp(z - max)) along `axis`, in float64 (fixed-order sum), as float64."""
    z64 = _wide(z)
    shift = z64 - z64.max(axis=axis, keepdims=True)  # max is exact: order cannot change it
    return shift - log(sum64(exp(shift), axis, keepdims=True))  # the compiled maps: `_exp64`'s, `_log64`'s bits


@njit(cache=True)
def softmax_xent64(z, target, grad) -> float:
    """Softmax cross-entropy of (N, K) logits z against target rows, in one compiled pass: returns the sum
    of target * log_softmax over all of z in C order, and writes (exp(log_softmax) - target) / N to grad.

    The same IEEE operations in the same order as `log_softmax`, `sum64` and `exp` on the whole batch (so
    the same bits); the array form spent about 120 us a step in ufunc calls on a 10-class head."""
    n, k = z.shape
    ls = np.empty(k)
    row = np.zeros(SUM_LANES)  # `sum64`'s order: value j of a row to partial sum j % SUM_LANES (`_mid_sum`) ...
    flat = np.zeros(SUM_LANES)  # ... and of the whole batch, flat index i * k + j
    for i in range(n):
        top = np.float64(z[i, 0])  # float() keeps a float32 a float32 in Numba
        for j in range(1, k):
            v = np.float64(z[i, j])
            if v > top or v != v:  # NaN wins, as numpy's max
                top = v
        row[:] = 0.0
        for j in range(k):
            ls[j] = np.float64(z[i, j]) - top
            row[j % SUM_LANES] += exp64_scalar(ls[j])
        s = 0.0
        for lane in range(SUM_LANES):
            s += row[lane]
        lg = log64_scalar(s)
        for j in range(k):
            v = ls[j] - lg
            t = target[i, j]
            flat[(i * k + j) % SUM_LANES] += t * v
            grad[i, j] = (exp64_scalar(v) - t) / n
    total = 0.0
    for lane in range(SUM_LANES):
        total += flat[lane]
    return total


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(z - max) / sum along `axis` in z's float dtype (float64 inside, fixed-order sum)."""
    z = np.asarray(z)
    z64 = _wide(z)
    e = exp(z64 - z64.max(axis=axis, keepdims=True))  # the compiled map: `_exp64`'s bits
    return _out(e / sum64(e, axis, keepdims=True), z)


# Integer exponents up to this size are powered by binary exponentiation (IEEE products in a fixed order);
# others through exp(b * log|a|).
POWER_MAX_INT = 64


def power(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a ** b elementwise (broadcast) in a's float dtype, portable: an integer exponent (one for the whole
    array, |b| <= POWER_MAX_INT) by products in float64 (x**2 is x*x, x**3 (x*x)*x ...; a negative one the
    reciprocal), 0.5 as sqrt (numpy's own shortcut), any other through `exp` and `log` of |a| with C's pow rules
    for the sign, zeros, infinities and NaN. numpy's power calls the platform's libm pow, whose last bit differs
    between builds."""
    a = np.asarray(a)
    b = np.asarray(b)
    a64 = _wide(a)
    with np.errstate(all="ignore"):
        if b.size == 1 or (b.size and (b == b.reshape(-1)[0]).all()):
            e = float(b.reshape(-1)[0]) if b.size else 0.0
            if e == 0.5:  # sqrt is correctly rounded (and numpy's power takes it for 0.5 too: sqrt(-inf) is nan)
                return _out(np.broadcast_to(np.sqrt(a64), np.broadcast_shapes(a.shape, b.shape)).copy(), a)
            if math.isfinite(e) and e == int(e) and abs(e) <= POWER_MAX_INT:
                p = powi(a64, abs(int(e)))
                p = 1.0 / p if e < 0 else p
                return _out(np.broadcast_to(p, np.broadcast_shapes(a.shape, b.shape)).copy(), a)
        a64, b64 = np.broadcast_arrays(a64, _wide(b))
        mag = np.abs(a64)
        y = _exp64(b64 * _log64(mag))  # |a| ** b; log 0 = -inf gives 0 or inf by b's sign, as pow
        whole = b64 == np.floor(b64)
        odd = whole & np.isfinite(b64) & (np.fmod(b64, 2.0) != 0.0)
        y = np.where((a64 < 0) & ~whole & np.isfinite(a64), np.nan, y)  # a negative base to a fractional power
        y = np.where((a64 < 0) & odd, -y, y)  # (-x) ** odd n = -(x ** n)
        y = np.where(b64 == 0.0, 1.0, y)  # pow(x, 0) is 1, even for NaN
        y = np.where((a64 == 1.0) | ((a64 == -1.0) & np.isinf(b64)), 1.0, y)  # pow(1, y), pow(-1, +-inf)
        return _out(y, a)


def powi(base: float | np.ndarray, n: int) -> float | np.ndarray:
    """base ** n for an integer n >= 0 by binary exponentiation: a fixed sequence of IEEE products, where
    Python's float ** and numpy's power call the platform's libm pow (not correctly rounded, and built with FMA
    on some). A float, or elementwise over a float array (same products, in its dtype)."""
    if n < 0:
        raise ValueError(f"powi needs n >= 0, got {n}")
    array = isinstance(base, np.ndarray)
    result, b = (np.ones_like(base), base) if array else (1.0, float(base))
    while n:
        if n & 1:
            result = result * b
        n >>= 1
        if n:  # no square past the last bit: a wasted pass over an array, and an overflow it would not use
            b = b * b
    return result


_HALF_PI = 1.5707963267948966
_SIN_COEFFS = tuple(1 / math.factorial(2 * n + 1) for n in range(12))


def cos_0_pi(x: float) -> float:
    """cos x for 0 <= x <= pi in Python floats (IEEE double ops only): -sin(x - pi/2) by its Taylor series
    (12 terms on |y| <= pi/2: the first left out is below 2^-60), where math.cos is the platform's libm."""
    if not 0.0 <= x <= math.pi:
        raise ValueError(f"cos_0_pi needs 0 <= x <= pi, got {x}")
    y = x - _HALF_PI
    z = y * y
    acc = 0.0
    for c in reversed(_SIN_COEFFS):  # sin y = y * sum (-z)^n / (2n + 1)!, Horner from the highest term
        acc = acc * -z + c
    return -(y * acc)


# ------------------------------------------------------------------------------- what the ops call
# Each is the deterministic function while `active()`, else numpy's (BLAS, SIMD libm, pairwise sums).


def op_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`matmul` when active, else np.matmul."""
    return matmul(a, b) if active() else np.matmul(a, b)


def op_sum(x: np.ndarray, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> np.ndarray:
    """`sum_` when active, else x.sum (x's dtype either way)."""
    if active():
        return sum_(x, axis, keepdims)
    return np.asarray(x).sum(axis=None if axis is None else tuple(np.atleast_1d(axis)), keepdims=keepdims)


def op_channel_sum(x: np.ndarray) -> np.ndarray:
    """`op_sum` over every axis but 1 (a conv's bias gradient), the same bits, without `sum64`'s general
    axis handling: four Python calls deep, it cost as much as the sum inside a batch-8 step."""
    if not active() or x.ndim < 2:
        return op_sum(x, (0,) + tuple(range(2, x.ndim)))
    return _sum_kept_block(x, 1, 2).astype(_float_type(x), copy=False)


def op_mean(x: np.ndarray, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> np.ndarray:
    """`mean` when active, else x.mean."""
    if active():
        return mean(x, axis, keepdims)
    return np.asarray(x).mean(axis=None if axis is None else tuple(np.atleast_1d(axis)), keepdims=keepdims)


def op_exp(x: np.ndarray) -> np.ndarray:
    """`exp` when active, else np.exp."""
    return exp(x) if active() else np.exp(x)


def op_log(x: np.ndarray) -> np.ndarray:
    """`log` when active, else np.log."""
    return log(x) if active() else np.log(x)


def op_tanh(x: np.ndarray) -> np.ndarray:
    """`tanh` when active, else np.tanh."""
    return tanh(x) if active() else np.tanh(x)


def op_power(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`power` when active, else np.power (both in a's dtype: b cast to it first, ONNX's rule)."""
    return power(a, b) if active() else np.power(a, np.asarray(b).astype(a.dtype, copy=False))


def op_expm1(x: np.ndarray) -> np.ndarray:
    """`expm1` when active, else np.expm1."""
    return expm1(x) if active() else np.expm1(x)


def op_log1p(x: np.ndarray) -> np.ndarray:
    """`log1p` when active, else np.log1p."""
    return log1p(x) if active() else np.log1p(x)


def op_sigmoid(x: np.ndarray) -> np.ndarray:
    """`sigmoid` when active, else 1 / (1 + exp(-x)) split by sign so that exp never overflows (in x's dtype)."""
    if active():
        return sigmoid(x)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
