"""Clip's one-pass kernel (norm_kernels.clip_forward, relu_backward on its mask) against numpy's formula: values, the
gradient mask (no gradient on a bound itself), NaN, one-sided bounds, float64, non-contiguous input."""
import numpy as np
import pytest

from edgetrain.ops.elementwise import Clip


def _reference(x, lo, hi, g):
    y = x
    keep = np.ones(x.shape, bool)
    if lo is not None:
        y = np.maximum(y, lo.astype(x.dtype))
        keep &= x > lo
    if hi is not None:
        y = np.minimum(y, hi.astype(x.dtype))
        keep &= x < hi
    return y, np.where(keep, g, 0).astype(g.dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bounds", [(0.0, 6.0), (0.0, None), (None, 6.0), (-1.5, 2.25)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_clip_matches_numpy(dtype, bounds, contiguous):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 6, 5, 5)) * 5).astype(dtype)
    x.flat[:6] = [0.0, 6.0, -1.5, 2.25, np.nan, -0.0]
    if not contiguous:
        x = x.transpose(0, 2, 1, 3)
    lo, hi = (None if b is None else np.array(b, np.float32) for b in bounds)
    op = Clip.__new__(Clip)
    (y,), keep = op.forward([x, lo] if hi is None else [x, lo, hi], None)  # an absent min arrives as None
    g = rng.standard_normal(x.shape).astype(dtype)
    want_y, want_g = _reference(x, lo, hi, g)
    np.testing.assert_array_equal(y, want_y)
    assert y.dtype == dtype
    np.testing.assert_array_equal(op.backward(keep, [g], [True])[0], want_g)
