"""Quantisers and the counter-based generator: property tests (hypothesis) and statistics."""
from itertools import pairwise

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgetrain.errors import NonFiniteError
from edgetrain.quant import (
    QTensor,
    QuantStats,
    RngKey,
    RunningRange,
    compute_scale,
    qrange,
    quantize,
    random_bits,
    storage_dtype,
    stream_seed,
    uniform,
)
from edgetrain.quant import quantizer as quantizer_module
from edgetrain.quant.quantizer import quantize_rows, quantize_weights

SETTINGS = settings(max_examples=60, deadline=None)

bits_st = st.integers(2, 16)
shapes_st = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9)
floats_st = st.floats(-1e4, 1e4, allow_nan=False, width=32) | st.sampled_from([0.0, 1e-30, -1e-30, 3.0, -3.0])
arrays_st = hnp.arrays(np.float32, shapes_st, elements=floats_st)


def deq64(qt: QTensor) -> np.ndarray:
    """q * scale in float64 (exact for <=16-bit q and a float32 scale)."""
    return qt.q.astype(np.float64) * qt.scale_broadcast().astype(np.float64)


# ------------------------------------------------------------------------------- ranges, dtypes


def test_ranges_and_storage_dtypes():
    for bits in range(2, 17):
        lo, hi = qrange(bits)
        assert (lo, hi) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
        assert storage_dtype(bits) == (np.int8 if bits <= 8 else np.int16)
        assert qrange(bits, signed=False) == (0, 2 ** bits - 1)
        assert storage_dtype(bits, signed=False) == (np.uint8 if bits <= 8 else np.uint16)
    for bad in (1, 17, 0, 2.5):
        with pytest.raises(ValueError):
            qrange(bad)


@SETTINGS
@given(x=arrays_st, bits=bits_st, signed=st.booleans(), stochastic=st.booleans(), pow2=st.booleans(),
       per_channel=st.booleans(), seed=st.integers(0, 2 ** 64 - 1))
def test_values_always_in_range_and_dtype(x, bits, signed, stochastic, pow2, per_channel, seed):
    qt = quantize(x, bits, signed=signed, axis=0 if per_channel else None, pow2=pow2,
                  rounding="stochastic" if stochastic else "nearest", key=(seed, 3, 7))
    lo, hi = qrange(bits, signed)
    assert qt.q.dtype == storage_dtype(bits, signed) and qt.q.shape == x.shape
    assert qt.q.min() >= lo and qt.q.max() <= hi
    scale = np.asarray(qt.scale)
    assert scale.dtype == np.float32 and np.all(scale > 0) and np.all(np.isfinite(scale))
    if signed:  # a data-derived range never saturates
        assert qt.stats.saturated == 0
    assert qt.stats.elements == x.size


@SETTINGS
@given(x=arrays_st, bits=bits_st, pow2=st.booleans(), per_channel=st.booleans())
def test_nearest_error_at_most_half_a_step(x, bits, pow2, per_channel):
    qt = quantize(x, bits, axis=0 if per_channel else None, pow2=pow2)
    err = np.abs(deq64(qt) - x.astype(np.float64))
    half = qt.scale_broadcast().astype(np.float64) / 2
    assert np.all(err <= half * (1 + 1e-12) + np.abs(x) * 1e-15)
    # Data-derived ranges use the whole grid: the largest |x| lands on +-qmax (unless the scale
    # would be subnormal, where it is floored to the smallest normal float32).
    if not per_channel and not pow2 and np.abs(x).max() / qrange(bits)[1] >= np.finfo(np.float32).tiny:
        assert np.abs(qt.q.astype(np.int64)).max() == qrange(bits)[1]


@SETTINGS
@given(x=arrays_st, bits=bits_st, step=st.integers(0, 10 ** 6))
def test_stochastic_error_below_one_step(x, bits, step):
    qt = quantize(x, bits, rounding="stochastic", key=(11, step, 2))
    err = np.abs(deq64(qt) - x.astype(np.float64))
    assert np.all(err < float(qt.scale) * (1 + 1e-12))
    # Stochastic rounding only ever picks one of the two neighbouring grid points.
    v = x.astype(np.float64) / float(qt.scale)
    assert np.all((qt.q >= np.floor(v) - 1e-9) & (qt.q <= np.ceil(v) + 1e-9))


