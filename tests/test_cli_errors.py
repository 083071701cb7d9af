"""Bad input to `edgetrain info`: exit 2, one clear line on stderr, no traceback."""
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import models


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgetrain.cli", *args], capture_output=True, text=True, timeout=120)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _save(tmp_path, name, model_or_bytes):
    path = tmp_path / name
    path.write_bytes(model_or_bytes if isinstance(model_or_bytes, bytes) else model_or_bytes.SerializeToString())
    return str(path)


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def bad_cases(tmp_path):
    good = models.build_model("lenet5").SerializeToString()
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    return {
        "truncated": (_save(tmp_path, "trunc.onnx", good[: len(good) // 3]),
                      ["trunc.onnx", "not a readable ONNX model"]),
        "garbage": (_save(tmp_path, "garbage.onnx", bytes(range(256)) * 8), ["garbage.onnx", "not"]),
        "empty": (_save(tmp_path, "empty.onnx", b""), ["empty.onnx", "empty"]),
        "missing": (str(tmp_path / "nope.onnx"), ["nope.onnx", "no such file"]),
        "unsupported": (
            _save(tmp_path, "unsup.onnx", _model(
                [helper.make_node("Relu", ["x"], ["a"], name="r"),
                 helper.make_node("Acos", ["a"], ["b"], name="acos_1"),
                 helper.make_node("Acos", ["b"], ["c"], name="acos_2"),
                 helper.make_node("Atan", ["c"], ["y"], name="atan_head")],
                [_vi("x", ["N", 3])], [_vi("y", ["N", 3])])),
            ["unsup.onnx", "opset 17", "Acos", "'acos_1'", "'acos_2'", "Atan", "'atan_head'"]),
        "dangling": (
            _save(tmp_path, "dangling.onnx", _model(
                [helper.make_node("Add", ["x", "ghost"], ["y"], name="add_ghost")],
                [_vi("x", ["N", 3])], [_vi("y", ["N", 3])])),
            ["dangling.onnx", "add_ghost", "ghost"]),
        "free_spatial_dim": (
            _save(tmp_path, "dyn.onnx", _model(
                [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                [_vi("x", ["N", "features"])], [_vi("y", ["N", 3])], [w])),
            ["dyn.onnx", "input 'x'", "dimension 1", "not fixed"]),
        "old_opset": (
            _save(tmp_path, "old.onnx", _model([helper.make_node("Relu", ["x"], ["y"])],
                                               [_vi("x", ["N", 3])], [_vi("y", ["N", 3])], opset=9)),
            ["old.onnx", "opset 9"]),
        "shape_mismatch": (
            _save(tmp_path, "mismatch.onnx", _model(
                [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                [_vi("x", ["N", 5])], [_vi("y", ["N", 3])], [w])),
            ["mismatch.onnx"]),
    }


CASE_NAMES = ["truncated", "garbage", "empty", "missing", "unsupported", "dangling", "free_spatial_dim",
              "old_opset", "shape_mismatch"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_model_gives_one_line_and_exit_2(case, tmp_path):
    path, needles = bad_cases(tmp_path)[case]
    r = run_cli("info", path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert lines[0].startswith("edgetrain: error: ")
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert r.stdout == ""


def test_bad_command_line_is_one_line():
    r = run_cli("info")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_nan_weights_are_named_at_eval_not_a_quantiser_traceback(tmp_path):
    """Issue 17, items 9 and 13: `eval --bits 8/8` of a model whose weights hold NaN."""
    proto = models.build_model("lenet5")
    init = proto.graph.initializer[0]
    w = numpy_helper.to_array(init).copy()
    w.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    path = _save(tmp_path, "nanw.onnx", proto)
    r = run_cli("eval", path, "--data", "digits", "--bits", "8/8")
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.strip() == (f"edgetrain: error: {path}: initializer '{init.name}' holds NaN; "
                                "the model cannot be trained or evaluated")


def test_info_on_a_good_model(tmp_path):
    path = _save(tmp_path, "resnet8.onnx", models.build_model("resnet8"))
    r = run_cli("info", path)
    assert r.returncode == 0, r.stderr
    assert "layer1.0.conv1" in r.stdout and "fp32 (classifier)" in r.stdout
    r = run_cli("info", path, "--json")
    import json

    summary = json.loads(r.stdout)
    assert summary["parameters"] == 78042
    convs = [layer for layer in summary["layers"] if layer["op_type"] == "Conv"]
    assert len(convs) == 9 and all(layer["precision"] == "int" for layer in convs)
    # stem conv: 32x32 output, 16 channels, 3x3x3 kernel
    assert convs[0]["macs"] == 32 * 32 * 16 * 27
    assert summary["macs_per_sample"] == sum(layer["macs"] for layer in summary["layers"])
    gemm = [layer for layer in summary["layers"] if layer["op_type"] == "Gemm"][0]
    assert gemm["precision"] == "fp32 (classifier)" and gemm["macs"] == 64 * 10


def test_python_api_errors_are_edgetrain_errors(tmp_path):
    import edgetrain

    path, _ = bad_cases(tmp_path)["unsupported"]
    with pytest.raises(edgetrain.ModelError):
        edgetrain.load(path)
    model = edgetrain.load(models.build_model("lenet5"))
    with pytest.raises(edgetrain.DataError, match=r"input 'input' must have shape \(N, 1, 28, 28\)"):
        model(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(edgetrain.DataError, match="labels must lie in 0..9"):
        model.loss_and_grad(np.zeros((2, 1, 28, 28), np.float32), np.array([0, 10]))
