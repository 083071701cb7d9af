"""Reductions, unary math and activations, Pow/Mod/Max/Min/Where, logic: gradients against float64 central
differences and PyTorch autograd, forwards against onnxruntime at old and new opsets, erf against math.erf."""
import math

import numpy as np
import onnx
import pytest
from gradcheck import check_model_gradients
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import edgetrain
from edgetrain.errors import ModelError
from edgetrain.graph import Node
from edgetrain.ops import Run
from edgetrain.ops.reduce import ReduceSum
from edgetrain.ops.special import erf

TOL = 1e-6
R = np.random.default_rng(2026)


def rnd(*shape):
    return R.standard_normal(shape)


def away(x, points=(0.0,), margin=0.05):
    """x moved at least `margin` away from each kink point, so central differences do not straddle one."""
    for p in points:
        near = np.abs(x - p) < margin
        x = np.where(near, p + np.where(x >= p, margin, -margin), x)
    return x


def one_node(op_type, feeds, consts=None, opset=18, order=None, **attrs):
    """A one-node model over graph inputs `feeds` and constant initializers `consts`, each a {name: array};
    `order` lists the node's inputs ("" for an omitted optional one), graph inputs then constants by default."""
    consts = consts or {}
    node_inputs = order if order is not None else list(feeds) + list(consts)
    node = helper.make_node(op_type, node_inputs, ["y"], name="op", **attrs)
    g_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                for n, a in feeds.items()]
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in consts.items()]
    out = helper.make_tensor_value_info("y", onnx.TensorProto.UNDEFINED, None)  # shape inference fills it in
    graph = helper.make_graph([node], "t", g_inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def load64(proto):
    return edgetrain.load(proto, dtype=np.float64)


# name: (op_type, graph inputs, constants, attributes with "opset"/"order", PyTorch's function of (torch,
# the inputs in graph-input order) or None). Inputs keep off kinks; ties and kinks get their own tests below.
def _cases():
    x4 = rnd(2, 3, 4, 5)
    pos = np.abs(rnd(3, 4)) + 0.5
    ax = lambda *a: {"axes": np.array(a, dtype=np.int64)}
    return {
        "reduce_sum_input_axes": ("ReduceSum", {"x": x4}, ax(1, -1), {"opset": 13},
                                  lambda t, x: x.sum((1, 3), keepdim=True)),
        "reduce_sum_attr_opset11": ("ReduceSum", {"x": x4}, {}, {"opset": 11, "axes": [0, 2], "keepdims": 0},
                                    lambda t, x: x.sum((0, 2))),
        "reduce_mean_hw_attr_opset13": ("ReduceMean", {"x": x4}, {}, {"opset": 13, "axes": [2, 3]},
                                        lambda t, x: x.mean((2, 3), keepdim=True)),
        "reduce_mean_input_all": ("ReduceMean", {"x": x4}, {}, {"keepdims": 0}, lambda t, x: x.mean()),
        "reduce_max": ("ReduceMax", {"x": x4}, ax(1), {}, lambda t, x: x.amax(1, keepdim=True)),
        "reduce_min_attr_opset13": ("ReduceMin", {"x": x4}, {}, {"opset": 13, "axes": [2, 3], "keepdims": 0},
                                    lambda t, x: x.amin((2, 3))),
        "reduce_l2": ("ReduceL2", {"x": x4}, ax(2, 3), {},
                      lambda t, x: t.linalg.vector_norm(x, 2, (2, 3), keepdim=True)),
        "reduce_l1": ("ReduceL1", {"x": away(x4)}, ax(1), {},
                      lambda t, x: t.linalg.vector_norm(x, 1, 1, keepdim=True)),
        "reduce_sum_square": ("ReduceSumSquare", {"x": x4}, ax(0, 3), {},
                              lambda t, x: (x * x).sum((0, 3), keepdim=True)),
        "reduce_prod": ("ReduceProd", {"x": 0.5 + np.abs(x4)}, ax(2), {}, lambda t, x: x.prod(2, keepdim=True)),
        "reduce_log_sum": ("ReduceLogSum", {"x": pos}, ax(1), {}, lambda t, x: x.sum(1, keepdim=True).log()),
        "reduce_log_sum_exp": ("ReduceLogSumExp", {"x": 5 * x4}, ax(1, 2), {},
                               lambda t, x: x.logsumexp((1, 2), keepdim=True)),
        "reduce_sum_square_noop": ("ReduceSumSquare", {"x": rnd(3, 4)}, {}, {"noop_with_empty_axes": 1},
                                   lambda t, x: x * x),
        "hardswish": ("HardSwish", {"x": away(4 * rnd(4, 6), (-3.0, 3.0))}, {}, {"opset": 14},
                      lambda t, x: t.nn.functional.hardswish(x)),
        # alpha = 1/4: torch's hardsigmoid(1.5 x) is clip(x/4 + 1/2), with the bounds excluded as ours.
        "hardsigmoid": ("HardSigmoid", {"x": away(4 * rnd(4, 6), (-2.0, 2.0))}, {}, {"alpha": 0.25, "beta": 0.5},
                        lambda t, x: t.nn.functional.hardsigmoid(1.5 * x)),
        "gelu_erf": ("Gelu", {"x": 3 * rnd(4, 6)}, {}, {"opset": 20},
                     lambda t, x: t.nn.functional.gelu(x)),
        "gelu_tanh": ("Gelu", {"x": 3 * rnd(4, 6)}, {}, {"opset": 20, "approximate": "tanh"},
                      lambda t, x: t.nn.functional.gelu(x, approximate="tanh")),
        "erf": ("Erf", {"x": 2 * rnd(4, 6)}, {}, {}, lambda t, x: x.erf()),
        "tanh": ("Tanh", {"x": 2 * rnd(4, 6)}, {}, {}, lambda t, x: x.tanh()),
        "exp": ("Exp", {"x": rnd(4, 6)}, {}, {}, lambda t, x: x.exp()),
        "log": ("Log", {"x": pos}, {}, {}, lambda t, x: x.log()),
        "sqrt": ("Sqrt", {"x": pos}, {}, {}, lambda t, x: x.sqrt()),
        "reciprocal": ("Reciprocal", {"x": away(rnd(4, 6), margin=0.3)}, {}, {}, lambda t, x: x.reciprocal()),
        "neg": ("Neg", {"x": rnd(4, 6)}, {}, {}, lambda t, x: -x),
        "abs": ("Abs", {"x": away(rnd(4, 6))}, {}, {}, lambda t, x: x.abs()),
        "softplus": ("Softplus", {"x": 4 * rnd(4, 6)}, {}, {}, lambda t, x: t.nn.functional.softplus(x)),
        "elu": ("Elu", {"x": away(2 * rnd(4, 6))}, {}, {"alpha": 0.75},
                lambda t, x: t.nn.functional.elu(x, 0.75)),
        # ONNX's alpha and gamma are float32 (torch's selu uses them in double): torch's elu scaled by them.
        "selu": ("Selu", {"x": away(2 * rnd(4, 6))}, {}, {},
                 lambda t, x: 1.05070102214813232421875 * t.nn.functional.elu(x, 1.67326319217681884765625)),
        "floor": ("Floor", {"x": away(3 * rnd(4, 6) + 0.5, np.arange(-12.0, 12))}, {}, {}, lambda t, x: x.floor()),
        "pow_both": ("Pow", {"a": pos, "b": rnd(4)[:1] + rnd(3, 1)}, {}, {},
                     lambda t, a, b: a.pow(b)),
        "pow_const_exponent": ("Pow", {"a": rnd(3, 4)}, {"e": np.array(2.0)}, {}, lambda t, a: a.pow(2.0)),
        "mod_fmod": ("Mod", {"a": 5 * rnd(3, 4), "b": away(rnd(4), margin=0.5)}, {}, {"fmod": 1},
                     lambda t, a, b: t.fmod(a, b)),
        "max_variadic": ("Max", {"a": rnd(2, 3, 4), "b": rnd(3, 1), "c": rnd(4)}, {}, {},
                         lambda t, a, b, c: t.maximum(t.maximum(a, b), c)),
        "min_pair": ("Min", {"a": rnd(2, 3, 4), "b": rnd(3, 1)}, {}, {},
                     lambda t, a, b: t.minimum(a, b)),
        "sum_variadic": ("Sum", {"a": rnd(2, 3), "b": rnd(3), "c": rnd(2, 1)}, {}, {}, lambda t, a, b, c: a + b + c),
        "mean_variadic": ("Mean", {"a": rnd(2, 3), "b": rnd(3)}, {}, {}, lambda t, a, b: (a + b) / 2),
        "where": ("Where", {"x": rnd(3, 4), "z": rnd(4)}, {"c": R.random((3, 1)) < 0.5}, {"order": ["c", "x", "z"]},
                  None),
        "castlike": ("CastLike", {"x": rnd(3, 4)}, {"like": np.zeros(1)}, {}, lambda t, x: x),
        "log_softmax": ("LogSoftmax", {"x": 3 * rnd(3, 4, 5)}, {}, {"axis": 1},
                        lambda t, x: t.nn.functional.log_softmax(x, 1)),
        "log_softmax_opset11_flattened": ("LogSoftmax", {"x": rnd(3, 4, 5)}, {}, {"opset": 11, "axis": 1},
                                          lambda t, x: t.nn.functional.log_softmax(x.flatten(1), 1).reshape(x.shape)),
        "prelu_channel_slope": ("PRelu", {"x": away(rnd(2, 3, 4, 4)), "s": rnd(3, 1, 1)}, {}, {},
                                lambda t, x, s: t.nn.functional.prelu(x, s.reshape(3))),
        "cumsum_exclusive_reverse": ("CumSum", {"x": rnd(3, 5)}, {"axis": np.array(1)}, {"exclusive": 1, "reverse": 1},
                                     lambda t, x: x.flip(1).cumsum(1).flip(1) - x),
        "celu": ("Celu", {"x": away(2 * rnd(4, 6))}, {}, {"alpha": 0.5},
                 lambda t, x: t.nn.functional.celu(x, 0.5)),
        "mish": ("Mish", {"x": 3 * rnd(4, 6)}, {}, {}, lambda t, x: t.nn.functional.mish(x)),
        "softsign": ("Softsign", {"x": away(3 * rnd(4, 6))}, {}, {}, lambda t, x: t.nn.functional.softsign(x)),
        "thresholded_relu": ("ThresholdedRelu", {"x": away(3 * rnd(4, 6), (0.5,))}, {}, {"alpha": 0.5},
                             lambda t, x: t.nn.functional.threshold(x, 0.5, 0.0)),
        "sin": ("Sin", {"x": 3 * rnd(4, 6)}, {}, {}, lambda t, x: x.sin()),
        "cos": ("Cos", {"x": 3 * rnd(4, 6)}, {}, {}, lambda t, x: x.cos()),
    }


CASES = _cases()


def build(name):
    op_type, feeds, consts, attrs, _ = CASES[name]
    attrs = dict(attrs)
    opset, order = attrs.pop("opset", 18), attrs.pop("order", None)
    return load64(one_node(op_type, feeds, consts, opset=opset, order=order, **attrs)), dict(feeds)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # Floor: both gradients are 0, 0/0 in gradcheck
@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_matches_finite_differences(name):
    model, feeds = build(name)
    errors = check_model_gradients(model, feeds, training=True)
    assert errors, "nothing was checked"
    bad = {k: v for k, v in errors.items() if v > TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def edgetrain_run(model, feeds, upstream=None, seed=0):
    """Output and input gradients of L = sum(w * y) for a random (or given) w."""
    env, tape = model.forward_train(feeds)
    y = env["y"]
    w = upstream if upstream is not None else np.random.default_rng(seed).standard_normal(y.shape)
    return y, w, model.backward(tape, {"y": w})


def torch_run(fn, feeds, w):
    """fn(torch, *input tensors) in float64 autograd: its output and the inputs' gradients of sum(w * y)."""
    torch = pytest.importorskip("torch")
    ts = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in feeds.values()]
    y = fn(torch, *ts)
    (y * torch.tensor(w)).sum().backward()
    return y.detach().numpy(), {k: t.grad.numpy() for k, t in zip(feeds, ts)}


def assert_same(mine, ref, rtol=1e-10, atol=1e-12):
    np.testing.assert_allclose(mine, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(k for k, v in CASES.items() if v[4] is not None))
def test_matches_pytorch_autograd(name):
    pytest.importorskip("torch")
    model, feeds = build(name)
    y, w, grads = edgetrain_run(model, feeds)
    ty, tgrads = torch_run(CASES[name][4], feeds, w)
    assert_same(y, ty)
    # torch's hardsigmoid_backward multiplies by a float32 1/6 even in float64 (ours is exact, as FD confirms).
    rtol = 1e-7 if name == "hardsigmoid" else 1e-10
    for k in feeds:
        assert_same(grads[k], tgrads[k], rtol=rtol)


def test_where_matches_pytorch_autograd():
    torch = pytest.importorskip("torch")
    model, feeds = build("where")
    y, w, grads = edgetrain_run(model, feeds)
    cond = torch.tensor(CASES["where"][2]["c"])
    ty, tgrads = torch_run(lambda t, x, yy: t.where(cond, x, yy), feeds, w)
    assert_same(y, ty)
    for k in feeds:
        assert_same(grads[k], tgrads[k])


# Kinks and ties, where finite differences say nothing: the choice PyTorch makes is the reference.
def test_reduce_max_min_split_ties_as_pytorch_amax():
    pytest.importorskip("torch")
    x = np.array([[1.0, 3.0, 3.0, -1.0], [2.0, 2.0, 2.0, 0.0], [5.0, -5.0, 4.0, 4.0]])
    for op, fn in (("ReduceMax", lambda t, x: x.amax(1)), ("ReduceMin", lambda t, x: x.amin(1))):
        model = load64(one_node(op, {"x": x}, {"axes": np.array([1])}, keepdims=0))
        y, w, grads = edgetrain_run(model, {"x": x})
        ty, tgrads = torch_run(fn, {"x": x}, w)
        assert_same(y, ty)
        assert_same(grads["x"], tgrads["x"])


def test_max_min_split_ties_as_pytorch_maximum():
    pytest.importorskip("torch")
    a = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 7.0]])
    b = np.array([1.0, 5.0, 3.0])
    for op, fn in (("Max", lambda t, a, b: t.maximum(a, b)), ("Min", lambda t, a, b: t.minimum(a, b))):
        model = load64(one_node(op, {"a": a, "b": b}))
        y, w, grads = edgetrain_run(model, {"a": a, "b": b})
        ty, tgrads = torch_run(fn, {"a": a, "b": b}, w)
        assert_same(y, ty)
        for k in "ab":
            assert_same(grads[k], tgrads[k])


