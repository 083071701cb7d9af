"""The depthwise conv kernels (kernels/depthwise.py) against test_kernels' NumPy int64 references, bit for bit:
forward, input gradient and weight gradient over random strides, pads (beyond the kernel too), dilations,
kernel sizes and bit-widths, fused rescaling, and thread counts."""
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kernels import (
    assert_exact,
    qmax,
    random_operand,
    ref_conv_backward_data,
    ref_conv_backward_weight,
    ref_conv_forward,
)

from edgetrain import kernels
from edgetrain.kernels import depthwise, threads


@pytest.fixture(autouse=True, params=["numba", "default"])
def route(request):
    """Every test on the numba backend and on the default route (which hands depthwise convs to numba)."""
    previous = kernels.get_backend().name
    if request.param == "numba":
        kernels.set_backend("numba")
    try:
        yield request.param
    finally:
        kernels.set_backend(previous)


def _out(size, lo, hi, k, stride, dil):
    return (size + lo + hi - dil * (k - 1) - 1) // stride + 1


@st.composite
def depthwise_cases(draw):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pads = tuple(draw(st.integers(0, 4)) for _ in range(4))
    h_min = max(1, dh * (kh - 1) + 1 - pads[0] - pads[2])  # the dilated kernel must fit the padded input
    h = draw(st.integers(h_min, h_min + 10))
    w_min = max(1, dw * (kw - 1) + 1 - pads[1] - pads[3])
    w = draw(st.integers(w_min, w_min + 10))
    n, c = draw(st.integers(1, 3)), draw(st.integers(2, 5))
    bits_x, bits_w, bits_g = draw(st.integers(2, 16)), draw(st.integers(2, 16)), draw(st.integers(2, 16))
    extreme = draw(st.booleans())
    return (n, c, h, w), (c, 1, kh, kw), dict(stride=(sh, sw), pads=pads, dilation=(dh, dw), groups=c), \
        (bits_x, bits_w, bits_g), extreme, draw(st.integers(0, 2 ** 32 - 1))


def _operands(x_shape, w_shape, kw, bits, extreme, seed):
    rng = np.random.default_rng(seed)
    bits_x, bits_w, bits_g = bits
    x = random_operand(rng, x_shape, bits_x, signed=bits_x % 2 == 1)
    w = random_operand(rng, w_shape, bits_w)
    y = (x_shape[0], x_shape[1], _out(x_shape[2], kw["pads"][0], kw["pads"][2], w_shape[2], kw["stride"][0],
                                      kw["dilation"][0]),
         _out(x_shape[3], kw["pads"][1], kw["pads"][3], w_shape[3], kw["stride"][1], kw["dilation"][1]))
    dy = random_operand(rng, y, bits_g)
    if extreme:  # every value at its largest magnitude, signs alternating by channel for the gradient
        x[...] = qmax(bits_x, signed=bits_x % 2 == 1)
        w[...] = -qmax(bits_w)
        dy[...] = qmax(bits_g)
        dy[:, ::2] = -qmax(bits_g)
    return x, w, dy


def _check(x, w, dy, kw):
    args = (kw["stride"], kw["pads"], kw["dilation"], kw["groups"])
    assert_exact(kernels.conv2d_forward(x, w, **kw), ref_conv_forward(x, w, *args))
    assert_exact(kernels.conv2d_backward_data(dy, w, x.shape, **kw), ref_conv_backward_data(dy, w, x.shape, *args))
    assert_exact(kernels.conv2d_backward_weight(dy, x, w.shape, **kw), ref_conv_backward_weight(dy, x, w.shape, *args))


@settings(max_examples=50, deadline=None)
@given(depthwise_cases())
def test_random_depthwise_convs_are_exact(case):
    """Each case on both plane paths: the stride-phase kernels and the channels-last loops for small planes."""
    x_shape, w_shape, kw, bits, extreme, seed = case
    before = depthwise.SMALL_PLANE_MAX
    try:
        for small_max in (0, 10 ** 9):
            depthwise.SMALL_PLANE_MAX = small_max
            _check(*_operands(x_shape, w_shape, kw, bits, extreme, seed), kw)
    finally:
        depthwise.SMALL_PLANE_MAX = before


@pytest.mark.parametrize("shape,stride,pads,dilation", [
    ((8, 48, 32, 32), 1, (1, 1, 1, 1), 1),  # MobileNetV2-0.35's shapes at batch 8
    ((8, 48, 32, 32), 2, (1, 1, 1, 1), 1),
    ((2, 7, 8, 8), 1, (2, 2, 2, 2), 2),
    ((2, 3, 4, 4), 1, (3, 0, 0, 3), 1),  # padding beyond the kernel's reach
])
def test_model_shapes_and_worst_cases(shape, stride, pads, dilation):
    kw = dict(stride=(stride, stride), pads=pads, dilation=(dilation, dilation), groups=shape[1])
    rng = np.random.default_rng(1)
    x = random_operand(rng, shape, 8, signed=False)
    w = random_operand(rng, (shape[1], 1, 3, 3), 8)
    y = ref_conv_forward(x, w, (stride, stride), pads, (dilation, dilation), shape[1])
    _check(x, w, random_operand(rng, y.shape, 8), kw)
    # 16-bit codes: int64 accumulators, and weight-gradient runs of 2 terms (segment_length at 32767^2)
    x16 = np.full(shape, 32767, np.int16)
    w16 = np.full((shape[1], 1, 3, 3), -32767, np.int16)
    _check(x16, w16, np.full(y.shape, 32767, np.int16), kw)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [17, 3], ids=["phases", "small"])