def test_nearest_is_round_half_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5], np.float32)
    qt = quantize(x, 8, range=127.0)  # scale exactly 1
    assert float(qt.scale) == 1.0
    np.testing.assert_array_equal(qt.q, [0, 2, 2, 0, -2, -2, 4, 126])


def test_stochastic_rounding_is_unbiased():
    """Mean of q*scale over many independent draws equals x within a few standard errors."""
    x = np.linspace(-1.0, 1.0, 37, dtype=np.float32)
    scale_range = 1.0
    bits = 4  # coarse grid (scale 1/7) so that the bias of nearest rounding would be visible
    copies = 4000
    qt = quantize(np.tile(x, copies), bits, range=scale_range, rounding="stochastic", key=(5, 0, 1))
    mean = deq64(qt).reshape(copies, -1).mean(axis=0)
    step = float(qt.scale)
    # Per copy the error is Bernoulli with variance <= step^2 / 4.
    assert np.all(np.abs(mean - x) < 5 * (step / 2) / np.sqrt(copies))
    # Over keys (steps) for the same elements as well.
    means = np.mean([deq64(quantize(x, bits, range=scale_range, rounding="stochastic", key=(5, s, 1)))
                     for s in range(2000)], axis=0)
    assert np.all(np.abs(means - x) < 5 * (step / 2) / np.sqrt(2000))
    nearest_bias = np.abs(deq64(quantize(x, bits, range=scale_range)) - x).max()
    assert nearest_bias > 10 * (step / 2) / np.sqrt(copies)  # the test can tell the difference


# ----------------------------------------------------------------------------------- scales


@SETTINGS
@given(x=arrays_st, bits=bits_st, per_channel=st.booleans())
def test_pow2_scales_are_powers_of_two(x, bits, per_channel):
    qt = quantize(x, bits, axis=0 if per_channel else None, pow2=True)
    mant, _ = np.frexp(np.atleast_1d(qt.scale).astype(np.float64))
    assert np.all(mant == 0.5)


@SETTINGS
@given(w=hnp.arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3)),
                    elements=floats_st), bits=bits_st)
def test_per_channel_scale_per_output_row(w, bits):
    qt = quantize(w, bits, axis=0)
    qmax = qrange(bits)[1]
    assert qt.axis == 0 and qt.scale.shape == (w.shape[0],)
    for c in range(w.shape[0]):
        amax = float(np.abs(w[c]).max())
        if amax == 0:
            assert qt.scale[c] == 1 and not qt.q[c].any()
            continue
        assert amax / float(qt.scale[c]) <= qmax
        if amax / qmax < np.finfo(np.float32).tiny:  # a subnormal scale is raised to the smallest normal
            assert qt.scale[c] == np.finfo(np.float32).tiny
            continue
        # The smallest float32 scale with amax / scale <= qmax, so the row's largest |w| hits qmax.
        assert amax / float(np.nextafter(qt.scale[c], np.float32(0))) > qmax
        assert np.abs(qt.q[c].astype(np.int64)).max() == qmax
    np.testing.assert_array_equal(compute_scale(w, bits, axis=0), qt.scale)


def test_per_channel_along_other_axis_and_dequantize():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 10
    qt = quantize(x, 8, axis=1)
    assert qt.scale.shape == (3,)
    want = np.abs(x).max(axis=(0, 2)) / 127
    np.testing.assert_allclose(qt.scale, want, rtol=1e-6)
    assert qt.dequantize().dtype == np.float32
    np.testing.assert_allclose(qt.dequantize(), x, atol=float(qt.scale.max()) / 2 + 1e-6)


def test_zero_tensor_never_divides_by_zero():
    for pow2 in (False, True):
        for axis in (None, 0):
            qt = quantize(np.zeros((3, 4), np.float32), 8, axis=axis, pow2=pow2)
            assert np.all(np.asarray(qt.scale) == 1) and not qt.q.any()
            assert qt.stats == QuantStats(12, 0, 0.0)
    qt = quantize(np.zeros(5), 8, rounding="stochastic", key=(0, 0, 0))
    assert not qt.q.any()
    qt = quantize(np.full(4, 1e-44, np.float32), 8)  # subnormal range: scale stays a positive normal
    assert float(qt.scale) > 0 and np.all(deq64(qt) >= 0)


