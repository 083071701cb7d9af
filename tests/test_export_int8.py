"""Float and int8 (QDQ) exports of a fixed-point-trained model, served by onnxruntime, against the engine."""
import dataclasses

import numpy as np
import onnx
import pytest

import models
from edgetrain.cli.demo import demo_model_path
from edgetrain.data import Dataset, Split, load_data
from edgetrain.errors import ModelError
from edgetrain.export import export_int8, export_onnx, onnxruntime_outputs, optimized_op_counts, to_onnx_int8
from edgetrain.int8_graph import fold_batchnorm, stays_float
from edgetrain.train.config import resolve
from edgetrain.train.runstate import build_model
from edgetrain.train.trainer import Trainer

FLOAT_TOLERANCE = 1e-4
INT8_MIN_AGREEMENT = 0.99
# Random inputs and labels after 6 steps leave near-tied logits: the engine's own 8/8 and fp32 forwards agree on
# 93.5% of them. The export follows the engine to within its own quantisation error (max relative error 0.04).
RESIDUAL_MIN_AGREEMENT = 0.9
RESIDUAL_MAX_RELATIVE_ERROR = 0.1


def train(tmp_path, model_path, split, steps, bits="8/8", batch_size=32):
    cfg = resolve(dict(model=str(model_path), data="digits", schedule="static" if bits else "fp32", bits=bits,
                       steps=steps, batch_size=batch_size, out=str(tmp_path / "run"), lr=0.02))
    model, _ = build_model(cfg.model, cfg.seed, None)
    Trainer(model, split, cfg, export_model=False).fit()
    return model


def engine(model, x, precision=None):
    saved = model.precision_config
    if precision:
        model.set_precision(precision)
    try:
        return np.concatenate([model(x[i:i + 250]) for i in range(0, len(x), 250)])
    finally:
        model.set_precision(saved)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


INTEGER_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger"}


@pytest.mark.parametrize("bits", ["8/8", "6/8"])
def test_float_and_int8_exports_match_the_engine_on_held_out_digits(tmp_path, digits, bits):
    model = train(tmp_path, demo_model_path(), digits, steps=40, bits=bits)
    x = digits.test.x  # held out: never trained on
    export_onnx(model, tmp_path / "float.onnx")
    export_int8(model, tmp_path / "int8.onnx", calibration=digits.train.x[:256])
    ref_float, ref_int = engine(model, x, "fp32"), engine(model, x)
    got_float = onnxruntime_outputs(tmp_path / "float.onnx", x)
    got_int = onnxruntime_outputs(tmp_path / "int8.onnx", x)
    assert np.abs(got_float - ref_float).max() / np.abs(ref_float).max() < FLOAT_TOLERANCE
    agreement = (got_int.argmax(1) == ref_int.argmax(1)).mean()
    assert agreement >= INT8_MIN_AGREEMENT, agreement
    int8_top1, float_top1 = (got_int.argmax(1) == digits.test.y).mean(), (got_float.argmax(1) == digits.test.y).mean()
    assert int8_top1 > 0.9 and abs(int8_top1 - float_top1) <= 0.005, (int8_top1, float_top1)
    # onnxruntime runs it on integer kernels: no float Conv or Gemm left but the first conv (one input channel,
    # faster in float: edgetrain.int8_graph.MIN_INT8_CONV_CHANNELS) and the fp32 classifier.
    ops = optimized_op_counts(tmp_path / "int8.onnx", tmp_path / "int8.optimized.onnx")
    assert ops.get("QLinearConv") == 1 and ops.get("QGemm", 0) + ops.get("QLinearMatMul", 0) == 2, ops
    assert ops.get("Conv") == 1 and ops.get("Gemm", 0) + ops.get("FusedGemm", 0) == 1, ops