def test_max_three_way_tie_splits_in_thirds():
    a = np.array([2.0, 1.0])
    model = load64(one_node("Max", {"a": a, "b": a.copy(), "c": np.array([2.0, 0.0])}))
    _, _, grads = edgetrain_run(model, {"a": a, "b": a.copy(), "c": np.array([2.0, 0.0])}, upstream=np.ones(2))
    np.testing.assert_array_equal(grads["a"], [1 / 3, 0.5])
    np.testing.assert_array_equal(grads["c"], [1 / 3, 0.0])


@pytest.mark.parametrize("op,fn,x", [
    ("HardSwish", "hardswish", [-4.0, -3.0, -1.0, 0.0, 3.0, 4.0]),
    ("HardSigmoid", "hardsigmoid", [-3.0, 3.0, 0.0]),
    ("Abs", "abs", [0.0, -1.0]),
    ("Elu", "elu", [0.0, -1.0]),
    ("Sign", "sign", [0.0, 2.0]),
    ("Round", "round", [0.5, 1.5, -2.5]),
    ("Ceil", "ceil", [0.5, -1.0]),
])
def test_kinks_match_pytorch(op, fn, x):
    torch = pytest.importorskip("torch")
    x = np.array(x)
    attrs = {"alpha": 1 / 6} if op == "HardSigmoid" else {}
    model = load64(one_node(op, {"x": x}, opset=14, **attrs))
    y, w, grads = edgetrain_run(model, {"x": x})
    tfn = getattr(torch.nn.functional, fn, None) or getattr(torch, fn)
    ty, tgrads = torch_run(lambda t, v: tfn(v), {"x": x}, w)
    assert_same(y, ty, rtol=1e-7)  # HardSigmoid's alpha is float32 1/6
    assert_same(grads["x"], tgrads["x"], rtol=1e-7)


