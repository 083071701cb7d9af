"""The integer kernels against plain NumPy int64 references, bit for bit, on every backend.

The references below are written independently of edgetrain.kernels (int64 matmul and per-tap
einsum/scatter loops over a zero-padded input), so an error in the kernels' packing, phase
decomposition, zero-point encoding or accumulator choice cannot cancel out. Every test runs once
per registered backend (the `backend` fixture), so each backend must give the reference's bits.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetrain import kernels
from edgetrain.graph import Node
from edgetrain.kernels import ort_backend
from edgetrain.kernels.bounds import INT32_MAX, accumulator_dtype, segment_length
from edgetrain.ops.base import Run
from edgetrain.ops.conv import Conv

BITS = list(range(2, 17))
BACKENDS = sorted(kernels._BACKENDS)


@pytest.fixture(autouse=True, params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test on one backend, then restore the default. The vnni backend takes every weight
    gradient itself here (in production small images with large tiles go to onnxruntime), so the
    tests' small shapes exercise its kernel."""
    from edgetrain.kernels.vnni_backend import VnniBackend
    monkeypatch.setattr(VnniBackend, "WGRAD_MIN_SPAN", 0)
    previous = kernels.set_backend(request.param)
    try:
        yield kernels.get_backend()
    finally:
        kernels.set_backend(previous)


# ------------------------------------------------------------------------------- references


def ref_gemm(a, b):
    return a.astype(np.int64) @ b.astype(np.int64)


def _out_size(size, pad_lo, pad_hi, kernel, stride, dilation):
    return (size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def _tap_slices(geo_out, r, s, stride, dilation):
    (oh, ow), (sh, sw), (dh, dw) = geo_out, stride, dilation
    return (slice(r * dh, r * dh + sh * (oh - 1) + 1, sh), slice(s * dw, s * dw + sw * (ow - 1) + 1, sw))


def ref_conv_forward(x, w, stride, pads, dilation, groups):
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    pt, pl, pb, pr = pads
    xp = np.zeros((n, c, h + pt + pb, wd + pl + pr), np.int64)
    xp[:, :, pt:pt + h, pl:pl + wd] = x
    out = (_out_size(h, pt, pb, kh, stride[0], dilation[0]), _out_size(wd, pl, pr, kw, stride[1], dilation[1]))
    y = np.zeros((n, m) + out, np.int64)
    mg = m // groups
    for f in range(m):
        g = f // mg
        for r in range(kh):
            for s in range(kw):
                rows, cols = _tap_slices(out, r, s, stride, dilation)
                patch = xp[:, g * cg:(g + 1) * cg, rows, cols]
                y[:, f] += np.einsum("nchw,c->nhw", patch, w[f, :, r, s].astype(np.int64))
    return y


def ref_conv_backward_data(dy, w, x_shape, stride, pads, dilation, groups):
    n, c, h, wd = x_shape
    m, cg, kh, kw = w.shape
    pt, pl, pb, pr = pads
    dxp = np.zeros((n, c, h + pt + pb, wd + pl + pr), np.int64)
    mg = m // groups
    for f in range(m):
        g = f // mg
        for r in range(kh):
            for s in range(kw):
                rows, cols = _tap_slices(dy.shape[2:], r, s, stride, dilation)
                dxp[:, g * cg:(g + 1) * cg, rows, cols] += np.einsum(
                    "nhw,c->nchw", dy[:, f].astype(np.int64), w[f, :, r, s].astype(np.int64))
    return dxp[:, :, pt:pt + h, pl:pl + wd]


def ref_conv_backward_weight(dy, x, w_shape, stride, pads, dilation, groups):
    n, c, h, wd = x.shape
    m, cg, kh, kw = w_shape
    pt, pl, pb, pr = pads
    xp = np.zeros((n, c, h + pt + pb, wd + pl + pr), np.int64)
    xp[:, :, pt:pt + h, pl:pl + wd] = x
    dw = np.zeros(w_shape, np.int64)
    mg = m // groups
    for f in range(m):
        g = f // mg
        for r in range(kh):
            for s in range(kw):
                rows, cols = _tap_slices(dy.shape[2:], r, s, stride, dilation)
                patch = xp[:, g * cg:(g + 1) * cg, rows, cols]
                dw[f, :, r, s] = np.einsum("nchw,nhw->c", patch, dy[:, f].astype(np.int64))
    return dw


# -------------------------------------------------------------------------------- operands


def signed_dtype(bits):
    return np.int8 if bits <= 8 else np.int16


def qmax(bits, signed=True):
    return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1


def random_operand(rng, shape, bits, signed=True):
    top = qmax(bits, signed)
    dt = signed_dtype(bits) if signed else (np.uint8 if bits <= 8 else np.uint16)
    return rng.integers(-top if signed else 0, top + 1, shape).astype(dt)


def worst_operands(shape_a, shape_b, bits_a, bits_b, case):
    """Every value at the largest magnitude: all-positive products, all-negative, or alternating."""
    a = np.full(shape_a, qmax(bits_a), signed_dtype(bits_a))
    b = np.full(shape_b, qmax(bits_b), signed_dtype(bits_b))
    if case == "negative":
        b = -b
    elif case == "alternating":
        a = a * np.where(np.arange(a.size).reshape(shape_a) % 2 == 0, 1, -1).astype(a.dtype)
    return a, b


def assert_exact(got, want):
    assert got.dtype in (np.int32, np.int64)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.astype(np.int64), want)
    if np.abs(want).max(initial=0) > INT32_MAX:
        assert got.dtype == np.int64


# -------------------------------------------------------------------------------------- GEMM


@pytest.mark.parametrize("bits_a", BITS)
def test_gemm_every_bit_width_random_and_worst_case(bits_a):
    rng = np.random.default_rng(bits_a)
    for bits_b in BITS:
        a = random_operand(rng, (7, 45), bits_a)
        b = random_operand(rng, (45, 6), bits_b)
        assert_exact(kernels.gemm(a, b), ref_gemm(a, b))
        for case in ("positive", "negative", "alternating"):
            a, b = worst_operands((5, 67), (67, 9), bits_a, bits_b, case)
            assert_exact(kernels.gemm(a, b), ref_gemm(a, b))


def test_gemm_dtype_extremes_and_unsigned():
    """int16 -32768 (outside the symmetric range; pairs of it overflow vpmaddwd) and full uint16."""
    a = np.full((3, 40), -32768, np.int16)
    assert_exact(kernels.gemm(a, a.T.copy()), ref_gemm(a, a.T))
    rng = np.random.default_rng(0)
    u16 = rng.integers(0, 65536, (6, 33)).astype(np.uint16)
    u16[0] = 65535
    s16 = random_operand(rng, (33, 5), 16)
    assert_exact(kernels.gemm(u16, s16), ref_gemm(u16, s16))
    u8 = rng.integers(0, 256, (6, 33)).astype(np.uint8)
    i8 = np.full((33, 4), -128, np.int8)
    assert_exact(kernels.gemm(u8, i8), ref_gemm(u8, i8))


def test_gemm_large_shapes_cross_blocks():
    rng = np.random.default_rng(1)
    a = random_operand(rng, (203, 1100), 8)
    b = random_operand(rng, (1100, 150), 12)
    assert_exact(kernels.gemm(a, b), ref_gemm(a, b))


