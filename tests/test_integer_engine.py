"""The integer engine computes what it claims: exact against a float64 fake-quantised simulation,
deterministic, and trains as well as fp32 on the shipped digits."""
import numpy as np
import pytest
from seeded_steps import fixed_batch, sgd_steps

import edgetrain
import models
from edgetrain.kernels.rescale import rescaled
from edgetrain.ops.base import Run
from edgetrain.ops.conv import Conv
from edgetrain.quant import mac as qops


def _rescaled(acc, rescale):
    """The exact sums as the production kernels return them: as they are, or rescaled to floats."""
    return acc if rescale is None else rescaled(acc, rescale)


class _Float64Kernels:
    """The same three products as edgetrain.kernels, computed by the float reference ops in float64.

    Integer operands below 2^53 make every float64 product and partial sum exact here, so this is an
    independent exact implementation: the float Conv op's im2col and BLAS, not the Numba kernels.
    `rescale=` is honoured as the production kernels do (the exact sums times the scales through
    `kernels.rescale`), so the engine under test takes the path it takes in production.
    """

    def __init__(self, node):
        self.node = node

    def _conv(self, args, w_shape):
        from edgetrain.graph import Node

        attrs = {"strides": list(args["stride"]), "dilations": list(args["dilation"]), "group": args["groups"],
                 "pads": [args["pads"][0], args["pads"][1], args["pads"][2], args["pads"][3]],
                 "kernel_shape": list(w_shape[2:])}
        return Conv(Node("sim", "Conv", ["x", "w"], ["y"], attrs), 17)

    def conv2d_forward(self, xq, wq, bounds=None, rescale=None, **args):
        y, _ = self._conv(args, wq.shape).forward([xq.astype(np.float64), wq.astype(np.float64)], Run(False))
        return _rescaled(y[0], rescale)

    def conv2d_backward_weight(self, dyq, xq, w_shape, bounds=None, **args):
        conv = self._conv(args, w_shape)
        _, ctx = conv.forward([xq.astype(np.float64), np.zeros(w_shape)], Run(True))
        return conv.backward(ctx, [dyq.astype(np.float64)], [False, True])[1]

    def conv2d_backward_data(self, gq, wq, x_shape, bounds=None, rescale=None, **args):
        conv = self._conv(args, wq.shape)
        _, ctx = conv.forward([np.zeros(x_shape), wq.astype(np.float64)], Run(True))
        return _rescaled(conv.backward(ctx, [gq.astype(np.float64)], [True, True])[0], rescale)

    def linear_forward(self, xq, wq, bounds=None):
        return xq.astype(np.float64) @ wq.astype(np.float64).T

    def linear_backward_weight(self, dyq, xq, bounds=None):
        return dyq.astype(np.float64).T @ xq.astype(np.float64)

    def linear_backward_data(self, gq, wq, bounds=None):
        return gq.astype(np.float64) @ wq.astype(np.float64)


def _train_step(model, x, y):
    loss, grads = model.loss_and_grad(x, y)
    return loss, grads


@pytest.mark.parametrize("name,kwargs,bits", [
    ("lenet5", {}, "8/8"),
    ("lenet5", {}, "4/6"),
    ("resnet8", dict(in_channels=1, input_size=12), "8/8"),
    ("mobilenetv2", dict(input_size=16, width_mult=0.25), "6/8:w4"),
    ("mlp", {}, "3/16"),
])
def test_integer_engine_equals_float64_fake_quant_simulation(name, kwargs, bits, monkeypatch):
    proto = models.build_model(name, seed=4, **kwargs)
    model = edgetrain.load(proto, seed=11)
    model.set_precision(bits, quantize_classifier=True)
    shape = (6,) + tuple(model.input_shape[1:])
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    y = np.arange(6) % 10
    model.step = 3
    loss, grads = _train_step(model, x, y)
    out = model(x)

    sim = edgetrain.load(proto, seed=11)
    sim.set_precision(bits, quantize_classifier=True)
    sim.step = 3
    monkeypatch.setattr(qops, "kernels", _Float64Kernels(None))
    sim_loss, sim_grads = _train_step(sim, x, y)
    sim_out = sim(x)

    assert loss == sim_loss
    np.testing.assert_array_equal(out, sim_out)
    for k in grads:
        np.testing.assert_array_equal(grads[k], sim_grads[k], err_msg=k)
    assert any(isinstance(op, qops.QuantMAC) for op in model.executor.ops.values())