def test_pow_and_reduce_prod_at_zero_match_pytorch():
    pytest.importorskip("torch")
    a, b = np.array([0.0, 0.0, 2.0, 0.5]), np.array([2.0, 0.0, 0.0, 3.0])
    model = load64(one_node("Pow", {"a": a, "b": b}))
    y, w, grads = edgetrain_run(model, {"a": a, "b": b})
    ty, tgrads = torch_run(lambda t, a, b: t.pow(a, b), {"a": a, "b": b}, w)
    assert_same(y, ty)
    for k in "ab":
        assert_same(grads[k], tgrads[k])
    x = np.array([[0.0, 2.0, 3.0], [0.0, 0.0, 4.0], [1.5, 2.0, -1.0]])
    model = load64(one_node("ReduceProd", {"x": x}, {"axes": np.array([1])}, keepdims=0))
    y, w, grads = edgetrain_run(model, {"x": x})
    ty, tgrads = torch_run(lambda t, x: x.prod(1), {"x": x}, w)
    assert_same(y, ty)
    assert_same(grads["x"], tgrads["x"])


def test_mod_floored_matches_pytorch_remainder():
    pytest.importorskip("torch")
    a, b = np.array([5.5, -5.5, 7.0, -7.25]), np.array([2.0, 2.0, -3.0, -3.0])
    model = load64(one_node("Mod", {"a": a, "b": b}, fmod=0))
    y, w, grads = edgetrain_run(model, {"a": a, "b": b})
    ty, tgrads = torch_run(lambda t, a, b: t.remainder(a, b), {"a": a, "b": b}, w)
    assert_same(y, ty)
    for k in "ab":
        assert_same(grads[k], tgrads[k])


