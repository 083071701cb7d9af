"""kernels.lanes: the fixed lane order of long float sums, against a plain-Python statement of that order."""
import numpy as np
import pytest
from numba import njit

from edgetrain.kernels import lanes


def _lane_order_sum(terms: list[float]) -> float:
    """The documented order in Python floats: term j into lane j % LANES, lanes added pairwise."""
    acc = [0.0] * lanes.LANES
    for j, t in enumerate(terms):
        acc[j % lanes.LANES] += t
    width = lanes.LANES
    while width > 1:
        width //= 2
        for q in range(width):
            acc[q] = acc[q] + acc[q + width]
    return acc[0]


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