def test_small_gemm_rows_route_matches_the_tiles_worst_case():
    """The short-reduction route (NumbaBackend.gemm_rows) against the 4x4 tiles: C and F operands,
    int32 and segmented int64 accumulation at full int16 magnitudes."""
    from edgetrain.kernels.numba_backend import NumbaBackend

    backend, rng = NumbaBackend(), np.random.default_rng(3)
    for m, n, k in ((120, 40, 8), (9, 8, 1), (5, 33, 256)):
        a = np.asfortranarray(rng.integers(-32768, 32768, (m, k)).astype(np.int16))
        a[0] = -32768
        bt = rng.integers(-32768, 32768, (n, k)).astype(np.int16)
        bt[0] = -32768
        dtype = accumulator_dtype(k, 32768, 32768)
        seg = segment_length(k, 32768, 32768)
        ref = ref_gemm(a, bt.T)
        for x in (a, np.ascontiguousarray(a)):
            assert backend.gemm_nt(x, bt, dtype, seg).dtype == dtype
            assert_exact(backend.gemm_nt(x, bt, dtype, seg), ref)
            assert_exact(backend._gemm_nt(x, bt, dtype, seg), ref)


def test_linear_conveniences():
    rng = np.random.default_rng(2)
    x, w, dy = random_operand(rng, (9, 13), 8), random_operand(rng, (5, 13), 6), random_operand(rng, (9, 5), 16)
    assert_exact(kernels.linear_forward(x, w), ref_gemm(x, w.T))
    assert_exact(kernels.linear_backward_data(dy, w), ref_gemm(dy, w))
    assert_exact(kernels.linear_backward_weight(dy, x), ref_gemm(dy.T, x))


def test_rejects_wrong_dtypes_and_shapes():
    with pytest.raises(TypeError):
        kernels.gemm(np.zeros((2, 2), np.int32), np.zeros((2, 2), np.int8))
    with pytest.raises(TypeError):
        kernels.gemm(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int8))
    with pytest.raises(ValueError):
        kernels.gemm(np.zeros((2, 3), np.int8), np.zeros((2, 2), np.int8))
    with pytest.raises(ValueError):
        kernels.conv2d_forward(np.zeros((1, 3, 4, 4), np.int8), np.zeros((2, 2, 3, 3), np.int8))


# ------------------------------------------------------------------------------- accumulator