def test_layernorm_and_gelu_decompositions_match_pytorch():
    """The graphs TorchScript exports for LayerNorm (ReduceMean, Sub, Pow, Add, Sqrt, Div) and nn.GELU
    (Div, Erf, Add, Mul, Mul) at opset 17, differentiated end to end."""
    pytest.importorskip("torch")
    x = rnd(3, 5, 8)
    c = {"two": np.array(2.0), "eps": np.array(1e-5), "sqrt2": np.array(math.sqrt(2)), "one": np.array(1.0),
         "half": np.array(0.5)}
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
             helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["d2"]),
             helper.make_node("ReduceMean", ["d2"], ["v"], axes=[-1]),
             helper.make_node("Add", ["v", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["s"]),
             helper.make_node("Div", ["d", "s"], ["n"]),
             helper.make_node("Div", ["n", "sqrt2"], ["q"]),
             helper.make_node("Erf", ["q"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]),
             helper.make_node("Mul", ["n", "e1"], ["p"]),
             helper.make_node("Mul", ["p", "half"], ["y"])]
    graph = helper.make_graph(nodes, "ln_gelu", [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, x.shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, None)],
                              [numpy_helper.from_array(v, k) for k, v in c.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = load64(onnx.shape_inference.infer_shapes(proto))
    y, w, grads = edgetrain_run(model, {"x": x})
    fn = lambda t, x: t.nn.functional.gelu(t.nn.functional.layer_norm(x, (8,), eps=1e-5))
    ty, tgrads = torch_run(fn, {"x": x}, w)
    assert_same(y, ty, rtol=1e-9)
    assert_same(grads["x"], tgrads["x"], rtol=1e-9)
    errors = check_model_gradients(model, {"x": x})
    assert max(errors.values()) < TOL, errors


# Forwards against onnxruntime, float32, across the opsets where axes moved from attribute to input.
ORT_CASES = [
    ("ReduceSum", 11, {"axes": [1]}, None),
    ("ReduceSum", 13, {"keepdims": 0}, [1, -1]),
    ("ReduceSum", 13, {"noop_with_empty_axes": 1}, []),
    ("ReduceMean", 11, {"axes": [2, 3]}, None),
    ("ReduceMean", 13, {"axes": [2, 3], "keepdims": 0}, None),
    ("ReduceMean", 18, {}, [2, 3]),
    ("ReduceMean", 18, {}, None),
    ("ReduceMax", 13, {"axes": [0]}, None),
    ("ReduceMax", 18, {"keepdims": 0}, [-1]),
    ("ReduceMin", 18, {}, [1, 2]),
    ("ReduceL2", 13, {"axes": [1]}, None),
    ("ReduceL2", 18, {}, [3]),
    ("ReduceLogSumExp", 18, {}, [1]),
    ("ReduceProd", 13, {"axes": [2]}, None),
    ("ArgMax", 13, {"axis": 1, "keepdims": 0}, None),
    ("ArgMin", 13, {"axis": -1, "select_last_index": 1}, None),
    ("HardSwish", 14, {}, None),
    ("HardSigmoid", 11, {"alpha": 0.3, "beta": 0.4}, None),
    ("Gelu", 20, {}, None),
    ("Gelu", 20, {"approximate": "tanh"}, None),
    ("Erf", 13, {}, None),
    ("Softplus", 11, {}, None),
    ("Selu", 11, {}, None),
]


@pytest.mark.parametrize("op,opset,attrs,axes", ORT_CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(ORT_CASES)])
def test_forward_matches_onnxruntime(op, opset, attrs, axes):
    ort = pytest.importorskip("onnxruntime")
    x = (3 * rnd(2, 3, 4, 5)).astype(np.float32)
    x[0, 0, 0, :2] = x[0, 0, 0, 2]  # ties for ArgMax/ArgMin's select_last_index
    consts = {"axes": np.array(axes, dtype=np.int64)} if axes is not None else {}
    proto = one_node(op, {"x": x}, consts, opset=opset, **attrs)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    have = edgetrain.load(proto).run({"x": x})["y"]
    assert have.shape == want.shape and have.dtype == want.dtype
    np.testing.assert_allclose(have, want, rtol=2e-6, atol=1e-6)


