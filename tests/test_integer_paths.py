"""The integer path beyond 2-D convolutions: Conv1d, Conv3d, MatMul between two activations and N-D Linear
layers give exactly what a plain NumPy int64 reference computes from the same quantised codes, forward and
backward; a small Conv1d + attention model trains at static 8/8 and under PFQ; `info` says what stays float."""
import itertools

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgetrain
from edgetrain.graph import Node
from edgetrain.ops.base import OPS, Run, unbroadcast
from edgetrain.precision.spec import LayerPrecision
from edgetrain.quant import mac as qops
from edgetrain.quant import quantize

KEY = (5, 3)


# -- references: plain int64 NumPy, and the engine's rescale arithmetic spelled out --------------------
def _conv_ref(x, w, strides, pads_begin, pads_end, dilations, groups):
    """y = conv(x, w) over any number of spatial dims, in int64, by kernel offsets."""
    x, w = x.astype(np.int64), w.astype(np.int64)
    nd = x.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(pads_begin, pads_end)))
    out = [(xp.shape[2 + i] - (w.shape[2 + i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(nd)]
    m, cg = w.shape[:2]
    y = np.zeros((x.shape[0], m) + tuple(out), np.int64)
    for off in itertools.product(*[range(k) for k in w.shape[2:]]):
        sl = tuple(slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in zip(off, dilations, strides, out))
        win = xp[(slice(None), slice(None)) + sl]
        for g in range(groups):
            wg = w[(slice(g * (m // groups), (g + 1) * (m // groups)), slice(None)) + off]
            y[:, g * (m // groups):(g + 1) * (m // groups)] += np.einsum(
                "mc,nc...->nm...", wg, win[:, g * cg:(g + 1) * cg])
    return y


def _conv_grads_ref(dy, x, w, strides, pads_begin, pads_end, dilations, groups):
    """(dW, dX) of the conv in int64: dW from dy and x, dX from dy and w."""
    dy, x, w = dy.astype(np.int64), x.astype(np.int64), w.astype(np.int64)
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(pads_begin, pads_end)))
    dxp = np.zeros(xp.shape, np.int64)
    dw = np.zeros(w.shape, np.int64)
    out = dy.shape[2:]
    m, cg = w.shape[:2]
    for off in itertools.product(*[range(k) for k in w.shape[2:]]):
        sl = tuple(slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in zip(off, dilations, strides, out))
        full = (slice(None), slice(None)) + sl
        for g in range(groups):
            ms, cs = slice(g * (m // groups), (g + 1) * (m // groups)), slice(g * cg, (g + 1) * cg)
            n = dy.shape[0]
            dw[(ms, slice(None)) + off] += np.einsum("nmp,ncp->mc", dy[:, ms].reshape(n, m // groups, -1),
                                                     xp[full][:, cs].reshape(n, cg, -1))
            dxp[full][:, cs] += np.einsum("nm...,mc->nc...", dy[:, ms], w[(ms, slice(None)) + off])
    crop = tuple(slice(b, b + n) for b, n in zip(pads_begin, x.shape[2:]))
    return dw, dxp[(slice(None), slice(None)) + crop]


def _rescale(acc, scale):
    """The engine's rescale of exact integers: acc * float32 scale, formed in float64, stored as float32."""
    return (acc.astype(np.float64) * np.asarray(scale, np.float32).astype(np.float64)).astype(np.float32)


def _product(s_a, s_b):
    return np.float32(np.float32(s_a) * np.float32(s_b))


def _op(op_type, attrs, cls, bits=(8, 8, 8), inputs=("x", "w"), unsigned=False, unsigned_other=False):
    float_op = OPS[op_type](Node("layer", op_type, list(inputs), ["y"], attrs), 17)
    return cls(float_op, LayerPrecision(*bits), 0, unsigned, qops.QuantRuntime(), unsigned_other=unsigned_other)


def _codes(t, bits, axis=None, signed=True):
    return quantize(np.ascontiguousarray(t), bits, signed=signed, axis=axis)


# -- Conv1d and Conv3d -----------------------------------------------------------------------------------
CONVS = [
    # (x shape, w shape, attrs, strides, pads begin, pads end, dilations, group)
    ((3, 4, 17), (6, 4, 3), dict(pads=[1, 1]), (1,), (1,), (1,), (1,), 1),
    ((2, 4, 20), (6, 2, 5), dict(strides=[2], pads=[2, 1], dilations=[2], group=2), (2,), (2,), (1,), (2,), 2),
    ((2, 3, 9), (5, 3, 4), dict(auto_pad="SAME_UPPER", strides=[2]), (2,), (1,), (2,), (1,), 1),
    ((2, 4, 15), (4, 1, 3), dict(group=4), (1,), (0,), (0,), (1,), 4),  # depthwise
    ((2, 3, 5, 6, 7), (4, 3, 3, 2, 3), dict(pads=[1, 0, 1, 1, 1, 0]), (1, 1, 1), (1, 0, 1), (1, 1, 0), (1, 1, 1), 1),
    ((2, 4, 7, 6, 5), (6, 2, 2, 3, 2), dict(strides=[2, 1, 2], dilations=[2, 1, 1], pads=[1, 1, 0, 0, 1, 1], group=2),
     (2, 1, 2), (1, 1, 0), (0, 1, 1), (2, 1, 1), 2),
]


@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"conv{len(c[0]) - 2}d{c[2]}")
def test_conv1d_and_conv3d_equal_the_int64_reference(case):
    x_shape, w_shape, attrs, strides, pb, pe, dil, group = case
    rng = np.random.default_rng(len(x_shape) * 10 + group)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    node = Node("layer", "Conv", ["x", "w", "b"], ["y"], attrs)
    cls = qops.integer_form(node, {"w": w, "b": b})
    assert cls is (qops.QuantConv if len(x_shape) == 3 else qops.QuantConv3d)
    op = _op("Conv", attrs, cls, bits=(8, 6, 10), inputs=("x", "w", "b"))
    (y,), ctx = op.forward([x, w, b], Run(True, KEY))

    xq, wq = _codes(x, 8), _codes(w, 6, axis=0)
    np.testing.assert_array_equal(ctx.inputs[0].q.reshape(x_shape), xq.q)
    acc = _conv_ref(xq.q, wq.q, strides, pb, pe, dil, group)
    scale = (np.float32(xq.scale) * wq.scale.astype(np.float32)).astype(np.float32)
    channels = (1, -1) + (1,) * (len(x_shape) - 2)
    expect = _rescale(acc, scale.reshape(channels)) + b.reshape(channels)
    np.testing.assert_array_equal(y, expect)
    assert y.shape == OPS["Conv"](node, 17).forward([x, w, b], Run(False))[0][0].shape

    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw, db = op.backward(ctx, [dy], [True, True, True])
    dyq = op._quantize_grad(dy, KEY)
    vq = _codes(w, 6)  # per tensor for the error back-propagation
    ref_dw, _ = _conv_grads_ref(dyq.q, xq.q, wq.q, strides, pb, pe, dil, group)
    _, ref_dx = _conv_grads_ref(dyq.q, xq.q, vq.q, strides, pb, pe, dil, group)
    np.testing.assert_array_equal(dw, _rescale(ref_dw, _product(dyq.scale, xq.scale)))
    np.testing.assert_array_equal(dx, _rescale(ref_dx, _product(dyq.scale, vq.scale)))
    np.testing.assert_array_equal(db, dy.sum(axis=(0,) + tuple(range(2, dy.ndim))))
    assert dx.shape == x.shape and dw.shape == w.shape
    assert op.backward(ctx, [dy], [False, True, True])[0] is None  # a first layer skips its error


def test_conv1d_groups_of_samples_equal_each_group_alone():
    """DFQ's sample groups (merged into shared kernel calls) give each group what its own op gives."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 4, 12)).astype(np.float32)
    w = rng.standard_normal((5, 4, 3)).astype(np.float32)
    a = _op("Conv", {"pads": [1, 1]}, qops.QuantConv)
    b = _op("Conv", {"pads": [1, 1]}, qops.QuantConv, bits=(6, 8, 12))
    groups = [qops.Group(slice(0, 2), a), qops.Group(slice(2, 6), b)]
    (y,), ctx = a.forward_groups([x, w], Run(True, KEY), groups)
    np.testing.assert_array_equal(y[:2], a.forward([x[:2], w], Run(True, KEY))[0][0])
    np.testing.assert_array_equal(y[2:], b.forward([x[2:], w], Run(True, KEY))[0][0])
    dx, dw = a.backward(ctx, [np.ones_like(y)], [True, True])
    assert dx.shape == x.shape and dw.shape == w.shape


@pytest.mark.parametrize("dtypes", [(np.int8, np.int8), (np.uint8, np.int16), (np.uint16, np.int8)])
@pytest.mark.parametrize("a_shape,bt_shape", [((2, 3, 5, 4), (2, 3, 6, 4)), ((3, 1, 7, 9), (4, 2, 9)),
                                               ((2, 48, 40), (2, 50, 40))])  # the last: one GEMM per matrix
def test_batched_gemm_nt_equals_int64_matmul_at_the_largest_codes(dtypes, a_shape, bt_shape):
    from edgetrain import kernels

    rng = np.random.default_rng(0)

    def codes(shape, dtype):
        info = np.iinfo(dtype)
        lo = info.min + 1 if info.min else 0  # symmetric signed codes, as the quantiser writes them
        t = rng.integers(lo, info.max + 1, shape).astype(dtype)
        t.reshape(-1)[:3] = info.max  # the largest magnitudes, so a narrow accumulator would overflow
        return t

    a, bt = codes(a_shape, dtypes[0]), codes(bt_shape, dtypes[1])
    bound = (max(abs(np.iinfo(dtypes[0]).min + 1), np.iinfo(dtypes[0]).max), np.iinfo(dtypes[1]).max)
    out = kernels.batched_gemm_nt(a, bt, bound)
    np.testing.assert_array_equal(out, np.matmul(a.astype(np.int64), np.swapaxes(bt.astype(np.int64), -1, -2)))
    assert out.dtype == np.int64


# -- MatMul between two activations ----------------------------------------------------------------------
MATMULS = [
    ((2, 3, 5, 4), (2, 3, 4, 6), False),  # attention scores: [B, heads, T, d] x [B, heads, d, T']
    ((2, 3, 5, 4), (3, 4, 6), True),  # B broadcast over the samples; A non-negative (after a softmax)
    ((2, 1, 5, 4), (2, 3, 4, 6), False),  # A broadcast over the heads
    ((4, 7), (7, 3), False),  # plain 2-D
    ((2, 5, 4), (4,), False),  # 1-D B: promoted, then its axis dropped
]


@pytest.mark.parametrize("a_shape,b_shape,unsigned", MATMULS)
def test_matmul_of_two_activations_equals_the_int64_reference(a_shape, b_shape, unsigned):
    rng = np.random.default_rng(len(a_shape) + len(b_shape))
    a = rng.standard_normal(a_shape).astype(np.float32)
    if unsigned:
        a = np.abs(a)
    b = rng.standard_normal(b_shape).astype(np.float32)
    node = Node("layer", "MatMul", ["a", "b"], ["y"], {})
    assert qops.integer_form(node, {}) is qops.QuantMatMul
    op = _op("MatMul", {}, qops.QuantMatMul, bits=(8, 4, 10), inputs=("a", "b"), unsigned=unsigned)
    assert op.precision == LayerPrecision(8, 8, 10)  # B is an activation: act bits, whatever the weight bits
    (y,), ctx = op.forward([a, b], Run(True, KEY))
    aq, bq = _codes(a, 8, signed=not unsigned), _codes(b, 8)
    assert aq.q.dtype == (np.uint8 if unsigned else np.int8)
    a2 = aq.q[None] if a.ndim == 1 else aq.q
    b2 = bq.q[:, None] if b.ndim == 1 else bq.q
    acc = np.matmul(a2.astype(np.int64), b2.astype(np.int64))
    expect = _rescale(acc, _product(aq.scale, bq.scale)).reshape(np.matmul(a, b).shape)
    np.testing.assert_array_equal(y, expect)
    np.testing.assert_allclose(y, np.matmul(a, b), atol=0.05 * np.abs(np.matmul(a, b)).max())

    dy = rng.standard_normal(y.shape).astype(np.float32)
    da, db = op.backward(ctx, [dy], [True, True])
    dyq = op._quantize_grad(dy.reshape(acc.shape), KEY)
    ref_da = unbroadcast(np.matmul(dyq.q.astype(np.int64), np.swapaxes(b2, -1, -2).astype(np.int64)), a2.shape)
    ref_db = unbroadcast(np.matmul(np.swapaxes(a2, -1, -2).astype(np.int64), dyq.q.astype(np.int64)), b2.shape)
    np.testing.assert_array_equal(da, _rescale(ref_da, _product(dyq.scale, bq.scale)).reshape(a.shape))
    np.testing.assert_array_equal(db, _rescale(ref_db, _product(aq.scale, dyq.scale)).reshape(b.shape))
    assert op.backward(ctx, [dy], [False, True])[0] is None


def test_matmul_sample_groups_each_quantised_by_its_own_op():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((5, 2, 4, 3)).astype(np.float32)
    b = rng.standard_normal((5, 2, 3, 4)).astype(np.float32)
    p = _op("MatMul", {}, qops.QuantMatMul, inputs=("a", "b"))
    q = _op("MatMul", {}, qops.QuantMatMul, bits=(4, 4, 8), inputs=("a", "b"))
    (y,), ctx = p.forward_groups([a, b], Run(True, KEY), [qops.Group(slice(0, 3), p), qops.Group(slice(3, 5), q)])
    np.testing.assert_array_equal(y[:3], p.forward([a[:3], b[:3]], Run(True, KEY))[0][0])
    np.testing.assert_array_equal(y[3:], q.forward([a[3:], b[3:]], Run(True, KEY))[0][0])
    da, db = p.backward(ctx, [np.ones_like(y)], [True, True])
    assert da.shape == a.shape and db.shape == b.shape


# -- Linear layers of transformers: N-D activations ------------------------------------------------------
@pytest.mark.parametrize("op_type,w_shape,attrs,x_shape", [
    ("MatMul", (6, 5), {}, (2, 7, 6)),  # [B, T, C] x W[C, D]
    ("MatMul", (6, 5), {}, (2, 3, 4, 6)),
    ("Gemm", (5, 6), {"transB": 1}, (4, 6)),
])
def test_linear_on_nd_activations_equals_the_int64_reference(op_type, w_shape, attrs, x_shape):
    rng = np.random.default_rng(len(x_shape))
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    inputs = ["x", "w"] + (["c"] if op_type == "Gemm" else [])
    c = rng.standard_normal(5).astype(np.float32)
    assert qops.integer_form(Node("layer", op_type, inputs, ["y"], attrs), {"w": w}) is qops.QuantLinear
    op = _op(op_type, attrs, qops.QuantLinear, inputs=inputs)
    args = [x, w] + ([c] if op_type == "Gemm" else [])
    (y,), ctx = op.forward(args, Run(True, KEY))
    rows = w if attrs.get("transB") else w.T  # (out, in)
    x2 = x.reshape(-1, x.shape[-1])
    xq, wq = _codes(x2, 8), _codes(rows, 8, axis=0)
    acc = xq.q.astype(np.int64) @ wq.q.astype(np.int64).T
    # QuantLinear's rescale: the accumulator as floats times the per-output-channel scale products
    expect = acc.astype(np.float32) * (np.float32(xq.scale) * wq.scale.astype(np.float32)).reshape(1, -1)
    if op_type == "Gemm":
        expect = expect + c
    np.testing.assert_array_equal(y, expect.reshape(x_shape[:-1] + (5,)))

    dy = rng.standard_normal(y.shape).astype(np.float32)
    grads = op.backward(ctx, [dy], [True, True] + [True] * (op_type == "Gemm"))
    dyq = op._quantize_grad(dy.reshape(-1, 5), KEY)
    vq = _codes(rows, 8)
    ref_dw_rows = _rescale(dyq.q.astype(np.int64).T @ xq.q.astype(np.int64), _product(dyq.scale, xq.scale))
    ref_dx = _rescale(dyq.q.astype(np.int64) @ vq.q.astype(np.int64), _product(dyq.scale, vq.scale))
    np.testing.assert_array_equal(grads[1], ref_dw_rows if attrs.get("transB") else ref_dw_rows.T)
    np.testing.assert_array_equal(grads[0], ref_dx.reshape(x_shape))
    if op_type == "Gemm":
        np.testing.assert_array_equal(grads[2], dy.sum(axis=0))


# -- a model: Conv1d, attention, classifier ----------------------------------------------------------------
def _attention_model(seed=0, residual=False, left_mix=False):
    """x [N, 4, 16] -> Conv1d -> Relu -> [N, 16, 8] -> Q, K, V -> 2 heads -> softmax(Q K^T) V -> Gemm."""
    rng = np.random.default_rng(seed)

    def param(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    def const(name, v):
        return numpy_helper.from_array(np.asarray(v, np.int64), name)

    mk = helper.make_node
    nodes = [
        mk("Conv", ["x", "cw", "cb"], ["c"], name="conv1d", pads=[1, 1], kernel_shape=[3]),
        mk("Relu", ["c"], ["r"], name="relu"),
        mk("Transpose", ["r"], ["t"], name="tokens", perm=[0, 2, 1]),
        mk("MatMul", ["t", "wq"], ["q"], name="q_proj"),
        mk("MatMul", ["t", "wk"], ["k"], name="k_proj"),
        mk("MatMul", ["t", "wv"], ["v"], name="v_proj"),
        mk("Reshape", ["q", "heads"], ["q4"], name="q_split"),
        mk("Reshape", ["k", "heads"], ["k4"], name="k_split"),
        mk("Reshape", ["v", "heads"], ["v4"], name="v_split"),
        mk("Transpose", ["q4"], ["qh"], name="q_heads", perm=[0, 2, 1, 3]),
        mk("Transpose", ["k4"], ["kt"], name="k_heads", perm=[0, 2, 3, 1]),
        mk("Transpose", ["v4"], ["vh"], name="v_heads", perm=[0, 2, 1, 3]),
        mk("MatMul", ["qh", "kt"], ["s"], name="scores"),
        mk("Softmax", ["s"], ["p"], name="softmax", axis=-1),
        mk("MatMul", ["p", "vh"], ["o"], name="attend"),
        mk("Transpose", ["o"], ["o2"], name="merge_heads", perm=[0, 2, 1, 3]),
        mk("Reshape", ["o2", "tokens_shape"], ["o3"], name="merge"),
        mk("MatMul", ["o3", "wo"], ["a"], name="out_proj"),
    ]
    inits = [param("cw", 8, 4, 3), param("cb", 8), param("wq", 8, 8), param("wk", 8, 8), param("wv", 8, 8),
             param("wo", 8, 8), const("heads", [0, 16, 2, 4]), const("tokens_shape", [0, 16, 8]),
             const("flat", [0, -1]), param("fw", 3, 128), param("fb", 3)]
    nodes.append(mk("Add", ["t", "a"], ["h"], name="residual") if residual else mk("Relu", ["a"], ["h"], name="act"))
    if left_mix:  # W @ x: a weight as the first operand, which the integer path does not take
        nodes.append(mk("MatMul", ["wl", "h"], ["h2"], name="token_mix"))
        inits.append(param("wl", 16, 16))
    nodes += [mk("Reshape", ["h2" if left_mix else "h", "flat"], ["f"], name="flatten"),
              mk("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _batch(n=6, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4, 16)).astype(np.float32), np.arange(n) % 3


def test_conv1d_attention_model_trains_one_static_8_8_step():
    model = edgetrain.load(_attention_model(), seed=3)
    precision = model.set_precision("8/8")
    names = [n.name for n in model.mac_layers]
    assert names == ["conv1d", "q_proj", "k_proj", "v_proj", "scores", "attend", "out_proj", "fc"]
    assert {n: type(model.executor.ops[n]).__name__ for n in names} == {
        "conv1d": "QuantConv", "q_proj": "QuantLinear", "k_proj": "QuantLinear", "v_proj": "QuantLinear",
        "scores": "QuantMatMul", "attend": "QuantMatMul", "out_proj": "QuantLinear", "fc": "Gemm"}
    assert str(precision["scores"]) == "8/8" and precision["fc"].is_float
    assert model.executor.ops["attend"].unsigned_input  # the softmax output is stored unsigned
    x, y = _batch()
    before = {k: v.copy() for k, v in model.parameters().items()}
    loss, grads = model.loss_and_grad(x, y)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())
    for name, g in grads.items():
        model.parameters()[name] -= 0.1 * g
    assert all(not np.array_equal(before[k], v) for k, v in model.parameters().items())
    # BitOPs: a MatMul between activations counts act x act forward, grad x act for each backward
    cost = model.last_cost["scores"]
    assert cost.macs == len(x) * 2 * 16 * 16 * 4
    assert (cost.forward, cost.backward_data, cost.backward_weight) == (cost.macs * 64,) * 3
    assert cost.saved_bits == 2 * len(x) * 2 * 16 * 4 * 8  # both operands are kept for backward
    assert model.runtime.act_ranges["scores"].value and model.runtime.act_ranges["scores#1"].value
    # close to the float model, in training and in eval (both operands at their running ranges)
    ref = edgetrain.load(_attention_model(), seed=3)
    lf, gf = ref.loss_and_grad(x, y)
    assert abs(lf - loss) < 0.05
    for name, g in gf.items():
        assert np.abs(grads[name] - g).max() <= 0.1 * np.abs(g).max() + 1e-6, name
    for name, p in model.parameters().items():
        ref.parameters()[name][...] = p
    out, expect = model(x), ref(x)
    assert np.abs(out - expect).max() <= 0.05 * np.abs(expect).max()


def test_pfq_run_raises_the_new_layers_with_every_stage():
    """PFQ's controller drives the model as the Trainer does: its spec at the start, a new one when it switches."""
    from edgetrain.precision.pfq import PFQController
    from edgetrain.train.optim import SGD

    model = edgetrain.load(_attention_model(), seed=0)
    ctrl = PFQController(stages=("3/6", "4/6", "8/8"), switch_steps=(1, 2))
    model.set_precision(ctrl.precision)
    assert str(model.precision["scores"]) == "3/6" and str(model.precision["conv1d"]) == "3/6"
    optim = SGD(model.parameters(), lr=0.05)
    x, y = _batch(8)
    seen = []
    for step in range(4):
        model.step = step
        loss, grads = model.loss_and_grad(x, y)
        assert np.isfinite(loss)
        optim.step(grads)
        seen.append(str(model.precision["attend"]))
        spec = ctrl.on_step(step, loss)
        if spec is not None:
            model.set_precision(spec)
    assert seen == ["3/6", "4/6", "8/8", "8/8"]
    assert [s.precision for s in ctrl.switches] == ["4/6", "8/8"]
    assert isinstance(model.executor.ops["attend"], qops.QuantMatMul)
    assert 0 < model.cost.per_layer["scores"] < model.cost.per_layer["fc"]  # the fp32 classifier is the dearest
    assert all(np.isfinite(p).all() for p in model.parameters().values())


def test_dfq_gates_a_residual_attention_block():
    from edgetrain.precision.dfq.config import DFQConfig
    from edgetrain.precision.dfq.controller import DFQ

    model = edgetrain.load(_attention_model(residual=True), seed=0)
    model.set_precision("8/8")
    dfq = DFQ.attach(model, DFQConfig(candidates=("0", "4/8", "8/8")))
    assert [u.name for u in dfq.units] == ["block0"]
    assert {"scores", "attend", "q_proj", "out_proj"} <= dfq.gated_layers
    x, y = _batch(8)
    rng = np.random.default_rng(0)
    dfq.force = {0: rng.integers(0, 3, len(x))}  # a mix: skipped, 4/8 and 8/8 samples
    loss, grads = model.loss_and_grad(x, y)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())
    assert np.abs(grads["wq"]).max() > 0
    assert model.runtime.act_ranges["scores@4/8#1"].value  # each candidate quantises K^T with its own range
    # BitOPs: K^T takes the activation bits, not DFQ's weight width (4)
    counts = np.bincount(dfq.record.choices[0], minlength=3)
    cost = model.last_cost["scores"]
    assert cost.forward == 2 * 16 * 16 * 4 * (counts[1] * 4 * 4 + counts[2] * 8 * 8) and counts[2] > 0


def test_int8_export_quantises_the_weights_and_leaves_attention_products_float():
    from edgetrain.export import onnxruntime_outputs, to_onnx_int8

    model = edgetrain.load(_attention_model(), seed=0)
    model.set_precision("8/8")
    x, y = _batch()
    model.loss_and_grad(x, y)  # one step: every layer has its running activation range
    proto = to_onnx_int8(model)
    dequantized = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    reads_integers = {n.name for n in proto.graph.node
                      if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[0] in dequantized
                      and n.input[1] in dequantized}
    assert reads_integers == {"conv1d", "q_proj", "k_proj", "v_proj", "out_proj"}
    ops = {n.name: list(n.input) for n in proto.graph.node}
    assert ops["scores"] == ["qh", "kt"] and ops["attend"] == ["p", "vh"]  # float MatMuls, as imported
    out = onnxruntime_outputs(proto, x)
    np.testing.assert_allclose(out, model(x), atol=0.05 * np.abs(model(x)).max())


# -- info ------------------------------------------------------------------------------------------------
def test_info_names_the_float_layers_and_why():
    from edgetrain.info import format_table, summarize

    model = edgetrain.load(_attention_model(left_mix=True))
    summary = summarize(model)
    assert summary["quantised_layers"] == ["conv1d", "q_proj", "k_proj", "v_proj", "scores", "attend", "out_proj"]
    reasons = {f["name"]: f["reason"] for f in summary["float_layers"]}
    assert reasons == {"token_mix": "MatMul weight is its first operand (W @ x): not quantised",
                       "fc": "classifier: fp32 by FracTrain's default (setting quantize_classifier)"}
    assert "Softmax" in summary["float_ops"] and "Reshape" not in summary["float_ops"]
    table = format_table(summary)
    assert "token_mix (MatMul): MatMul weight is its first operand (W @ x): not quantised" in table
    assert "other ops compute in float32" in table and "Softmax" in table
    model.set_precision("8/8")
    assert model.precision["token_mix"].is_float and type(model.executor.ops["token_mix"]).__name__ == "MatMul"


def test_float_reasons():
    w3 = np.zeros((2, 3, 4), np.float32)
    assert qops.float_reason(Node("m", "MatMul", ["x", "w"], ["y"], {}), {"w": w3}) == \
        "MatMul weight is not a 2-D parameter (3-D): not quantised"
    assert "first operand" in qops.float_reason(Node("m", "MatMul", ["w", "x"], ["y"], {}), {"w": w3[0]})
    assert qops.integer_form(Node("m", "MatMul", ["w", "x"], ["y"], {}), {"w": w3[0]}) is None
    assert qops.float_reason(Node("c", "Conv", ["x", "w"], ["y"], {}), {"w": np.zeros((1,) * 6)}) == \
        "Conv over 4 spatial dims: not quantised"
    assert qops.float_reason(Node("g", "Gemm", ["x", "w"], ["y"], {"transA": 1}), {"w": w3[0]}) == \
        "Gemm with transA: not quantised"
