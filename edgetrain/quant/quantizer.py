"""Quantisers: float tensor -> QTensor, with per-tensor or per-channel scales and two roundings.

Conventions, identical everywhere in the engine:

* scale = range / qmax, where range is max|x| (signed) or max x (unsigned) of the tensor or of
  each channel, or a range the caller gives (e.g. a `RunningRange` in eval). The float32 scale is
  rounded up when needed so that range / scale <= qmax holds exactly: data-derived ranges never
  saturate. `pow2=True` rounds the scale up to a power of two (rescaling becomes a shift). A zero
  range gives scale 1 (every q is 0), never a division by zero; scales below the smallest normal
  float32 (ranges under qmax * 2^-126) are raised to it.
* nearest rounding is round half to even (IEEE-754 default, numpy.rint): 0.5 -> 0, 1.5 -> 2.
* stochastic rounding is q = floor(x * r + u) in x's float type, r = 1 / scale rounded to that type
  and u in [0, 1) on a 24-bit grid from the counter-based generator of `rng`, drawn for the element's
  flat C-order index (+ `index_offset`, the two under 2^32) in the stream of `key`: unbiased to within
  the float32 roundings of the product and the sum (under 2^-16 of a step for 8-bit codes),
  |error| < scale, and bit-identical for any chunking, thread count or machine.
* nearest codes equal rint(x / scale) with the quotient in float64; values whose float64 x / scale lies
  beyond [qmin, qmax] are clipped AND counted in `QuantStats.saturated` (only possible with a given
  range, or for negatives in the unsigned form).
* NaN or infinity in the input raises NonFiniteError (a DataError and a ValueError).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from edgetrain.errors import NonFiniteError
from edgetrain.kernels.extrema import KEY_VIEWS as _KEY_VIEWS
from edgetrain.kernels.extrema import decode as _decode
from edgetrain.kernels.extrema import fold as _fold
from edgetrain.kernels.extrema import start as _start
from edgetrain.kernels.threads import SMALL_ELEMENTS, ensure_pool
from edgetrain.quant.qtensor import QTensor, QuantStats, check_bits, qrange, storage_dtype
from edgetrain.quant.rng import RngKey, check_draws, stream_seed, stream_words, uniform_at

ROUNDINGS = ("nearest", "stochastic")
_PIECE = 1 << 15  # elements per parallel work item
# Elementwise work is cheap per element, so it goes parallel only from this many elements on (below,
# the kernels' serial branch: no parallel launch, no switching of the thread pool).
PARALLEL_MIN_ELEMENTS = SMALL_ELEMENTS
_SCALE_FLOOR = float(np.finfo(np.float32).tiny)  # smallest normal float32, a power of two
# Nearest rounding multiplies by 1 / scale where it can prove the code equals rint(x / scale): where no
# value saturates, |x / scale| <= 2^16, so x * (1 / scale) is within 2^-36 of x / scale and the division's
# own float64 rounding within 2^-37; a product at most this far from its rounded integer q leaves both
# quotients nearer to q than 1/2. Farther (a value within 2^-30 of a half-integer), the piece divides.
NEAR_HALF = 0.5 - 2.0 ** -30  # also where a BatchNorm writes codes itself (ops.norm_kernels.bn_codes)
# float32 data with codes of at most 8 bits multiplies in float32 instead (8 lanes a vector, not 4): 1/scale
# rounded to float32 and the float32 product are each within 2^-24 relative, so where nothing saturates
# (|x / scale| <= 255.5 < 2^8) the product is within 2^-15 of x / scale; a product at most NARROW_NEAR_HALF
# from its rounded integer q (4x that margin) leaves x / scale, and its float64 quotient, nearer to q than 1/2.
# Farther (1 value in 4,096), its block of NARROW_BLOCK values divides.
NARROW_MAX = 255.0  # the widest code magnitude the float32 product covers
NARROW_NEAR_HALF = np.float32(0.5 - 2.0 ** -13)
NARROW_BLOCK = 64


def narrow_margin(dtype: np.dtype, qmax: int) -> float:
    """NARROW_NEAR_HALF where data of `dtype` rounded to codes up to `qmax` may take the float32 product (the
    rule `_nearest_item` applies inside its kernel), else 0: for a kernel of another module, e.g. bn_codes."""
    return NARROW_NEAR_HALF if np.dtype(dtype) == np.float32 and qmax <= NARROW_MAX else 0.0


@dataclass
class RunningRange:
    """Exponential moving average of a tensor's observed max |x| (the range eval quantises with)."""

    momentum: float = 0.1
    value: float | None = None

    def update(self, observed: float) -> float:
        """Fold in one batch's range (the first batch sets it) and return the new value."""
        observed = float(observed)
        self.value = observed if self.value is None else (1.0 - self.momentum) * self.value + self.momentum * observed
        return self.value


# ----------------------------------------------------------------------------------- kernels


@njit(inline="always", cache=True)
def _store(r, v, lo, hi, dst, j):
    """dst[j] = r clipped to [lo, hi] (dst's integer type holds that range); returns 1 if v lies beyond it."""
    dst[j] = np.int32(min(max(r, lo), hi))
    return (v < lo) | (v > hi)


