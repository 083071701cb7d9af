"""The integer kernels against plain NumPy int64 references, bit for bit.

The references below are written independently of edgetrain.kernels (int64 matmul and per-tap
einsum/scatter loops over a zero-padded input), so an error in the kernels' packing, phase
decomposition or accumulator choice cannot cancel out.
"""
import numpy as np
import pytest

from edgetrain import kernels
from edgetrain.graph import Node
from edgetrain.kernels.bounds import INT32_MAX, accumulator_dtype, segment_length
from edgetrain.ops.conv import Conv

BITS = list(range(2, 17))


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
    "stride_asym_pad": ((2, 3, 9, 8), (4, 3, 3, 2), (2, 3), (0, 1, 2, 1), (1, 1), 1),
    "dilation": ((1, 2, 9, 9), (3, 2, 3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1),
    "dilation_stride": ((2, 2, 11, 10), (3, 2, 3, 2), (2, 2), (1, 0, 2, 1), (2, 3), 1),
    "groups": ((2, 4, 6, 6), (6, 2, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),
    "depthwise_stride": ((2, 4, 7, 7), (4, 1, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 4),
    "depthwise_multiplier": ((1, 3, 6, 6), (6, 1, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3),
    "pointwise_stride2": ((2, 5, 7, 7), (3, 5, 1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),
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
    (y_float,), ctx = op.forward([x.astype(np.float64), w.astype(np.float64)], True)
    y = kernels.conv2d_forward(x, w, **kw)
    assert y.shape == y_float.shape
    np.testing.assert_array_equal(y.astype(np.float64), y_float)
    dy = random_operand(rng, y.shape, 8)
    dx_float, dw_float = op.backward(ctx, [dy.astype(np.float64)])
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
