"""The compiled 2-D MaxPool against the NumPy form it replaces: the same values, argmax, indices and
gradient bits, on overlapping, padded, dilated and ceil-mode windows, with ties, signed zeros and NaN;
and a MaxPool with its Relu folded in (`MaxPool.relu`) against the Relu and the MaxPool as two ops."""
import numpy as np
import pytest

from edgetrain.graph import Node
from edgetrain.ops import pool_kernels
from edgetrain.ops.elementwise import Relu
from edgetrain.ops.pool import MaxPool, fuse_relu_pool

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
                m.setattr(pool_kernels, "compiled_case", lambda *a: False)
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_tiled_2x2_pool_is_the_numpy_form_bit_for_bit(dtype, relu, monkeypatch):
    """The windows tile the input (`tiles_2x2`: its gathered two-pass forward and row-wise backward), on
    many ties, signed zeros, NaN (first and later offsets) and infinities, with and without the folded Relu."""
    rng = np.random.default_rng(3)
    x = rng.integers(-3, 4, size=(3, 5, 8, 10)).astype(dtype) * dtype(0.5)
    x[0, 0, :2, :2] = [[-0.0, 0.0], [0.0, -0.0]]
    x[1, 2, 4, 5] = np.nan
    x[1, 2, 5, 4] = np.nan  # two NaNs in one window: the first in offset order wins
    x[1, 3, 0, 1] = np.nan
    x[2, 3, :4, :4] = -np.inf
    x[2, 4] = -0.0
    assert pool_kernels.tiles_2x2((2, 2), (2, 2), (1, 1), x.shape[2:], (4, 5))
    g = rng.standard_normal((3, 5, 4, 5)).astype(dtype)
    g.flat[::7] = -0.0
    if relu:
        (y, dx), (yf, dxf) = _relu_then_pool(dict(kernel_shape=[2, 2], strides=[2, 2]), x, g, False, monkeypatch)
        (_, _), (yc, dxc) = _relu_then_pool(dict(kernel_shape=[2, 2], strides=[2, 2]), x, g, True, monkeypatch)
        pairs = [(yc, y), (dxc, dx), (yf, y), (dxf, dx)]
    else:
        (outs_c, dx_c), (outs_n, dx_n) = _both(_op(dict(kernel_shape=[2, 2], strides=[2, 2]), indices=True), x, g,
                                                monkeypatch)
        pairs = list(zip(outs_c, outs_n)) + [(dx_c, dx_n)]
    for a, b in pairs:
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_large_input_takes_the_parallel_branch_with_the_same_bits(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 32, 48, 48)).astype(np.float32)
    assert x.size // 4 >= pool_kernels.PARALLEL_MIN_OUTPUTS  # outputs of the 3x3 stride-2 pool
    op = _op(dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    g = rng.standard_normal((4, 32, 24, 24)).astype(np.float32)
    (outs_c, dx_c), (outs_n, dx_n) = _both(op, x, g, monkeypatch)
    np.testing.assert_array_equal(outs_c[0], outs_n[0])
    np.testing.assert_array_equal(dx_c, dx_n)


def _relu_then_pool(attrs, x, g, compiled, monkeypatch):
    """Forward and backward of a Relu and a MaxPool as two ops, and as one fused MaxPool."""
    relu_node = Node("relu", "Relu", ["x"], ["r"], {})
    pool_node = Node("pool", "MaxPool", ["r"], ["y"], dict(attrs))
    relu, pool = Relu(relu_node, 17), MaxPool(pool_node, 17)
    fused_pool, stand_in = fuse_relu_pool(relu_node, pool_node, 17)
    with monkeypatch.context() as m:
        if not compiled:
            m.setattr(pool_kernels, "compiled_case", lambda *a: False)
        (r,), rctx = relu.forward([x], None)
        (y,), pctx = pool.forward([r], None)
        (dx,) = relu.backward(rctx, pool.backward(pctx, [g], [True]), [True])
        (passed,), _ = stand_in.forward([x], None)
        (yf,), fctx = fused_pool.forward([passed], None)
        (dxf,) = stand_in.backward(None, fused_pool.backward(fctx, [g], [True]), [True])
    return (y, dx), (yf, dxf)


@pytest.mark.parametrize("attrs", CASES)
@pytest.mark.parametrize("compiled", [True, False])
def test_relu_folded_into_maxpool_is_relu_then_maxpool_bit_for_bit(attrs, compiled, monkeypatch):
    rng = np.random.default_rng(len(str(attrs)) + 7)
    x = rng.integers(-3, 4, size=(3, 4, 9, 8)).astype(np.float32) * np.float32(0.5)
    x[0, 0, 1, 1] = -0.0
    x[0, 1, :4, :4] = -1.0  # windows with no positive value: no gradient either way
    x[2, 0] = -0.0  # a plane of -0.0: the Relu makes it +0.0 before any compare
    x[1, 2, 4, 4] = np.nan
    x[2, 3, :3, :3] = -np.inf
    shape = MaxPool(Node("p", "MaxPool", ["x"], ["y"], dict(attrs)), 17).forward([x], None)[0][0].shape
    g = rng.standard_normal(shape).astype(np.float32)
    g.flat[::7] = -0.0
    (y, dx), (yf, dxf) = _relu_then_pool(attrs, x, g, compiled, monkeypatch)
    np.testing.assert_array_equal(yf.view(np.uint8), y.view(np.uint8))
    np.testing.assert_array_equal(dxf.view(np.uint8), dx.view(np.uint8))
    assert not np.signbit(yf[~np.isnan(yf)]).any()


@pytest.mark.parametrize("attrs", [dict(kernel_shape=[2, 2], strides=[2, 2]),
                                   dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])])
def test_large_relu_pool_takes_the_parallel_branch_with_the_same_bits(attrs, monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 32, 48, 48)).astype(np.float32)
    assert x.size // 4 >= pool_kernels.PARALLEL_MIN_OUTPUTS
    g = rng.standard_normal((4, 32, 24, 24)).astype(np.float32)
    (y, dx), (yf, dxf) = _relu_then_pool(attrs, x, g, True, monkeypatch)
    (yn, dxn), _ = _relu_then_pool(attrs, x, g, False, monkeypatch)
    for a in (yf, y):
        np.testing.assert_array_equal(a, yn)
    for a in (dxf, dx):
        np.testing.assert_array_equal(a, dxn)


def test_a_pool_whose_indices_are_read_keeps_its_relu():
    relu_node = Node("relu", "Relu", ["x"], ["r"], {})
    pool_node = Node("pool", "MaxPool", ["r"], ["y", "i"], dict(kernel_shape=[2, 2]))
    assert fuse_relu_pool(relu_node, pool_node, 17) is None