# The two kernels share their layout: work item w is piece (w % pieces) of row (w // pieces) of
# x3 = (outer, channels, inner); loops start at 0 on slices and have no data-dependent branch, so
# LLVM vectorises them (NaN/inf are rejected before, in NumPy).


@njit(inline="always", cache=True)
def _nearest_narrow(src, s, r32, lo, hi, dst):
    """dst = clip(rint(src / s)) for float32 src and codes of at most 8 bits, multiplying in float32
    (NARROW_NEAR_HALF says why the codes are the same); a block of NARROW_BLOCK values that holds one near a
    half-integer divides instead (48,000 weights 13.9 -> 10.4 us, 2.1 million values 614 -> 506 us, one
    thread). The float64 loop in `_nearest_item` has the same shape; one helper taking the margin and the
    block as arguments ran 3-5% slower."""
    lo32, hi32 = np.float32(lo), np.float32(hi)
    n = src.size
    for b0 in range(0, n, NARROW_BLOCK):
        sv = src[b0:min(n, b0 + NARROW_BLOCK)]
        dv = dst[b0:]
        near = False
        for j in range(sv.size):
            v = sv[j] * r32
            q = np.rint(v)
            near |= abs(v - q) > NARROW_NEAR_HALF
            dv[j] = np.int32(min(max(q, lo32), hi32))
        if near:
            for j in range(sv.size):
                dv[j] = np.int32(min(max(np.rint(np.float64(sv[j]) / s), lo), hi))


