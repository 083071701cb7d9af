"""kernels.detfloat: fixed-order GEMM and sums against float64 references and against themselves on 1 and 2
threads; portable exp/log/tanh against math's to a measured ulp bound; no fast-math flags in any kernel's
LLVM IR; training steps bit-identical on 1 and 2 threads; and no BLAS, platform libm or numpy float sum
on the deterministic training path (issue 16: x86_64 and arm64 must give the same bits)."""
import ast
import dataclasses
import math
import re
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import models
from edgetrain.cli.demo import demo_model_path
from edgetrain.data import load_data
from edgetrain.kernels import detfloat
from edgetrain.losses import softmax_cross_entropy
from edgetrain.train.config import resolve
from edgetrain.train.runstate import build_model
from edgetrain.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
F32 = np.float32


def _threads(n: int):
    """numba.set_num_threads(n) for a block (capped at what the machine launched)."""
    class _Ctx:
        def __enter__(self):
            self.before = numba.get_num_threads()
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))

        def __exit__(self, *exc):
            numba.set_num_threads(self.before)

    return _Ctx()


def _on_1_and_2_threads(fn):
    with _threads(1):
        one = fn()
    with _threads(2):
        two = fn()
    return one, two


def _bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


rng = np.random.default_rng(16)


# ------------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (37, 300, 1100), (5, 0, 3), (130, 7, 9), (3, 2049, 2)])
def test_gemm_matches_float64_and_is_thread_invariant(m, k, n):
    a = rng.standard_normal((m, k)).astype(F32)
    b = rng.standard_normal((k, n)).astype(F32)
    one, two = _on_1_and_2_threads(lambda: detfloat.gemm(a, b.T.copy().T))  # a strided b is read as well
    assert one.dtype == F32 and _bits_equal(one, two)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    # one float64 sum rounded once: within one float32 rounding of the exact product
    np.testing.assert_allclose(one, ref, rtol=2 ** -23, atol=1e-5 * math.sqrt(max(k, 1)))
    nearest = ref.astype(F32)
    assert _bits_equal(one, nearest) or np.abs(one - nearest).max() <= np.spacing(F32(np.abs(ref).max()))


def test_a_narrow_gemm_runs_transposed_with_the_same_bits(monkeypatch):
    """A classifier-shaped product (few columns, many rows) is computed as b^T a^T: the same products
    summed in the same order, so the bits of the direct form."""
    a = rng.standard_normal((130, 300)).astype(F32)
    b = rng.standard_normal((300, 10)).astype(F32)
    assert b.shape[1] < detfloat.NARROW_N and a.shape[0] >= detfloat.NARROW_MIN_M
    transposed = detfloat.gemm(a, b)
    monkeypatch.setattr(detfloat, "NARROW_N", 0)
    assert _bits_equal(transposed, detfloat.gemm(a, b))


@pytest.mark.parametrize("a_shape,b_shape", [((4, 6, 5), (5, 3)), ((2, 4, 6, 5), (2, 1, 5, 3)), ((5,), (5, 3)),
                                             ((4, 5), (5,)), ((3, 4, 5), (3, 5, 2))])
def test_matmul_follows_numpy_semantics(a_shape, b_shape):
    a = rng.standard_normal(a_shape).astype(F32)
    b = rng.standard_normal(b_shape).astype(F32)
    one, two = _on_1_and_2_threads(lambda: detfloat.matmul(a, b))
    ref = np.matmul(a.astype(np.float64), b.astype(np.float64))
    assert one.shape == ref.shape and _bits_equal(one, two)
    np.testing.assert_allclose(one, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,axis", [((32, 16, 9, 9), (0, 2, 3)), ((64, 10), 0), ((64, 10), 1), ((7, 3, 5), None),
                                        ((4, 5, 6), (0, 2)), ((4, 5, 6), (1,)), ((3, 1025), (0,)), ((0, 4), 0),
                                        ((2, 3, 4, 5), (1, 3))])
def test_sums_match_float64_and_are_thread_invariant(shape, axis):
    x = (rng.standard_normal(shape) * 100).astype(F32)
    one, two = _on_1_and_2_threads(lambda: detfloat.sum_(x, axis, keepdims=True))
    ref = x.astype(np.float64).sum(axis=axis, keepdims=True)
    assert one.shape == ref.shape and one.dtype == F32 and _bits_equal(one, two)
    np.testing.assert_allclose(one, ref, rtol=1e-6, atol=1e-3)
    mean = detfloat.mean(x, axis)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=axis), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape,axis", [((8, 40, 32, 32), (0, 2, 3)), ((600, 512), 0), ((5, 7, 9), (0, 2)),
                                        ((9, 33), 0), ((3, 4, 13), (0, 2)), ((2, 3, 5), (0, 2))])