# --------------------------------------------------------------------------------- unsigned


@SETTINGS
@given(x=arrays_st, bits=st.integers(1, 16), stochastic=st.booleans())
def test_unsigned_form_uses_the_whole_grid(x, bits, stochastic):
    relu = np.maximum(x, 0)
    qt = quantize(relu, bits, signed=False, rounding="stochastic" if stochastic else "nearest", key=(1, 1, 1))
    assert qt.q.dtype == (np.uint8 if bits <= 8 else np.uint16)
    assert int(qt.q.max()) <= 2 ** bits - 1 and qt.stats.saturated == 0
    # (A range so tiny that its scale would fall below the quantiser's floor is the one exception.)
    if relu.max() / (2 ** bits - 1) >= quantizer_module._SCALE_FLOOR and not stochastic:
        assert int(qt.q.max()) == 2 ** bits - 1  # no bit wasted on a sign
    # Negative values in the unsigned form are clipped to 0 and reported.
    qt = quantize(x, bits, signed=False)
    assert qt.stats.saturated == int((x < 0).sum())
    assert np.all(qt.q[x < 0] == 0)


# ------------------------------------------------------------------------------- saturation


@SETTINGS
@given(x=arrays_st, bits=bits_st, r=st.floats(1e-3, 1e3), stochastic=st.booleans())
def test_saturation_with_a_fixed_range_is_clipped_and_counted(x, bits, r, stochastic):
    qt = quantize(x, bits, range=r, rounding="stochastic" if stochastic else "nearest", key=(2, 2, 2))
    qmax = qrange(bits)[1]
    v = x.astype(np.float64) / float(qt.scale)
    beyond = np.abs(v) > qmax
    assert qt.stats.saturated == int(beyond.sum())
    assert np.all(qt.q[v > qmax] == qmax) and np.all(qt.q[v < -qmax] == -qmax)
    assert qt.stats.observed_max == pytest.approx(float(np.abs(x).max()))


def test_rejects_nan_and_missing_key():
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([1.0, np.nan]), 8)
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([1.0, np.inf]), 8, range=1.0)
    with pytest.raises(ValueError, match="key"):
        quantize(np.ones(3), 8, rounding="stochastic")
    with pytest.raises(ValueError):
        quantize(np.ones(3), 8, rounding="up")
    with pytest.raises(ValueError):
        quantize(np.ones(3), 8, range=0.0)


def test_qtensor_validates_its_fields():
    with pytest.raises(TypeError):
        QTensor(np.zeros(3, np.int16), np.float32(1), 8)
    with pytest.raises(TypeError):
        QTensor(np.zeros(3, np.int8), np.float64(1), 8)
    with pytest.raises(ValueError):
        QTensor(np.zeros((2, 3), np.int8), np.ones(3, np.float32), 8, axis=0)


def test_running_range():
    rr = RunningRange(momentum=0.1)
    assert rr.update(2.0) == 2.0
    assert rr.update(4.0) == pytest.approx(2.2)


# -------------------------------------------------------------------------------- generator


def _lowbias_reference(stream: int, index: int) -> int:
    """bits_index of the stream word `stream`, as rng's module doc writes it (pure Python)."""
    mask = (1 << 32) - 1
    k0, m = stream & mask, (stream >> 32) | 1
    z = (index * m + k0) & mask
    z ^= z >> 16
    z = (z * 0x7FEB352D) & mask
    z ^= z >> 15
    z = (z * 0x846CA68B) & mask
    return z ^ (z >> 16)


def test_generator_is_the_documented_hash():
    key = RngKey(seed=2024, step=17, layer=3)
    stream = stream_seed(key)
    bits = random_bits(key, 50, offset=10 ** 9)
    assert bits.dtype == np.uint32
    assert [int(b) for b in bits] == [_lowbias_reference(stream, 10 ** 9 + i) for i in range(50)]
    u = uniform(key, 50, offset=10 ** 9)
    assert u.dtype == np.float32
    np.testing.assert_array_equal(u, (bits >> np.uint32(8)).astype(np.float64) / 2.0 ** 24)
    assert u.min() >= 0 and u.max() < 1
    # Golden values pin the stream derivation: a resumed run on another machine must draw these.
    assert stream_seed((1, 2, 3)) == stream_seed(RngKey(1, 2, 3)) == 0xEE4E49653E58C3FA
    assert [int(b) for b in random_bits((1, 2, 3), 3)] == [0x065F561F, 0xA03B8CC5, 0xD345E733]
    # The last index a stream may draw, and no further.
    assert int(random_bits(key, 1, offset=2 ** 32 - 1)[0]) == _lowbias_reference(stream, 2 ** 32 - 1)
    with pytest.raises(ValueError, match="2\\^32"):
        random_bits(key, 2, offset=2 ** 32 - 1)



