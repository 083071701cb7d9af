"""Export writes the user's graph back with trained values; the demo runs end to end."""
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edgetrain
import models
from edgetrain.export import export_onnx, to_onnx
from edgetrain.train.optim import SGD


def _ort(path_or_proto, x):
    data = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else path_or_proto
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_export_after_training_matches_engine_in_onnxruntime(tmp_path):
    model = edgetrain.load(models.build_model("resnet8", input_size=16, seed=2))
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    y = np.arange(8) % 10
    opt = SGD(model.parameters(), 0.05, momentum=0.9)
    for _ in range(3):
        _, grads = model.loss_and_grad(x, y)
        opt.step(grads)
    path = tmp_path / "trained.onnx"
    export_onnx(model, path)
    ref = _ort(path.read_bytes(), x)
    ours = model(x)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4
    # BatchNorm statistics moved in training, and the export carries them.
    exported = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    np.testing.assert_array_equal(exported["bn1.running_mean"], model.buffers()["bn1.running_mean"])
    assert np.abs(exported["bn1.running_mean"]).max() > 0
    # Same graph: node list unchanged.
    src = models.build_model("resnet8", input_size=16, seed=2)
    assert [n.name for n in onnx.load(str(path)).graph.node] == [n.name for n in src.graph.node]


def test_import_edgetrain_does_not_import_torch():
    """PyTorch is an optional extra: edgetrain.from_torch imports it when called, not before."""
    code = "import sys, edgetrain; assert callable(edgetrain.from_torch); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_export_of_torch_model_with_aliased_initializers(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                 torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    src = tmp_path / "src.onnx"
    edgetrain.from_torch(module, torch.randn(2, 3, 8, 8), str(src))
    model = edgetrain.load(src)
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    model.loss_and_grad(x, np.array([0, 1, 1, 0]))  # moves the running statistics apart from the BN affine
    proto = to_onnx(model)
    np.testing.assert_allclose(_ort(proto, x), model(x), rtol=1e-4, atol=1e-5)


def test_demo_cli_runs_and_verifies_its_export(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgetrain.cli", "demo", "--steps", "60", "--out", str(tmp_path),
                        "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["export_ok"]
    assert result["accuracy_after"]["rotated"] > result["accuracy_before"]["rotated"] + 0.3
    assert (tmp_path / "lenet5_rotated.onnx").exists()


def test_training_is_deterministic():
    def run(seed):
        model = edgetrain.load(models.build_model("lenet5", seed=1), seed=seed)
        x = np.random.default_rng(5).standard_normal((16, 1, 28, 28)).astype(np.float32)
        opt = SGD(model.parameters(), 0.1, momentum=0.9)
        for _ in range(3):
            _, g = model.loss_and_grad(x, np.arange(16) % 10)
            opt.step(g)
        return model.state_dict()

    a, b = run(0), run(0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