def test_sum_kernels_serial_and_parallel_branches_agree(shape, axis):
    """Below SUM_PARALLEL_MIN the sum kernels take their own serial loop; both branches sum each output in
    the same order (the bits of the serial reference loop either way), large and small inputs alike."""
    x = (rng.standard_normal(shape) * 100).astype(F32)
    axes = (axis,) if np.isscalar(axis) else axis
    kept = [d for d in range(x.ndim) if d not in axes]
    lo, hi = kept[0], kept[-1] + 1
    outer, mid, inner = (int(np.prod(x.shape[:lo])), int(np.prod(x.shape[lo:hi])), int(np.prod(x.shape[hi:])))
    want = np.empty(mid)
    view = x.reshape(outer, mid, inner)
    def in_order(values):  # a strictly sequential float64 sum from 0 (np.add.accumulate is not pairwise)
        return float(np.add.accumulate(np.concatenate([[0.0], values.astype(np.float64)]))[-1])

    for c in range(mid):  # the documented order
        if inner == 1:  # over o
            want[c] = in_order(view[:, c, 0])
        else:  # value i of each run (runs in order of o) to partial sum i % SUM_LANES; then those in order
            lanes = [in_order(view[:, c, lane::detfloat.SUM_LANES].reshape(-1)) for lane in range(detfloat.SUM_LANES)]
            want[c] = in_order(np.array(lanes))
    for parallel in (False, True):
        got = np.empty(mid)
        if inner == 1:
            detfloat._sum_outer(view.reshape(outer, mid), got, parallel)
        else:
            detfloat._sum_mid(view, got, parallel)
        assert _bits_equal(got, want), parallel
    assert _bits_equal(detfloat.sum64(x, axis), want.reshape([x.shape[d] for d in kept]))


def test_softmax_and_log_softmax_match_float64():
    z = (rng.standard_normal((33, 10)) * 20).astype(F32)
    z64 = z.astype(np.float64)
    ref = z64 - z64.max(1, keepdims=True) - np.log(np.exp(z64 - z64.max(1, keepdims=True)).sum(1, keepdims=True))
    np.testing.assert_allclose(detfloat.log_softmax(z, 1), ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(detfloat.softmax(z, 1), np.exp(ref), rtol=1e-6, atol=1e-12)


def test_powi_is_exact_for_small_powers_and_close_to_pow():
    assert detfloat.powi(0.5, 10) == 2.0 ** -10 and detfloat.powi(3.0, 0) == 1.0
    for t in (1, 7, 100, 12345):
        assert detfloat.powi(0.999, t) == pytest.approx(0.999 ** t, rel=1e-14)


# --------------------------------------------------------------------------- exp, log and kin


def _ulps64(got: float, want: float) -> float:
    if math.isinf(want) or want == 0:
        return 0.0 if got == want else math.inf
    return abs(got - want) / math.ulp(want)


EDGES = [0.0, -0.0, 1e-45, -1e-45, 1.17549435e-38, 1e-30, 1e-8, 0.5, 1.0, 2.0, 88.72283, 88.7229, 89.0, -87.33654,
         -103.972, -104.0, -200.0, 3.4028235e38, -3.4028235e38, 0.34657359, -0.34657359]
f32s = st.floats(width=32, allow_nan=False, allow_infinity=False)


def _check_exp(x32: np.ndarray):
    got64 = detfloat._exp64(x32.astype(np.float64))
    for x, g in zip(x32.tolist(), got64.tolist()):
        try:
            want = math.exp(x)
        except OverflowError:
            want = math.inf
        if want == 0 or math.isinf(want) or want < 2.3e-308:
            assert g == want or abs(g - want) <= 5e-324 * 2
        else:
            assert _ulps64(g, want) <= 2, (x, g, want)
    # float32 results: the correctly rounded value (the float64 one is within 2 ulp of double)
    with np.errstate(over="ignore"):
        want32 = np.array([math.exp(x) if x < 709 else math.inf for x in x32.tolist()]).astype(F32)
    got32 = detfloat.exp(x32)
    with np.errstate(invalid="ignore"):
        assert np.all((got32 == want32) | (np.abs(got32.astype(np.float64) - want32) <= np.spacing(want32)))


def _check_log(x32: np.ndarray):
    got64 = detfloat._log64(x32.astype(np.float64))
    for x, g in zip(x32.tolist(), got64.tolist()):
        want = math.log(x) if x > 0 else (-math.inf if x == 0 else math.nan)
        if math.isnan(want):
            assert math.isnan(g)
        else:
            assert _ulps64(g, want) <= 1, (x, g, want)


def test_exp_log_edge_values():
    _check_exp(np.array(EDGES, F32))
    _check_log(np.abs(np.array(EDGES, F32)))
    special = np.array([np.inf, -np.inf, np.nan], F32)
    assert detfloat.exp(special)[0] == np.inf and detfloat.exp(special)[1] == 0 and np.isnan(detfloat.exp(special)[2])
    lg = detfloat.log(np.array([0.0, -0.0, -1.0, np.inf, np.nan], F32))
    assert lg[0] == -np.inf and lg[1] == -np.inf and np.isnan(lg[2]) and lg[3] == np.inf and np.isnan(lg[4])
    t = detfloat.tanh(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, 20.0], F32))
    assert t[0] == 0 and math.copysign(1, t[1]) == -1 and t[2] == 1 and t[3] == -1 and np.isnan(t[4])
    assert t[5] == F32(1e-30) and t[6] == 1
    assert detfloat.sigmoid(np.array([-np.inf, np.inf, 0.0], F32)).tolist() == [0.0, 1.0, 0.5]


