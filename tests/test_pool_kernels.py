"""The compiled 2-D MaxPool against the NumPy form it replaces: the same values, argmax, indices and
gradient bits, on overlapping, padded, dilated and ceil-mode windows, with ties, signed zeros and NaN."""
import numpy as np
import pytest

from edgetrain.graph import Node
from edgetrain.ops import pool_kernels
from edgetrain.ops.pool import MaxPool

CASES = [
    dict(kernel_shape=[2, 2], strides=[2, 2]),
    dict(kernel_shape=[2, 2], strides=[1, 1]),  # the 2x2 forward, overlapping: the general backward
    dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 0, 0, 1]),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[3, 3], strides=[1, 1], pads=[0, 1, 2, 0]),
    dict(kernel_shape=[2, 3], strides=[1, 2], dilations=[2, 1]),
    dict(kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 2], ceil_mode=1),
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, auto_pad="NOTSET"),
    dict(kernel_shape=[3, 2], strides=[2, 1], auto_pad="SAME_UPPER"),
]


def _op(attrs, indices=False):
    node = Node("pool", "MaxPool", ["x"], ["y", "i"] if indices else ["y"], dict(attrs))
    return MaxPool(node, 17)


def _both(op, x, g, monkeypatch):
    """Forward (outputs) and backward (dx) of op, once compiled and once in the NumPy form."""
    results = []
    for compiled in (True, False):
        with monkeypatch.context() as m:
            if not compiled:
                m.setattr(pool_kernels, "compiled_case", lambda a: False)
            outs, ctx = op.forward([x], None)
            dx = op.backward(ctx, [g.astype(outs[0].dtype)] + [None] * (len(outs) - 1), [True])[0]
            results.append((outs, dx))
    return results


@pytest.mark.parametrize("attrs", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_maxpool_is_the_numpy_form_bit_for_bit(attrs, dtype, monkeypatch):
    rng = np.random.default_rng(len(str(attrs)))
    # few distinct values: many ties, which the first-maximum rule must settle as NumPy does
    x = rng.integers(-3, 4, size=(3, 4, 9, 8)).astype(dtype) * dtype(0.5)
    x[0, 0, 1, 1] = -0.0
    x[1, 2, 4, 4] = np.nan
    x[2, 3, :3, :3] = -np.inf
    op = _op(attrs, indices=True)
    g = rng.standard_normal(op.forward([x], None)[0][0].shape)
    g.flat[::7] = -0.0  # a -0.0 gradient lands as +0.0 (0 + -0.0), in every form
    (outs_c, dx_c), (outs_n, dx_n) = _both(op, x, g, monkeypatch)
    for a, b in zip(outs_c, outs_n):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))  # bits: -0.0 and NaN too
    np.testing.assert_array_equal(dx_c.view(np.uint8), dx_n.view(np.uint8))


def test_large_input_takes_the_parallel_branch_with_the_same_bits(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 32, 48, 48)).astype(np.float32)
    assert x.size // 4 >= pool_kernels.PARALLEL_MIN_OUTPUTS  # outputs of the 3x3 stride-2 pool
    op = _op(dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    g = rng.standard_normal((4, 32, 24, 24)).astype(np.float32)
    (outs_c, dx_c), (outs_n, dx_n) = _both(op, x, g, monkeypatch)
    np.testing.assert_array_equal(outs_c[0], outs_n[0])
    np.testing.assert_array_equal(dx_c, dx_n)