def test_accumulator_choice():
    assert accumulator_dtype(576, 127, 127) == np.int32
    assert accumulator_dtype(131072, 255, 127) == np.int64  # 4.2e9 > 2^31 - 1
    assert accumulator_dtype(131072, 255, 32767) == np.int64
    # Exactly at the boundary: K*A*B == 2^31 - 1 still fits, one more term does not.
    assert accumulator_dtype(1, INT32_MAX, 1) == np.int32
    assert accumulator_dtype(2, (INT32_MAX + 1) // 2, 1) == np.int64
    assert segment_length(10 ** 6, 32767, 32767) == 2  # 2 * 32767^2 < 2^31 - 1 < 3 * 32767^2
    with pytest.raises(OverflowError):
        accumulator_dtype(2 ** 40, 65535, 65535)


def test_gemm_output_dtype_by_actual_bound():
    small = np.full((2, 100), 3, np.int16)
    assert kernels.gemm(small, small.T.copy()).dtype == np.int32  # int16 storage, tiny values
    big = np.full((2, 3000), 32767, np.int16)
    out = kernels.gemm(big, big.T.copy())
    assert out.dtype == np.int64 and int(out[0, 0]) == 3000 * 32767 ** 2


# -------------------------------------------------------------------------------------- conv

# (x shape, w shape, stride, pads (top, left, bottom, right), dilation, groups)
CONV_CASES = {
    "plain": ((2, 3, 7, 7), (4, 3, 3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    "pad1": ((2, 4, 6, 5), (5, 4, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    "stride2_pad1": ((2, 4, 8, 8), (6, 4, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    # odd width: a stride-2 dx's two column phases differ by one column (vnni's paired emit)
    "stride2_odd": ((2, 4, 7, 9), (6, 4, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    "stride_asym_pad": ((2, 3, 9, 8), (4, 3, 3, 2), (2, 3), (0, 1, 2, 1), (1, 1), 1),
    "dilation": ((1, 2, 9, 9), (3, 2, 3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1),
    "dilation_stride": ((2, 2, 11, 10), (3, 2, 3, 2), (2, 2), (1, 0, 2, 1), (2, 3), 1),
    "groups": ((2, 4, 6, 6), (6, 2, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),
    "depthwise_stride": ((2, 4, 7, 7), (4, 1, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 4),
    "depthwise_multiplier": ((1, 3, 6, 6), (6, 1, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3),
    "pointwise_stride2": ((2, 5, 7, 7), (3, 5, 1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    # few positions per image: vnni runs it as one GEMM over the batch (both directions and dW)
    "pointwise_small": ((3, 6, 3, 2), (9, 6, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    # 32 positions in all: vnni's GEMM over the batch returns a contiguous (C, N*H*W) accumulator
    "pointwise_whole_tiles": ((8, 6, 2, 2), (9, 6, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    "stride3_kernel2": ((1, 2, 10, 10), (2, 2, 2, 2), (3, 3), (1, 0, 0, 1), (1, 1), 1),
    "pad_beyond_kernel": ((1, 2, 4, 4), (3, 2, 2, 2), (1, 1), (3, 2, 2, 3), (1, 1), 1),
    "wide_channels": ((2, 37, 5, 5), (9, 37, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
}


def conv_args(case):
    x_shape, w_shape, stride, pads, dilation, groups = CONV_CASES[case]
    return x_shape, w_shape, dict(stride=stride, pads=pads, dilation=dilation, groups=groups)


def y_shape(x_shape, w_shape, kw):
    y = ref_conv_forward(np.zeros(x_shape, np.int8), np.zeros(w_shape, np.int8), kw["stride"], kw["pads"],
                         kw["dilation"], kw["groups"])
    return y.shape


def check_all_conv_kernels(x, w, dy, kw):
    args = (kw["stride"], kw["pads"], kw["dilation"], kw["groups"])
    assert_exact(kernels.conv2d_forward(x, w, **kw), ref_conv_forward(x, w, *args))
    assert_exact(kernels.conv2d_backward_data(dy, w, x.shape, **kw), ref_conv_backward_data(dy, w, x.shape, *args))
    assert_exact(kernels.conv2d_backward_weight(dy, x, w.shape, **kw), ref_conv_backward_weight(dy, x, w.shape, *args))


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_geometry_variants(case):
    x_shape, w_shape, kw = conv_args(case)
    rng = np.random.default_rng(len(case))
    x = random_operand(rng, x_shape, 8, signed=False)
    w = random_operand(rng, w_shape, 8)
    dy = random_operand(rng, y_shape(x_shape, w_shape, kw), 16)
    check_all_conv_kernels(x, w, dy, kw)


@pytest.mark.parametrize("bits_a", BITS)
def test_conv_every_bit_width(bits_a):
    """bits_a for activations/gradients against every weight bit-width, random and worst case."""
    x_shape, w_shape, kw = conv_args("stride2_pad1")
    ys = y_shape(x_shape, w_shape, kw)
    rng = np.random.default_rng(100 + bits_a)
    for bits_b in BITS:
        x = random_operand(rng, x_shape, bits_a, signed=bits_a % 2 == 0)  # unsigned form too
        w = random_operand(rng, w_shape, bits_b)
        dy = random_operand(rng, ys, bits_a)
        check_all_conv_kernels(x, w, dy, kw)
    for bits_b in BITS:
        for case in ("positive", "negative", "alternating"):
            x, w = worst_operands(x_shape, w_shape, bits_a, bits_b, case)
            dy = np.full(ys, -qmax(bits_a), signed_dtype(bits_a))
            check_all_conv_kernels(x, w, dy, kw)


def test_weight_gradient_batch128_overflows_int32_but_is_exact():
    """128 x 8 x 8 pixels of 16-bit gradients times 8-bit activations: |sum| ~ 2^36."""
    x = np.full((128, 3, 8, 8), 255, np.uint8)
    w_shape = (4, 3, 3, 3)
    dy = np.full((128, 4, 8, 8), 32767, np.int16)
    dy[:, 1] = -32767
    kw = dict(stride=1, pads=(1, 1, 1, 1), dilation=1, groups=1)
    dw = kernels.conv2d_backward_weight(dy, x, w_shape, **kw)
    want = ref_conv_backward_weight(dy, x, w_shape, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert np.abs(want).max() > 2 ** 35  # 32 times beyond int32
    assert dw.dtype == np.int64
    np.testing.assert_array_equal(dw, want)
    # Random signs at the same magnitudes: partial sums wander without cancelling by design.
    rng = np.random.default_rng(3)
    dy = (rng.integers(0, 2, dy.shape) * 2 - 1).astype(np.int16) * np.int16(32767)
    np.testing.assert_array_equal(kernels.conv2d_backward_weight(dy, x, w_shape, **kw),
                                  ref_conv_backward_weight(dy, x, w_shape, (1, 1), (1, 1, 1, 1), (1, 1), 1))


def test_forward_and_backward_data_long_reductions_use_int64():
    x = np.full((1, 300, 3, 3), 32767, np.int16)
    w = np.full((2, 300, 3, 3), -32767, np.int16)
    y = kernels.conv2d_forward(x, w, pads=(1, 1, 1, 1))
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, ref_conv_forward(x, w, (1, 1), (1, 1, 1, 1), (1, 1), 1))
    dy = np.full((1, 300, 3, 3), 32767, np.int16)
    w2 = np.full((300, 2, 3, 3), 32767, np.int16)
    dx = kernels.conv2d_backward_data(dy, w2, (1, 2, 3, 3), pads=(1, 1, 1, 1))
    np.testing.assert_array_equal(dx, ref_conv_backward_data(dy, w2, (1, 2, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1))


def test_threads_for_runs_small_work_on_one_thread_and_restores_the_pool():
    """Small work: one thread inside, the caller's count after (also when the block raises); large work and
    a single-threaded caller: untouched."""
    import numba

    from edgetrain.kernels.threads import threads_for
    before = numba.get_num_threads()
    try:
        for outer in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(outer)
            with threads_for(10):
                assert numba.get_num_threads() == 1
            assert numba.get_num_threads() == outer
            with threads_for(10, threshold=5):
                assert numba.get_num_threads() == outer
            with pytest.raises(KeyError), threads_for(10):
                raise KeyError
            assert numba.get_num_threads() == outer
    finally:
        numba.set_num_threads(before)


def test_results_do_not_depend_on_thread_count(monkeypatch):
    import numba

    from edgetrain.kernels import threads
    monkeypatch.setattr(threads, "SMALL_WORK", 0)  # force the parallel path even for small shapes
    rng = np.random.default_rng(4)
    x = random_operand(rng, (6, 8, 9, 9), 8, signed=False)
    w = random_operand(rng, (8, 8, 3, 3), 8)
    dy = random_operand(rng, (6, 8, 5, 5), 16)
    kw = dict(stride=2, pads=(1, 1, 1, 1))
    runs = []
    before = numba.get_num_threads()
    try:
        for n_threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n_threads)
            runs.append((kernels.conv2d_forward(x, w, **kw), kernels.conv2d_backward_data(dy, w, x.shape, **kw),
                         kernels.conv2d_backward_weight(dy, x, w.shape, **kw), kernels.gemm(x[0, 0], x[1, 0])))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(runs[0], runs[-1], strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------- against the float Conv op


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_geometry_matches_float_conv_op(case):
    """Same output shapes and values as edgetrain.ops.conv.Conv on float64 copies (exact there too)."""
    x_shape, w_shape, kw = conv_args(case)
    rng = np.random.default_rng(7)
    x = random_operand(rng, x_shape, 6)
    w = random_operand(rng, w_shape, 6)
    attrs = dict(strides=list(kw["stride"]), pads=list(kw["pads"]), dilations=list(kw["dilation"]),
                 group=kw["groups"], kernel_shape=list(w_shape[2:]))
    op = Conv(Node("conv", "Conv", ["x", "w"], ["y"], attrs), 17)
    (y_float,), ctx = op.forward([x.astype(np.float64), w.astype(np.float64)], Run(True))
    y = kernels.conv2d_forward(x, w, **kw)
    assert y.shape == y_float.shape
    np.testing.assert_array_equal(y.astype(np.float64), y_float)
    dy = random_operand(rng, y.shape, 8)
    dx_float, dw_float = op.backward(ctx, [dy.astype(np.float64)], [True, True])
    np.testing.assert_array_equal(kernels.conv2d_backward_data(dy, w, x.shape, **kw).astype(np.float64), dx_float)
    np.testing.assert_array_equal(kernels.conv2d_backward_weight(dy, x, w.shape, **kw).astype(np.float64), dw_float)


def test_caller_bounds_give_the_same_exact_result_and_choose_the_accumulator():
    """Bounds from a quantiser (qmax) replace the operand scans: same bits, and int64 where needed."""
    from edgetrain.kernels import accumulator_dtype, conv2d_backward_weight

    rng = np.random.default_rng(3)
    dy = rng.integers(-32767, 32768, (128, 4, 8, 8)).astype(np.int16)
    x = rng.integers(0, 256, (128, 3, 8, 8)).astype(np.uint8)
    measured = conv2d_backward_weight(dy, x, (4, 3, 3, 3), pads=(1, 1, 1, 1))
    bounded = conv2d_backward_weight(dy, x, (4, 3, 3, 3), pads=(1, 1, 1, 1), bounds=(32767, 255))
    np.testing.assert_array_equal(measured, bounded)
    assert bounded.dtype == accumulator_dtype(128 * 8 * 8, 32767, 255) == np.int64
    ref = np.zeros((4, 3, 3, 3), np.int64)
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    for i in range(3):
        for j in range(3):
            ref[:, :, i, j] = np.einsum("nmhw,nchw->mc", dy.astype(np.int64), xp[:, :, i:i + 8, j:j + 8])
    np.testing.assert_array_equal(bounded, ref)


# ------------------------------------------------------------------- backends: routes and probes


def _operand(data, shape, bits, signed, mode):
    """Random values at `bits`, or every value at the range's edge (qmax, -qmax, int8's -128)."""
    top = qmax(bits, signed)
    dt = signed_dtype(bits) if signed else (np.uint8 if bits <= 8 else np.uint16)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1), label="seed"))
    if mode == "random":
        return rng.integers(-top if signed else 0, top + 1, shape).astype(dt), top
    edge = [top] if not signed else ([top, -top, -128] if bits == 8 else [top, -top])
    return rng.choice(np.array(edge, np.int64), shape).astype(dt), max(top, 128 if signed and bits == 8 else 0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_conv_geometries_bit_widths_and_edge_values(backend, data):
    """Randomised shapes, strides, pads, dilations, groups, signedness and bit-widths (8-bit most
    often: that is where the backends differ), values random or all at the range's edge, with and
    without caller bounds."""
    groups = data.draw(st.sampled_from([1, 1, 1, 2]), label="groups")
    n = data.draw(st.integers(1, 3), label="n")
    c = groups * data.draw(st.integers(1, 5), label="c/g")
    m = groups * data.draw(st.integers(1, 5), label="m/g")
    kh, kw = data.draw(st.integers(1, 3), label="kh"), data.draw(st.integers(1, 3), label="kw")
    sh, sw = data.draw(st.integers(1, 3), label="sh"), data.draw(st.integers(1, 3), label="sw")
    dh, dw = data.draw(st.integers(1, 2), label="dh"), data.draw(st.integers(1, 2), label="dw")
    pads = tuple(data.draw(st.integers(0, 2), label="pad") for _ in range(4))
    h = data.draw(st.integers(max(1, dh * (kh - 1) + 1 - pads[0] - pads[2]), 9), label="h")
    w = data.draw(st.integers(max(1, dw * (kw - 1) + 1 - pads[1] - pads[3]), 9), label="w")
    bit_choice = st.sampled_from([8, 8, 8, 2, 5, 7, 9, 12, 16])
    bits_x, bits_w, bits_g = (data.draw(bit_choice, label=f"bits_{t}") for t in "xwg")
    x_signed = data.draw(st.booleans(), label="x signed")
    mode = data.draw(st.sampled_from(["random", "edge"]), label="mode")
    x, bx = _operand(data, (n, c, h, w), bits_x, x_signed, mode)
    wt, bw = _operand(data, (m, c // groups, kh, kw), bits_w, True, mode)
    args = ((sh, sw), pads, (dh, dw), groups)
    kw_ = dict(stride=(sh, sw), pads=pads, dilation=(dh, dw), groups=groups)
    want_y = ref_conv_forward(x, wt, *args)
    dy, bg = _operand(data, want_y.shape, bits_g, True, mode)
    with_bounds = data.draw(st.booleans(), label="bounds")
    b = (lambda p, q: dict(bounds=(p, q))) if with_bounds else (lambda p, q: {})
    assert_exact(kernels.conv2d_forward(x, wt, **kw_, **b(bx, bw)), want_y)
    assert_exact(kernels.conv2d_backward_data(dy, wt, x.shape, **kw_, **b(bg, bw)),
                 ref_conv_backward_data(dy, wt, x.shape, *args))
    assert_exact(kernels.conv2d_backward_weight(dy, x, wt.shape, **kw_, **b(bg, bx)),
                 ref_conv_backward_weight(dy, x, wt.shape, *args))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_gemm_shapes_signedness_and_edge_values(backend, data):
    m, k, n = (data.draw(st.integers(1, 70), label=t) for t in "mkn")
    mode = data.draw(st.sampled_from(["random", "edge"]), label="mode")
    bits_a, bits_b = (data.draw(st.sampled_from([8, 8, 3, 11, 16]), label=t) for t in "ab")
    a, ba = _operand(data, (m, k), bits_a, data.draw(st.booleans(), label="a signed"), mode)
    b, bb = _operand(data, (k, n), bits_b, data.draw(st.booleans(), label="b signed"), mode)
    assert_exact(kernels.gemm(a, b, bounds=(ba, bb)), ref_gemm(a, b))
    assert_exact(kernels.gemm_nt(a, np.ascontiguousarray(b.T)), ref_gemm(a, b))
    assert_exact(kernels.linear_backward_weight(a, a), ref_gemm(a.T, a))


@pytest.mark.parametrize("raw_terms,chunk_bytes", [(40, 1 << 19), (10 ** 6, 1), (100, 1)])
def test_short_int32_runs_split_reductions_and_chunks(backend, monkeypatch, raw_terms, chunk_bytes):
    """With tiny int32 runs and chunks the onnxruntime backend splits GEMM reductions, cuts the
    weight gradient into one-image runs, hands over-long convs to Numba and spreads one-image chunks
    over every thread: still exact."""
    from edgetrain.kernels import threads
    monkeypatch.setattr(threads, "SMALL_WORK", 0)
    monkeypatch.setattr(ort_backend, "RAW_TERMS", raw_terms)
    monkeypatch.setattr(ort_backend, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(9)
    a = random_operand(rng, (9, 130), 8)
    b = random_operand(rng, (130, 7), 8, signed=False)
    assert_exact(kernels.gemm(a, b), ref_gemm(a, b))
    assert_exact(kernels.gemm(b.T.copy(), a.T.copy()), ref_gemm(b.T, a.T))
    # (x shape, w shape, stride): 8-multiple widths and channels take the word-transpose path.
    for x_shape, w_shape, stride in (((5, 3, 4, 4), (4, 3, 3, 3), 1), ((3, 8, 16, 16), (16, 8, 3, 3), 1),
                                     ((3, 4, 9, 9), (8, 4, 3, 3), 2), ((2, 8, 16, 16), (8, 8, 1, 1), 2)):
        for signed in (False, True):
            x = random_operand(rng, x_shape, 8, signed=signed)
            w = random_operand(rng, w_shape, 8)
            pad = w_shape[2] // 2
            kw = dict(stride=(stride, stride), pads=(pad,) * 4, dilation=(1, 1), groups=1)
            dy = random_operand(rng, y_shape(x_shape, w_shape, kw), 8, signed=not signed)
            check_all_conv_kernels(x, w, dy, kw)


def _counting_ort(monkeypatch):
    """The onnxruntime backend, made active, with its route counts reset (skips where it is unusable)."""
    pytest.importorskip("onnxruntime")
    ort = kernels._BACKENDS["onnxruntime"]
    if not ort.usable:
        pytest.skip("onnxruntime failed the exactness probe on this CPU (a saturating u8 x s8 GEMM)")
    monkeypatch.setattr(ort, "routes", type(ort.routes)())
    kernels.set_backend("onnxruntime")
    return ort


def test_onnxruntime_route_is_taken_for_8_bit_operands(monkeypatch):
    """The onnxruntime backend really runs 8-bit products itself (no silent fallback), and passes
    16-bit ones to Numba."""
    ort = _counting_ort(monkeypatch)
    monkeypatch.setattr(ort, "SMALL_GEMM_WORK", 0)  # this test's GEMM is tiny: no Numba shortcut
    rng = np.random.default_rng(1)
    x = random_operand(rng, (2, 4, 6, 6), 8, signed=False)
    w = random_operand(rng, (5, 4, 3, 3), 8)
    dy = random_operand(rng, (2, 5, 3, 3), 8)
    kw = dict(stride=(2, 2), pads=(1, 1, 1, 1), dilation=(1, 1), groups=1)
    check_all_conv_kernels(x, w, dy, kw)
    b = random_operand(rng, (6, 2), 8)
    assert_exact(kernels.gemm(x[0, 0], b), ref_gemm(x[0, 0], b))
    assert dict(ort.routes) == {"conv2d_forward": 1, "conv2d_backward_data": 1, "conv2d_backward_weight": 1,
                                "gemm_nt": 1}
    ort.routes.clear()
    check_all_conv_kernels(x.astype(np.uint16) * 100, w, dy.astype(np.int16) * 200, kw)
    assert dict(ort.routes) == {"conv2d_forward:numba": 1, "conv2d_backward_data:numba": 1,
                                "conv2d_backward_weight:numba": 1}


def test_tiny_gemms_take_numba_with_the_same_integers(monkeypatch):
    """Below SMALL_GEMM_WORK multiply-accumulates a GEMM skips the session run (a fixed ~20 us) for the
    Numba kernels; from it on, onnxruntime's. Both exact: the same integers either way."""
    ort = _counting_ort(monkeypatch)
    rng = np.random.default_rng(3)
    small_a, small_b = random_operand(rng, (8, 120), 8, signed=False), random_operand(rng, (120, 84), 8)
    big_a, big_b = random_operand(rng, (64, 128), 8, signed=False), random_operand(rng, (128, 64), 8)
    assert 8 * 120 * 84 < ort.SMALL_GEMM_WORK <= 64 * 128 * 64
    assert_exact(kernels.gemm(small_a, small_b), ref_gemm(small_a, small_b))
    assert dict(ort.routes) == {"gemm_nt:numba": 1}
    assert_exact(kernels.gemm(big_a, big_b), ref_gemm(big_a, big_b))
    assert ort.routes["gemm_nt"] == 1


@pytest.mark.parametrize("bits", [9, 12, 14])
def test_wide_gradients_run_as_two_8_bit_products(monkeypatch, bits):
    """A 9- to 14-bit gradient against 8-bit operands is split into a low part in [0, 127] and a signed
    high part, each an 8-bit product on onnxruntime's integer GEMM, and the sum is exact, worst
    cases (every value at +-qmax, and the most negative high parts) included."""
    ort = _counting_ort(monkeypatch)
    rng = np.random.default_rng(bits)
    x = random_operand(rng, (3, 4, 6, 6), 8, signed=False)
    w = random_operand(rng, (5, 4, 3, 3), 8)
    kw = dict(stride=(1, 1), pads=(1, 1, 1, 1), dilation=(1, 1), groups=1)
    args = (kw["stride"], kw["pads"], kw["dilation"], kw["groups"])
    for dy in (random_operand(rng, (3, 5, 6, 6), bits), np.full((3, 5, 6, 6), qmax(bits), np.int16),
               np.full((3, 5, 6, 6), -qmax(bits), np.int16)):
        assert_exact(kernels.conv2d_backward_data(dy, w, x.shape, **kw), ref_conv_backward_data(dy, w, x.shape, *args))
        assert_exact(kernels.conv2d_backward_weight(dy, x, w.shape, **kw),
                     ref_conv_backward_weight(dy, x, w.shape, *args))
        bounds = (qmax(bits), 127)
        assert_exact(kernels.conv2d_backward_weight(dy, x, w.shape, **kw, bounds=(qmax(bits), 255)),
                     ref_conv_backward_weight(dy, x, w.shape, *args))
        scale = rng.uniform(0.5, 2, 4).astype(np.float32)
        got = kernels.conv2d_backward_data(dy, w, x.shape, **kw, bounds=bounds, rescale=(scale, np.float32))
        want = ref_conv_backward_data(dy, w, x.shape, *args).astype(np.float64) * scale.reshape(1, -1, 1, 1)
        np.testing.assert_array_equal(got, want.astype(np.float32))
    assert "conv2d_backward_data:numba" not in ort.routes and "conv2d_backward_weight:numba" not in ort.routes
    assert ort.routes["conv2d_backward_data"] == 2 * 6 and ort.routes["conv2d_backward_weight"] == 2 * 6


def test_onnxruntime_probe_rejects_a_saturating_gemm():
    """A u8 x s8 GEMM that saturates int16 pairs (x86 without VNNI) must fail the probe, so the
    backend falls back to Numba instead of returning wrong bits."""
    def exact(a, b, za, zb):
        return np.matmul(a.astype(np.int64) - za, b.astype(np.int64) - zb).astype(np.int32)

    def saturating(a, b, za, zb):
        prod = a.astype(np.int64)[..., :, :, None] * b.astype(np.int64)[..., None, :, :]
        k = prod.shape[-2] - prod.shape[-2] % 2
        pairs = np.clip(prod[..., :k:2, :] + prod[..., 1:k:2, :], -32768, 32767).sum(axis=-2)
        pairs = pairs + prod[..., k:, :].sum(axis=-2)
        corr = za * b.astype(np.int64).sum(axis=-2)[..., None, :] + zb * a.astype(np.int64).sum(axis=-1)[..., None]
        return (pairs - corr + a.shape[-1] * za * zb).astype(np.int32)

    assert ort_backend._probe(exact)
    assert not ort_backend._probe(saturating)
    backend = ort_backend.OrtBackend()
    backend._usable = False
    rng = np.random.default_rng(0)
    a, b = random_operand(rng, (4, 9), 8, signed=False), random_operand(rng, (9, 3), 8)
    np.testing.assert_array_equal(backend.gemm_nt(a, b.T.copy(), np.dtype(np.int32), 9, (255, 127)), ref_gemm(a, b))


def test_default_backend_is_onnxruntime_with_numba_registered():
    assert {"numba", "onnxruntime"} <= set(kernels._BACKENDS)
    assert kernels.get_backend().name in BACKENDS


def _rescale_ref(acc, scale, dtype):
    """acc * scale[c] (or scale[n, c]) exactly as qops always rescaled: the int as float64 times the float
    scale, rounded once."""
    rows = scale.reshape(1, -1) if scale.ndim == 1 else scale
    return (acc.astype(np.float64) * rows.astype(np.float64)[:, :, None, None]).astype(dtype)


@pytest.mark.parametrize("per_image", [False, True], ids=["scale[c]", "scale[n,c]"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["pad1", "stride2_pad1", "stride2_odd", "stride_asym_pad", "dilation_stride",
                                  "pointwise_stride2", "pointwise_small", "pointwise_whole_tiles", "groups",
                                  "pad_beyond_kernel"])
def test_rescaled_outputs_are_the_rescaled_exact_integers(backend, case, dtype, per_image, monkeypatch):
    """rescale=(scale, dtype) returns acc * scale[c] in one rounding, the same bits as rescaling the
    integer result afterwards, whether the backend fuses it (chunk by chunk, phases of a strided dx)
    or not; large accumulators (beyond 2^24, where float32 rounds) included; a (N, C) scale gives
    every image its own row (DFQ's sample groups)."""
    monkeypatch.setattr(ort_backend, "CHUNK_BYTES", 1)  # one image per chunk: every chunk boundary
    x_shape, w_shape, kw = conv_args(case)
    rng = np.random.default_rng(11)
    x = random_operand(rng, x_shape, 8, signed=False)
    w = random_operand(rng, w_shape, 8)
    x[0] = 255
    w[0] = 127
    args = (kw["stride"], kw["pads"], kw["dilation"], kw["groups"])
    want_y = ref_conv_forward(x, w, *args)
    dy = random_operand(rng, want_y.shape, 8)
    scale_y = rng.uniform(1e-4, 3.0, w_shape[0]).astype(dtype)
    scale_x = np.full(x_shape[1], dtype(np.float32(0.0123) * np.float32(0.731)), dtype)
    if per_image:
        scale_y = rng.uniform(1e-4, 3.0, (x_shape[0], w_shape[0])).astype(dtype)
        scale_x = scale_x[None, :] * rng.uniform(0.5, 2.0, (x_shape[0], 1)).astype(dtype)
    y = kernels.conv2d_forward(x, w, **kw, bounds=(255, 127), rescale=(scale_y, np.dtype(dtype)))
    assert y.dtype == dtype and y.flags.c_contiguous
    np.testing.assert_array_equal(y, _rescale_ref(want_y, scale_y, dtype))
    dx = kernels.conv2d_backward_data(dy, w, x.shape, **kw, bounds=(127, 127), rescale=(scale_x, np.dtype(dtype)))
    assert dx.dtype == dtype and dx.flags.c_contiguous
    np.testing.assert_array_equal(dx, _rescale_ref(ref_conv_backward_data(dy, w, x.shape, *args), scale_x, dtype))


@pytest.mark.parametrize("per_image", [False, True])
def test_channel_major_rescale_equals_the_planes_one(backend, per_image):
    """A (C, N*H*W) accumulator rescaled straight into NCHW (`rescaled_channel_major`) gives `rescaled`'s
    bits on its NCHW view, beyond float32's exact integers too, per channel or per image, on both branches."""
    from edgetrain.kernels.rescale import rescaled, rescaled_channel_major
    rng = np.random.default_rng(4)
    for n, c, h, w in ((8, 5, 4, 4), (3, 7, 1, 1), (64, 40, 8, 8)):  # the last above the parallel threshold
        acc = rng.integers(-2 ** 31, 2 ** 31 - 1, (c, n * h * w)).astype(np.int32)
        scale = rng.uniform(1e-6, 3.0, (n, c) if per_image else c).astype(np.float32)
        got = rescaled_channel_major(acc, (n, c, h, w), (scale, np.dtype(np.float32)))
        want = rescaled(acc.reshape(c, n, h, w).transpose(1, 0, 2, 3), (scale, np.dtype(np.float32)))
        assert got.flags.c_contiguous and np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_rescale_rounds_once_beyond_float32_integers(backend):
    """Sums above 2^24 are not float32 integers: the rescale must round acc * scale once (float64
    product), not round acc to float32 first; 16-bit operands take the split/int64 route."""
    x = np.full((1, 300, 3, 3), 32767, np.int16)
    w = np.full((2, 300, 3, 3), -32767, np.int16)
    w[1] = 32765
    scale = np.array([0.1, 3.3e-5], np.float32)
    y = kernels.conv2d_forward(x, w, pads=(1, 1, 1, 1), rescale=(scale, np.dtype(np.float32)))
    want = _rescale_ref(ref_conv_forward(x, w, (1, 1), (1, 1, 1, 1), (1, 1), 1), scale, np.float32)
    np.testing.assert_array_equal(y, want)
    x8 = np.full((2, 64, 4, 4), 255, np.uint8)
    w8 = np.full((3, 64, 3, 3), 127, np.int8)
    acc = ref_conv_forward(x8, w8, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert acc.max() > 2 ** 24  # 576 * 255 * 127 = 18.7M: beyond float32's exact integers
    scale = np.array([0.3, 1.7, 2.9e-3], np.float32)
    y = kernels.conv2d_forward(x8, w8, pads=(1, 1, 1, 1), bounds=(255, 127), rescale=(scale, np.dtype(np.float32)))
    np.testing.assert_array_equal(y, _rescale_ref(acc, scale, np.float32))


def test_vnni_backend_runs_its_kernels_where_the_cpu_has_them(monkeypatch):
    """On an AVX-512 VNNI CPU the vnni backend passes its self-check and really runs the convs
    (no silent fallback); elsewhere it is never compiled and every call takes the next backend."""
    from edgetrain.kernels import vnni
    vb = kernels._BACKENDS["vnni"]
    if not vnni.available():
        assert not vb.vnni_usable
        pytest.skip("the tiles have no form for this CPU (AVX-512 VNNI, AVX2, Arm dot product)")
    assert vb.vnni_usable
    monkeypatch.setattr(vb, "routes", type(vb.routes)())
    kernels.set_backend("vnni")
    rng = np.random.default_rng(5)
    for signed in (False, True):
        x = random_operand(rng, (3, 5, 9, 9), 8, signed=signed)
        w = random_operand(rng, (7, 5, 3, 3), 8)
        for stride in (1, 2):
            kw = dict(stride=(stride, stride), pads=(1, 1, 1, 1), dilation=(1, 1), groups=1)
            dy = random_operand(rng, y_shape(x.shape, w.shape, kw), 8, signed=not signed)
            check_all_conv_kernels(x, w, dy, kw)
    assert vb.routes["conv2d_forward:vnni"] == 4 and vb.routes["conv2d_backward_data:vnni"] == 4
    assert vb.routes["conv2d_backward_weight:vnni"] == 4
    # 1x1 convs on small maps: one GEMM over the batch, signed or unsigned data, up to the limits
    kw = dict(stride=(1, 1), pads=(0, 0, 0, 0), dilation=(1, 1), groups=1)
    for shape in ((4, 12, 1, 1), (3, 8, 4, 4), (2, 5, 8, 8), (2, 4, 16, 16)):
        for signed in (False, True):
            x = random_operand(rng, shape, 8, signed=signed)
            w = random_operand(rng, (6, shape[1], 1, 1), 8)
            check_all_conv_kernels(x, w, random_operand(rng, (shape[0], 6) + shape[2:], 8, signed=not signed), kw)
    assert vb.routes["conv2d_forward:vnni_gemm"] == vb.routes["conv2d_backward_data:vnni_gemm"] == 6  # to 8x8
    assert vb.routes["conv2d_backward_weight:vnni_gemm"] == 8  # to 16x16


def test_vnni_small_maps_run_as_one_gemm_over_the_patches(monkeypatch):
    """Convs with at most SMALL_MAP_POSITIONS output positions per image take the patch-matrix route
    (`unfold`, one GEMM over the batch, `unfold.fold` for the input gradient): the int64 reference's integers
    over strides, dilations, uneven pads, kernels wider than the map, 1x1 strided shortcuts and a 1x1 output,
    signed and unsigned data, worst-case codes, and the rescaled forms' bits (small shapes, the weights' floor
    lowered to 0); at the defaults, 128 channels on 4x4 maps take it, 64 channels and 6x6 outputs do not."""
    from edgetrain.kernels import vnni
    vb = kernels._BACKENDS["vnni"]
    if not vnni.available() or not vb.vnni_usable:
        pytest.skip("the tiles have no form for this CPU (AVX-512 VNNI, AVX2, Arm dot product)")
    monkeypatch.setattr(vb, "routes", type(vb.routes)())
    monkeypatch.setattr(vb, "SMALL_MAP_MIN_WEIGHTS", 0)
    kernels.set_backend("vnni")
    rng = np.random.default_rng(21)
    cases = [((4, 8, 4, 4), (6, 8, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
             ((2, 6, 8, 8), (5, 6, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
             ((3, 5, 3, 3), (4, 5, 3, 3), (1, 1), (0, 0, 0, 0), (1, 1)),  # one output position
             ((2, 4, 6, 5), (3, 4, 3, 2), (2, 2), (0, 1, 2, 1), (2, 1)),
             ((2, 8, 7, 7), (9, 8, 1, 1), (2, 2), (0, 0, 0, 0), (1, 1)),  # a projection shortcut
             ((2, 3, 4, 4), (7, 3, 5, 5), (1, 1), (2, 2, 2, 2), (1, 1)),  # taps past every edge
             ((1, 20, 2, 3), (33, 20, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1))]
    for x_shape, w_shape, stride, pads, dilation in cases:
        kw = dict(stride=stride, pads=pads, dilation=dilation, groups=1)
        for signed in (False, True):
            x = random_operand(rng, x_shape, 8, signed=signed)
            w = random_operand(rng, w_shape, 8)
            dy = random_operand(rng, y_shape(x_shape, w_shape, kw), 8, signed=not signed)
            check_all_conv_kernels(x, w, dy, kw)
        x_top = np.full(x_shape, 255, np.uint8)  # worst case: every sum at its bound
        w_low = np.full(w_shape, -128, np.int8)
        dy_low = np.full(y_shape(x_shape, w_shape, kw), -128, np.int8)
        check_all_conv_kernels(x_top, w_low, dy_low, kw)
        scale_y = rng.uniform(1e-4, 3.0, w_shape[0]).astype(np.float32)
        scale_x = rng.uniform(1e-4, 3.0, x_shape[1]).astype(np.float32)
        args = (stride, pads, dilation, 1)
        y = kernels.conv2d_forward(x_top, w_low, **kw, bounds=(255, 128), rescale=(scale_y, np.dtype(np.float32)))
        np.testing.assert_array_equal(y, _rescale_ref(ref_conv_forward(x_top, w_low, *args), scale_y, np.float32))
        dx = kernels.conv2d_backward_data(dy_low, w_low, x_shape, **kw, bounds=(128, 128),
                                          rescale=(scale_x, np.dtype(np.float32)))
        want = ref_conv_backward_data(dy_low, w_low, x_shape, *args)
        np.testing.assert_array_equal(dx, _rescale_ref(want, scale_x, np.float32))
    calls = 3 * len(cases)  # two signednesses and the worst case
    assert vb.routes["conv2d_forward:vnni_patches"] == calls + len(cases)  # and the rescaled form
    assert vb.routes["conv2d_backward_data:vnni_patches"] == calls + len(cases)
    assert vb.routes["conv2d_backward_weight:vnni_patches"] == calls
    monkeypatch.undo()
    monkeypatch.setattr(vb, "routes", type(vb.routes)())
    kw = dict(stride=(1, 1), pads=(1, 1, 1, 1), dilation=(1, 1), groups=1)
    for shape, m, routed in (((2, 128, 4, 4), 128, True), ((2, 64, 4, 4), 64, False), ((1, 160, 6, 6), 160, False)):
        x = random_operand(rng, shape, 8, signed=False)
        w = random_operand(rng, (m, shape[1], 3, 3), 8)
        check_all_conv_kernels(x, w, random_operand(rng, (shape[0], m) + shape[2:], 8), kw)
        assert vb.routes["conv2d_forward:vnni_patches"] == routed, shape
        monkeypatch.setattr(vb, "routes", type(vb.routes)())


def test_vnni_convs_are_exact_on_one_and_two_threads(monkeypatch):
    """The VNNI convs with their work split over images: one and two threads give the int64 reference's
    integers, the weight gradient summing each thread's partial sums (`vnni.wgrad_finish`) over patch
    rows that fill its blocks of 8 and that do not (5 x 9 = 45), lanes padded past the output channels."""
    import numba

    from edgetrain.kernels import threads, vnni
    vb = kernels._BACKENDS["vnni"]
    if not vnni.available():
        pytest.skip("the tiles have no form for this CPU (AVX-512 VNNI, AVX2, Arm dot product)")
    assert vb.vnni_usable  # its self-check passed (a kernel that fails it is never used, so never tested here)
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba launched one thread")
    monkeypatch.setattr(threads, "SMALL_WORK", 0)  # the threaded path even for these small shapes
    monkeypatch.setattr(vb, "routes", type(vb.routes)())
    kernels.set_backend("vnni")
    rng = np.random.default_rng(13)
    kw = dict(stride=(1, 1), pads=(1, 1, 1, 1), dilation=(1, 1), groups=1)
    before = numba.get_num_threads()
    try:
        for n_threads in (1, 2):
            numba.set_num_threads(n_threads)
            for x_shape, m in (((5, 16, 8, 8), 24), ((4, 5, 9, 9), 7)):
                x = random_operand(rng, x_shape, 8, signed=False)
                w = random_operand(rng, (m, x_shape[1], 3, 3), 8)
                check_all_conv_kernels(x, w, random_operand(rng, y_shape(x.shape, w.shape, kw), 8), kw)
    finally:
        numba.set_num_threads(before)
    assert vb.routes["conv2d_backward_weight:vnni"] == 4


@pytest.mark.parametrize("signed", [False, True])
def test_vnni_few_channel_convs_unfold_their_rows_exactly(signed, monkeypatch):
    """A conv of one channel and a kernel of 4 rows or more runs with the kernel's rows as channels
    (`vnni_backend.unfold_rows`): the int64 reference's results over strides, dilations, paddings beyond
    the kernel and odd sizes; a 3x3 kernel (9 steps of 4 codes against 3) and two channels of a 5x5 (25
    against 15) would save too little and stay as they are."""
    from edgetrain.kernels import vnni
    vb = kernels._BACKENDS["vnni"]
    if not vnni.available() or not vb.vnni_usable:
        pytest.skip("the tiles have no form for this CPU (AVX-512 VNNI, AVX2, Arm dot product)")
    monkeypatch.setattr(vb, "routes", type(vb.routes)())
    kernels.set_backend("vnni")
    rng = np.random.default_rng(11 + signed)
    calls = 0
    for c, k, stride, dil, pads, size in ((1, 5, 1, 1, (2, 2, 2, 2), (28, 28)), (1, 7, 2, 1, (3, 3, 3, 3), (19, 12)),
                                          (1, 5, 2, 2, (3, 0, 4, 1), (13, 10)), (1, 5, 1, 1, (0, 0, 0, 0), (5, 7)),
                                          (1, 4, 3, 1, (5, 1, 4, 2), (8, 9)), (2, 5, 1, 1, (2, 2, 2, 2), (9, 9)),
                                          (1, 3, 1, 1, (1, 1, 1, 1), (9, 9))):
        x = random_operand(rng, (3, c) + size, 8, signed=signed)
        w = random_operand(rng, (16, c, k, k), 8)
        kw = dict(stride=(stride, 1), pads=pads, dilation=(dil, 1), groups=1)
        assert_exact(kernels.conv2d_forward(x, w, **kw), ref_conv_forward(x, w, kw["stride"], pads, kw["dilation"], 1))
        calls += c == 1 and k > 3
    assert vb.routes["conv2d_forward:vnni_rows"] == calls == 5


def test_vnni_gemms_are_exact_on_one_and_many_threads(monkeypatch):
    """8-bit GEMMs on the VNNI tiles (the linear layers): either operand signed, both signed (the XOR
    coding and its correction), reductions not a multiple of 4, lanes not a multiple of 16, transposed
    views (a weight gradient's dy^T), worst-case operands, and the threaded path on 1 and 2 threads."""
    import numba

    from edgetrain.kernels import vnni
    vb = kernels._BACKENDS["vnni"]
    if not vnni.available() or not vb.vnni_usable:
        pytest.skip("the tiles have no form for this CPU (AVX-512 VNNI, AVX2, Arm dot product)")
    monkeypatch.setattr(vb, "routes", type(vb.routes)())
    kernels.set_backend("vnni")
    rng = np.random.default_rng(6)
    calls = 0
    for m, k, n in ((8, 400, 120), (1, 1, 1), (33, 70, 17), (130, 9, 64)):
        for sa, sb in ((False, True), (True, False), (True, True)):
            a, b = random_operand(rng, (m, k), 8, signed=sa), random_operand(rng, (k, n), 8, signed=sb)
            assert_exact(kernels.gemm(a, b, bounds=(255, 255)), ref_gemm(a, b))
            assert_exact(kernels.linear_backward_weight(a, a, bounds=(255, 255)), ref_gemm(a.T, a))
            calls += 1 + sa  # a uint8 weight gradient (uint8 x uint8) is not a VNNI product
        for case in ("positive", "negative", "alternating"):
            a, b = worst_operands((m, k), (k, n), 8, 8, case)
            assert_exact(kernels.gemm(a, b, bounds=(128, 128)), ref_gemm(a, b))
            calls += 1
    assert vb.routes["gemm_nt:vnni"] == calls
    for m, k, n in ((32, 40, 24), (160, 800, 300)):  # read-only operands (broadcast views), used in place
        a, b = random_operand(rng, (m, k), 8), random_operand(rng, (k, n), 8, signed=False)
        a.flags.writeable = b.flags.writeable = False
        assert_exact(kernels.gemm(a, b, bounds=(128, 255)), ref_gemm(a, b))
    # both int8, the weight's rows (a multiple of 16, whole words) more than the input's: the weight gives
    # the tiles' rows in place and the input is packed, the result transposed (small and threaded sizes)
    for m, k, n in ((8, 400, 128), (128, 784, 512)):
        x, w = worst_operands((m, k), (k, n), 8, 8, "alternating")[0], random_operand(rng, (n, k), 8)
        w[0] = -128
        assert_exact(kernels.linear_forward(x, w, bounds=(128, 128)), ref_gemm(x, w.T))
    a, b = random_operand(rng, (96, 777), 8, signed=False), random_operand(rng, (777, 200), 8)
    assert 96 * 777 * 200 >= vb.GEMM_PARALLEL_WORK
    before = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            assert_exact(kernels.gemm(a, b, bounds=(255, 128)), ref_gemm(a, b))
    finally:
        numba.set_num_threads(before)


def test_onnxruntime_c_api_reports_errors_instead_of_crashing():
    """A failing MatMulInteger through the C API raises onnxruntime's message (and leaks nothing)."""
    pytest.importorskip("onnxruntime")
    ort = kernels._BACKENDS["onnxruntime"]
    if not ort.usable:
        pytest.skip("onnxruntime unusable here")
    from edgetrain.kernels.ort_capi import matmul_integer
    api = ort._api
    a, b, y = np.zeros((2, 3), np.uint8), np.zeros((4, 5), np.int8), np.zeros((2, 5), np.int32)
    shapes = np.zeros((3, 3), np.int64)
    shapes[0, :2], shapes[1, :2], shapes[2, :2] = a.shape, b.shape, y.shape  # K disagrees: 3 vs 4
    status = matmul_integer(api.create_tensor, api.run, api.release_value, api.memory_info, api.session(0, 0),
                            api.input_names, api.output_names, a, 2, b, 2, y, 2, shapes, np.zeros(3, np.int64))
    assert status != 0
    with pytest.raises(RuntimeError, match="onnxruntime"):
        api.check(int(status))


def test_malloc_tuning_is_applied_once_and_respects_the_environment(monkeypatch):
    from edgetrain.kernels import memory
    assert memory._applied and isinstance(memory._applied[0], bool)
    assert memory.tune_malloc() is memory._applied[0]  # applied once, at import
    monkeypatch.setattr(memory, "_applied", [])
    monkeypatch.setenv("EDGETRAIN_MALLOC_TUNING", "0")
    assert memory.tune_malloc() is False
    monkeypatch.setattr(memory, "_applied", [])
    monkeypatch.delenv("EDGETRAIN_MALLOC_TUNING")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1")
    assert memory.tune_malloc() is False  # the process chose its own policy


@pytest.mark.parametrize("shape", [(8, 16), (128, 784), (24, 40), (7, 13), (1, 8)])
def test_operand_coding_transposes_and_xors_exactly(shape):
    """The GEMM operands' codes (XOR 0x80) of transposed views: 8x8 word blocks or tiled bytes."""
    rng = np.random.default_rng(sum(shape))
    m = rng.integers(-128, 128, shape).astype(np.int8)
    for xor in (0, 0x80):
        for view in (m, m.T, m[:, ::-1]):
            got = ort_backend._coded(view, xor, np.uint8)
            assert got.flags.c_contiguous
            np.testing.assert_array_equal(got, view.view(np.uint8) ^ np.uint8(xor))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 150), st.integers(1, 150), st.sampled_from([np.float32, np.float64]), st.booleans(),
       st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2 ** 31))
def test_rescale_matrix_is_numpys_rescale_in_either_layout(rows, cols, dtype, transposed, per_col, cast_first, biased,
                                                           relu, seed):
    """rescale_matrix on a C-contiguous or a transposed accumulator (the GEMM backends return either),
    tiled or not, serial or parallel: cast_first gives NumPy's acc.astype(dtype) * scale (QuantLinear's
    forward), else the float64 product rounded once (every other rescale); accumulators beyond 2^24 included.
    With a bias, NumPy's `y + bias` after it, and with relu, np.maximum(y, 0) (the Relu op's) last: zeros,
    -0.0 and NaN among the values."""
    from edgetrain.kernels import rescale
    from edgetrain.kernels.threads import SMALL_ELEMENTS

    rng = np.random.default_rng(seed)
    acc = rng.integers(-2 ** 31, 2 ** 31, (cols, rows) if transposed else (rows, cols), dtype=np.int64)
    acc[rng.random(acc.shape) < 0.1] = 0
    acc = acc.astype(np.int32).T if transposed else acc.astype(np.int32)
    scale = rng.uniform(1e-6, 3.0, cols if per_col else 1).astype(dtype)
    if per_col and cols > 2:
        scale[:3] = (-0.5, 0.0, np.nan)  # a zero scale makes -0.0 of negative codes; NaN stays NaN
    bias = rng.standard_normal(cols).astype(dtype) if biased else None
    if biased and cols > 1:
        bias[1] = -0.0
    if cast_first:
        want = acc.astype(dtype) * scale.reshape(1, -1)
    else:
        want = (acc.astype(np.float64) * scale.astype(np.float64).reshape(1, -1)).astype(dtype)
    if biased:
        want = want + bias
    if relu:
        want = np.maximum(want, 0).astype(dtype, copy=False)
    want = np.ascontiguousarray(want)
    empty = np.empty(0, dtype)
    for small in (SMALL_ELEMENTS, 0):  # the serial branch, then the parallel one
        out = np.empty(acc.shape, dtype)
        rescale._rescale_matrix(acc, scale, empty if bias is None else bias, out, cast_first, relu, transposed, small)
        assert np.array_equal(out.view(np.uint8), want.view(np.uint8))
    got = rescale.rescale_matrix(acc, scale if per_col else scale[0], dtype, cast_first, bias=bias, relu=relu)
    assert got.flags.c_contiguous and np.array_equal(got.view(np.uint8), want.view(np.uint8))


def test_scratch_sets_follow_their_slabs():
    """A kept set of scratch views is handed out again only while no slab has grown: after one grows, a set
    that shared it gets views of the new slab (the old one neither written nor kept alive)."""
    from edgetrain.kernels.vnni_backend import _Scratch

    sc = _Scratch()
    def specs(n):
        return [("a", (2, n), np.uint8), ("b", (n,), np.int32)]

    first = sc.get_set(("small",), lambda: specs(3))
    assert sc.get_set(("small",), lambda: pytest.fail("kept set rebuilt")) is first
    assert [a.shape for a in first] == [(2, 3), (3,)]
    big = sc.get_set(("big",), lambda: specs(50))  # grows both slabs
    again = sc.get_set(("small",), lambda: specs(3))
    assert again is not first and [a.shape for a in again] == [(2, 3), (3,)]
    assert np.shares_memory(again[0], big[0]) and not np.shares_memory(again[0], first[0])
    for k in range(_Scratch.MAX_SETS + 1):  # bounded: programs evicted from their caches leave no keys behind
        sc.get_set((k,), lambda: specs(3))
    assert len(sc._sets) <= _Scratch.MAX_SETS