@settings(max_examples=300, deadline=None)
@given(st.lists(f32s, min_size=1, max_size=64))
def test_exp_within_two_ulp_of_double(xs):
    _check_exp(np.array(xs, F32))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, min_value=0.0, allow_nan=False, allow_infinity=False), min_size=1, max_size=64))
def test_log_within_one_ulp_of_double(xs):
    _check_log(np.array(xs, F32))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, min_value=-60, max_value=60), min_size=1, max_size=64))
def test_tanh_expm1_sigmoid_near_float64(xs):
    x = np.array(xs, F32)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(detfloat._expm1_64(x64), np.expm1(x64), rtol=4e-16, atol=0)
    np.testing.assert_allclose(detfloat.tanh(x), np.tanh(x64).astype(F32), rtol=2 ** -23, atol=0)
    np.testing.assert_allclose(detfloat.sigmoid(x), (1 / (1 + np.exp(-x64))).astype(F32), rtol=2 ** -23, atol=0)


def _same_bits64(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(((a.view(np.int64) == b.view(np.int64)) | (np.isnan(a) & np.isnan(b))).all())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=64))
def test_compiled_scalar_twins_give_the_array_forms_bits(xs):
    """exp64_scalar, expm1_64_scalar, tanh64_scalar and tanh64_block are the same IEEE operations as the
    ufunc forms."""
    x = np.array(xs + EDGES + [0.5, -0.5, 0.49999999999999994, 709.8, -745.2, 1100.0, -2000.0], np.float64)
    with np.errstate(all="ignore"):
        assert _same_bits64(detfloat._exp64(x), np.array([detfloat.exp64_scalar(v) for v in x]))
        assert _same_bits64(detfloat._expm1_64(x), np.array([detfloat.expm1_64_scalar(v) for v in x]))
        tiny = np.array([5e-324, 1e-310, 2.2250738585072014e-308, 1.4142135623730951, 1.4142135623730954])
        xl = np.concatenate([x, tiny, np.abs(x)])
        assert _same_bits64(detfloat._log64(xl), np.array([detfloat.log64_scalar(v) for v in xl]))
        x32 = x.astype(F32)
        twin = np.array([detfloat.tanh64_scalar(float(v)) for v in x32]).astype(F32)
        assert _same_bits64(detfloat.tanh(x32).astype(np.float64), twin.astype(np.float64))
        block = np.empty(x32.size)
        detfloat.tanh64_block(x32.astype(np.float64), block, np.empty((detfloat.TANH_SCRATCH_ROWS, x32.size)))
        assert _same_bits64(block.astype(F32).astype(np.float64), twin.astype(np.float64))


MAPS = [("exp", detfloat.exp, detfloat._exp_array), ("log", detfloat.log, detfloat._log_array),
        ("expm1", detfloat.expm1, detfloat._expm1_array), ("tanh", detfloat.tanh, detfloat._tanh_array),
        ("sigmoid", detfloat.sigmoid, detfloat._sigmoid_array)]