def test_logic_ops_are_bool_and_pass_no_gradient():
    a, b = rnd(3, 4), rnd(4)
    model = load64(one_node("Less", {"a": a, "b": b}))
    np.testing.assert_array_equal(model.run({"a": a, "b": b})["y"], a < b)
    _, tape = model.forward_train({"a": a, "b": b})
    grads = model.backward(tape, {"y": np.ones((3, 4))})
    assert "a" not in grads and "b" not in grads


def test_reduce_axes_out_of_range_names_the_node():
    op = ReduceSum(Node("sum1", "ReduceSum", ["x", "a"], ["y"], {}), 13)
    with pytest.raises(ModelError, match="sum1.*out of range"):
        op.forward([np.zeros((2, 3)), np.array([2])], Run(False))
    with pytest.raises(ModelError, match="repeat"):
        op.forward([np.zeros((2, 3)), np.array([1, -1])], Run(False))


def test_gelu_refuses_an_unknown_approximation():
    with pytest.raises(ModelError, match="approximate"):
        edgetrain.load(one_node("Gelu", {"x": np.zeros((2, 2), np.float32)}, opset=20, approximate="fast"))


# erf: fdlibm's rational approximations, to 1 ulp in float64.
def ulps(have, want):
    return np.abs(have - want) / np.spacing(np.abs(want).astype(have.dtype))


