"""kernels.lanes: the fixed lane order of long float sums, against a plain-Python statement of that order."""
import numpy as np
import pytest
from numba import njit

from edgetrain.kernels import lanes


def _rows_lane_sum(rows: list[list[float]]) -> float:
    """The documented order in Python floats: each row's term j into lane j % LANES, rows in turn into
    the same lanes (BatchNorm's samples of one channel), then the lanes added pairwise."""
    acc = [0.0] * lanes.LANES
    for row in rows:
        for j, t in enumerate(row):
            acc[j % lanes.LANES] += t
    width = lanes.LANES
    while width > 1:
        width //= 2
        for q in range(width):
            acc[q] = acc[q] + acc[q + width]
    return acc[0]


def _lane_order_sum(terms: list[float]) -> float:
    """One row's sum in the lane order."""
    return _rows_lane_sum([terms])


@njit
def _sum(row):
    return lanes.sum_row(row, row.size)


@njit
def _dot(a, b):
    return lanes.dot_row(a, b, a.size)


@pytest.mark.parametrize("length", [1, 63, 64, 65, 1000, 4099])
def test_sum_and_dot_follow_the_lane_order_bit_for_bit(length):
    rng = np.random.default_rng(length)
    a = (rng.standard_normal(length) * rng.choice([1e-3, 1.0, 1e4], length)).astype(np.float32)
    b = rng.standard_normal(length).astype(np.float32)
    assert _sum(a) == _lane_order_sum([float(v) for v in a])
    assert _dot(a, b) == _lane_order_sum([float(x) * float(y) for x, y in zip(a, b)])  # float32 products exact
    assert abs(_sum(a) - float(np.sum(a.astype(np.float64)))) <= 1e-9 * float(np.abs(a).sum())


# Rows of 1, 5, 16 and 20 values reach fewer lanes than LANES (combine_span skips the empty ones' levels).
@pytest.mark.parametrize("length", [1, 5, 16, 20, 64, 100])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("runs", [0, 1, 3])  # the parallel kernels' runs of channels (0: serial kernels)
def test_batchnorm_sums_follow_the_lane_order_bit_for_bit(length, relu, runs):
    from edgetrain.ops import norm_kernels

    rng = np.random.default_rng(length)
    n, c = 3, 4
    x = rng.standard_normal((n, c, length)).astype(np.float32)
    x[:, 1] = -0.0  # a channel of negative zeros: its sums are +0.0 in every lane order
    g = rng.standard_normal((n, c, length)).astype(np.float32)
    scale, bias = rng.standard_normal(c), rng.standard_normal(c)
    y = np.empty_like(x)
    mean, var, inv = np.empty(c), np.empty(c), np.empty(c)
    dx, dscale, dbias = np.empty_like(x), np.empty(c), np.empty(c)
    if runs:
        norm_kernels.bn_train_forward_parallel(x, scale, bias, 1e-5, y, mean, var, inv, relu, np.inf, runs)
        norm_kernels.bn_train_backward_parallel(x, g, relu, scale, bias, mean, inv, dx, dscale, dbias, np.inf, runs)
    else:
        norm_kernels.bn_train_forward(x, scale, bias, 1e-5, y, mean, var, inv, relu)
        norm_kernels.bn_train_backward(x, g, relu, scale, bias, mean, inv, dx, dscale, dbias)
    for ch in range(c):
        rows = [[float(v) for v in x[i, ch]] for i in range(n)]
        assert mean[ch] == _rows_lane_sum(rows) / (n * length)
        assert np.signbit(mean[ch]) == np.signbit(_rows_lane_sum(rows))
        gm = [[float(gv) if (not relu or yv > 0) else 0.0 for gv, yv in zip(g[i, ch], y[i, ch])] for i in range(n)]
        assert dbias[ch] == _rows_lane_sum(gm)
        m = float(mean[ch])
        assert dscale[ch] == _rows_lane_sum([[gv * (float(xv) - m) for gv, xv in zip(gr, x[i, ch])]
                                             for i, gr in enumerate(gm)]) * float(inv[ch])