@pytest.mark.parametrize("name,compiled,reference", MAPS, ids=[m[0] for m in MAPS])
@pytest.mark.parametrize("dtype", [F32, np.float64])
def test_compiled_maps_give_the_array_forms_bits(name, compiled, reference, dtype):
    """The compiled elementwise maps (`detfloat._map`) are the ufunc forms' operations in the same order: the
    same bits for both float types, over every range exp reduces (to +-1100 and beyond, where it is 0 or inf),
    NaN, infinities, signed zeros and subnormals, on the serial branch, across block ends, and on the
    parallel branch; a non-contiguous input gives its contiguous copy's bits."""
    rng = np.random.default_rng(len(name))
    for n in (1, detfloat.MAP_BLOCK - 1, detfloat.MAP_BLOCK + 3, detfloat.MAP_PARALLEL_MIN + 77):
        x = np.concatenate([rng.standard_normal(n) * rng.choice([0.1, 1.0, 30.0, 900.0, 1e4], n),
                            np.array(EDGES + [0.5, -0.5, 0.49999999999999994, 709.8, -745.2, 1100.0, -2000.0,
                                              88.7, -103.9, 40.0, 5e-324, -1e-310])]).astype(dtype)
        if name == "log":
            x = np.abs(x) if n % 2 else x  # mostly the domain, and negatives on some sizes
        with np.errstate(all="ignore"):
            got, want = compiled(x), reference(x)
        assert got.dtype == want.dtype == dtype
        assert _same_bits64(got.astype(np.float64), want.astype(np.float64)), (name, n)
    x2 = rng.standard_normal((6, 40)).astype(dtype)[:, ::3]  # strided
    with np.errstate(all="ignore"):
        assert _same_bits64(compiled(x2).astype(np.float64), reference(np.ascontiguousarray(x2)).astype(np.float64))
    assert compiled(np.empty((0, 3), dtype)).shape == (0, 3)


@pytest.mark.parametrize("exponent", [2.0, 3.0, -1.0, -2.0, 0.5, 0.0, 1.0, 7.0, 2.5, -0.3, 1.5, np.nan, np.inf])
def test_power_is_pow_to_within_an_ulp_with_pow_special_values(exponent):
    """detfloat.power against float64 pow rounded once: products for integer exponents, sqrt for 0.5, exp/log
    otherwise; C's pow rules at zeros, infinities, negative bases and NaN (pow(x, 0) = pow(1, y) = 1)."""
    r = np.random.default_rng(9)
    a = np.concatenate([r.standard_normal(500) * 3, r.uniform(0, 40, 100),
                        [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 2.0, -2.0, 1e-20, 1e20]]).astype(F32)
    e32 = np.float32(exponent)
    with np.errstate(all="ignore"):
        got = detfloat.power(a, e32)
        want = np.power(a.astype(np.float64), np.float64(e32)).astype(F32)
    assert got.dtype == F32 and got.shape == a.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.signbit(got[got == 0]), np.signbit(want[got == 0]))
    np.testing.assert_allclose(got, want, rtol=2 ** -23, atol=0)
    b = r.standard_normal(a.size).astype(F32) * 3  # a whole array of exponents
    with np.errstate(all="ignore"):
        want_ab = np.power(a.astype(np.float64), b.astype(np.float64)).astype(F32)
        np.testing.assert_allclose(detfloat.power(a, b), want_ab, rtol=2 ** -22, atol=0, equal_nan=True)


def _xent_array_form(logits: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """The cross-entropy as whole-array detfloat calls: what `softmax_xent64` must equal bit for bit."""
    n = logits.shape[0]
    log_softmax = detfloat.log_softmax(logits, axis=1)
    t64 = target.astype(np.float64)
    return -float(detfloat.sum64(t64 * log_softmax)) / n, ((detfloat.exp(log_softmax) - t64) / n).astype(logits.dtype)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 12), st.sampled_from([F32, np.float64]), st.floats(0.0, 0.5),
       st.floats(1e-3, 1e3), st.integers(0, 2 ** 31))
