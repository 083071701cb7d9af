"""Round trip: int8 ONNX models (edgetrain's own QDQ export, onnxruntime's quantisers) load back, evaluate as
onnxruntime does, train and export again."""
import functools
import json
import warnings

import numpy as np
import onnx
import pytest

import edgetrain
from edgetrain.cli.demo import demo_model_path
from edgetrain.cli.main import main
from edgetrain.data import load_data
from edgetrain.export import export_int8, export_onnx, onnxruntime_session
from edgetrain.train.config import resolve
from edgetrain.train.optim import SGD
from edgetrain.train.runstate import build_model
from edgetrain.train.trainer import Trainer

WEIGHTS = ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight")


def ort(path, x):
    sess = onnxruntime_session(path)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, digits):
    """The shipped LeNet-5 trained a few 8/8 steps, exported int8 (QDQ)."""
    tmp = tmp_path_factory.mktemp("int8")
    cfg = resolve(dict(model=str(demo_model_path()), data="digits", schedule="static", bits="8/8", steps=4,
                       batch_size=32, out=str(tmp / "run"), lr=0.02))
    model, _ = build_model(cfg.model, cfg.seed, None)
    Trainer(model, digits, cfg, export_model=False).fit()
    path = tmp / "int8.onnx"
    export_int8(model, path)
    return path


def test_int8_export_evaluates_as_onnxruntime_does(int8_export, digits):
    model = edgetrain.load(int8_export)
    # Weights are float parameters under their original names; nothing quantised is trainable.
    assert set(WEIGHTS) <= set(model.parameters())
    assert all(np.issubdtype(v.dtype, np.floating) for v in model.parameters().values())
    x = digits.test.x
    ours, theirs = model(x), ort(int8_export, x)
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    assert (ours.argmax(1) == digits.test.y).mean() > 0.5


