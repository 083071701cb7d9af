"""BatchNorm's running-statistics update in one compiled call (`norm_kernels.running_stats`) against NumPy's own
expressions (`mean * m + mu.astype(t) * (1 - m)`, the variance with the unbiased factor): the same bits, for
float32 and float64 statistics, every momentum, and NaN, infinities, subnormals and huge values."""
import numpy as np
import pytest

from edgetrain.ops import norm_kernels
from edgetrain.ops.norm import _running_stats


def _numpy_form(mean, var, mu, bvar, momentum, factor):
    m = np.asarray(momentum, dtype=mean.dtype)
    unbiased = bvar if factor == 1.0 else bvar * factor
    with np.errstate(over="ignore", invalid="ignore"):  # the infinities and NaNs below are meant
        return mean * m + mu.astype(mean.dtype) * (1 - m), var * m + unbiased.astype(var.dtype) * (1 - m)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.9, 0.1, 0.99, 0.97, 0.5, 0.0, 1.0, float(np.float32(0.9))])
@pytest.mark.parametrize("factor", [1.0, 8 / 7, 8192 / 8191])
def test_running_stats_are_numpys_bits(dtype, momentum, factor):
    rng = np.random.default_rng(int(momentum * 1000) + int(factor * 10))
    c = 301
    mean = (rng.standard_normal(c) * 10.0 ** rng.integers(-8, 8, c)).astype(dtype)
    var = np.abs(rng.standard_normal(c) * 10.0 ** rng.integers(-8, 8, c)).astype(dtype)
    mu = rng.standard_normal(c) * 10.0 ** rng.integers(-40, 40, c)  # float64: some round to 0 or inf in float32
    bvar = np.abs(rng.standard_normal(c)) * 10.0 ** rng.integers(-40, 40, c)
    mean[:4] = [np.nan, np.inf, -np.inf, np.finfo(dtype).tiny / 4]
    mu[4:8] = [np.nan, -np.inf, 1e300, -0.0]
    var[8], bvar[9] = np.inf, np.nan
    new_mean, new_var = np.empty_like(mean), np.empty_like(var)
    norm_kernels.running_stats(mean, var, mu, bvar, momentum, factor, new_mean, new_var)
    want_mean, want_var = _numpy_form(mean, var, mu, bvar, momentum, factor)
    for got, want in ((new_mean, want_mean), (new_var, want_var)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    # the op's helper takes the compiled call here, and NumPy's form for other types (float16)
    for got, want in zip(_running_stats(mean, var, mu, bvar, momentum, factor), (want_mean, want_var)):
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    with np.errstate(over="ignore", invalid="ignore"):
        mean16, var16 = mean.astype(np.float16), var.astype(np.float16)
        half = _running_stats(mean16, var16, mu, bvar, momentum, factor)
    for got, want in zip(half, _numpy_form(mean16, var16, mu, bvar, momentum, factor)):
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