def _run(seed, steps=3, bits="8/8", threads=None):
    import numba

    model = edgetrain.load(models.build_model("resnet8", in_channels=1, input_size=12, seed=1), seed=seed)
    model.set_precision(bits)
    old = numba.get_num_threads()
    try:
        if threads:
            numba.set_num_threads(threads)
        sgd_steps(model, *fixed_batch(), steps)
    finally:
        numba.set_num_threads(old)
    return model.state_dict()


def test_relu_folded_into_batchnorm_gives_the_unfolded_bits(monkeypatch):
    """Integer layers' BatchNorms take over the Relu that alone reads them, and so do residual joins' Adds
    (AddRelu); training with and without those folds ends on the same weights and BatchNorm statistics,
    bit for bit, plain and with DFQ."""
    from edgetrain.ops import norm
    from edgetrain.precision.dfq.config import DFQConfig
    from edgetrain.precision.dfq.controller import DFQ

    def run(dfq: bool):
        model = edgetrain.load(models.build_model("resnet8", in_channels=1, input_size=12, seed=1), seed=0)
        model.set_precision("8/8")
        if dfq:
            d = DFQ.attach(model, DFQConfig())
            d.force = {u.index: np.arange(16) % 6 for u in d.units}  # every candidate, skip included
        folded = sum(isinstance(op, norm.FusedAway) for op in model.executor.ops.values())
        if dfq:  # the blocks' closing ReLUs, which the gated units run (test_dfq checks those)
            folded -= len(d.fused_ops)
        x, y = fixed_batch()
        sgd_steps(model, x, y)
        return model.state_dict(), model(x), folded

    for dfq in (False, True):
        fused_state, fused_out, folded = run(dfq)
        assert folded >= 4  # the stem's and each block's first BatchNorm + Relu (and the joins' Add + Relu)
        with monkeypatch.context() as m:
            m.setattr(norm, "fuse_relu", lambda *a, **k: None)
            m.setattr(edgetrain.model, "fuse_relu", lambda *a, **k: None)
            m.setattr(edgetrain.precision.dfq.gated_unit, "fuse_relu", lambda *a, **k: None)
            m.setattr(edgetrain.model.Model, "_fuse_add_relus", lambda *a, **k: None)  # the joins' Add + Relu
            plain_state, plain_out, none = run(dfq)
        assert none == 0
        assert fused_state.keys() == plain_state.keys()
        for k in fused_state:
            assert np.array_equal(fused_state[k], plain_state[k]), k
        assert np.array_equal(fused_out, plain_out)


def test_relu6_folded_into_batchnorm_gives_the_unfolded_bits(monkeypatch):
    """MobileNetV2's ReLU6 (Clip(0, 6)) folds into its BatchNorm as a capped Relu: training with and
    without the fold ends on the same weights, statistics and eval outputs, bit for bit; and a model set
    back to fp32 runs its Clips again."""
    from edgetrain.ops import norm

    def run():
        model = edgetrain.load(models.build_model("mobilenetv2", in_channels=1, input_size=12, seed=1,
                                                  width_mult=0.35), seed=0)
        model.set_precision("8/8")
        capped = sum(isinstance(op, norm.BatchNormalization) and op.cap == 6.0 for op in model.executor.ops.values())
        x = (np.random.default_rng(5).standard_normal((8, 1, 12, 12)) * 4).astype(np.float32)
        sgd_steps(model, x, np.arange(8) % 10, steps=2)
        return model, model.state_dict(), model(x), capped

    model, fused_state, fused_out, capped = run()
    assert capped >= 10
    model.set_precision("fp32")  # no integer layers: no fold, every Clip runs as itself
    assert not any(isinstance(op, norm.FusedAway) for op in model.executor.ops.values())
    with monkeypatch.context() as m:
        m.setattr(edgetrain.model, "fuse_relu", lambda *a, **k: None)
        _, plain_state, plain_out, none = run()
    assert none == 0
    for k in fused_state:
        assert np.array_equal(fused_state[k], plain_state[k]), k
    assert np.array_equal(fused_out, plain_out)


