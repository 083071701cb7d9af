"""Tests for the ONNX model builders in models/ and the torch exporter."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import models
from models.build import main as build_main
from models.graph_builder import BN_EPSILON, BN_MOMENTUM, GraphBuilder
from models.mlp import mlp
from models.resnet import cifar_resnet

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH = 2
NUM_CLASSES = 7
SEED = 3
# Small inputs / widths keep every builder well under a second in onnxruntime.
FAST_KWARGS: dict[str, dict[str, object]] = {
    "resnet8": {"input_size": 8},
    "resnet20": {"input_size": 8},
    "resnet38": {"input_size": 8},
    "resnet74": {"input_size": 8, "width": 4},
    "mobilenetv2": {"input_size": 16, "width_mult": 0.25},
    "mobilenetv3_small": {"input_size": 16, "width_mult": 0.25},
    "vit_tiny": {"input_size": 8, "patch": 4, "dim": 16, "depth": 1, "heads": 2},
    "lenet5": {"input_size": 16},
    "mlp": {"input_size": 8},
}
RESNET_DEPTHS = {"resnet8": 8, "resnet20": 20, "resnet38": 38, "resnet74": 74}
RESNET_STAGES = 3
RESNET_PROJECTION_SHORTCUTS = 2
MOBILENETV2_BLOCKS = 17
MOBILENETV2_RESIDUAL_ADDS = 10
TORCH_ATOL = 1e-4


def _fast_build(name: str, seed: int = SEED) -> onnx.ModelProto:
    return models.build_model(name, num_classes=NUM_CLASSES, seed=seed, **FAST_KWARGS[name])


def _input_shape(model: onnx.ModelProto, batch: int) -> list[int]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [batch if d.dim_param else d.dim_value for d in dims]


def _run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _ops(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    tensors = {t.name: t for t in model.graph.initializer}
    return onnx.numpy_helper.to_array(tensors[name])


# ---------------------------------------------------------------- all builders
def test_registry_has_expected_names() -> None:
    assert set(models.BUILDERS) == {"resnet8", "resnet20", "resnet38", "resnet74", "mobilenetv2", "mobilenetv3_small",
                                    "vit_tiny", "lenet5", "mlp"}


def test_build_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        models.build_model("vgg")


@pytest.mark.parametrize("name", sorted(models.BUILDERS))
def test_builder_checks_and_runs(name: str) -> None:
    model = _fast_build(name)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (graph_in,) = model.graph.input
    (graph_out,) = model.graph.output
    assert graph_in.name == "input" and graph_in.type.tensor_type.shape.dim[0].dim_param == "N"
    out_dims = graph_out.type.tensor_type.shape.dim
    assert graph_out.name == "logits" and out_dims[0].dim_param == "N" and out_dims[1].dim_value == NUM_CLASSES
    x = np.random.default_rng(0).standard_normal(_input_shape(model, BATCH)).astype(np.float32)
    logits = _run(model, x)
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(models.BUILDERS))
def test_names_are_unique_and_readable(name: str) -> None:
    model = _fast_build(name)
    node_names = [n.name for n in model.graph.node]
    init_names = [t.name for t in model.graph.initializer]
    assert all(node_names) and len(set(node_names)) == len(node_names)
    assert len(set(init_names)) == len(init_names)
    assert not any(n.startswith("onnx::") or "/" in n for n in node_names + init_names)


@pytest.mark.parametrize("name", sorted(models.BUILDERS))
def test_same_seed_is_byte_identical_and_other_seed_differs(name: str) -> None:
    first = _fast_build(name, seed=SEED).SerializeToString()
    assert _fast_build(name, seed=SEED).SerializeToString() == first
    assert _fast_build(name, seed=SEED + 1).SerializeToString() != first


def test_registry_defaults_are_standard_shapes() -> None:
    names = ("resnet8", "mobilenetv2", "mobilenetv3_small", "vit_tiny", "lenet5", "mlp")
    shapes = {name: _input_shape(models.build_model(name), 1) for name in names}
    assert shapes == {"resnet8": [1, 3, 32, 32], "mobilenetv2": [1, 3, 32, 32], "mobilenetv3_small": [1, 1, 28, 28],
                      "vit_tiny": [1, 1, 28, 28], "lenet5": [1, 1, 28, 28], "mlp": [1, 784]}


# ----------------------------------------------------------------------- ResNet
@pytest.mark.parametrize("name", sorted(RESNET_DEPTHS))
def test_resnet_layer_counts(name: str) -> None:
    blocks = RESNET_STAGES * (RESNET_DEPTHS[name] - 2) // 6
    model = _fast_build(name)
    assert len(_ops(model, "Conv")) == 1 + 2 * blocks + RESNET_PROJECTION_SHORTCUTS
    assert len(_ops(model, "BatchNormalization")) == len(_ops(model, "Conv"))
    assert len(_ops(model, "Add")) == blocks
    assert len(_ops(model, "Gemm")) == 1


@pytest.mark.parametrize("depth", [0, 2, 9, 21, 32.0, True])
def test_resnet_rejects_bad_depth(depth: object) -> None:
    with pytest.raises(ValueError, match=f"depth {depth!r}"):
        cifar_resnet(depth)  # type: ignore[arg-type]


def test_resnet_uses_torch_state_dict_names() -> None:
    model = cifar_resnet(20, input_size=8)
    init_names = {t.name for t in model.graph.initializer}
    node_names = {n.name for n in model.graph.node}
    for expected in ["conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.bn1.running_mean",
                     "layer2.0.downsample.0.weight", "layer3.2.bn2.bias", "fc.weight", "fc.bias"]:
        assert expected in init_names
    assert {"layer1.0.conv1", "layer3.0.downsample.0", "fc"} <= node_names
    assert "layer1.0.downsample.0.weight" not in init_names  # stage 1 keeps identity shortcuts


def test_resnet_initialisation_follows_torch() -> None:
    model = cifar_resnet(20, seed=SEED)
    conv = _init(model, "layer3.0.conv2.weight")
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert conv.std() == pytest.approx(np.sqrt(2.0 / fan_out), rel=0.05)
    fc = _init(model, "fc.weight")
    bound = 1.0 / np.sqrt(fc.shape[1])
    assert np.abs(fc).max() <= bound and np.abs(_init(model, "fc.bias")).max() <= bound
    assert (_init(model, "bn1.weight") == 1).all() and (_init(model, "bn1.bias") == 0).all()
    assert (_init(model, "bn1.running_mean") == 0).all() and (_init(model, "bn1.running_var") == 1).all()
    attrs = {a.name: a.f for a in _ops(model, "BatchNormalization")[0].attribute}
    assert attrs == pytest.approx({"epsilon": BN_EPSILON, "momentum": BN_MOMENTUM})


# ------------------------------------------------------------------ MobileNetV2
def test_mobilenetv2_structure() -> None:
    # Full width: at width_mult 0.25 rounding to 8 channels creates extra residual joins.
    model = models.build_model("mobilenetv2", input_size=8)
    depthwise = [n for n in _ops(model, "Conv") if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(depthwise) == MOBILENETV2_BLOCKS
    assert len(_ops(model, "Add")) == MOBILENETV2_RESIDUAL_ADDS
    constants = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in _ops(model, "Constant")}
    for clip in _ops(model, "Clip"):
        assert (float(constants[clip.input[1]]), float(constants[clip.input[2]])) == (0.0, 6.0)
    assert _init(model, "features.18.0.weight").shape[0] == 1280
    assert "classifier.1.weight" in {t.name for t in model.graph.initializer}


# ---------------------------------------------------------------- LeNet and MLP
def test_lenet_rejects_too_small_input() -> None:
    with pytest.raises(ValueError, match="too small"):
        models.build_model("lenet5", input_size=8)


def test_mlp_image_input_starts_with_flatten() -> None:
    model = mlp((1 * 28 * 28, 32, 10), in_shape=(1, 28, 28))
    assert model.graph.node[0].op_type == "Flatten"
    assert _input_shape(model, BATCH) == [BATCH, 1, 28, 28]
    assert [n.op_type for n in mlp().graph.node] == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    with pytest.raises(ValueError, match="features"):
        mlp((100, 10), in_shape=(1, 28, 28))


def test_graph_builder_rejects_duplicate_node_names() -> None:
    gb = GraphBuilder("dup")
    x = gb.input("input", ["N", 3, 4, 4])
    gb.relu(x, name="act")
    with pytest.raises(ValueError, match="'act'"):
        gb.relu(x, name="act")


def test_graph_builder_pools_match_torch_semantics() -> None:
    gb = GraphBuilder("pools")
    x = gb.input("input", ["N", 1, 4, 4])
    gb.avgpool(x, 3, stride=1, pad=1, name="avg")
    gb.maxpool(x, 2, name="max")
    model = gb.finish([x], [("avg", ["N", 1, 4, 4]), ("max", ["N", 1, 2, 2])])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    avg, mx = session.run(None, {"input": np.ones((1, 1, 4, 4), np.float32)})
    assert avg[0, 0, 0, 0] == pytest.approx(4 / 9)  # padding counted, like torch's AvgPool2d default
    assert mx.shape == (1, 1, 2, 2)


# -------------------------------------------------------------------------- CLI
def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "models.build", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_writes_model(tmp_path: Path) -> None:
    out = tmp_path / "r8.onnx"
    result = _run_cli("resnet8", "--out", str(out), "--num-classes", "5", "--input-size", "8", "--seed", "1")
    assert result.returncode == 0, result.stderr
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 5
    assert os.listdir(tmp_path) == ["r8.onnx"]  # temp file was renamed, not left behind


def test_cli_bad_name_is_one_line_exit_2(tmp_path: Path) -> None:
    result = _run_cli("vgg", "--out", str(tmp_path / "x.onnx"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "vgg" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["lenet5", "--out", "x.onnx", "--input-size", "4"],
                                  ["lenet5", "--out", "x.onnx", "--seed", "-1"],
                                  ["lenet5"], [], ["--all", "d", "--seed", "1"]])
def test_cli_bad_arguments_exit_2(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path / a) if a.endswith(".onnx") or a == "d" else a for a in argv]
    with pytest.raises(SystemExit) as exc_info:
        sys.exit(build_main(argv))
    assert exc_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cli_all_writes_every_model(tmp_path: Path) -> None:
    assert build_main(["--all", str(tmp_path / "out")]) == 0
    written = sorted(os.listdir(tmp_path / "out"))
    assert written == sorted(f"{name}.onnx" for name in models.BUILDERS)


# ----------------------------------------------------------------- torch export
def _calibrate_batchnorm(module, x) -> None:
    """Give BN realistic running stats so eval logits are O(1) and the comparison is meaningful."""
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the stats exactly
    module.train()
    with torch.no_grad():
        module(x)


@pytest.mark.parametrize("demo", ["resnet18", "mobilenetv2"])
def test_torch_export_matches_onnxruntime(demo: str, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from edgetrain import from_torch
    from models.export_torch import torch_mobilenetv2, torch_resnet18

    torch.manual_seed(0)
    module = torch_resnet18(NUM_CLASSES, width=8) if demo == "resnet18" else torch_mobilenetv2(NUM_CLASSES, 0.25)
    x = torch.randn(8, 3, 32, 32)
    _calibrate_batchnorm(module, x)
    path = str(tmp_path / f"{demo}.onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_torch(module, x[:1], path)
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert module.training  # export must restore the caller's mode
    module.eval()
    with torch.no_grad():
        expected = module(x[:3]).numpy()
    got = _run(path, x[:3].numpy())  # batch 3 != export batch 1: dynamic batch works
    assert np.abs(expected).max() > 1e-2
    np.testing.assert_allclose(got, expected, rtol=0, atol=TORCH_ATOL)
    model = onnx.load(path)
    assert model.graph.input[0].name == "input" and model.graph.output[0].name == "logits"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_torch_export_cli(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from models.export_torch import main as export_main

    out = tmp_path / "mnv2.onnx"
    assert export_main(["--demo", "mobilenetv2", "--out", str(out), "--width-mult", "0.25", "--input-size", "16"]) == 0
    onnx.checker.check_model(onnx.load(str(out)))
    assert os.listdir(tmp_path) == ["mnv2.onnx"]


def test_mobilenetv2_initializers_match_torch_state_dict() -> None:
    pytest.importorskip("torch")
    from models.export_torch import torch_mobilenetv2

    state = torch_mobilenetv2(NUM_CLASSES, 0.25).state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = models.build_model("mobilenetv2", num_classes=NUM_CLASSES, width_mult=0.25, input_size=8)
    assert {t.name: tuple(t.dims) for t in model.graph.initializer} == expected