def test_erf_within_one_ulp_of_math_erf():
    x = np.concatenate([np.linspace(-7, 7, 20001), 10.0 ** np.linspace(-310, 0.5, 2000),
                        [0.84375, 1.25, 1 / 0.35, 6.0, np.nextafter(6.0, 0), np.nextafter(0.84375, 0)]])
    x = np.concatenate([x, -x])
    want = np.array([math.erf(v) for v in x])
    assert ulps(erf(x), want).max() <= 1.0
    x32 = x.astype(np.float32)
    want32 = np.array([math.erf(float(v)) for v in x32]).astype(np.float32)
    assert ulps(erf(x32), want32).max() <= 1.0
    assert erf(x32).dtype == np.float32
    special = erf(np.array([np.inf, -np.inf, np.nan, 0.0, -0.0]))
    np.testing.assert_array_equal(special[:2], [1.0, -1.0])
    assert np.isnan(special[2]) and np.signbit(special[4]) and not np.signbit(special[3])


@settings(max_examples=300, deadline=None)
@given(st.floats(-8, 8, allow_nan=False), st.floats(-8, 8, allow_nan=False))
def test_erf_properties(a, b):
    lo, hi = sorted((a, b))
    e = erf(np.array([lo, hi, -lo]))
    assert e[0] <= e[1]  # monotone
    assert e[2] == -e[0]  # odd, exactly
    assert abs(e[0]) <= 1
    assert abs(e[0] - math.erf(lo)) <= np.spacing(abs(math.erf(lo))) or e[0] == math.erf(lo)