def test_relu_folded_into_maxpool_gives_the_unfolded_bits(monkeypatch):
    """LeNet-5's Relus, each read only by a MaxPool, run inside those pools in an integer model (and as
    themselves at fp32); training with and without the fold ends on the same weights and eval outputs,
    bit for bit."""
    from edgetrain.ops.base import FusedAway
    from edgetrain.ops.pool import MaxPool

    def run():
        model = edgetrain.load(models.build_model("lenet5", seed=1), seed=0)
        model.set_precision("8/8")
        pools = [op for op in model.executor.ops.values() if isinstance(op, MaxPool) and op.relu]
        x = np.random.default_rng(5).standard_normal((8, 1, 28, 28)).astype(np.float32)
        sgd_steps(model, x, np.arange(8) % 10, steps=3)
        return model, model.state_dict(), model(x), len(pools)

    model, fused_state, fused_out, folded = run()
    assert folded == 2
    # the two pools' Relus, and the classifier's two, folded into their Linears (next test)
    assert sum(isinstance(op, FusedAway) for op in model.executor.ops.values()) == 4
    model.set_precision("fp32")
    assert not any(isinstance(op, FusedAway) or getattr(op, "relu", False) for op in model.executor.ops.values())
    with monkeypatch.context() as m:
        m.setattr(edgetrain.model.Model, "_fuse_relu_pools", lambda *a, **k: None)
        _, plain_state, plain_out, none = run()
    assert none == 0
    for k in fused_state:
        assert np.array_equal(fused_state[k], plain_state[k]), k
    assert np.array_equal(fused_out, plain_out)