def test_fused_rescale_gives_the_rescaled_exact_integers(per_image, dtype, stride, size):
    """One rounding of the exact integer times the scale: the bits `rescale.rescaled` gives afterwards."""
    from edgetrain.kernels.rescale import rescaled
    rng = np.random.default_rng(5)
    x = random_operand(rng, (3, 6, size, size), 8, signed=False)
    w = random_operand(rng, (6, 1, 3, 3), 8)
    x[0] = 255
    kw = dict(stride=stride, pads=(1, 1, 1, 1), groups=6)
    y_int = kernels.conv2d_forward(x, w, **kw)
    scale = rng.uniform(1e-4, 3.0, (3, 6) if per_image else 6).astype(dtype)
    y = kernels.conv2d_forward(x, w, **kw, bounds=(255, 127), rescale=(scale, np.dtype(dtype)))
    assert y.dtype == dtype and y.flags.c_contiguous
    np.testing.assert_array_equal(y, rescaled(y_int, (scale, np.dtype(dtype))))
    dy = random_operand(rng, y.shape, 8)
    dx_int = kernels.conv2d_backward_data(dy, w, x.shape, **kw)
    dx = kernels.conv2d_backward_data(dy, w, x.shape, **kw, bounds=(127, 127), rescale=(scale, np.dtype(dtype)))
    np.testing.assert_array_equal(dx, rescaled(dx_int, (scale, np.dtype(dtype))))


def test_depthwise_convs_take_the_depthwise_kernels(monkeypatch):
    calls = []
    for name in ("planes", "planes_scaled", "backward_weight", "small_planes", "small_backward_weight"):
        original = getattr(depthwise, name)
        monkeypatch.setattr(depthwise, name, lambda *a, _o=original, _n=name: (calls.append(_n), _o(*a))[1])
    rng = np.random.default_rng(2)
    x = random_operand(rng, (2, 4, 12, 12), 8, signed=False)  # 144 outputs a plane: above SMALL_PLANE_MAX
    w = random_operand(rng, (4, 1, 3, 3), 8)
    dy = random_operand(rng, (2, 4, 12, 12), 8)
    kw = dict(pads=(1, 1, 1, 1), groups=4)
    kernels.conv2d_forward(x, w, **kw)
    kernels.conv2d_backward_data(dy, w, x.shape, **kw)
    kernels.conv2d_backward_weight(dy, x, w.shape, **kw)
    assert calls == ["planes", "planes", "backward_weight"]
    calls.clear()
    strided = dict(kw, stride=2)  # strided too: the stride phases, weight gradient included
    x20 = random_operand(rng, (2, 4, 20, 20), 8, signed=False)
    dy10 = random_operand(rng, (2, 4, 10, 10), 8)
    kernels.conv2d_forward(x20, w, **strided)
    kernels.conv2d_backward_data(dy10, w, x20.shape, **strided)
    kernels.conv2d_backward_weight(dy10, x20, w.shape, **strided)
    assert calls == ["planes", "planes", "backward_weight"]
    calls.clear()
    # planes of at most SMALL_PLANE_MAX outputs (here 6x6 and 3x3): channels-last
    for args, g in ((kw, dy[:, :, :6, :6]), (strided, dy[:, :, :3, :3])):
        kernels.conv2d_forward(x[:, :, :6, :6], w, **args)
        kernels.conv2d_backward_data(g, w, (2, 4, 6, 6), **args)
        kernels.conv2d_backward_weight(g, x[:, :, :6, :6], w.shape, **args)
        assert calls == ["small_planes", "small_planes", "small_backward_weight"]
        calls.clear()
    kernels.conv2d_forward(x, np.concatenate([w, w]), **kw)  # a depth multiplier of 2: the general kernels
    assert calls == []


def test_results_do_not_depend_on_thread_count(monkeypatch):
    monkeypatch.setattr(threads, "SMALL_WORK", 0)  # the parallel path even at these sizes
    rng = np.random.default_rng(9)
    x = random_operand(rng, (5, 9, 11, 11), 8, signed=False)
    w = random_operand(rng, (9, 1, 3, 3), 8)
    runs = []
    before = numba.get_num_threads()
    try:
        for n_threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n_threads)
            for stride in (1, 2):
                kw = dict(stride=stride, pads=(1, 1, 1, 1), groups=9)
                dy = random_operand(np.random.default_rng(stride), (5, 9, 11 // stride + (stride == 2), 11 // stride
                                                                   + (stride == 2)), 8)
                runs.append((kernels.conv2d_forward(x, w, **kw), kernels.conv2d_backward_data(dy, w, x.shape, **kw),
                             kernels.conv2d_backward_weight(dy, x, w.shape, **kw)))
    finally:
        numba.set_num_threads(before)
    half = len(runs) // 2
    for a, b in zip(runs[:half], runs[half:], strict=True):
        for u, v in zip(a, b, strict=True):
            np.testing.assert_array_equal(u, v)