def test_non_negative_through_reductions_and_hardsigmoid():
    """The integer engine stores these unsigned: a mean of ReLU outputs (an SE block's pooling) and HardSigmoid."""
    from edgetrain.layers import non_negative_values

    x = rnd(2, 3, 4, 4)
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["m"], axes=[2, 3]),
             helper.make_node("HardSigmoid", ["x"], ["h"]),
             helper.make_node("ReduceMean", ["x"], ["mx"], axes=[2, 3]),
             helper.make_node("Add", ["m", "h"], ["y0"]),
             helper.make_node("Add", ["y0", "mx"], ["y"])]
    graph = helper.make_graph(nodes, "nn", [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, x.shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    known = non_negative_values(load64(onnx.shape_inference.infer_shapes(proto)).graph)
    assert {"r", "m", "h"} <= known and not {"mx", "y"} & known


def test_torchscript_export_of_se_block_gelu_and_layernorm_trains_as_pytorch(tmp_path):
    """What PyTorch's exporter writes for MobileNetV3's HardSwish and squeeze-excite (x.mean((2, 3)), HardSigmoid),
    nn.GELU (Erf), a hand-written LayerNorm (ReduceMean, Pow, Sqrt) and a mask (Greater, Where), through
    edgetrain.from_torch: forward and every parameter's gradient against autograd, in float64."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.Hardswish()
            self.squeeze, self.excite, self.gate = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1), nn.Hardsigmoid()
            self.fc, self.gelu, self.out = nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 3)

        def forward(self, x):
            x = self.act(self.conv(x))
            x = x * self.gate(self.excite(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
            h = self.gelu(self.fc(x.mean((2, 3))))
            h = h - h.mean(-1, keepdim=True)
            h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
            return self.out(torch.where(h > 0, h, 0.5 * h))

    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    path = tmp_path / "net.onnx"
    edgetrain.from_torch(net, x, path)
    model = edgetrain.load(path, dtype=np.float64)
    assert {"HardSwish", "HardSigmoid", "ReduceMean", "Erf", "Pow", "Sqrt", "Where"} <= {
        n.op_type for n in model.graph.nodes}
    env, tape = model.forward_train({"input": x.numpy()})
    w = np.random.default_rng(0).standard_normal(env["logits"].shape)
    grads = model.backward(tape, {"logits": w})
    y = net(x)
    (y * torch.tensor(w)).sum().backward()
    # HardSigmoid's alpha is a float32 attribute in ONNX: 1/6 to 3e-8 relative, not torch's double 1/6.
    np.testing.assert_allclose(env["logits"], y.detach().numpy(), rtol=1e-6, atol=1e-9)
    for name, p in net.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-6, atol=1e-9, err_msg=name)


def test_prelu_slope_is_a_parameter():
    x = rnd(2, 3, 4)
    model = load64(one_node("PRelu", {"x": x}, {"slope": np.full((3, 1), 0.25)}))
    assert set(model.parameters()) == {"slope"}
    errors = check_model_gradients(model, {"x": away(x)})
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("op", ["And", "Or", "Xor", "Not", "Equal", "Greater", "LessOrEqual"])
def test_logic_matches_onnxruntime(op):
    """ONNX's own And/Or/Xor/Not cases are opset 1 and 7 models, older than we import: onnxruntime at opset 13
    stands in for them (broadcasting 4-d against 2-d, as their bcast cases)."""
    ort = pytest.importorskip("onnxruntime")
    bools = op in ("And", "Or", "Xor", "Not")
    a = R.random((2, 3, 4, 5)) < 0.5 if bools else R.integers(-2, 3, (2, 3, 4, 5)).astype(np.float32)
    b = R.random((4, 5)) < 0.5 if bools else R.integers(-2, 3, (4, 5)).astype(np.float32)
    feeds = {"a": a} if op == "Not" else {"a": a, "b": b}
    proto = one_node(op, feeds, opset=13)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    have = edgetrain.load(proto).run(feeds)["y"]
    assert have.dtype == np.bool_
    np.testing.assert_array_equal(have, want)


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_in_float32_out(name):
    """A float32 model computes and differentiates in float32: no silent float64 from constants or attributes."""
    op_type, feeds, consts, attrs, _ = CASES[name]
    attrs = dict(attrs)
    opset, order = attrs.pop("opset", 18), attrs.pop("order", None)
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    consts = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in consts.items()}
    model = edgetrain.load(one_node(op_type, feeds, consts, opset=opset, order=order, **attrs))
    env, tape = model.forward_train(feeds)
    assert env["y"].dtype == np.float32
    grads = model.backward(tape, {"y": np.ones_like(env["y"])})
    assert {k: g.dtype for k, g in grads.items() if k in feeds} == {k: np.dtype(np.float32) for k in feeds}