@pytest.mark.parametrize("batch", [8, 128])  # small_linear's path, and the general one (bias in the rescale)
def test_relu_folded_into_linear_gives_the_unfolded_bits(monkeypatch, batch):
    """The MLP's Relus, each read only by an integer Linear's output, run inside those Linears (and as
    themselves at fp32 or with the fold off); training with and without the fold ends on the same weights
    and eval outputs, bit for bit, and the folded layers are the two hidden ones, not the classifier."""
    from edgetrain.ops.base import FusedAway
    from edgetrain.quant.mac import QuantLinear

    def run():
        model = edgetrain.load(models.build_model("mlp", seed=1), seed=0)
        model.set_precision("8/8")
        folded = sorted(name for name, op in model.executor.ops.items() if isinstance(op, QuantLinear) and op.relu)
        x = np.random.default_rng(5).standard_normal((batch, 784)).astype(np.float32)
        x[:, :3] = 0.0  # inputs whose codes are 0: outputs equal to the bias, -0.0 and +0.0 among them
        sgd_steps(model, x, np.arange(batch) % 10, steps=3)
        return model, model.state_dict(), model(x), folded

    model, fused_state, fused_out, folded = run()
    assert folded == ["fc1", "fc2"]
    assert sum(isinstance(op, FusedAway) for op in model.executor.ops.values()) == 2
    model.set_precision("fp32")
    assert not any(isinstance(op, FusedAway) or getattr(op, "relu", False) for op in model.executor.ops.values())
    model.set_precision("8/8")
    assert sum(isinstance(op, FusedAway) for op in model.executor.ops.values()) == 2  # folded again
    with monkeypatch.context() as m:
        m.setattr(edgetrain.model.Model, "_fuse_linear_relus", lambda *a, **k: None)
        _, plain_state, plain_out, none = run()
    assert none == []
    for k in fused_state:
        assert np.array_equal(fused_state[k], plain_state[k]), k
    assert np.array_equal(fused_out, plain_out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("parallel", [False, True])
def test_folded_relu6_is_clip_of_the_stored_output(dtype, parallel):
    """Capped at 6, the BatchNorm stores min(max(y, 0), 6) and passes the gradient where 0 < y < 6 of
    the stored output, as the unfolded Clip does, values at and beyond both bounds included."""
    from edgetrain.ops import norm_kernels

    rng = np.random.default_rng(7 + parallel)
    x = rng.standard_normal((4, 3, 37)).astype(dtype)
    x[0, :2, :4] = [[-9.0, 0.0, 2.0, 9.0]]
    x[:, 2] = 1.5  # a constant channel: its output is exactly its bias, 6, on the bound (no gradient there)
    g = rng.standard_normal((4, 3, 37)).astype(dtype)
    scale, bias = np.array([3.0, -4.0, 8.0]), np.array([1.0, 2.0, 6.0])
    forward = norm_kernels.bn_train_forward_parallel if parallel else norm_kernels.bn_train_forward
    backward = norm_kernels.bn_train_backward_parallel if parallel else norm_kernels.bn_train_backward
    plain, capped = np.empty_like(x), np.empty_like(x)
    mean, var, inv = np.empty(3), np.empty(3), np.empty(3)
    forward(x, scale, bias, 1e-5, plain, mean, var, inv, False)
    forward(x, scale, bias, 1e-5, capped, mean, var, inv, True, 6.0)
    want = np.minimum(np.maximum(plain, dtype(0)), dtype(6))
    assert np.array_equal(capped, want) and (capped == 6).any() and (capped == 0).any() and (plain == 6).any()
    folded = [np.empty_like(x), np.empty(3), np.empty(3)]
    backward(x, g, True, scale, bias, mean, inv, *folded, 6.0)
    masked = [np.empty_like(x), np.empty(3), np.empty(3)]
    backward(x, np.where((plain > 0) & (plain < 6), g, dtype(0)), False, scale, bias, mean, inv, *masked)
    for a, b in zip(folded, masked):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("magnitude", [1.0, 1e-44, 1e-46])  # 1e-46: outputs that round to 0 in float32
@pytest.mark.parametrize("parallel", [False, True])
def test_folded_relu_mask_is_the_stored_outputs_sign(dtype, magnitude, parallel):
    """The folded Relu's backward recomputes the BatchNorm output from x; its mask must be exactly
    y > 0 of the stored output, even where x * a + b is positive in float64 but rounds to 0 in float32."""
    from edgetrain.ops import norm_kernels

    rng = np.random.default_rng(int(-np.log10(magnitude)) + 3 * parallel)
    x = rng.standard_normal((4, 3, 37)).astype(dtype)
    g = rng.standard_normal((4, 3, 37)).astype(dtype)
    scale = rng.choice([-1.0, 1.0], 3) * magnitude
    bias = rng.standard_normal(3) * magnitude * 0.3
    y = np.empty_like(x)
    mean, var, inv = np.empty(3), np.empty(3), np.empty(3)
    forward = norm_kernels.bn_train_forward_parallel if parallel else norm_kernels.bn_train_forward
    backward = norm_kernels.bn_train_backward_parallel if parallel else norm_kernels.bn_train_backward
    forward(x, scale, bias, 1e-5, y, mean, var, inv, True)
    folded = [np.empty_like(x), np.empty(3), np.empty(3)]
    backward(x, g, True, scale, bias, mean, inv, *folded)
    masked = [np.empty_like(x), np.empty(3), np.empty(3)]
    backward(x, np.where(y > 0, g, dtype(0)), False, scale, bias, mean, inv, *masked)
    for a, b in zip(folded, masked):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
    if dtype is np.float32 and magnitude == 1e-46:  # the case a float64 sign test would get wrong
        affine = x.astype(np.float64) * (scale * inv)[None, :, None] + (bias - mean * scale * inv)[None, :, None]
        assert ((affine > 0) & ~(y > 0)).any()


def test_same_seed_same_bits_other_seed_differs():
    a, b, c = _run(0), _run(0), _run(1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a), "the seed must reach the stochastic rounding"


def test_thread_count_does_not_change_the_bits():
    import numba
    from threadpoolctl import threadpool_limits

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads")
    with threadpool_limits(1):
        one = _run(0, threads=1)
    two = _run(0, threads=2)
    assert all(np.array_equal(one[k], two[k]) for k in one)


def test_set_precision_between_steps_and_patterns():
    model = edgetrain.load(models.build_model("resnet8", in_channels=1, input_size=12))
    p = model.set_precision("8/8", {"layer1.*": "4/6", "layer3.0.conv2": "fp32"})
    assert str(p["layer1.0.conv1"]) == "4/6" and str(p["layer2.0.conv1"]) == "8/8"
    assert p["layer3.0.conv2"].is_float and p["fc"].is_float  # classifier fp32 by default
    x = np.random.default_rng(0).standard_normal((4, 1, 12, 12)).astype(np.float32)
    model.loss_and_grad(x, np.arange(4))
    mixed = model.cost.bitops
    model.set_precision("fp32")
    model.loss_and_grad(x, np.arange(4))
    fp32_step = model.cost.bitops - mixed
    assert fp32_step * 2 == model.cost.fp32_bitops  # the same shapes cost the same in fp32 every step
    assert mixed < fp32_step
    with pytest.raises(edgetrain.EdgetrainError, match="match no MAC layer"):
        model.set_precision("8/8", {"nonexistent.*": "4/4"})
    with pytest.raises(edgetrain.EdgetrainError, match="bits must be in 2..16"):
        model.set_precision("1/8")


def test_bitops_by_hand():
    model = edgetrain.load(models.build_model("lenet5"))
    model.set_precision("4/8")
    x = np.zeros((10, 1, 28, 28), np.float32)
    model.loss_and_grad(x, np.zeros(10, int))
    c = model.last_cost["conv2"]
    macs = 10 * (10 * 10 * 16 * 6 * 5 * 5)  # batch x output pixels x out channels x (in x k x k)
    assert c.macs == macs
    assert (c.forward, c.backward_data, c.backward_weight) == (macs * 4 * 4, macs * 8 * 4, macs * 4 * 8)
    first = model.last_cost["conv1"]
    assert first.backward_data == 0  # nothing to back-propagate into the data
    fc3 = model.last_cost["fc3"]
    assert fc3.forward == fc3.macs * 32 * 32  # the classifier stays fp32
    assert model.cost.fp32_bitops > model.cost.bitops


def test_skipped_input_gradient_is_not_computed(monkeypatch):
    calls = []
    real = qops.kernels.conv2d_backward_data

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(qops.kernels, "conv2d_backward_data", spy)
    model = edgetrain.load(models.build_model("lenet5"))
    model.set_precision("8/8")
    model.loss_and_grad(np.zeros((2, 1, 28, 28), np.float32), np.zeros(2, int))
    assert len(calls) == 1  # conv2 back-propagates into conv1's output; conv1 has no one to tell


def test_square_matmul_weight_gets_its_gradient_untransposed():
    """A MatMul weight is stored (in, out): its gradient is transposed back by layout, also when square."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 6)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6])],
                              [numpy_helper.from_array(w, "W")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x, dy = rng.standard_normal((2, 8, 6)).astype(np.float32)

    def grad(bits):
        model = edgetrain.load(proto)
        model.set_precision(bits, quantize_classifier=True)
        _, tape = model.forward_train(x)
        return model.backward(tape, {"y": dy})["W"]

    np.testing.assert_allclose(grad("16/16"), grad("fp32"), atol=2e-3)


def test_eval_uses_running_range_and_counts_saturation():
    model = edgetrain.load(models.build_model("mlp"))
    model.set_precision("8/8")
    x = np.random.default_rng(0).standard_normal((8, 784)).astype(np.float32)
    model.loss_and_grad(x, np.arange(8))
    assert not model.runtime.saturated
    model(x * 10)  # ten times the range training saw: clipped in eval, and counted
    assert model.runtime.saturated.get("fc1", 0) > 0


# --- training quality on the shipped digits -------------------------------------------------
# Steps per model: LeNet-5 is at 94.5% (fp32, 8/8 and 4/8 alike) after 150 steps, half the suite's time;
# ResNet-8 is still at 69% then (fp32 too), so it keeps 300.
ACCURACY_STEPS = {"lenet5": 150, "resnet8": 300}
ACCURACY_BATCH = 64


def _train_digits(name, precision, **kwargs):
    from edgetrain.data import load_digits
    from edgetrain.train.loop import accuracy, fit
    from edgetrain.train.optim import SGD
    from edgetrain.train.schedules import make_schedule

    x, y = load_digits("train")
    xt, yt = load_digits("test")
    model = edgetrain.load(models.build_model(name, seed=0, **kwargs))
    if precision != "fp32":
        model.set_precision(precision)
    opt = SGD(model.parameters(), 0.05, momentum=0.9, weight_decay=5e-4)
    steps = ACCURACY_STEPS[name]
    fit(model, x, y, steps=steps, batch_size=ACCURACY_BATCH, optimizer=opt, seed=0,
        schedule=make_schedule("cosine", 0.05, steps))
    return accuracy(model, xt, yt), model


# ResNet-8 at half width (8, 16, 32 channels): the same blocks and BatchNorms, a third of the suite's time.
@pytest.mark.parametrize("name,kwargs", [("lenet5", {}), ("resnet8", dict(in_channels=1, input_size=28, width=8))])
def test_static_low_precision_trains_as_well_as_fp32(name, kwargs):
    """Static 8/8 within 1.0 point of fp32 after the same steps; 4/8 within 3 points."""
    fp32, _ = _train_digits(name, "fp32", **kwargs)
    eight, m8 = _train_digits(name, "8/8", **kwargs)
    four, _ = _train_digits(name, "4/8", **kwargs)
    assert fp32 > 0.9, f"fp32 baseline too weak to compare against: {fp32:.3f}"
    assert eight >= fp32 - 0.010, f"8/8 {eight:.3f} vs fp32 {fp32:.3f}"
    assert four >= fp32 - 0.030, f"4/8 {four:.3f} vs fp32 {fp32:.3f}"
    assert m8.cost.percent_of_fp32 < 7.0  # 8/8 is 6.25% of fp32's BitOPs, plus the fp32 classifier


def test_add_relu_is_add_then_relu_bit_for_bit():
    """AddRelu (the fused join) against NumPy's Add then Relu: values, NaN, broadcasting, the small-tensor
    form, and the backward's mask for both inputs."""
    from edgetrain.graph import Node
    from edgetrain.kernels.threads import SMALL_ELEMENTS
    from edgetrain.ops.base import Run
    from edgetrain.ops.elementwise import AddRelu

    op = AddRelu(Node("j", "Add", ["a", "b"], ["y"], {}), 17)
    rng = np.random.default_rng(3)
    for a_shape, b_shape in (((4, 8, 40, 50), (4, 8, 40, 50)), ((3, 5), (3, 5)), ((4, 8, 40, 50), (1, 8, 1, 1))):
        a = rng.standard_normal(a_shape).astype(np.float32)
        b = rng.standard_normal(b_shape).astype(np.float32)
        a.flat[7] = np.nan
        (y,), ctx = op.forward([a, b], Run(True, (0, 0), 0))
        want = np.maximum(a + b, 0)
        assert np.array_equal(y, want, equal_nan=True)
        g = rng.standard_normal(y.shape).astype(np.float32)
        ga, gb = op.backward(ctx, [g], [True, True])
        masked = g * (want > 0)
        assert np.array_equal(ga, masked) and gb.shape == b_shape
        handed = g.copy()  # a gradient the engine hands over for good (Op.reuses_grads): the same values, over it
        over_a, _ = op.backward(ctx, [handed], [True, True], owned=(True,))
        assert np.array_equal(over_a, masked) and (over_a is handed) == (y.size >= SMALL_ELEMENTS)
        assert np.allclose(gb, masked.sum(axis=tuple(i for i, d in enumerate(b_shape) if d == 1 and a_shape[i] > 1),
                                          keepdims=True).reshape(b_shape))