def test_generator_ignores_chunking():
    key = (7, 123456, 42)
    n = 300_001
    whole = random_bits(key, n)
    cuts = [0, 1, 999, 65_536, 65_537, 200_000, n]
    pieces = np.concatenate([random_bits(key, b - a, offset=a) for a, b in pairwise(cuts)])
    np.testing.assert_array_equal(whole, pieces)


@SETTINGS
@given(x=arrays_st, bits=bits_st, signed=st.booleans(), per_channel=st.booleans(), fixed=st.booleans(),
       offset=st.integers(0, 2 ** 32 - 1000), seed=st.integers(0, 2 ** 20), wide=st.booleans())
def test_stochastic_codes_are_the_documented_formula(x, bits, signed, per_channel, fixed, offset, seed, wide):
    """q = clip(floor(x * r + u)) in x's float type, r = 1 / scale rounded to it, u from `uniform` (NumPy):
    the compiled kernels against the module doc, for float32 and float64 tensors."""
    x = x.astype(np.float64 if wide else np.float32)
    axis = 0 if per_channel and x.ndim > 1 else None
    key = (seed, 5, 9)
    kw = dict(signed=signed, axis=axis, rounding="stochastic", key=key, index_offset=offset)
    if fixed:
        kw["range"] = 0.5  # some values saturate: the count path
    qt = quantize(x, bits, **kw)
    qmin, qmax = qrange(bits, signed)
    scale = np.asarray(qt.scale, np.float64)
    if axis is not None:
        scale = scale.reshape((-1,) + (1,) * (x.ndim - 1))
    r = (1.0 / scale).astype(x.dtype)
    u = uniform(key, x.size, offset=offset).astype(x.dtype).reshape(x.shape)
    expected = np.clip(np.floor(x * r + u), qmin, qmax)
    np.testing.assert_array_equal(qt.q, expected.astype(qt.q.dtype))
    if fixed:
        assert qt.stats.saturated == int(np.count_nonzero((x / scale < qmin) | (x / scale > qmax)))


def test_stochastic_draws_stay_within_a_stream():
    with pytest.raises(ValueError, match="2\\^32"):
        quantize(np.ones(10, np.float32), 8, rounding="stochastic", key=(1, 2, 3), index_offset=2 ** 32 - 5)


def test_stochastic_quantize_ignores_chunking_and_threads(monkeypatch):
    monkeypatch.setattr(quantizer_module, "PARALLEL_MIN_ELEMENTS", 0)  # parallel even when small
    monkeypatch.setattr(quantizer_module, "_PIECE", 1000)  # many work items, uneven last one
    x = np.random.default_rng(0).standard_normal((6, 5, 7, 11)).astype(np.float32)
    key = (3, 99, 5)
    whole = quantize(x, 6, rounding="stochastic", key=key, range=3.0)
    flat = x.reshape(-1)
    cuts = [0, 17, 500, 1001, flat.size]
    parts = [quantize(flat[a:b], 6, rounding="stochastic", key=key, range=3.0, index_offset=a).q
             for a, b in pairwise(cuts)]
    np.testing.assert_array_equal(whole.q.reshape(-1), np.concatenate(parts))
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = quantize(x, 6, rounding="stochastic", key=key, range=3.0)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(whole.q, one.q)
    # Per-channel scales draw from the same element indices.
    pc = quantize(x, 6, axis=1, rounding="stochastic", key=key)
    pc2 = quantize(x, 6, axis=1, rounding="stochastic", key=key)
    np.testing.assert_array_equal(pc.q, pc2.q)


