"""The stride-1 planar conv kernels (kernels/planar.py) against test_kernels' NumPy int64 references, bit
for bit: forward and input gradient over pads, dilations and kernel shapes, 2-16 bits, the int8 codes
shifted to uint8 (and the bound that keeps them unshifted), fused rescaling, routing and thread counts."""
import numba
import numpy as np
import pytest
from test_kernels import assert_exact, qmax, random_operand, ref_conv_backward_data, ref_conv_forward

from edgetrain import kernels
from edgetrain.kernels import planar, threads
from edgetrain.kernels.geometry import conv2d_geometry
from edgetrain.kernels.rescale import rescaled


@pytest.fixture(autouse=True)
def numba_route(monkeypatch):
    from edgetrain.kernels.numba_backend import NumbaBackend
    monkeypatch.setattr(NumbaBackend, "PLANAR_MIN_PIXELS", 1)  # the small test shapes take the kernel too
    previous = kernels.set_backend("numba")
    try:
        yield
    finally:
        kernels.set_backend(previous)


CASES = [((2, 3, 7, 6), (5, 3, 3, 3), (1, 1, 1, 1), (1, 1)),
         ((1, 2, 9, 9), (3, 2, 3, 3), (2, 1, 0, 2), (2, 2)),
         ((2, 4, 5, 5), (6, 4, 2, 2), (1, 0, 0, 1), (1, 1)),
         ((1, 2, 6, 7), (4, 2, 3, 2), (0, 0, 0, 0), (1, 3)),
         ((1, 2, 4, 4), (3, 2, 2, 2), (3, 2, 2, 3), (1, 1)),  # pads beyond the kernel: backward not taken
         ((2, 3, 40, 35), (5, 3, 3, 3), (1, 1, 1, 1), (1, 1))]  # more rows than one accumulator tile


def _check(x, w, dy, pads, dil):
    kw = dict(stride=1, pads=pads, dilation=dil, groups=1)
    args = ((1, 1), pads, dil, 1)
    assert_exact(kernels.conv2d_forward(x, w, **kw), ref_conv_forward(x, w, *args))
    assert_exact(kernels.conv2d_backward_data(dy, w, x.shape, **kw), ref_conv_backward_data(dy, w, x.shape, *args))


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("bits", [2, 7, 8, 12, 16])
def test_planar_convs_are_exact(case, bits):
    x_shape, w_shape, pads, dil = CASES[case]
    rng = np.random.default_rng(case * 31 + bits)
    x = random_operand(rng, x_shape, bits, signed=bits % 2 == 1)
    w = random_operand(rng, w_shape, bits)
    y = ref_conv_forward(x, w, (1, 1), pads, dil, 1)
    dy = random_operand(rng, y.shape, bits)
    _check(x, w, dy, pads, dil)
    x[...] = qmax(bits, signed=bits % 2 == 1)
    w[...] = -qmax(bits)
    dy[...] = -qmax(bits)
    dy.flat[::3] = qmax(bits)
    _check(x, w, dy, pads, dil)


def test_int8_shift_only_within_the_int32_bound():
    """int8 dy at -127 everywhere with weights at 127: K * 255 * 127 beyond int32 keeps the codes as they
    are (an int32 accumulator), and the result stays exact either way."""
    k = 8000
    dy = np.full((1, k, 5, 5), -127, np.int8)
    w = np.full((k, 2, 3, 3), 127, np.int8)
    assert k * 9 * 255 * 127 > np.iinfo(np.int32).max >= k * 9 * 127 * 127
    _check(np.zeros((1, 2, 5, 5), np.uint8), w, dy, (1, 1, 1, 1), (1, 1))


def test_routing(monkeypatch):
    calls = []
    original = planar.conv_planes
    monkeypatch.setattr(planar, "conv_planes", lambda *a: (calls.append(1), original(*a))[1])
    rng = np.random.default_rng(2)
    x = random_operand(rng, (2, 3, 8, 8), 8, signed=False)
    w = random_operand(rng, (4, 3, 3, 3), 8)
    kernels.conv2d_forward(x, w, pads=(1, 1, 1, 1))
    assert len(calls) == 1
    kernels.conv2d_forward(x, w, pads=(1, 1, 1, 1), stride=2)  # strided: the GEMM-form kernel
    assert len(calls) == 1
    assert not planar.takes(conv2d_geometry((1, 2, 4, 4), (3, 2, 2, 2), 1, (3, 2, 2, 3)), True)


def test_fused_rescale_and_thread_counts(monkeypatch):
    monkeypatch.setattr(threads, "SMALL_WORK", 0)
    rng = np.random.default_rng(9)
    x = random_operand(rng, (5, 6, 11, 11), 8, signed=False)
    w = random_operand(rng, (7, 6, 3, 3), 8)
    dy = random_operand(rng, (5, 7, 11, 11), 8)
    scale = rng.uniform(1e-4, 3.0, (5, 7)).astype(np.float32)
    scale_x = rng.uniform(1e-4, 3.0, 6).astype(np.float32)
    kw = dict(pads=(1, 1, 1, 1))
    runs = []
    before = numba.get_num_threads()
    try:
        for n_threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n_threads)
            y = kernels.conv2d_forward(x, w, **kw)
            dx = kernels.conv2d_backward_data(dy, w, x.shape, **kw)
            ys = kernels.conv2d_forward(x, w, **kw, bounds=(255, 127), rescale=(scale, np.dtype(np.float32)))
            dxs = kernels.conv2d_backward_data(dy, w, x.shape, **kw, bounds=(127, 127),
                                               rescale=(scale_x, np.dtype(np.float32)))
            np.testing.assert_array_equal(ys, rescaled(y, (scale, np.dtype(np.float32))))
            np.testing.assert_array_equal(dxs, rescaled(dx, (scale_x, np.dtype(np.float32))))
            runs.append((y, dx, ys, dxs))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(runs[0], runs[-1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_int8_codes_with_zero_weight_sums_keep_padding_at_zero():
    """Rows of weights summing to 0 give a zero correction; the shifted padding must still encode 0."""
    rng = np.random.default_rng(4)
    dy = random_operand(rng, (2, 4, 6, 6), 8)
    w = np.zeros((4, 3, 3, 3), np.int8)
    w[:, :, 0, 0], w[:, :, 2, 2] = 5, -5
    _check(random_operand(rng, (2, 3, 6, 6), 8, signed=False), w, dy, (1, 1, 1, 1), (1, 1))
