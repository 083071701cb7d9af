"""Every op's backward against central finite differences in float64 (relative error < 1e-6)."""
import numpy as np
import onnx
import pytest
from gradcheck import check_model_gradients
from onnx import TensorProto, helper, numpy_helper

import edgetrain

TOL = 1e-6


def single_op_model(op_type, inputs, params=(), consts=(), out_count=1, opset=17, **attrs):
    """A one-node model: `inputs` are (name, array) graph inputs, `params` trainable initializers,
    `consts` non-trainable initializers; "" in the order list means an omitted optional input."""
    order = [n for n, _ in inputs] + [n for n, _ in params] + [n for n, _ in consts]
    node_inputs = attrs.pop("node_inputs", order)
    node = helper.make_node(op_type, node_inputs, [f"y{i}" for i in range(out_count)], name="op", **attrs)
    g_inputs = [helper.make_tensor_value_info(n, TensorProto.DOUBLE, a.shape) for n, a in inputs]
    inits = [numpy_helper.from_array(a, n) for n, a in list(params) + list(consts)]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.DOUBLE, None) for i in range(out_count)]
    graph = helper.make_graph([node], "t", g_inputs, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)  # the checker wants output shapes declared
    return edgetrain.load(model, dtype=np.float64), {n: a for n, a in inputs}


R = np.random.default_rng(1234)


def rnd(*shape):
    return R.standard_normal(shape)


def away_from_zero(*shape, margin=0.05):
    """Random values at least `margin` from 0, so kinks (ReLU, Clip) are not straddled by the FD step."""
    x = rnd(*shape)
    return np.where(np.abs(x) < margin, np.sign(x + 1e-12) * margin, x)