@njit(inline="always", cache=True)
def _nearest_item(x3, scale, lo, hi, pieces, out3, sat, w, count):
    """Work item w of `_quantize_nearest` (the one body of its serial and parallel loops)."""
    channels, inner = x3.shape[1], x3.shape[2]
    span = (inner + pieces - 1) // pieces
    row = w // pieces
    j0 = (w % pieces) * span
    src = x3[row // channels, row % channels, j0:min(inner, j0 + span)]
    dst = out3[row // channels, row % channels, j0:]
    s = np.float64(scale[row % channels])
    if count:
        ns = 0
        for j in range(src.size):
            v = np.float64(src[j]) / s
            ns += _store(np.rint(v), v, lo, hi, dst, j)
        sat[w] = ns
        return
    # Multiply by 1 / s, and divide only the pieces where a value lies near a half-integer (module doc:
    # the codes are rint(x / s) all the same). A float64 division costs 2 cycles a value on some x86
    # cores, twice the rest of this loop: 2.1 million float32 values 1.19 -> 0.60 ms on one thread.
    r = 1.0 / s
    if src.itemsize == 4 and hi <= NARROW_MAX and -lo <= NARROW_MAX:
        _nearest_narrow(src, s, np.float32(r), lo, hi, dst)
        sat[w] = 0
        return
    near = False
    for j in range(src.size):
        v = np.float64(src[j]) * r
        q = np.rint(v)
        near |= abs(v - q) > NEAR_HALF
        dst[j] = np.int32(min(max(q, lo), hi))
    if near:
        for j in range(src.size):
            dst[j] = np.int32(min(max(np.rint(np.float64(src[j]) / s), lo), hi))
    sat[w] = 0


@njit(parallel=True, cache=True)
def _quantize_nearest(x3, scale, qmin, qmax, pieces, out3, sat, min_parallel, count):
    """out3 = clip(rint(x3 / scale[channel])); sat[w] = saturations of work item w. Below
    `min_parallel` elements a serial loop over the same items: no parallel launch. count=False (the
    caller knows from the range that no value lies beyond [qmin, qmax] * scale) drops the saturation
    test and its sum, which cost the loop a third of its time (2.1 million float32 values on one thread
    of a 2.6 GHz Xeon: 1.69 -> 1.16 ms; the codes are the same)."""
    items = x3.shape[0] * x3.shape[1] * pieces
    lo = np.float64(qmin)
    hi = np.float64(qmax)
    if x3.size < min_parallel:
        for w in range(items):
            _nearest_item(x3, scale, lo, hi, pieces, out3, sat, w, count)
        return
    for w in prange(items):
        _nearest_item(x3, scale, lo, hi, pieces, out3, sat, w, count)


@njit(inline="always", cache=True)
def _stochastic_item(x3, recip, bounds, scale, k0, m, offset, pieces, out3, sat, w, count):
    """Work item w of `_quantize_stochastic` (the one body of its serial and parallel loops)."""
    channels, inner = x3.shape[1], x3.shape[2]
    span = (inner + pieces - 1) // pieces
    row = w // pieces
    j0 = (w % pieces) * span
    src = x3[row // channels, row % channels, j0:min(inner, j0 + span)]
    dst = out3[row // channels, row % channels, j0:]
    r = recip[row % channels]
    lo, hi = bounds[0], bounds[1]
    first = offset + row * inner + j0  # flat C-order index of src[0]
    if count:  # saturation is judged on the exact quotient, as nearest rounding's
        s = np.float64(scale[row % channels])
        ns = 0
        for j in range(src.size):
            v = np.float64(src[j]) / s
            ns += _store(np.floor(src[j] * r + uniform_at(j, first, k0, m)), v, lo, hi, dst, j)
        sat[w] = ns
        return
    for j in range(src.size):
        dst[j] = np.int32(min(max(np.floor(src[j] * r + uniform_at(j, first, k0, m)), lo), hi))
    sat[w] = 0


@njit(parallel=True, cache=True)
def _quantize_stochastic(x3, scale, qmin, qmax, seed, offset, pieces, out3, sat, min_parallel, count):
    """out3 = clip(floor(x3 * (1 / scale[channel]) + u)) in x3's float type, u drawn for each element's
    flat index (`rng`); serial below `min_parallel` elements, as `_quantize_nearest`, and without the
    saturation test at count=False."""
    items = x3.shape[0] * x3.shape[1] * pieces
    recip = np.empty(x3.shape[1], x3.dtype)  # rounded once to x3's type: the loop never widens
    for c in range(x3.shape[1]):
        recip[c] = 1.0 / np.float64(scale[c])
    bounds = np.empty(2, x3.dtype)
    bounds[0], bounds[1] = qmin, qmax
    k0, m = stream_words(seed)
    if x3.size < min_parallel:
        for w in range(items):
            _stochastic_item(x3, recip, bounds, scale, k0, m, offset, pieces, out3, sat, w, count)
        return
    for w in prange(items):
        _stochastic_item(x3, recip, bounds, scale, k0, m, offset, pieces, out3, sat, w, count)


@njit(cache=True, nogil=True)
def _may_saturate(lo, hi, scale, qmin, qmax):
    """Whether any channel's range [lo[c], hi[c]] reaches beyond [qmin, qmax] * scale[c]: the kernels' `count`
    (the products are exact in float64). A range taken from the data never does; a given one may."""
    for c in range(scale.size):
        s = np.float64(scale[c])
        if lo[c] < qmin * s or hi[c] > qmax * s:
            return True
    return False


# ------------------------------------------------------------------------------------ helpers


def _as_float(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    return np.ascontiguousarray(x)


def _view3(x: np.ndarray, axis: int | None) -> tuple[np.ndarray, int | None]:
    """x as (outer, channels, inner) around `axis` (channels = 1 for a per-tensor scale)."""
    if axis is None:
        return x.reshape(1, 1, x.size), None
    if x.ndim == 0:
        raise ValueError("a per-channel scale needs an array with at least one axis")
    axis = int(axis) % x.ndim
    outer = math.prod(x.shape[:axis])  # Python ints: np.prod costs ~20 us a call
    return x.reshape(outer, x.shape[axis], -1), axis


def _pieces(inner: int) -> int:
    return max(1, -(-inner // _PIECE))


@njit(cache=True, nogil=True)
def _extrema(x3, lo, hi):
    """lo[c], hi[c] = min and max of x3[:, c, :] in one pass; False if any value is NaN or infinite.

    For small tensors (a layer's weights, a small batch's activations): one compiled call instead of
    NumPy's two reductions and their checks, 2 us instead of 10 for 2,304 weights; larger ones take
    `_key_extrema`, which vectorises (this loop took 107 us for 131,072 values where NumPy took 47)."""
    bad = False
    for c in range(x3.shape[1]):
        a = np.inf
        b = -np.inf
        for o in range(x3.shape[0]):
            row = x3[o, c]
            for j in range(row.size):
                v = row[j]
                a = min(a, v)
                b = max(b, v)
                bad |= (v - v) != 0  # NaN or infinity: v - v is 0 exactly for every finite v
        lo[c] = a
        hi[c] = b
    return not bad


# Below this many values `_extrema`'s plain loop wins; from here on `_key_extrema` (or the parallel scan).
_KEY_EXTREMA_MIN = 4096


@njit(cache=True, nogil=True)
def _key_extrema(bits3, exp_mask, mag_mask, sign, lo, hi):
    """`_extrema` on the floats' bit patterns, as integer reductions (`kernels.extrema`): lo[c], hi[c] = the
    bit patterns of the min and max of channel c; False if any value is NaN or infinite. Measured (one
    thread, Zen 5, with the earlier per-value keys): 48,000 float32 values 7 us here, 28 us in `_extrema`,
    5 to 21 us in NumPy (per tensor / per channel)."""
    bad = False
    for c in range(bits3.shape[1]):
        smax, smin, fmax = _start(sign)
        for o in range(bits3.shape[0]):
            smax, smin, fmax = _fold(bits3[o, c], smax, smin, fmax, sign)
        lo[c], hi[c], flag = _decode(smax, smin, fmax, sign, exp_mask, mag_mask)
        bad |= flag
    return not bad


@njit(cache=True, nogil=True, parallel=True)
def _key_extrema_pieces(bits, exp_mask, mag_mask, sign, piece_smax, piece_smin, piece_fmax, out):
    """`_key_extrema` of one flat tensor, in pieces of _PIECE values on parallel threads (one slot per piece
    in each of the three reductions' arrays), then the pieces combined: out = the bit patterns of the min
    and the max; False if a NaN or infinity was met. Min and max are exact, so neither the pieces' order
    nor the thread count can change them. (No name here may equal one inside the inlined `_fold`: Numba's
    inlining into a parallel loop let a clash turn an earlier scan's results into garbage.)"""
    n = bits.size
    for p in prange(piece_smax.size):
        piece = bits[p * _PIECE:min(n, (p + 1) * _PIECE)]  # a view from 0: no index wraparound to check
        s0, s1, s2 = _start(sign)
        piece_smax[p], piece_smin[p], piece_fmax[p] = _fold(piece, s0, s1, s2, sign)
    out[0], out[1], bad = _decode(piece_smax.max(), piece_smin.min(), piece_fmax.max(), sign, exp_mask, mag_mask)
    return not bad


@njit(cache=True, nogil=True, parallel=True)
def _key_extrema_rows(bits3, exp_mask, mag_mask, sign, lo_out, hi_out):
    """`_key_extrema` of a (1, rows, inner) tensor with its rows on parallel threads: each row's min and max
    are exact, so the same values for any thread count. A layer's weights quantised per output channel
    ((512, 784): 61 -> 32 us on 2 threads). (No name here may equal one inside the inlined `_fold` or
    `_decode`: Numba's inlining into a parallel loop let such a clash give wrong results.)"""
    rows = bits3.shape[1]
    row_bad = np.zeros(rows, np.bool_)
    for rr in prange(rows):
        q0, q1, q2 = _start(sign)
        q0, q1, q2 = _fold(bits3[0, rr], q0, q1, q2, sign)
        lo_out[rr], hi_out[rr], row_bad[rr] = _decode(q0, q1, q2, sign, exp_mask, mag_mask)
    return not row_bad.any()


# From this many values a per-tensor range takes the parallel scan; below, `_key_extrema` on one thread
# costs less than a parallel launch (measured 2 threads: 2.1 million float32 values 0.08 ms against
# NumPy's 0.16 ms; 131,072 values about even).
_PARALLEL_EXTREMA_MIN = 1 << 18


def _flat_extrema(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """([min], [max]) in float64 of a large flat float tensor from the parallel scan; None if it holds a
    NaN or infinity."""
    ints, exp_mask, mag_mask, sign = _KEY_VIEWS[flat.dtype]
    pieces = _pieces(flat.size)
    out = np.empty(2, ints)
    slots = [np.empty(pieces, ints) for _ in range(3)]  # per piece: smax, smin, fmax
    if not _key_extrema_pieces(flat.view(ints), exp_mask, mag_mask, sign, *slots, out):
        return None
    values = out.view(flat.dtype).astype(np.float64)
    return values[:1], values[1:]


def _finite_extrema(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel min and max of (outer, channels, inner); ValueError on NaN or infinity. Every size
    takes a compiled scan that checks finiteness as it goes: the plain loop for small tensors, the
    integer-keyed one from _KEY_EXTREMA_MIN values, the parallel one for a large per-tensor range.
    (NumPy's min and max along an axis were 3-7x slower on per-channel weights: (256, 784) 52 us
    against 18, (256, 256) 46 against 6.4.)"""
    if x3.size == 0:
        return np.zeros(x3.shape[1]), np.zeros(x3.shape[1])
    if x3.shape[0] == 1 and x3.shape[1] == 1 and x3.size >= _PARALLEL_EXTREMA_MIN:
        found = _flat_extrema(x3.reshape(-1))  # x3 comes from _as_float: float32/64 and contiguous
        if found is None:
            raise non_finite(x3)
        return found
    if x3.size >= _KEY_EXTREMA_MIN:
        ints, exp_mask, mag_mask, sign = _KEY_VIEWS[x3.dtype]
        lo_bits, hi_bits = np.empty(x3.shape[1], ints), np.empty(x3.shape[1], ints)
        if _key_extrema(x3.view(ints), exp_mask, mag_mask, sign, lo_bits, hi_bits):
            return lo_bits.view(x3.dtype).astype(np.float64), hi_bits.view(x3.dtype).astype(np.float64)
    else:
        lo, hi = np.empty(x3.shape[1], np.float64), np.empty(x3.shape[1], np.float64)
        if _extrema(x3, lo, hi):
            return lo, hi
    raise non_finite(x3)


def non_finite(x3: np.ndarray) -> NonFiniteError:
    """The error for a tensor that holds NaN or infinity, with the count."""
    return NonFiniteError(f"cannot quantise: the tensor holds {int((~np.isfinite(x3)).sum())} NaN or infinite values")


def channel_range(x: np.ndarray, *, signed: bool = True, axis: int | None = None) -> np.ndarray:
    """max|x| (signed) or max(x, 0) (unsigned) of the whole tensor, or of each index of `axis`."""
    lo, hi = _finite_extrema(_view3(_as_float(x), axis)[0])
    top = np.maximum(np.abs(lo), np.abs(hi)) if signed else hi
    return np.maximum(top, 0.0)


@njit(cache=True, nogil=True)
def _scales(top, qmax, pow2, out):
    """`scale_from_range` channel by channel, in one compiled call (the NumPy form costs ~15 array
    operations, some 60 us a call, and a step quantises a few tensors per layer). The same IEEE
    operations as `_scales_numpy` in the same order, so the same float32 bits; returns False on a
    range that is negative or not finite (out is then undefined)."""
    floor = np.float32(_SCALE_FLOOR)
    for i in range(top.size):
        t = top[i]
        if not (t >= 0.0 and t < np.inf):
            return False
        raw = t / qmax
        if pow2:
            mant, exp = math.frexp(raw)
            s = np.float32(math.ldexp(1.0, exp - 1 if mant == 0.5 else exp))
        else:
            s = np.float32(raw)
        s = max(s, floor)
        # float32 rounding (or float64 rounding of raw) can leave t / s a hair above qmax
        for _ in range(2):
            if not t / np.float64(s) > qmax:
                break
            s = s * np.float32(2) if pow2 else np.nextafter(s, np.float32(np.inf))
        out[i] = s if t > 0 else np.float32(1)
    return True


def scale_from_range(top, bits: int, *, signed: bool = True, pow2: bool = False) -> np.ndarray:
    """float32 scale(s) with top / scale <= qmax exactly; 1 where top is 0; a power of two if pow2."""
    qmax = qrange(bits, signed)[1]
    top = np.asarray(top, np.float64)
    out = np.empty(top.shape, np.float32)
    if not _scales(top.reshape(-1), float(qmax), bool(pow2), out.reshape(-1)):
        raise ValueError(f"a quantisation range must be finite and >= 0, got {top}")
    return out


def _scales_numpy(top: np.ndarray, qmax: int, pow2: bool) -> np.ndarray:
    """The array form `_scales` computes (the reference the tests compare it with, bit for bit)."""
    raw = top / qmax
    if pow2:
        mant, exp = np.frexp(raw)
        scale = np.ldexp(1.0, np.where(mant == 0.5, exp - 1, exp)).astype(np.float32)
    else:
        scale = raw.astype(np.float32)
    scale = np.maximum(scale, np.float32(_SCALE_FLOOR))
    # float32 rounding (or float64 rounding of raw) can leave top / scale a hair above qmax.
    for _ in range(2):
        over = top / scale.astype(np.float64) > qmax
        if not over.any():
            break
        scale = np.where(over, scale * np.float32(2) if pow2 else np.nextafter(scale, np.float32(np.inf)), scale)
    return np.where(top > 0, scale, np.float32(1)).astype(np.float32)


def compute_scale(x: np.ndarray, bits: int, *, signed: bool = True, axis: int | None = None,
                  pow2: bool = False) -> np.float32 | np.ndarray:
    """The scale `quantize` would derive from x's own range (a scalar, or one per index of axis)."""
    scale = scale_from_range(channel_range(x, signed=signed, axis=axis), bits, signed=signed, pow2=pow2)
    return scale if axis is not None else np.float32(scale[0])


# ---------------------------------------------------------------------------------- quantize


@njit(cache=True, nogil=True, inline="always")
def _tensor_scale(values, given, signed, qmax, pow2, scale):
    """scale[0] from a tensor's [min, max] (values) or the given range (given > 0), as `_scales` sets it;
    False for a range `_scales` refuses."""
    lo, hi = np.float64(values[0]), np.float64(values[1])
    top = np.empty(1)
    if given > 0:
        top[0] = given
    else:
        top[0] = max(max(abs(lo), abs(hi)), 0.0) if signed else max(hi, 0.0)
    return _scales(top, np.float64(qmax), pow2, scale)


@njit(cache=True, nogil=True)
def _quantize_flat(x3, bits3, exp_mask, mag_mask, sign, given, signed, qmin, qmax, pow2, stochastic, seed,
                   offset, min_parallel, q3, out):
    """A per-tensor quantisation in one compiled call: range scan, scale, codes (the same `_fold` or
    `_key_extrema_pieces`, `_scales` and work items as the per-channel path, so the same codes and scale;
    the scan and the codes go parallel from `_PARALLEL_EXTREMA_MIN` and `min_parallel` values). given > 0
    fixes the range. out = [scale, min, max]; returns the saturated count, -1 for NaN or infinity, -2 for a
    range `_scales` refuses. Five compiled calls and their arguments cost more than the work at batch 8
    (6 us for 4 values) and several microseconds a call at any size (65,536 values: 20.4 -> 16.7 us)."""
    lo_hi = np.empty(2, bits3.dtype)
    if x3.size >= _PARALLEL_EXTREMA_MIN:
        flat = bits3.reshape(x3.size)
        pieces_e = (x3.size + _PIECE - 1) // _PIECE
        if not _key_extrema_pieces(flat, exp_mask, mag_mask, sign, np.empty(pieces_e, bits3.dtype),
                                   np.empty(pieces_e, bits3.dtype), np.empty(pieces_e, bits3.dtype), lo_hi):
            return -1
    else:
        a, b, c = _start(sign)
        a, b, c = _fold(bits3[0, 0], a, b, c, sign)
        lo_hi[0], lo_hi[1], bad = _decode(a, b, c, sign, exp_mask, mag_mask)
        if bad:
            return -1
    values = lo_hi.view(x3.dtype)
    scale = np.empty(1, np.float32)
    if not _tensor_scale(values, given, signed, qmax, pow2, scale):
        return -2
    pieces = (x3.shape[2] + _PIECE - 1) // _PIECE
    sat = np.zeros(pieces, np.int64)
    count = _may_saturate(values[:1], values[1:], scale, qmin, qmax)
    # The kernels themselves (serial below min_parallel): compiled in a parallel pipeline, the loop
    # vectorises; inlined into this function it did not (10.6 us against 2.2).
    if stochastic:
        _quantize_stochastic(x3, scale, qmin, qmax, seed, offset, pieces, q3, sat, min_parallel, count)
    else:
        _quantize_nearest(x3, scale, qmin, qmax, pieces, q3, sat, min_parallel, count)
    out[0], out[1], out[2] = scale[0], values[0], values[1]
    return sat.sum()


def quantize(x: np.ndarray, bits: int, *, signed: bool = True, axis: int | None = None, rounding: str = "nearest",
             pow2: bool = False, range: float | np.ndarray | None = None,
             key: RngKey | tuple[int, int, int] | None = None, index_offset: int = 0) -> QTensor:
    """Quantise x to `bits` (see the module doc for every convention); the result's `.stats` counts
    saturated elements. `range` fixes max|x| (or a per-channel array); `key` (seed, step, layer)
    is required by stochastic rounding; `index_offset` shifts the element indices it draws for."""
    bits = check_bits(bits, signed)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    stochastic = rounding == "stochastic"
    if stochastic and key is None:
        raise ValueError("stochastic rounding needs key=(seed, step, layer): it never uses a global RNG")
    if stochastic:
        check_draws(index_offset, np.size(x))
    x = _as_float(x)
    qmin, qmax = qrange(bits, signed)
    if axis is None and x.size:
        return _quantize_tensor(x, bits, signed, qmin, qmax, stochastic, pow2, range, key, index_offset)
    x3, axis = _view3(x, axis)
    outer, channels, inner = x3.shape
    lo, hi = _finite_extrema(x3)
    if range is None:
        top = np.maximum(np.abs(lo), np.abs(hi)) if signed else np.maximum(hi, 0.0)
    else:
        top = np.broadcast_to(np.asarray(range, np.float64), (channels,))
        if np.any(top <= 0):
            raise ValueError(f"a given quantisation range must be > 0, got {range}")
    scale = scale_from_range(top, bits, signed=signed, pow2=pow2)
    pieces = _pieces(inner)
    items = outer * channels * pieces
    q = np.empty(x3.shape, storage_dtype(bits, signed))  # the kernels store clipped values: they fit
    sat = np.zeros(items, np.int64)
    if items:
        count = _may_saturate(lo, hi, scale, qmin, qmax)
        if stochastic:
            _quantize_stochastic(x3, scale, qmin, qmax, np.uint64(stream_seed(key)), np.int64(index_offset),
                                 pieces, q, sat, PARALLEL_MIN_ELEMENTS, count)
        else:
            _quantize_nearest(x3, scale, qmin, qmax, pieces, q, sat, PARALLEL_MIN_ELEMENTS, count)
    # max |x| = max(|max hi|, |min lo|), as lo <= hi per channel: two small reductions instead of four
    # (none for a per-tensor range: NumPy's reductions cost ~2 us a call, a few per quantisation)
    if not x.size:
        observed = 0.0
    elif channels == 1:
        observed = max(abs(float(hi[0])), abs(float(lo[0])))
    else:
        observed = max(abs(float(hi.max())), abs(float(lo.min())))
    stats = QuantStats(int(x.size), int(sat[0]) if items == 1 else int(sat.sum()), observed)
    return QTensor.trusted(q.reshape(x.shape), scale if axis is not None else np.float32(scale[0]), bits, signed,
                           axis, stats)


def _quantize_tensor(x: np.ndarray, bits: int, signed: bool, qmin: int, qmax: int, stochastic: bool,
                     pow2: bool, range, key, index_offset: int) -> QTensor:
    """`quantize` with a per-tensor scale (`_quantize_flat`)."""
    given = 0.0
    if range is not None:
        given = float(np.asarray(range, np.float64).reshape(-1)[0]) if np.size(range) == 1 else -1.0
        if not given > 0:
            raise ValueError(f"a given quantisation range must be > 0, got {range}")
    x3 = x.reshape(1, 1, x.size)
    ints, exp_mask, mag_mask, sign = _KEY_VIEWS[x.dtype]
    q = np.empty(x.shape, storage_dtype(bits, signed))
    ensure_pool()  # _quantize_flat is serial and calls parallel kernels
    out = np.empty(3)
    sat = _quantize_flat(x3, x3.view(ints), exp_mask, mag_mask, sign, given, signed, qmin, qmax, bool(pow2),
                         stochastic, np.uint64(stream_seed(key)) if stochastic else np.uint64(0),
                         np.int64(index_offset), PARALLEL_MIN_ELEMENTS, q.reshape(x3.shape), out)
    if sat == -1:
        raise non_finite(x3)
    if sat == -2:
        raise ValueError(f"a quantisation range must be finite and >= 0, got {given}")
    stats = QuantStats(int(x.size), int(sat), max(abs(float(out[2])), abs(float(out[1]))))
    return QTensor.trusted(q, np.float32(out[0]), bits, signed, None, stats)


@njit(cache=True, nogil=True, inline="always")
def _row_folds(bits2, rows, k, sign, row_smax, row_smin, row_fmax):
    """Selected row k's three reductions (`_key_extrema_pieces`'), into slot k (names unlike `_fold`'s)."""
    rf0, rf1, rf2 = _start(sign)
    row_smax[k], row_smin[k], row_fmax[k] = _fold(bits2[rows[k]], rf0, rf1, rf2, sign)


@njit(cache=True, nogil=True, parallel=True)
def _rows_key_extrema(bits2, rows, sign, row_smax, row_smin, row_fmax):
    """`_row_folds` of every selected row, rows on parallel threads (exact: min and max, so neither the rows'
    order nor the thread count can change what they combine to)."""
    for k in prange(rows.size):
        _row_folds(bits2, rows, k, sign, row_smax, row_smin, row_fmax)


@njit(inline="always", cache=True)
def _row_nearest_item(x2, rows, scale, lo, hi, pieces, q2, sat, w, count):
    """Work item w of `_quantize_rows_nearest`: `_nearest_item` on selected row w // pieces as a (1, 1, inner)
    tensor. (Names unlike `_nearest_item`'s: inlined into a parallel loop, a shared name once gave wrong results.)"""
    rn_len = x2.shape[1]
    rn_k = w // pieces
    _nearest_item(x2[rows[rn_k]:rows[rn_k] + 1].reshape(1, 1, rn_len), scale, lo, hi, pieces,
                  q2[rn_k:rn_k + 1].reshape(1, 1, rn_len), sat[rn_k * pieces:(rn_k + 1) * pieces], w % pieces, count)


@njit(parallel=True, cache=True)
def _quantize_rows_nearest(x2, rows, scale, qmin, qmax, pieces, q2, sat, min_parallel, count):
    """q2[k] = clip(rint(x2[rows[k]] / scale[0])), serial below `min_parallel` values as `_quantize_nearest`."""
    lo = np.float64(qmin)
    hi = np.float64(qmax)
    if rows.size * x2.shape[1] < min_parallel:
        for w in range(rows.size * pieces):
            _row_nearest_item(x2, rows, scale, lo, hi, pieces, q2, sat, w, count)
        return
    for w in prange(rows.size * pieces):
        _row_nearest_item(x2, rows, scale, lo, hi, pieces, q2, sat, w, count)


@njit(cache=True, nogil=True)
def _quantize_rows(x2, bits2, rows, exp_mask, mag_mask, sign, given, signed, qmin, qmax, pow2, min_parallel, q2,
                   out):
    """`_quantize_flat` (nearest) of x2[rows] without gathering the rows first: the same range, scale and codes.
    out = [scale, min, max]; returns the saturated count, -1 for NaN or infinity, -2 for a range `_scales`
    refuses."""
    slots = rows.size
    row_smax, row_smin, row_fmax = np.empty(slots, bits2.dtype), np.empty(slots, bits2.dtype), \
        np.empty(slots, bits2.dtype)
    if slots * x2.shape[1] >= _PARALLEL_EXTREMA_MIN:
        _rows_key_extrema(bits2, rows, sign, row_smax, row_smin, row_fmax)
    else:
        for k in range(slots):
            _row_folds(bits2, rows, k, sign, row_smax, row_smin, row_fmax)
    lo_hi = np.empty(2, bits2.dtype)
    lo_hi[0], lo_hi[1], bad = _decode(row_smax.max(), row_smin.min(), row_fmax.max(), sign, exp_mask, mag_mask)
    if bad:
        return -1
    values = lo_hi.view(x2.dtype)
    scale = np.empty(1, np.float32)
    if not _tensor_scale(values, given, signed, qmax, pow2, scale):
        return -2
    pieces = (x2.shape[1] + _PIECE - 1) // _PIECE
    sat = np.zeros(slots * pieces, np.int64)
    count = _may_saturate(values[:1], values[1:], scale, qmin, qmax)
    _quantize_rows_nearest(x2, rows, scale, qmin, qmax, pieces, q2, sat, min_parallel, count)
    out[0], out[1], out[2] = scale[0], values[0], values[1]
    return sat.sum()


def quantize_rows(x: np.ndarray, rows: np.ndarray, bits: int, *, signed: bool = True, pow2: bool = False,
                  range: float | None = None) -> QTensor:
    """`quantize(x[rows], bits, ...)` per tensor with nearest rounding, reading the rows where they lie: the
    same codes, scale and stats, without writing the gathered copy (a gated unit's executing samples,
    `edgetrain.precision.dfq.gated_unit`)."""
    bits = check_bits(bits, signed)
    x = _as_float(x)
    rows = np.ascontiguousarray(rows, np.int64)
    shape = (rows.size,) + x.shape[1:]
    if not rows.size or x.ndim == 0 or not x[0].size:
        return quantize(x[rows], bits, signed=signed, pow2=pow2, range=range)
    if rows.min() < 0 or rows.max() >= x.shape[0]:
        raise IndexError(f"row index out of range for {x.shape[0]} rows")
    given = 0.0
    if range is not None:
        given = float(range)
        if not given > 0:
            raise ValueError(f"a given quantisation range must be > 0, got {range}")
    qmin, qmax = qrange(bits, signed)
    x2 = x.reshape(x.shape[0], -1)
    ints, exp_mask, mag_mask, sign = _KEY_VIEWS[x.dtype]
    q = np.empty(shape, storage_dtype(bits, signed))
    ensure_pool()  # _quantize_rows is serial and calls parallel kernels
    out = np.empty(3)
    sat = _quantize_rows(x2, x2.view(ints), rows, exp_mask, mag_mask, sign, given, signed, qmin, qmax, bool(pow2),
                         PARALLEL_MIN_ELEMENTS, q.reshape(rows.size, -1), out)
    if sat == -1:
        raise non_finite(x[rows].reshape(1, 1, -1))
    if sat == -2:
        raise ValueError(f"a quantisation range must be finite and >= 0, got {given}")
    stats = QuantStats(int(q.size), int(sat), max(abs(float(out[2])), abs(float(out[1]))))
    return QTensor.trusted(q, np.float32(out[0]), bits, signed, None, stats)


@njit(cache=True, nogil=True)
def _quantize_both(x3, bits3, exp_mask, mag_mask, sign, qmin, qmax, pow2, min_parallel, q_rows, q_flat, scales,
                   extrema):
    """A signed tensor (1, rows, inner) quantised per row (q_rows, scales[:rows]) and per tensor (q_flat,
    scales[rows]) from one range scan, in one compiled call: the same `_key_extrema` (its rows on the pool
    from `min_parallel` values: `_key_extrema_rows`), `_scales` and
    nearest kernels as two `quantize` calls, so the same codes and scales (the tensor's range is the
    largest row range). extrema = [min, max]; returns the saturated count, -1 for NaN or infinity."""
    rows = x3.shape[1]
    lo_bits = np.empty(rows, bits3.dtype)
    hi_bits = np.empty(rows, bits3.dtype)
    if x3.size >= min_parallel and rows > 1:
        if not _key_extrema_rows(bits3, exp_mask, mag_mask, sign, lo_bits, hi_bits):
            return -1
    elif not _key_extrema(bits3, exp_mask, mag_mask, sign, lo_bits, hi_bits):
        return -1
    lo, hi = lo_bits.view(x3.dtype), hi_bits.view(x3.dtype)
    top = np.empty(rows + 1)
    least, most = np.inf, -np.inf
    for c in range(rows):
        a, b = np.float64(lo[c]), np.float64(hi[c])
        top[c] = max(max(abs(a), abs(b)), 0.0)
        least, most = min(least, a), max(most, b)
    top[rows] = max(max(abs(least), abs(most)), 0.0)
    extrema[0], extrema[1] = least, most
    _scales(top, np.float64(qmax), pow2, scales)  # finite ranges >= 0: it cannot refuse them
    count = _may_saturate(lo, hi, scales[:rows], qmin, qmax)  # data-derived ranges: never, checked all the same
    flat_count = _may_saturate(extrema[:1], extrema[1:], scales[rows:], qmin, qmax)
    pieces = (x3.shape[2] + _PIECE - 1) // _PIECE
    sat = np.zeros(rows * pieces, np.int64)
    _quantize_nearest(x3, scales[:rows], qmin, qmax, pieces, q_rows, sat, min_parallel, count)
    flat = x3.reshape(1, 1, x3.size)
    flat_pieces = (x3.size + _PIECE - 1) // _PIECE
    flat_sat = np.zeros(flat_pieces, np.int64)
    _quantize_nearest(flat, scales[rows:], qmin, qmax, flat_pieces, q_flat, flat_sat, min_parallel, flat_count)
    return sat.sum() + flat_sat.sum()


# The compiled quantisers themselves, for compiled kernels that quantise inside one call
# (`small_linear`): the same codes and scales as `quantize` per tensor and `quantize_weights`.
quantize_flat_kernel = _quantize_flat
quantize_both_kernel = _quantize_both


def quantize_weights(w_rows: np.ndarray, bits: int, *, pow2: bool = False) -> tuple[QTensor, QTensor]:
    """Signed nearest codes of w_rows per row (axis 0) and per tensor, from one range scan and one call:
    exactly `quantize(w_rows, bits, axis=0)` and `quantize(w_rows, bits)`. A MAC layer's forward takes
    the first and its error back-propagation the second; quantising them apart cost LeNet-5's layers
    two scans of the weights and five compiled calls more a step (16 us for 150 weights)."""
    bits = check_bits(bits, True)
    x = _as_float(w_rows)
    if x.ndim == 0 or x.shape[0] == 0 or x.size == 0:
        return quantize(x, bits, axis=0, pow2=pow2), quantize(x, bits, pow2=pow2)
    qmin, qmax = qrange(bits, True)
    x3 = x.reshape(1, x.shape[0], -1)
    ints, exp_mask, mag_mask, sign = _KEY_VIEWS[x.dtype]
    dtype = storage_dtype(bits, True)
    q_rows, q_flat = np.empty(x.shape, dtype), np.empty(x.shape, dtype)
    scales, extrema = np.empty(x.shape[0] + 1, np.float32), np.empty(2)
    ensure_pool()  # _quantize_both is serial and calls a parallel kernel
    sat = _quantize_both(x3, x3.view(ints), exp_mask, mag_mask, sign, qmin, qmax, bool(pow2), PARALLEL_MIN_ELEMENTS,
                         q_rows.reshape(x3.shape), q_flat.reshape(1, 1, x.size), scales, extrema)
    if sat == -1:
        raise non_finite(x3)
    stats = QuantStats(int(x.size), int(sat), max(abs(float(extrema[0])), abs(float(extrema[1]))))
    return (QTensor.trusted(q_rows, scales[:-1], bits, True, 0, stats),
            QTensor.trusted(q_flat, np.float32(scales[-1]), bits, True, None, stats))