def test_int8_graph_layout(tmp_path, digits):
    small = dataclasses.replace(digits, train=dataclasses.replace(digits.train, x=digits.train.x[:256],
                                                                  y=digits.train.y[:256]))
    model = train(tmp_path, demo_model_path(), small, steps=3)
    proto = to_onnx_int8(model, calibration=small.train.x[:64])
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = list(proto.graph.node)
    graph = {n.name: n for n in model.graph.nodes}
    # One Q/DQ pair per quantised tensor; every integer layer's input is one of them, at the engine's scale:
    # after ReLU and pooling they cannot be negative, so uint8 with zero point 0.
    for layer in ("conv2", "fc1", "fc2"):
        t = graph[layer].inputs[0]
        running = model.runtime.act_ranges[layer].value
        zp = inits[f"{t}.zero_point"]
        assert zp.dtype == np.uint8 and zp == 0 and inits[f"{t}.scale"] == pytest.approx(running / 255, rel=1e-6)
    # conv1 reads one channel: a float Conv (faster in onnxruntime), on float input, with the engine's int8 weights.
    assert f"{graph['conv1'].inputs[0]}.zero_point" not in inits
    w = inits["conv1.weight"]
    assert w.dtype == np.float32 and "conv1.weight_quantized" not in inits
    codes = w.reshape(6, -1) / (np.abs(w.reshape(6, -1)).max(axis=1, keepdims=True) / 127)
    np.testing.assert_allclose(codes, np.rint(codes), atol=1e-4)
    for layer, channels in (("conv2", 16), ("fc1", 120), ("fc2", 84)):
        w = f"{layer}.weight"
        assert inits[f"{w}_quantized"].dtype == np.int8 and np.abs(inits[f"{w}_quantized"]).max() == 127
        assert inits[f"{w}_scale"].shape == (channels,)
        assert inits[f"{layer}.bias_quantized"].dtype == np.int32
        dq = next(n for n in nodes if n.output[0] == f"{w}_dequantized")
        assert onnx.helper.get_attribute_value(dq.attribute[0]) == 0
    # The classifier (fp32 in training) stays float.
    assert inits["fc3.weight"].dtype == np.float32
    assert [n.op_type for n in nodes].count("Conv") == 2 and [n.op_type for n in nodes].count("Gemm") == 3


def test_int8_export_of_a_residual_network_folds_batchnorm(tmp_path):
    rng = np.random.default_rng(0)
    ds = lambda n: Dataset(rng.standard_normal((n, 3, 8, 8)).astype(np.float32), rng.integers(0, 10, n),
                           10, "synthetic", (0.0,) * 3, (1.0,) * 3)
    split = Split(ds(128), ds(200))
    path = tmp_path / "resnet8.onnx"
    path.write_bytes(models.build_model("resnet8", input_size=8, seed=1).SerializeToString())
    model = train(tmp_path, path, split, steps=6, batch_size=32)
    proto = to_onnx_int8(model, calibration=split.train.x)
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    ops = optimized_op_counts(proto, tmp_path / "optimized.onnx")
    # The stem reads 3 channels: it stays a float Conv (edgetrain.int8_graph.MIN_INT8_CONV_CHANNELS).
    assert ops.get("QLinearConv") == 8 and ops.get("QLinearAdd") == 3 and ops.get("Conv") == 1, ops
    got = onnxruntime_outputs(proto, split.test.x)
    ref = engine(model, split.test.x)
    # Residual joins and conv outputs no integer layer reads are quantised too (calibrated), unlike the engine.
    assert (got.argmax(1) == ref.argmax(1)).mean() >= RESIDUAL_MIN_AGREEMENT
    assert np.abs(got - ref).max() / np.abs(ref).max() < RESIDUAL_MAX_RELATIVE_ERROR


def test_fold_batchnorm_keeps_the_float_function(tmp_path):
    path = tmp_path / "resnet8.onnx"
    proto = models.build_model("resnet8", input_size=8, seed=1)
    rng = np.random.default_rng(1)
    for t in proto.graph.initializer:  # non-trivial running statistics
        if "running" in t.name or t.name.endswith(("mean", "var")):
            a = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array((np.abs(a) + rng.uniform(0.5, 2, a.shape)).astype(a.dtype), t.name))
    path.write_bytes(proto.SerializeToString())
    folded = onnx.ModelProto()
    folded.CopyFrom(proto)
    assert fold_batchnorm(folded) == sum(n.op_type == "BatchNormalization" for n in proto.graph.node) > 0
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    x = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    ref, got = onnxruntime_outputs(proto, x), onnxruntime_outputs(folded, x)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_int8_export_needs_integer_layers(tmp_path, digits):
    model, _ = build_model(demo_model_path(), 0, None)
    with pytest.raises(ModelError, match="every layer of this model is fp32"):
        to_onnx_int8(model)
    model.set_precision("8/8")
    with pytest.raises(ModelError, match="no running activation range"):
        to_onnx_int8(model)


def test_only_convs_on_fewer_than_4_input_channels_stay_float():
    # onnxruntime's int8 conv kernels need a multiple of 4 input channels; a depthwise conv also has one input
    # channel per group in its weights, but its own int8 kernel.
    conv = lambda group=1: onnx.helper.make_node("Conv", ["x", "w"], ["y"], group=group)
    assert stays_float(conv(), np.zeros((16, 1, 3, 3))) and stays_float(conv(), np.zeros((16, 3, 3, 3)))
    assert not stays_float(conv(), np.zeros((16, 4, 3, 3)))
    assert not stays_float(conv(group=48), np.zeros((48, 1, 3, 3)))
    assert not stays_float(onnx.helper.make_node("Gemm", ["x", "w"], ["y"]), np.zeros((10, 2)))