def test_other_seed_step_or_layer_gives_other_bits():
    base = random_bits((1, 2, 3), 1000)
    for other in [(2, 2, 3), (1, 3, 3), (1, 2, 4), (3, 2, 1), (0, 0, 0), (2, 1, 3)]:
        bits = random_bits(other, 1000)
        assert np.mean(bits == base) < 0.01
    x = np.linspace(-1, 1, 1001)
    a = quantize(x, 3, rounding="stochastic", key=(1, 2, 3)).q
    b = quantize(x, 3, rounding="stochastic", key=(1, 3, 3)).q
    assert (a != b).any()
    np.testing.assert_array_equal(a, quantize(x, 3, rounding="stochastic", key=(1, 2, 3)).q)


def _chi_square(counts: np.ndarray) -> tuple[float, int]:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum()), counts.size - 1


def _assert_chi_square_ok(counts: np.ndarray) -> None:
    stat, dof = _chi_square(counts.ravel())
    # chi2(dof) has mean dof and sd sqrt(2 dof); 6 sd leaves ~1e-9 false alarms.
    assert abs(stat - dof) < 6 * np.sqrt(2 * dof), (stat, dof)


def test_generator_uniformity_chi_square():
    n = 4_000_000
    u = uniform((9, 8, 7), n)
    _assert_chi_square_ok(np.bincount((u * 1024).astype(np.int64), minlength=1024))
    # The low bits that reach the mantissa (bits 8..17 of the word) are uniform too.
    low = (random_bits((9, 8, 7), n) >> np.uint32(8)) & np.uint32(1023)
    _assert_chi_square_ok(np.bincount(low.astype(np.int64), minlength=1024))
    # Consecutive indices are independent: pairs fill a 32x32 grid uniformly.
    pairs = (u * 32).astype(np.int64)
    _assert_chi_square_ok(np.bincount(pairs[:-1:2] * 32 + pairs[1::2], minlength=1024))
    # Neighbouring steps (the same element in consecutive training steps) are independent.
    v = uniform((9, 9, 7), n // 4)
    grid = (u[: n // 4] * 32).astype(np.int64) * 32 + (v * 32).astype(np.int64)
    _assert_chi_square_ok(np.bincount(grid, minlength=1024))
    assert abs(u.mean() - 0.5) < 6 * np.sqrt(1 / 12 / n)


@pytest.mark.parametrize("pow2", [False, True])
def test_compiled_scales_equal_the_numpy_form_bit_for_bit(pow2):
    """scale_from_range runs one compiled loop (`_scales`); the array form it replaced is the reference,
    over every width, both forms, ranges from subnormal to near float64's largest, and float32 near-ties."""
    from edgetrain.quant import quantizer
    from edgetrain.quant.qtensor import qrange

    rng = np.random.default_rng(1)
    tops = np.concatenate([np.abs(rng.standard_normal(4000)) * 10.0 ** rng.integers(-45, 40, 4000),
                           [0.0, 1e-300, 1e-45, 3e38, 3.5e38, 1e300, 1.7e308, 127.0, 255.0, 0.5, 1.0],
                           float(np.nextafter(np.float32(1), np.float32(2))) * np.arange(1, 300)])
    for bits in range(2, 17):
        for signed in (True, False):
            with np.errstate(all="ignore"):
                ref = quantizer._scales_numpy(tops, qrange(bits, signed)[1], pow2)
            got = quantizer.scale_from_range(tops, bits, signed=signed, pow2=pow2)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    for bad in (-1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="finite and >= 0"):
            quantizer.scale_from_range(np.array([1.0, bad]), 8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [100, 5000, 40000, 70000, 300000])  # each path; 300,000: the parallel scan, ten pieces
@pytest.mark.parametrize("per_channel", [False, True])
def test_extrema_paths_agree_with_numpy(dtype, size, per_channel):
    """Every path of the range scan gives NumPy's min and max (signed zeros, subnormals and the largest
    finite values included) and rejects NaN and both infinities wherever they sit."""
    rng = np.random.default_rng(size)
    x = (rng.standard_normal((10, size // 10)) * rng.choice([1e-40, 1e-3, 1.0, 1e30], size=(10, 1))).astype(dtype)
    x.flat[rng.integers(0, x.size, 5)] = -0.0
    x.flat[rng.integers(0, x.size, 2)] = np.finfo(dtype).max * rng.choice([-1, 1], 2)
    x3 = quantizer_module._view3(x, 0 if per_channel else None)[0]
    lo, hi = quantizer_module._finite_extrema(x3)
    axes = 1 if per_channel else None
    np.testing.assert_array_equal(lo, np.atleast_1d(x.min(axis=axes)).astype(np.float64))
    np.testing.assert_array_equal(hi, np.atleast_1d(x.max(axis=axes)).astype(np.float64))
    for bad in (np.nan, np.inf, -np.inf):
        for pos in (0, x.size // 2 + 1, x.size - 1):
            y = x.copy()
            y.flat[pos] = bad
            with pytest.raises(ValueError, match="NaN or infinite"):
                quantizer_module._finite_extrema(quantizer_module._view3(y, 0 if per_channel else None)[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [5000, 300000])  # the serial and the parallel integer scans
@pytest.mark.parametrize("signs", ["negative", "non-negative", "zeros", "mixed"])
def test_integer_scan_decodes_every_sign_pattern(dtype, size, signs):
    """The scan's three integer reductions (kernels.extrema) decode to the min and max in each case the
    decoding tells apart: every value negative, none negative, only signed zeros, both signs; and a NaN or
    infinity of either sign is found wherever it is, even where a larger magnitude sits beside it."""
    rng = np.random.default_rng(size)
    x = (rng.standard_normal(size) * 10.0 ** rng.uniform(-30, 30, size)).astype(dtype)
    x = {"negative": -np.abs(x) - np.finfo(dtype).tiny, "non-negative": np.abs(x),
         "zeros": np.where(x > 0, dtype(0.0), dtype(-0.0)), "mixed": x}[signs]
    lo, hi = quantizer_module._finite_extrema(x.reshape(1, 1, -1))
    assert (lo[0], hi[0]) == (x.min(), x.max())
    for bad in (np.nan, -np.nan, np.inf, -np.inf):
        y = x.copy()
        y[size // 3] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            quantizer_module._finite_extrema(y.reshape(1, 1, -1))


@SETTINGS
@given(x=arrays_st, per_channel=st.booleans(), signed=st.booleans())
def test_observed_max_is_the_largest_magnitude(x, per_channel, signed):
    """The range the running average records is max |x| of the whole tensor, whatever the scale's axis."""
    q = quantize(x, 8, signed=signed, axis=0 if per_channel else None)
    assert q.stats.observed_max == float(np.abs(x.astype(np.float64)).max())
    assert np.copysign(1.0, q.stats.observed_max) == 1.0  # never -0.0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70000) | st.sampled_from([(1 << 18) - 1, 1 << 18, 300001]),
       st.sampled_from([np.float32, np.float64]), st.integers(2, 16), st.booleans(),
       st.booleans(), st.booleans(), st.sampled_from([None, 0.4, 5.0]), st.integers(0, 2 ** 31))
def test_per_tensor_path_equals_the_per_channel_one(size, dtype, bits, signed, stochastic, pow2, fixed, seed):
    """A per-tensor quantisation takes one compiled call (`_quantize_flat`; from 2^18 values its scan runs
    in pieces on parallel threads): the same codes, scale and stats as the per-channel path gives the tensor
    as one channel, for either rounding, a fixed range, pow2, and the parallel kernels as the serial ones."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(size) * rng.uniform(1e-3, 1e3)).astype(dtype)
    x = x if signed else np.abs(x)
    kw = dict(signed=signed, pow2=pow2, rounding="stochastic" if stochastic else "nearest", key=(seed, 3, 1),
              index_offset=seed % 1000)
    one_channel = quantize(x.reshape(1, -1), bits, axis=0, range=None if fixed is None else np.array([fixed]), **kw)
    for parallel_from in (quantizer_module.PARALLEL_MIN_ELEMENTS, 0):
        default = quantizer_module.PARALLEL_MIN_ELEMENTS
        quantizer_module.PARALLEL_MIN_ELEMENTS = parallel_from
        try:
            flat = quantize(x, bits, range=fixed, **kw)
        finally:
            quantizer_module.PARALLEL_MIN_ELEMENTS = default
        assert flat.q.dtype == one_channel.q.dtype and np.array_equal(flat.q, one_channel.q.reshape(-1))
        assert flat.scale == one_channel.scale[0] and type(flat.scale) is np.float32
        assert flat.stats == one_channel.stats


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(st.sampled_from([np.float32, np.float64]),
                  hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=12), elements=floats_st),
       bits_st, st.booleans(), st.booleans())
def test_weights_quantised_both_ways_in_one_call_equal_two_quantize_calls(w, bits, pow2, parallel):
    """quantize_weights: the per-row and per-tensor codes of one scan are exactly quantize's (codes,
    scales, their types and stats), including all-zero rows and 16-bit codes; `parallel` takes the
    parallel row scan and kernels however small the tensor."""
    default = quantizer_module.PARALLEL_MIN_ELEMENTS
    quantizer_module.PARALLEL_MIN_ELEMENTS = 1 if parallel else default
    try:
        rows, flat = quantize_weights(w, bits, pow2=pow2)
    finally:
        quantizer_module.PARALLEL_MIN_ELEMENTS = default
    for got, want in ((rows, quantize(w, bits, axis=0, pow2=pow2)), (flat, quantize(w, bits, pow2=pow2))):
        assert got.q.dtype == want.q.dtype and np.array_equal(got.q, want.q)
        assert np.array_equal(got.scale, want.scale) and type(got.scale) is type(want.scale)
        assert got.axis == want.axis and got.stats == want.stats


def test_weights_quantised_both_ways_reject_nan_and_go_parallel_when_large():
    w = np.random.default_rng(0).standard_normal((300, 400)).astype(np.float32)  # above PARALLEL_MIN_ELEMENTS
    rows, flat = quantize_weights(w, 8)
    assert np.array_equal(rows.q, quantize(w, 8, axis=0).q) and np.array_equal(flat.q, quantize(w, 8).q)
    for bad in (np.nan, -np.inf):
        w[7, 3] = bad
        with pytest.raises(NonFiniteError):
            quantize_weights(w, 8)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5000), st.sampled_from([np.float32, np.float64]), st.integers(2, 16), st.booleans(),
       st.booleans(), st.floats(0.3, 1.5), st.integers(0, 2 ** 31))
def test_kernels_without_the_saturation_test_give_the_same_codes(size, dtype, bits, signed, stochastic, spread, seed):
    """Where the range shows that nothing can saturate, the kernels skip the saturation test
    (count=False): the codes must be those of the counting loop. Given data inside and beyond
    [qmin, qmax] * scale (spread > 1), the counting loop is the one the quantiser must choose."""
    rng = np.random.default_rng(seed)
    qmin, qmax = qrange(bits, signed)
    scale = np.array([rng.uniform(1e-3, 10)], np.float32)
    x = (rng.uniform(qmin if signed else 0, qmax, size) * spread * float(scale[0])).astype(dtype).reshape(1, 1, -1)
    # values exactly on the half-integers too, where the rounding's ties are decided
    x[0, 0, ::7] = ((np.floor(x[0, 0, ::7] / scale[0]) + 0.5) * scale[0]).astype(dtype)
    codes = []
    for count in (True, False):
        q = np.empty(x.shape, storage_dtype(bits, signed))
        sat = np.zeros(1, np.int64)
        if stochastic:
            quantizer_module._quantize_stochastic(x, scale, qmin, qmax, np.uint64(seed), np.int64(0), 1, q, sat,
                                                  1 << 30, count)
        else:
            quantizer_module._quantize_nearest(x, scale, qmin, qmax, 1, q, sat, 1 << 30, count)
        codes.append(q)
    assert np.array_equal(codes[0], codes[1])
    fixed = float(scale[0]) * qmax  # quantize() itself: a range that gives this scale, and its saturation count
    got = quantize(x.reshape(-1), bits, signed=signed, range=fixed, rounding="stochastic" if stochastic else "nearest",
                   key=(seed, 0, 0))
    v = x.reshape(-1).astype(np.float64) / float(got.scale)
    assert got.stats.saturated == int(((v < qmin) | (v > qmax)).sum())


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.booleans(), st.integers(0, 2 ** 31))
def test_float32_products_give_the_divisions_codes_at_near_ties(bits, signed, seed):
    """float32 data with codes of at most 8 bits is rounded from a float32 product (`_nearest_narrow`), a block
    dividing where a product lies near a half-integer. Fed only values whose product is near one but not on it
    (a block holding an exact tie would divide whatever the margin), from the half-integers and a few ulps either
    side under 64 scales, plus random values, the codes equal rint(x / scale) of the float64 division: a margin
    too small to cover the product's error fails here."""
    rng = np.random.default_rng(seed)
    qmin, qmax = qrange(bits, signed)
    k = np.arange(qmin, qmax).astype(np.float64)
    for s in (rng.uniform(1, 10, 64) * 10.0 ** rng.integers(-4, 3, 64)).astype(np.float32).reshape(-1, 1):
        ties = ((k + 0.5) * float(s[0])).astype(np.float32)
        lower, upper, x = ties, ties, [ties]
        for _ in range(3):
            lower, upper = np.nextafter(lower, np.float32(-np.inf)), np.nextafter(upper, np.float32(np.inf))
            x += [lower, upper]
        x = np.concatenate(x)
        v = x * np.float32(1.0 / np.float64(s[0]))  # the kernel's product
        gap = np.float32(0.5) - np.abs(v - np.rint(v))
        x = x[(gap > 0) & (gap <= 2.0 ** -13) & (np.abs(x.astype(np.float64) / float(s[0])) <= max(-qmin, qmax))]
        x = np.concatenate([x, (rng.uniform(qmin, qmax, 100) * float(s[0])).astype(np.float32)]).reshape(1, 1, -1)
        q = np.empty(x.shape, storage_dtype(bits, signed))
        quantizer_module._quantize_nearest(x, s, qmin, qmax, 1, q, np.zeros(1, np.int64), 1 << 30, False)
        want = np.clip(np.rint(x.astype(np.float64) / np.float64(s[0])), qmin, qmax)
        assert np.array_equal(q.astype(np.int64), want.astype(np.int64))


@SETTINGS
@given(x=hnp.arrays(st.sampled_from([np.float32, np.float64]),
                    st.tuples(st.integers(1, 9), st.integers(1, 4), st.integers(1, 40)), elements=floats_st),
       data=st.data(), bits=bits_st, signed=st.booleans(), pow2=st.booleans(),
       fixed=st.one_of(st.none(), st.floats(1e-3, 1e3)))
def test_rows_quantised_where_they_lie_are_the_gathered_rows_codes(x, data, bits, signed, pow2, fixed):
    """quantize_rows(x, rows) is quantize(x[rows]) per tensor: the same codes, scale and stats, for any rows
    (repeated, unordered)."""
    rows = np.array(data.draw(st.lists(st.integers(0, x.shape[0] - 1), min_size=1, max_size=12)), np.int64)
    want = quantize(x[rows], bits, signed=signed, pow2=pow2, range=fixed)
    got = quantize_rows(x, rows, bits, signed=signed, pow2=pow2, range=fixed)
    assert got.q.dtype == want.q.dtype and np.array_equal(got.q, want.q)
    assert np.float32(got.scale).tobytes() == np.float32(want.scale).tobytes()
    assert got.stats == want.stats and (got.bits, got.signed, got.axis) == (want.bits, want.signed, want.axis)


def test_rows_quantised_where_they_lie_check_what_quantize_checks():
    """A NaN in a chosen row is refused as quantize refuses it; one in a row not chosen is never read."""
    x = np.ones((4, 3, 5), np.float32)
    x[2, 1, 3] = np.nan
    with pytest.raises(NonFiniteError):
        quantize_rows(x, np.array([0, 2]), 8)
    assert np.array_equal(quantize_rows(x, np.array([3, 0]), 8).q, quantize(x[[3, 0]], 8).q)
    with pytest.raises(IndexError):
        quantize_rows(x, np.array([4]), 8)
    with pytest.raises(ValueError, match="range must be > 0"):
        quantize_rows(x, np.array([0]), 8, range=0.0)


@pytest.mark.parametrize("signed", [True, False])
def test_rows_quantised_where_they_lie_on_the_parallel_loops(signed):
    """Half of a (64, 16, 32, 32) batch, in a shuffled order: the parallel range scan and parallel codes give
    quantize(x[rows])'s codes, scale and stats."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 16, 32, 32)).astype(np.float32)
    x = x if signed else np.maximum(x, 0)
    rows = rng.permutation(64)[:32]
    assert rows.size * x[0].size >= 1 << 18  # quantizer._PARALLEL_EXTREMA_MIN
    want, got = quantize(x[rows], 8, signed=signed), quantize_rows(x, rows, 8, signed=signed)
    assert np.array_equal(got.q, want.q) and got.scale == want.scale and got.stats == want.stats

