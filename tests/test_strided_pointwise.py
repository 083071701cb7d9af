"""A 1x1 conv with strides and no padding runs on the pixels it reads (`kernels.strided`): the copies against NumPy's
slicing, the sparse input gradient's sums in the executor against dense sums, and whole integer models against the
whole-map route."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import edgetrain
from edgetrain.engine import _Pending
from edgetrain.kernels.strided import Dilated, dense, dilate, subsample
from edgetrain.quant import mac, quantize


def _subsampled_like(rng, shape, strides, dtype):
    return subsample(rng.standard_normal(shape).astype(dtype), strides)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 11), st.integers(1, 11), st.integers(1, 4),
       st.integers(1, 4), st.sampled_from([np.float32, np.float64]), st.integers(0, 2 ** 31 - 1))
def test_copies_and_the_sparse_sum_are_numpys(n, c, h, w, sh, sw, dtype, seed):
    """subsample is x[:, :, ::sh, ::sw]; dilate puts it back with zeros between; add_into is the dense sum on the
    pixels it covers and leaves the rest as they were (NaN, -0.0 included)."""
    rng = np.random.default_rng(seed)
    shape, strides = (n, c, h, w), (sh, sw)
    x = rng.standard_normal(shape).astype(dtype)
    sub = subsample(x, strides)
    np.testing.assert_array_equal(sub, x[:, :, ::sh, ::sw])
    assert sub.flags.c_contiguous
    full = np.zeros(shape, dtype)
    full[:, :, ::sh, ::sw] = sub
    np.testing.assert_array_equal(dilate(sub, shape, strides), full)
    acc = rng.standard_normal(shape).astype(dtype)
    acc.reshape(-1)[:: 3] = -0.0
    acc.reshape(-1)[1:: 5] = np.nan
    want = acc.copy()
    want[:, :, ::sh, ::sw] += sub
    g = Dilated(sub, shape, strides)
    g.add_into(acc)
    np.testing.assert_array_equal(acc, want)
    assert np.array_equal(np.signbit(acc), np.signbit(want))  # unread pixels keep -0.0: nothing was added there
    np.testing.assert_array_equal(np.asarray(g), full)
    assert dense(g).shape == shape and dense(acc) is acc


def test_a_dilated_gradient_needs_the_subsampled_shape():
    with pytest.raises(ValueError, match="subsampled"):
        Dilated(np.zeros((1, 1, 2, 2)), (1, 1, 5, 5), (2, 2))
    with pytest.raises(ValueError, match="shape"):
        dilate(np.zeros((1, 1, 2, 2)), (1, 1, 5, 5), (2, 2))


@pytest.mark.parametrize("order", ["sparse first", "dense first", "both sparse", "sparse alone"])
def test_the_executor_sums_a_sparse_gradient_as_the_dense_one(order):
    """_Pending.add: whichever arrives first, the sum held is the dense sum (in place where it may write); a sparse
    gradient alone, or a leaf's, comes out as its full array; a seed or an array pending under another name is never
    written."""
    rng = np.random.default_rng(0)
    shape, strides = (2, 3, 7, 6), (2, 2)
    g1 = Dilated(_subsampled_like(rng, shape, strides, np.float32), shape, strides)
    g2 = Dilated(_subsampled_like(rng, shape, strides, np.float32), shape, strides)
    d = rng.standard_normal(shape).astype(np.float32)
    d_copy = d.copy()
    seed = rng.standard_normal(shape).astype(np.float32)
    pending = _Pending({"seed": seed.copy()})
    if order == "sparse first":
        pending.add("x", g1)
        pending.add("x", d)
        want = d_copy + np.asarray(g1)
    elif order == "dense first":
        pending.add("x", d)
        pending.add("x", g1)
        want = d_copy + np.asarray(g1)
    elif order == "both sparse":
        pending.add("x", g1)
        pending.add("x", g2)
        want = np.asarray(g1) + np.asarray(g2)
    else:
        pending.add("x", g1)
        want = np.asarray(g1)
    held = pending.final()["x"]
    assert type(held) is np.ndarray
    np.testing.assert_array_equal(held, want)
    np.testing.assert_array_equal(pending.pop("x"), want)
    # a seed is the caller's: summed into a new array
    pending.add("seed", g1)
    np.testing.assert_array_equal(pending.pop("seed"), seed + np.asarray(g1))
    # one array pending under two names (an Add's): the sparse sum goes into a copy
    pending.add("a", d_copy)
    pending.add("b", d_copy)
    keep = d_copy.copy()
    pending.add("a", g1)
    np.testing.assert_array_equal(pending.pop("b"), keep)
    np.testing.assert_array_equal(pending.pop("a"), keep + np.asarray(g1))


def _two_readers(conv_shape: tuple, one_d: bool = False):
    """x read by a 1x1 conv with strides (`conv_shape`'s weights) and by a 3x3 conv with the same output size: their
    sum is the output, so x's gradient is the sum of a sparse and a dense one."""
    rng = np.random.default_rng(5)
    m, c = conv_shape[:2]
    if one_d:
        nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="pointwise", strides=[2], kernel_shape=[1]),
                 helper.make_node("Conv", ["x", "w3"], ["b"], name="three", strides=[2], pads=[1, 1], kernel_shape=[3]),
                 helper.make_node("Add", ["a", "b"], ["y"], name="join")]
        w1, w3, x_shape, y_shape = (m, c, 1), (m, c, 3), [None, c, 9], [None, m, 5]
    else:
        nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="pointwise", strides=[2, 3], kernel_shape=[1, 1]),
                 helper.make_node("Conv", ["x", "w3"], ["b"], name="three", strides=[2, 3], pads=[1, 1, 1, 1],
                                  kernel_shape=[3, 3]),
                 helper.make_node("Add", ["a", "b"], ["y"], name="join")]
        w1, w3, x_shape, y_shape = (m, c, 1, 1), (m, c, 3, 3), [None, c, 9, 10], [None, m, 5, 4]
    inits = [numpy_helper.from_array(rng.standard_normal(w1).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(w3).astype(np.float32), "w3")]
    graph = helper.make_graph(nodes, "two_readers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _step(proto, x, dy, monkeypatch=None):
    model = edgetrain.load(proto, seed=3)
    model.set_precision("8/8", quantize_classifier=True)  # both convs feed the output
    model.step = 2
    env, tape = model.forward_train(x)
    grads = model.backward(tape, {"y": dy.copy()}, wrt={"x", "w1", "w3"})
    return model, env, tape, grads


@pytest.mark.parametrize("one_d", [False, True])
def test_a_strided_pointwise_conv_gives_the_whole_map_routes_bits(one_d, monkeypatch):
    """Where x's largest magnitude lies on a pixel the 1x1 conv reads, both routes quantise with one scale: the
    output and every gradient equal the whole-map route's bit for bit (that route is checked against a float64
    simulation in test_integer_engine). The codes are those of the pixels read, at their own range."""
    proto = _two_readers((4, 3), one_d)
    rng = np.random.default_rng(8)
    shape = (5, 3, 9) if one_d else (5, 3, 9, 10)
    x = rng.standard_normal(shape).astype(np.float32)
    x[(0, 1) + (0,) * (len(shape) - 2)] = 9.0  # read by the strided conv, and the tensor's largest
    dy = rng.standard_normal((5, 4, 5) if one_d else (5, 4, 5, 4)).astype(np.float32)
    model, env, tape, grads = _step(proto, x, dy)
    ctx = next(c for node, _, c in tape.entries if node.name == "pointwise")
    view = x.reshape(shape[:2] + (1,) + shape[2:]) if one_d else x
    sub = view[:, :, ::2, ::(2 if one_d else 3)]
    want = quantize(sub, 8, signed=True)
    np.testing.assert_array_equal(ctx.inputs[0].q, want.q)
    assert ctx.inputs[0].scale == want.scale
    monkeypatch.setattr(mac, "_pointwise_strides", lambda args, w_shape: None)
    _, ref_env, ref_tape, ref_grads = _step(proto, x, dy)
    assert next(c for node, _, c in ref_tape.entries if node.name == "pointwise").subsampled is None
    np.testing.assert_array_equal(env["y"], ref_env["y"])
    assert set(grads) == set(ref_grads) == {"x", "w1", "w3"}
    for name in grads:
        assert type(grads[name]) is np.ndarray
        np.testing.assert_array_equal(grads[name], ref_grads[name], err_msg=name)


def test_a_strided_pointwise_conv_quantises_the_pixels_it_reads():
    """Where the largest magnitude lies on a pixel it does not read, the strided conv's scale is that of the pixels
    it reads (the whole-map route would have taken the larger one)."""
    proto = _two_readers((4, 3))
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 3, 9, 10)).astype(np.float32)
    x[0, 0, 1, 1] = 50.0  # read by the 3x3 conv only
    _, env, tape, grads = _step(proto, x, np.ones((4, 4, 5, 4), np.float32))
    ctx = next(c for node, _, c in tape.entries if node.name == "pointwise")
    want = quantize(x[:, :, ::2, ::3], 8, signed=True)
    assert ctx.subsampled == ((4, 3, 9, 10), (2, 3)) and ctx.inputs[0].scale == want.scale
    np.testing.assert_array_equal(ctx.inputs[0].q, want.q)
    assert np.isfinite(grads["x"]).all() and grads["x"].shape == x.shape