def test_compiled_cross_entropy_gives_the_array_forms_bits(n, k, dtype, smoothing, spread, seed):
    """The training loss's compiled pass is the array form's operations in the same order, with label
    smoothing, extreme logits, NaN and infinities."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, k)) * spread).astype(dtype)
    if seed % 5 == 0:
        logits.flat[rng.integers(0, logits.size)] = rng.choice([np.nan, np.inf, -np.inf])
    labels = rng.integers(0, k, n)
    target = np.zeros((n, k), dtype)
    target[np.arange(n), labels] = 1
    with np.errstate(all="ignore"), detfloat.using(True):
        loss, grad = softmax_cross_entropy(logits, labels, smoothing)
        want_loss, want_grad = _xent_array_form(logits, target * (1 - smoothing) + smoothing / k if smoothing
                                                else target)
    assert _same_bits64(np.array([loss]), np.array([want_loss]))
    assert _same_bits64(grad.astype(np.float64), want_grad.astype(np.float64))


# ------------------------------------------------------------------- no fast-math in the kernels


def _kernels():
    from edgetrain.kernels import rescale
    from edgetrain.ops import norm_kernels
    from edgetrain.precision.dfq import gate_kernels
    from edgetrain.precision.dfq import kernels as dfq_kernels
    from edgetrain.quant import quantizer, small_linear
    from edgetrain.train import optim

    return [detfloat._gemm, detfloat._sum_mid, detfloat._mid_sums, detfloat._sum_outer, norm_kernels.bn_train_forward,
            norm_kernels.bn_train_forward_parallel, norm_kernels.bn_train_backward,
            norm_kernels.bn_train_backward_parallel, norm_kernels.running_stats, norm_kernels.rescale_flat,
            rescale._rescale_planes,
            quantizer._quantize_nearest, quantizer._quantize_stochastic, quantizer._quantize_both,
            quantizer._quantize_flat, optim._sgd_momentum, dfq_kernels._matmul, dfq_kernels._row_means,
            gate_kernels.gate_forward_rows, gate_kernels.gate_backward_rows, gate_kernels.sample_sums,
            detfloat.tanh64_block, detfloat.softmax_xent64, small_linear.forward_codes, small_linear.backward_codes,
            detfloat._linear_forward_small, detfloat._linear_backward_small,
            detfloat._map_run]  # every operation of the maps (`_map` only deals runs to threads; its twin took 26 s)


FAST_FLAG = re.compile(r"= f(?:add|sub|mul|div|neg)\s+(?:fast|contract|reassoc|nnan|ninf|nsz|arcp|afn)\b")


def test_no_kernel_allows_contraction_or_reassociation(lenet_runs):
    """The IR is what LLVM's backend sees on every CPU: without `contract`/`reassoc` flags (and with no
    llvm.fmuladd/llvm.fma), no backend may fuse or reorder, so x86_64 and aarch64 round alike."""
    from edgetrain.precision.dfq import gates

    params = gates.init_gate_params([3], 2, 0, 1, 1.0)  # compiles the gate kernels (a float32 signature)
    zeros = np.zeros((2, gates.EMBED_WIDTH), F32)
    unit, shared = tuple(params[k] for k in gates.unit_param_names(0)), tuple(params[k] for k in gates.SHARED_NAMES)
    logits, ctx = gates.gate_forward(np.ones((2, 3), F32), unit, shared, zeros, zeros)
    gates.gate_backward(ctx, np.ones_like(logits), zeros, zeros, unit, shared)
    from edgetrain.kernels import rescale  # strided accumulators only (LeNet-5's are contiguous): compile it here
    rescale.rescale_planes(np.ones((1, 2, 3, 3), np.int32), np.ones(2, F32), np.empty((1, 2, 3, 3), F32))
    from edgetrain.quant import quantize  # the per-channel kernels (per-tensor codes take _quantize_flat)
    quantize(np.ones((2, 3), F32), 8, axis=0)
    quantize(np.ones((2, 3), F32), 8, axis=0, rounding="stochastic", key=(0, 0, 0))
    from edgetrain.ops import norm_kernels  # BatchNorm's running statistics (LeNet-5 has no BatchNorm)
    ones = np.ones(2, F32)
    norm_kernels.running_stats(ones, ones, np.ones(2), np.ones(2), 0.9, 1.0, np.empty(2, F32), np.empty(2, F32))
    # the elementwise maps' operations (LeNet-5 has no transcendental activation), called directly: `_map`'s cached
    # code holds its own copy, so calling `_map` leaves `_map_run` without a signature
    detfloat._map_run(ones, np.empty_like(ones), 0, 2, detfloat.MAP_SIGMOID,
                      np.empty((detfloat.MAP_SCRATCH_ROWS, detfloat.MAP_BLOCK)))
    checked = set()
    for kernel in _kernels():
        opts = {k: v for k, v in kernel.targetoptions.items() if k in ("parallel", "fastmath")}
        assert not opts.get("fastmath"), kernel
        for sig in kernel.signatures[:1]:  # the flags come from the compile options, not the argument types
            fresh = kernel
            if sig in kernel.stats.cache_hits:  # code loaded from the cache cannot be inspected: compile a twin
                fresh = numba.njit(**opts)(kernel.py_func)  # (on a cold cache, the usual CI case, none is needed)
                fresh.compile(sig)
            ir = fresh.inspect_llvm(sig)
            assert not FAST_FLAG.search(ir), (kernel.__name__, FAST_FLAG.search(ir).group(0))
            assert "llvm.fmuladd" not in ir and "@llvm.fma." not in ir, kernel.__name__
            asm = fresh.inspect_asm(sig)
            assert not re.search(r"\bv?f(?:n)?m(?:add|sub)\d", asm), kernel.__name__  # x86 FMA3, arm fmadd
            checked.add(kernel.__name__)
    # what the LeNet-5 runs and the gate above compiled (the other DFQ kernels only when a DFQ test ran first)
    assert {"_gemm", "_sum_mid", "_mid_sums", "_sum_outer", "rescale_flat", "_rescale_planes", "_quantize_nearest",
            "_quantize_stochastic", "_quantize_both", "_quantize_flat", "_sgd_momentum", "running_stats",
            "gate_forward_rows", "gate_backward_rows", "sample_sums", "tanh64_block", "softmax_xent64", "forward_codes",
            "backward_codes", "_linear_forward_small", "_linear_backward_small", "_map_run"} <= checked


# ----------------------------------------------------------------------- training, bit for bit


@pytest.fixture(scope="module")
def digits_small():
    split = load_data("digits")
    cut = lambda d, n: dataclasses.replace(d, x=d.x[:n], y=d.y[:n])
    return dataclasses.replace(split, train=cut(split.train, 96), test=cut(split.test, 32))


def _train(tmp_path, split, steps: int = 3, **kw) -> dict[str, np.ndarray]:
    cfg = resolve(dict(model=demo_model_path(), data="digits", steps=steps, batch_size=32,
                       out=str(tmp_path / "run"), seed=3, **kw))
    model, head = build_model(cfg.model, cfg.seed, cfg.num_classes)
    t = Trainer(model, split, cfg, head=head, export_model=False)
    for _ in range(steps):
        t.train_step()
    return {**model.state_dict(), **{f"opt/{k}": v for k, v in t.optimizer.state_dict().items()
                                     if isinstance(v, np.ndarray)}}


@pytest.fixture(scope="module")
def lenet_runs(tmp_path_factory, digits_small):
    runs = {}
    for name, kw in [("fp32-det", dict(schedule="fp32", deterministic=True)), ("8/8", dict(schedule="static")),
                     ("adam-8/8", dict(schedule="static", optimizer="adam"))]:
        runs[name] = _on_1_and_2_threads(lambda kw=kw: _train(tmp_path_factory.mktemp("r"), digits_small, **kw))
    return runs


@pytest.mark.parametrize("name", ["fp32-det", "8/8", "adam-8/8"])
def test_training_steps_bit_identical_on_1_and_2_threads(lenet_runs, name):
    one, two = lenet_runs[name]
    assert one.keys() == two.keys()
    assert [k for k in one if not _bits_equal(one[k], two[k])] == []


def test_deterministic_fp32_tracks_the_blas_path(tmp_path, digits_small, lenet_runs):
    fast = _train(tmp_path, digits_small, schedule="fp32")
    det = lenet_runs["fp32-det"][0]
    for k, v in fast.items():
        np.testing.assert_allclose(det[k], v, rtol=1e-4, atol=1e-5)


def test_deterministic_is_a_train_setting():
    from edgetrain.train.config import FIELDS, TrainConfig

    assert TrainConfig().deterministic is False and FIELDS["deterministic"].metadata["kind"] == "bool"


# ------------------------------------------------------------------- no BLAS, no platform libm


TRAPPED_FUNCTIONS = ("matmul", "dot", "einsum", "tensordot", "inner", "vdot", "exp", "log", "tanh", "expm1", "log1p",
                     "exp2", "log2", "log10", "power", "float_power", "sinh", "cosh", "arctanh")


@pytest.fixture
def trapped(monkeypatch):
    """numpy's BLAS entry points, transcendental ufuncs and ndarray.sum/mean on floats raise while it is active
    (but for a float32 product of small integers, which is exact)."""
    import numba.np.npyimpl  # noqa: F401  Numba reads numpy's ufunc objects once, before they are wrapped
    import numpy._core._methods as methods

    def floaty(a):
        return isinstance(a, (np.ndarray, np.floating, float)) and np.asarray(a).dtype.kind == "f"

    def exact_product(name, args):
        """A float32 matmul of integers whose every partial sum stays below 2^24 rounds nowhere, so BLAS gives
        the same bits on any CPU (`quant.small_linear`): checked here on the operands themselves."""
        if name != "matmul" or len(args) != 2:
            return False
        a, b = (np.asarray(t) for t in args)
        if a.dtype != np.float32 or b.dtype != np.float32 or a.ndim != 2 or b.ndim != 2:
            return False
        if not (np.array_equal(a, np.rint(a)) and np.array_equal(b, np.rint(b))):
            return False
        return a.shape[1] * float(np.abs(a).max(initial=0)) * float(np.abs(b).max(initial=0)) < 2 ** 24

    def trap(name, original):
        def call(*args, **kw):
            if any(floaty(a) for a in args) and not exact_product(name, args):
                raise AssertionError(f"np.{name} on floats on the deterministic path")
            return original(*args, **kw)
        return call

    for name in TRAPPED_FUNCTIONS:
        monkeypatch.setattr(np, name, trap(name, getattr(np, name)))
    monkeypatch.setattr(methods, "umr_sum", trap("sum (ndarray.sum/mean)", methods.umr_sum))


@pytest.mark.parametrize("builder,kw,shape", [("lenet5", {}, (1, 28, 28)),
                                              ("resnet8", dict(in_channels=1, input_size=8), (1, 8, 8))])
@pytest.mark.parametrize("precision", ["8/8", "fp32"])
def test_no_blas_libm_or_numpy_float_sum_on_the_deterministic_path(builder, kw, shape, precision, request):
    from edgetrain import load
    from edgetrain.train.loop import TrainStep
    from edgetrain.train.optim import SGD

    model = load(models.build_model(builder, seed=0, **kw))
    if precision != "fp32":
        model.set_precision(precision)
    model.deterministic = True
    step = TrainStep(model, SGD(model.parameters(), 0.01, momentum=0.9))
    x = rng.standard_normal((4,) + shape).astype(F32)
    y = rng.integers(0, 10, 4)
    step(0, x, y)  # compiles every kernel, unwrapped
    request.getfixturevalue("trapped")
    step(1, x, y)
    model(x)  # eval too


ACTIVATIONS = [("Sigmoid", {}), ("Tanh", {}), ("Gelu", {}), ("Gelu", dict(approximate="tanh")), ("Erf", {}),
               ("Softplus", {}), ("Mish", {}), ("Elu", {}), ("Selu", {}), ("Celu", {}), ("Exp", {}),
               ("Softmax", dict(axis=1)), ("LogSoftmax", dict(axis=1)), ("Pow", dict(exponent=3.0)),
               ("Sigmoid", {}), ("Pow", dict(exponent=1.5, direct=True))]  # of the Sigmoid's positive values


def _activations_model():
    """Gemm (16 -> 16) then each of ACTIVATIONS in turn, a Gemm to 10 classes last: every transcendental activation
    an exported model brings (SiLU is Sigmoid and Mul, GELU is Gelu or Erf), on the training path."""
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.default_rng(3)
    nodes, inits, cur = [], [], "x"
    for i, (op, attrs) in enumerate(ACTIVATIONS + [(None, {})]):
        out_dim = 10 if op is None else 16
        if not attrs.get("direct"):  # a Gemm first, but where the op takes the previous activation's output
            inits += [numpy_helper.from_array((r.standard_normal((out_dim, 16)) * 0.3).astype(F32), f"w{i}"),
                      numpy_helper.from_array(np.zeros(out_dim, F32), f"b{i}")]
            nodes.append(helper.make_node("Gemm", [cur, f"w{i}", f"b{i}"], [f"g{i}"], name=f"gemm{i}", transB=1))
            cur = f"g{i}"
        if op == "Pow":  # the exponent a Constant node, as exporters write it
            nodes.append(helper.make_node("Constant", [], [f"e{i}"], name=f"exp{i}",
                                          value=numpy_helper.from_array(np.array(attrs["exponent"], F32))))
            nodes.append(helper.make_node("Pow", [cur, f"e{i}"], [f"a{i}"], name=f"act{i}"))
            cur = f"a{i}"
        elif op is not None:
            nodes.append(helper.make_node(op, [cur], [f"a{i}"], name=f"act{i}", **attrs))
            cur = f"a{i}"
    graph = helper.make_graph(nodes, "acts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)


@pytest.mark.parametrize("precision", ["8/8", "fp32"])
def test_no_platform_libm_in_the_activations_on_the_deterministic_path(precision, request):
    """Sigmoid, Tanh, both GELUs, Erf, Softplus, Mish, the ELUs, Exp, the softmaxes and Pow forward and backward
    take detfloat's portable functions while it is active (numpy's exp/tanh/log1p are per-platform SIMD code,
    its power the platform's libm)."""
    from edgetrain import load
    from edgetrain.train.loop import TrainStep
    from edgetrain.train.optim import SGD

    model = load(_activations_model())
    if precision != "fp32":
        model.set_precision(precision)
    model.deterministic = True
    step = TrainStep(model, SGD(model.parameters(), 0.01, momentum=0.9))
    x = rng.standard_normal((4, 16)).astype(F32)
    y = rng.integers(0, 10, 4)
    step(0, x, y)
    request.getfixturevalue("trapped")
    step(1, x, y)
    assert np.isfinite(model(x)).all()


