"""The pointwise conv kernels (kernels/pointwise.py) against test_kernels' NumPy int64 references, bit for
bit: forward and input gradient over channel counts with leftover rows, pixel counts across tiles,
2-16 bits and extreme values, fused rescaling, routing and thread counts."""
import numba
import numpy as np
import pytest
from test_kernels import assert_exact, qmax, random_operand, ref_conv_backward_data, ref_conv_forward

from edgetrain import kernels
from edgetrain.kernels import pointwise, threads
from edgetrain.kernels.rescale import rescaled

KW = dict(stride=1, pads=(0, 0, 0, 0), dilation=1, groups=1)
REF = ((1, 1), (0, 0, 0, 0), (1, 1), 1)


@pytest.fixture(autouse=True)
def numba_route():
    previous = kernels.set_backend("numba")
    try:
        yield
    finally:
        kernels.set_backend(previous)


def _check(x, w, dy):
    assert_exact(kernels.conv2d_forward(x, w, **KW), ref_conv_forward(x, w, *REF))
    assert_exact(kernels.conv2d_backward_data(dy, w, x.shape, **KW), ref_conv_backward_data(dy, w, x.shape, *REF))


@pytest.mark.parametrize("n,c,h,w,m", [(2, 8, 8, 8, 48), (1, 5, 9, 9, 7), (2, 3, 40, 33, 6), (3, 17, 8, 10, 1),
                                       (1, 1, 8, 8, 5)])
@pytest.mark.parametrize("bits", [2, 8, 12, 16])
def test_pointwise_convs_are_exact(n, c, h, w, m, bits):
    rng = np.random.default_rng(n * 100 + c + bits)
    x = random_operand(rng, (n, c, h, w), bits, signed=bits % 8 != 0)
    wt = random_operand(rng, (m, c, 1, 1), bits)
    dy = random_operand(rng, (n, m, h, w), bits)
    _check(x, wt, dy)
    x[...] = qmax(bits, signed=bits % 8 != 0)  # every product at its largest magnitude: int64 at 16 bits
    wt[...] = -qmax(bits)
    dy[...] = qmax(bits)
    _check(x, wt, dy)


@pytest.mark.parametrize("per_image", [False, True])
def test_fused_rescale_gives_the_rescaled_exact_integers(per_image):
    rng = np.random.default_rng(3)
    x = random_operand(rng, (3, 6, 9, 9), 8, signed=False)
    w = random_operand(rng, (10, 6, 1, 1), 8)
    scale = rng.uniform(1e-4, 3.0, (3, 10) if per_image else 10).astype(np.float32)
    y = kernels.conv2d_forward(x, w, **KW, bounds=(255, 127), rescale=(scale, np.dtype(np.float32)))
    np.testing.assert_array_equal(y, rescaled(kernels.conv2d_forward(x, w, **KW), (scale, np.dtype(np.float32))))
    dy = random_operand(rng, y.shape, 8)
    scale_x = rng.uniform(1e-4, 3.0, (3, 6) if per_image else 6).astype(np.float32)
    dx = kernels.conv2d_backward_data(dy, w, x.shape, **KW, bounds=(127, 127), rescale=(scale_x, np.dtype(np.float32)))
    np.testing.assert_array_equal(dx, rescaled(kernels.conv2d_backward_data(dy, w, x.shape, **KW),
                                               (scale_x, np.dtype(np.float32))))


def test_routing(monkeypatch):
    calls = []
    for name in ("gemm_planes", "gemm_planes_scaled"):
        original = getattr(pointwise, name)
        monkeypatch.setattr(pointwise, name, lambda *a, _o=original, _n=name: (calls.append(_n), _o(*a))[1])
    rng = np.random.default_rng(2)
    w = random_operand(rng, (4, 3, 1, 1), 8)
    kernels.conv2d_forward(random_operand(rng, (2, 3, 8, 8), 8), w, **KW)  # 64 pixels per image
    assert calls == ["gemm_planes"]
    calls.clear()
    kernels.conv2d_forward(random_operand(rng, (2, 3, 4, 4), 8), w, **KW)  # 16: the GEMM-form kernel
    kernels.conv2d_forward(random_operand(rng, (2, 3, 8, 8), 8), w, **dict(KW, stride=2))
    assert calls == []


def test_results_do_not_depend_on_thread_count(monkeypatch):
    monkeypatch.setattr(threads, "SMALL_WORK", 0)
    rng = np.random.default_rng(9)
    x = random_operand(rng, (5, 9, 11, 11), 8, signed=False)
    w = random_operand(rng, (13, 9, 1, 1), 8)
    dy = random_operand(rng, (5, 13, 11, 11), 8)
    runs = []
    before = numba.get_num_threads()
    try:
        for n_threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n_threads)
            runs.append((kernels.conv2d_forward(x, w, **KW), kernels.conv2d_backward_data(dy, w, x.shape, **KW)))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(runs[0], runs[-1], strict=True):
        np.testing.assert_array_equal(a, b)
