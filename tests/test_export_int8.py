"""Float and int8 (QDQ) exports of a fixed-point-trained model, served by onnxruntime, against the engine."""
import dataclasses

import numpy as np
import onnx
import pytest

import models
from edgetrain.cli.demo import demo_model_path
from edgetrain.data import Dataset, Split, load_data
from edgetrain.errors import ModelError
from edgetrain.export import export_int8, export_onnx, onnxruntime_outputs, to_onnx_int8
from edgetrain.train.config import resolve
from edgetrain.train.runstate import build_model
from edgetrain.train.trainer import Trainer

FLOAT_TOLERANCE = 1e-4
INT8_MIN_AGREEMENT = 0.99


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


@pytest.mark.parametrize("bits", ["8/8", "6/8"])
def test_float_and_int8_exports_match_the_engine_on_held_out_digits(tmp_path, digits, bits):
    model = train(tmp_path, demo_model_path(), digits, steps=40, bits=bits)
    x = digits.test.x  # held out: never trained on
    export_onnx(model, tmp_path / "float.onnx")
    export_int8(model, tmp_path / "int8.onnx")
    ref_float, ref_int = engine(model, x, "fp32"), engine(model, x)
    got_float = onnxruntime_outputs(tmp_path / "float.onnx", x)
    got_int = onnxruntime_outputs(tmp_path / "int8.onnx", x)
    assert np.abs(got_float - ref_float).max() / np.abs(ref_float).max() < FLOAT_TOLERANCE
    agreement = (got_int.argmax(1) == ref_int.argmax(1)).mean()
    assert agreement >= INT8_MIN_AGREEMENT, agreement
    assert (got_int.argmax(1) == digits.test.y).mean() > 0.9


def test_int8_graph_layout(tmp_path, digits):
    small = dataclasses.replace(digits, train=dataclasses.replace(digits.train, x=digits.train.x[:256],
                                                                  y=digits.train.y[:256]))
    model = train(tmp_path, demo_model_path(), small, steps=3)
    proto = to_onnx_int8(model)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = list(proto.graph.node)
    quant = {n.name: n for n in nodes if n.op_type == "QuantizeLinear"}
    assert sorted(quant) == ["conv1.input_quantize", "conv2.input_quantize", "fc1.input_quantize",
                             "fc2.input_quantize"]
    # Normalised pixels can be negative (int8); after ReLU and pooling they cannot (uint8); zero points 0.
    assert inits["conv1.input_zero_point"].dtype == np.int8
    for layer in ("conv2", "fc1", "fc2"):
        assert inits[f"{layer}.input_zero_point"].dtype == np.uint8 and inits[f"{layer}.input_zero_point"] == 0
        running = model.runtime.act_ranges[layer].value
        assert inits[f"{layer}.input_scale"] == pytest.approx(running / 255, rel=1e-6)
    for w, channels in (("conv1.weight", 6), ("conv2.weight", 16), ("fc1.weight", 120), ("fc2.weight", 84)):
        assert inits[f"{w}_quantized"].dtype == np.int8 and np.abs(inits[f"{w}_quantized"]).max() == 127
        assert inits[f"{w}_scale"].shape == (channels,) and w not in inits
        dq = next(n for n in nodes if n.output[0] == f"{w}_dequantized")
        assert onnx.helper.get_attribute_value(dq.attribute[0]) == 0
    # Biases, and the classifier (fp32 in training), stay float.
    assert inits["fc3.weight"].dtype == np.float32 and inits["conv1.bias"].dtype == np.float32
    assert [n.op_type for n in nodes].count("Conv") == 2 and [n.op_type for n in nodes].count("Gemm") == 3


def test_int8_export_of_a_residual_network_with_batchnorm(tmp_path):
    rng = np.random.default_rng(0)
    ds = lambda n: Dataset(rng.standard_normal((n, 3, 8, 8)).astype(np.float32), rng.integers(0, 10, n),
                           10, "synthetic", (0.0,) * 3, (1.0,) * 3)
    split = Split(ds(128), ds(200))
    path = tmp_path / "resnet8.onnx"
    path.write_bytes(models.build_model("resnet8", input_size=8, seed=1).SerializeToString())
    model = train(tmp_path, path, split, steps=6, batch_size=32)
    proto = to_onnx_int8(model)
    # BatchNorm is not folded: every one of the source graph's BatchNormalization nodes is still there.
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == \
           sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    got = onnxruntime_outputs(proto, split.test.x)
    ref = engine(model, split.test.x)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= INT8_MIN_AGREEMENT


def test_int8_export_needs_integer_layers(tmp_path, digits):
    model, _ = build_model(demo_model_path(), 0, None)
    with pytest.raises(ModelError, match="every layer of this model is fp32"):
        to_onnx_int8(model)
    model.set_precision("8/8")
    with pytest.raises(ModelError, match="no running activation range"):
        to_onnx_int8(model)