# `a @ b` reaches BLAS without passing numpy's module functions, so it is checked in the source instead:
# on the training path, every @ sits in the branch taken when detfloat is not active.
TRAINING_PATH = ["edgetrain/ops/linear.py", "edgetrain/ops/conv.py", "edgetrain/ops/norm.py", "edgetrain/ops/pool.py",
                 "edgetrain/ops/elementwise.py", "edgetrain/ops/reduce.py", "edgetrain/ops/base.py",
                 "edgetrain/quant/mac.py", "edgetrain/quant/quantizer.py", "edgetrain/quant/small_linear.py",
                 "edgetrain/losses.py",
                 "edgetrain/train/optim.py", "edgetrain/precision/dfq/gates.py", "edgetrain/kernels/rescale.py"]


def _unguarded_matmuls(path: Path) -> list[int]:
    """Line numbers of `@` outside the else of an `if detfloat.active()` (or after one that returns)."""
    tree = ast.parse(path.read_text())
    guarded: set[int] = set()
    switch = lambda node: isinstance(node, (ast.If, ast.IfExp)) and "detfloat.active" in ast.unparse(node.test)
    for node in ast.walk(tree):
        if switch(node):
            for part in node.orelse if isinstance(node.orelse, list) else [node.orelse]:
                guarded.update(id(n) for n in ast.walk(part))
        for block in (getattr(node, "body", None),):  # `if detfloat.active(): return ...` guards what follows
            if not isinstance(block, list):
                continue
            for i, stmt in enumerate(block):
                if switch(stmt) and not stmt.orelse and isinstance(stmt.body[-1], ast.Return):
                    guarded.update(id(n) for later in block[i + 1:] for n in ast.walk(later))
    return [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.MatMult) and id(n) not in guarded]