def test_int8_export_trains_and_exports_float(int8_export, digits, tmp_path):
    model = edgetrain.load(int8_export)
    before = {k: v.copy() for k, v in model.parameters().items()}
    x, y = digits.train.x[:64], digits.train.y[:64]
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(5):
        loss, grads = model.loss_and_grad(x, y)
        losses.append(loss)
        # The straight-through gradient reaches the weights behind every fake-quantised activation.
        assert all(np.abs(grads[w]).max() > 0 for w in WEIGHTS)
        opt.step(grads)
    assert losses[-1] < losses[0]
    assert all(not np.array_equal(before[w], model.parameters()[w]) for w in WEIGHTS)
    # A float export writes the trained float weights; the activations' Q/DQ pairs stay, so onnxruntime
    # computes what the engine computes up to float summation order (which can move an activation across a
    # rounding boundary: agreement, not identity).
    export_onnx(model, tmp_path / "retrained.onnx")
    proto = onnx.load(str(tmp_path / "retrained.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for w in WEIGHTS:
        np.testing.assert_array_equal(inits[w], model.parameters()[w])
    xt = digits.test.x
    agreement = (model(xt).argmax(1) == ort(tmp_path / "retrained.onnx", xt).argmax(1)).mean()
    assert agreement >= 0.99, agreement


def test_int8_reexport_after_8_8_fine_tuning(int8_export, digits, tmp_path):
    model = edgetrain.load(int8_export)
    model.set_precision("8/8")
    opt = SGD(model.parameters(), lr=0.02)
    for step in range(3):
        model.step = step
        _, grads = model.loss_and_grad(digits.train.x[:64], digits.train.y[:64])
        opt.step(grads)
    # The imported activation QDQ pairs keep their (suffixed) names; the export adds its own in front of
    # each integer layer, and onnxruntime computes what the engine computes.
    export_int8(model, tmp_path / "again.onnx")
    x = digits.test.x
    assert (model(x).argmax(1) == ort(tmp_path / "again.onnx", x).argmax(1)).mean() >= 0.99
    again = edgetrain.load(tmp_path / "again.onnx")
    # Not bit-exact: onnxruntime fuses DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv and
    # rounds its int32 sum times one float multiplier, where the graph's own semantics (which edgetrain
    # follows) round the float conv of dequantised values: the two can land 1 LSB apart on a tie.
    assert (again(x).argmax(1) == ort(tmp_path / "again.onnx", x).argmax(1)).mean() >= 0.99


def test_info_reads_an_int8_export(int8_export, capsys):
    assert main(["info", str(int8_export), "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out)
    assert info  # a summary, not a refusal


class _Calibration:
    def __init__(self, name, x):
        self.batches = iter([{name: x[i:i + 16]} for i in range(0, len(x), 16)])

    def get_next(self):
        return next(self.batches, None)


@pytest.mark.parametrize("fmt", ["qdq", "qoperator", "dynamic"])
def test_onnxruntime_quantized_models_match_onnxruntime(fmt, digits, tmp_path):
    quantization = pytest.importorskip("onnxruntime.quantization")
    src = str(demo_model_path())
    out = str(tmp_path / f"{fmt}.onnx")
    if fmt == "dynamic":
        quantization.quantize_dynamic(src, out, weight_type=quantization.QuantType.QInt8)
    else:
        name = onnx.load(src).graph.input[0].name
        form = quantization.QuantFormat.QDQ if fmt == "qdq" else quantization.QuantFormat.QOperator
        quantization.quantize_static(src, out, _Calibration(name, digits.train.x[:64]), quant_format=form,
                                     per_channel=True, activation_type=quantization.QuantType.QUInt8,
                                     weight_type=quantization.QuantType.QInt8)
    x = digits.test.x
    model = edgetrain.load(out)
    ours, theirs = model(x), ort(out, x)
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
    if fmt == "qdq":
        assert set(WEIGHTS) <= set(model.parameters())
    # Written back (float weights where they were dequantised, the rest as it was), it still runs the same
    export_onnx(model, tmp_path / "back.onnx")
    assert (ort(tmp_path / "back.onnx", x).argmax(1) == theirs.argmax(1)).mean() >= 0.99
    # onnxruntime's QGemm has no ONNX shape inference: the importer supplies its output shapes for `info`
    assert main(["info", out]) == 0


OPSET10_CASES = ("test_qlinearconv", "test_convinteger_with_padding", "test_convinteger_without_padding",
                 "test_matmulinteger")


@functools.cache
def _onnx_cases() -> dict:
    from onnx.backend.test.case import node

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return {c.name: c for c in node.collect_testcases(None) if c.name in OPSET10_CASES}


@pytest.mark.parametrize("name", OPSET10_CASES)
def test_onnx_opset10_cases_at_opset_13(name):
    """ONNX's own cases of these ops are opset 10 (older than edgetrain imports); the ops are unchanged
    since, so the same graphs at opset 13 must give ONNX's expected outputs exactly."""
    case = _onnx_cases()[name]
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    model.opset_import[0].version = 13
    (inputs, outputs), = case.data_sets
    got = edgetrain.load(model).run(dict(zip([i.name for i in model.graph.input], inputs)))
    for info, want in zip(model.graph.output, outputs):
        assert got[info.name].dtype == want.dtype
        np.testing.assert_array_equal(got[info.name], want)


def test_fake_quantisation_straight_through_gradient():
    """Q -> DQ on an activation: eval rounds half to even and saturates as onnxruntime does; the gradient
    passes unchanged inside the representable range and is 0 where the value saturated."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.array([[1.0, -3.0, 0.25, 2.0]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["h"]),
         helper.make_node("QuantizeLinear", ["h", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "fq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.5, np.float32), "s"),
         numpy_helper.from_array(np.array(0, np.int8), "z")])
    model = edgetrain.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.array([[0.25, 100.0, 1.0, 0.375]], np.float32)  # h/s = 0.5 (tie: 0), -600 (saturates), 0.5, 1.5 (tie: 2)
    np.testing.assert_array_equal(model(x), [[0.0, -64.0, 0.0, 1.0]])
    # loss = sum(y): dL/dy = 1, so dL/dw = x where h did not saturate
    _, grads = model.loss_and_grad(x, np.zeros(1), loss=lambda out, _: (float(out.sum()), np.ones_like(out)))
    np.testing.assert_array_equal(grads["w"], [[0.25, 0.0, 1.0, 0.375]])