CASES = {
    "conv2d": lambda: single_op_model("Conv", [("x", rnd(2, 3, 7, 7))], [("w", rnd(4, 3, 3, 3)), ("b", rnd(4))]),
    "conv2d_stride_pad": lambda: single_op_model("Conv", [("x", rnd(2, 3, 8, 8))], [("w", rnd(5, 3, 3, 3))],
                                                  strides=[2, 2], pads=[1, 1, 1, 1]),
    "conv2d_asym_pad_dilation": lambda: single_op_model("Conv", [("x", rnd(1, 2, 9, 8))], [("w", rnd(3, 2, 3, 2))],
                                                         pads=[0, 1, 2, 1], dilations=[2, 1]),
    "conv2d_groups": lambda: single_op_model("Conv", [("x", rnd(2, 4, 6, 6))], [("w", rnd(6, 2, 3, 3)), ("b", rnd(6))],
                                             group=2, pads=[1, 1, 1, 1]),
    "conv2d_depthwise": lambda: single_op_model("Conv", [("x", rnd(2, 4, 6, 6))], [("w", rnd(4, 1, 3, 3))],
                                                group=4, strides=[2, 2], pads=[1, 1, 1, 1]),
    "conv2d_same_upper": lambda: single_op_model("Conv", [("x", rnd(1, 2, 7, 7))], [("w", rnd(2, 2, 4, 4))],
                                                 auto_pad="SAME_UPPER", strides=[2, 2]),
    "conv1d": lambda: single_op_model("Conv", [("x", rnd(2, 3, 11))], [("w", rnd(4, 3, 3)), ("b", rnd(4))],
                                      pads=[1, 2]),
    "conv3d": lambda: single_op_model("Conv", [("x", rnd(1, 2, 4, 5, 5))], [("w", rnd(3, 2, 2, 3, 3))],
                                      strides=[1, 2, 2]),
    "gemm": lambda: single_op_model("Gemm", [("a", rnd(4, 5))], [("b", rnd(3, 5)), ("c", rnd(3))], transB=1),
    "gemm_transA_alpha_beta": lambda: single_op_model("Gemm", [("a", rnd(5, 4))], [("b", rnd(5, 3)), ("c", rnd(4, 3))],
                                                      transA=1, alpha=0.7, beta=1.3),
    "gemm_scalar_c": lambda: single_op_model("Gemm", [("a", rnd(4, 5)), ("c", rnd(1))], [("b", rnd(5, 3))],
                                             node_inputs=["a", "b", "c"]),
    "matmul_2d": lambda: single_op_model("MatMul", [("a", rnd(4, 5))], [("b", rnd(5, 3))]),
    "matmul_batched_broadcast": lambda: single_op_model("MatMul", [("a", rnd(2, 3, 4, 5))], [("b", rnd(5, 2))]),
    "matmul_1d_2d": lambda: single_op_model("MatMul", [("a", rnd(5)), ("b", rnd(2, 5, 3))]),
    "matmul_2d_1d": lambda: single_op_model("MatMul", [("a", rnd(4, 5)), ("b", rnd(5))]),
    "add_broadcast": lambda: single_op_model("Add", [("a", rnd(2, 3, 4, 4))], [("b", rnd(3, 1, 1))]),
    "sub_broadcast": lambda: single_op_model("Sub", [("a", rnd(4, 1)), ("b", rnd(3, 1, 5))]),
    "mul_broadcast": lambda: single_op_model("Mul", [("a", rnd(2, 3, 4)), ("b", rnd(4))]),
    "div": lambda: single_op_model("Div", [("a", rnd(3, 4)), ("b", 2 + np.abs(rnd(3, 4)))]),
    "relu": lambda: single_op_model("Relu", [("x", away_from_zero(3, 7))]),
    "leaky_relu": lambda: single_op_model("LeakyRelu", [("x", away_from_zero(3, 7))], alpha=0.2),
    "sigmoid": lambda: single_op_model("Sigmoid", [("x", 3 * rnd(3, 7))]),
    "clip_relu6": lambda: single_op_model("Clip", [("x", 4 * away_from_zero(4, 6) + 3)],
                                          consts=[("lo", np.array(0.0)), ("hi", np.array(6.0))]),
    "clip_min_only": lambda: single_op_model("Clip", [("x", away_from_zero(4, 6))], consts=[("lo", np.array(0.0))]),
    "softmax_last_axis": lambda: single_op_model("Softmax", [("x", rnd(3, 4, 5))]),
    "softmax_axis1_opset11": lambda: single_op_model("Softmax", [("x", rnd(3, 4, 5))], opset=11, axis=1),
    "batchnorm_train": lambda: single_op_model(
        "BatchNormalization", [("x", rnd(4, 3, 5, 5))], [("s", rnd(3)), ("b", rnd(3))],
        [("m", rnd(3)), ("v", 1 + np.abs(rnd(3)))]),
    "batchnorm_train_2d": lambda: single_op_model(
        "BatchNormalization", [("x", rnd(6, 4))], [("s", rnd(4)), ("b", rnd(4))],
        [("m", rnd(4)), ("v", 1 + np.abs(rnd(4)))]),
    "maxpool": lambda: single_op_model("MaxPool", [("x", rnd(2, 3, 6, 6))], kernel_shape=[2, 2], strides=[2, 2]),
    "maxpool_overlap_pad": lambda: single_op_model("MaxPool", [("x", rnd(2, 2, 7, 7))], kernel_shape=[3, 3],
                                                   strides=[2, 2], pads=[1, 1, 1, 1]),
    "maxpool_ceil_dilation": lambda: single_op_model("MaxPool", [("x", rnd(1, 2, 8, 8))], kernel_shape=[2, 2],
                                                     strides=[2, 2], dilations=[2, 2], ceil_mode=1),
    "avgpool": lambda: single_op_model("AveragePool", [("x", rnd(2, 3, 6, 6))], kernel_shape=[3, 3], strides=[1, 1]),
    "avgpool_pads_exclude": lambda: single_op_model("AveragePool", [("x", rnd(2, 2, 5, 5))], kernel_shape=[3, 3],
                                                    strides=[2, 2], pads=[1, 1, 1, 1]),
    "avgpool_pads_include_ceil": lambda: single_op_model("AveragePool", [("x", rnd(2, 2, 6, 6))], kernel_shape=[3, 3],
                                                         strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1,
                                                         ceil_mode=1),
    "global_avgpool": lambda: single_op_model("GlobalAveragePool", [("x", rnd(2, 3, 4, 5))]),
    "global_maxpool": lambda: single_op_model("GlobalMaxPool", [("x", rnd(2, 3, 4, 5))]),
    "flatten": lambda: single_op_model("Flatten", [("x", rnd(2, 3, 4))], axis=2),
    "reshape": lambda: single_op_model("Reshape", [("x", rnd(2, 3, 4))], consts=[("s", np.array([0, -1, 2]))]),
    "transpose": lambda: single_op_model("Transpose", [("x", rnd(2, 3, 4))], perm=[2, 0, 1]),
    "concat": lambda: single_op_model("Concat", [("a", rnd(2, 3, 4)), ("b", rnd(2, 1, 4))], axis=1),
    "identity": lambda: single_op_model("Identity", [("x", rnd(3, 4))]),
    "dropout_train": lambda: single_op_model("Dropout", [("x", rnd(4, 6))], consts=[("r", np.array(0.3))]),
    "gather": lambda: single_op_model("Gather", [("x", rnd(5, 3))], consts=[("i", np.array([0, 2, 2, -1]))]),
    "slice": lambda: single_op_model("Slice", [("x", rnd(4, 6))],
                                     consts=[("s", np.array([1, 0])), ("e", np.array([3, 6])),
                                             ("a", np.array([0, 1])), ("st", np.array([1, 2]))]),
    "unsqueeze_squeeze": lambda: single_op_model("Unsqueeze", [("x", rnd(3, 4))], consts=[("a", np.array([0, 3]))]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_gradient_matches_finite_differences(name):
    model, feeds = CASES[name]()
    errors = check_model_gradients(model, feeds, training=True)
    assert errors, "nothing was checked"
    bad = {k: v for k, v in errors.items() if v > TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def test_batchnorm_eval_gradient():
    model, feeds = CASES["batchnorm_train"]()
    errors = check_model_gradients(model, feeds, training=False)
    assert max(errors.values()) < TOL, errors


def test_gradcheck_detects_a_wrong_backward(monkeypatch):
    """The checker itself must fail on a broken op (a test that cannot fail proves nothing)."""
    from edgetrain.ops.elementwise import Sigmoid

    monkeypatch.setattr(Sigmoid, "backward", lambda self, ctx, grads, needed: [grads[0] * ctx])
    model, feeds = CASES["sigmoid"]()
    assert max(check_model_gradients(model, feeds).values()) > 1e-2


def test_batchnorm_running_stats_update():
    x = rnd(8, 3, 4, 4)
    model, feeds = single_op_model("BatchNormalization", [("x", x)], [("s", np.ones(3)), ("b", np.zeros(3))],
                                   [("m", np.zeros(3)), ("v", np.ones(3))], momentum=0.9)
    model.loss_and_grad(feeds, np.zeros_like(x), loss="mse")
    mean = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3), ddof=1)  # unbiased, as PyTorch
    m = float(np.float32(0.9))  # ONNX float attributes are float32
    np.testing.assert_allclose(model.buffers()["m"], (1 - m) * mean, rtol=1e-12)
    np.testing.assert_allclose(model.buffers()["v"], m + (1 - m) * var, rtol=1e-12)


def _fan_out_errors(nodes: list, extra_inits: list) -> dict[str, float]:
    """check_model_gradients' errors for a float64 graph of x (3, 4, 5) -> y with parameters w and w2."""
    x, w, w2 = away_from_zero(3, 4, 5), rnd(3, 4, 5), rnd(3, 4, 5)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2"), *extra_inits]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, x.shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return check_model_gradients(edgetrain.load(model, dtype=np.float64), {"x": x}, training=True)


def test_fan_out_gradients_sum_right_when_backwards_share_arrays():
    """The engine sums a fan-out's gradients in place where it can. Add hands one array to both its
    inputs: here r's gradient arrives as the array c's gradient also is, while c's is still pending, and
    d's Reshape returns a view; an in-place sum into either would change another tensor's gradient."""
    nodes = [helper.make_node("Mul", ["x", "w"], ["c"]),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Mul", ["r", "w2"], ["m"]),
             helper.make_node("Reshape", ["m", "flat"], ["f"]),
             helper.make_node("Reshape", ["f", "back"], ["d"]),
             helper.make_node("Add", ["r", "c"], ["s"]),
             helper.make_node("Add", ["s", "d"], ["t"]),
             helper.make_node("Add", ["t", "r"], ["y"])]
    errors = _fan_out_errors(nodes, [numpy_helper.from_array(np.array([3, 20]), "flat"),
                                     numpy_helper.from_array(np.array([3, 4, 5]), "back")])
    assert set(errors) == {"x", "w", "w2"} and max(errors.values()) < TOL, errors


def test_fan_out_sum_leaves_an_array_another_pending_gradient_holds():
    """Add hands its output's gradient, one array, to r and to c; r's other gradient (through m) then
    arrives as a fresh array while c's is still pending: summing into r's array in place would change c's."""
    nodes = [helper.make_node("Mul", ["x", "w"], ["c"]),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Mul", ["r", "w2"], ["m"]),
             helper.make_node("Add", ["r", "c"], ["s"]),
             helper.make_node("Add", ["s", "m"], ["y"])]
    errors = _fan_out_errors(nodes, [])
    assert set(errors) == {"x", "w", "w2"} and max(errors.values()) < TOL, errors


def test_a_gradient_is_handed_over_only_where_nothing_else_sees_it():
    """The engine tells an op it may overwrite a gradient (Op.reuses_grads) only for an array of its own that no
    pending gradient, seed or view shares: not a seed, not one array pending under two names (Add hands one to
    both inputs) until the last is popped, not a view or a read-only broadcast."""
    from edgetrain.engine import _Pending

    seed, fresh, shared = np.ones(4), np.ones(4), np.ones(4)
    pending = _Pending({"y": seed})
    assert not pending.owned(pending.pop("y"))
    pending.add("a", shared)
    pending.add("b", shared)
    pending.add("v", fresh[1:])
    assert not pending.owned(pending.pop("a"))  # b still holds it
    assert pending.owned(pending.pop("b"))
    assert not pending.owned(pending.pop("v"))
    assert not pending.owned(np.broadcast_to(np.ones(1), (4,)))
    assert not pending.owned(np.ones((4, 4))[:, ::2].copy(order="F"))
    assert pending.owned(np.ones(4)) and not pending.owned(None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [7, (1 << 16) + 5, 3 * (1 << 15) + 11])
def test_gradient_sums_on_the_thread_pool_are_numpys_bits(dtype, size):
    """kernels.accumulate.add_into: small sums (NumPy) and the parallel kernel (uneven last piece) give np.add's bits;
    strided or mixed-type operands take np.add itself."""
    from edgetrain.kernels.accumulate import add_into

    rng = np.random.default_rng(size)
    acc = (rng.standard_normal(size) * 10.0 ** rng.uniform(-20, 20, size)).astype(dtype)
    g = (rng.standard_normal(size) * 10.0 ** rng.uniform(-20, 20, size)).astype(dtype)
    want = acc + g
    add_into(acc, g)
    np.testing.assert_array_equal(acc, want)
    wide = rng.standard_normal((4, size)).astype(dtype)
    strided, other = wide[:, ::2], rng.standard_normal((4, (size + 1) // 2)).astype(np.float32)
    want = strided + other.astype(dtype)
    add_into(strided, other)
    np.testing.assert_array_equal(strided, want)