@pytest.mark.parametrize("rel", TRAINING_PATH)
def test_every_matmul_operator_on_the_training_path_is_behind_the_switch(rel):
    assert _unguarded_matmuls(ROOT / rel) == []


def test_deterministic_flag_on_the_train_command_line():
    from edgetrain.cli.main import build_parser

    args = build_parser().parse_args(["train", "m.onnx", "--deterministic"])
    assert args.deterministic is True


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n,trans_a,trans_b", [(8, 84, 10, False, True), (3, 5, 7, True, False),
                                                    (1, 1, 1, False, False), (16, 40, 30, True, True)])
@pytest.mark.parametrize("bias", [True, False])
def test_small_gemm_gives_the_general_deterministic_bits(monkeypatch, dtype, m, k, n, trans_a, trans_b, bias):
    """A small Gemm's one-call forward and backward (`detfloat.linear_forward`/`linear_backward`) against the
    general deterministic path (`gemm` products, `sum_` for the bias), bit for bit, transposed operands too."""
    from edgetrain.graph import Node
    from edgetrain.ops.base import OPS, Run

    rng = np.random.default_rng(m * 100 + k + n)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    c = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal((m, n)).astype(dtype)
    inputs = ["a", "b"] + (["c"] if bias else [])
    op = OPS["Gemm"](Node("fc", "Gemm", inputs, ["y"], {"transA": int(trans_a), "transB": int(trans_b)}), 17)
    args = [a, b] + ([c] if bias else [])

    def run():
        with detfloat.using(True):
            (y,), ctx = op.forward(args, Run(True, (0, 0)))
            return y, op.backward(ctx, [g], [True] * len(args))

    y, grads = run()
    monkeypatch.setattr(detfloat, "SMALL_LINEAR", -1)  # every product through gemm and sum_
    y_ref, grads_ref = run()
    assert y.dtype == y_ref.dtype and np.array_equal(y, y_ref)
    assert len(grads) == len(grads_ref) == len(args)
    for got, want in zip(grads, grads_ref):
        assert got.shape == want.shape and got.dtype == want.dtype and np.array_equal(got, want)


@pytest.mark.parametrize("shape", [(8, 6, 28, 28), (2, 5, 7), (3, 4, 2, 3, 5), (0, 3, 4), (4, 2)])
@pytest.mark.parametrize("on", [True, False])
def test_channel_sum_is_op_sum_over_every_axis_but_one(shape, on):
    x = (rng.standard_normal(shape) * 10).astype(F32)
    with detfloat.using(on):
        got = detfloat.op_channel_sum(x)
        want = detfloat.op_sum(x, (0,) + tuple(range(2, x.ndim)))
    assert got.shape == want.shape and got.dtype == want.dtype and _bits_equal(got, want)
