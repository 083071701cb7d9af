"""Batch freedom (a model exported at a fixed batch trains at any batch when sound) and
`edgetrain.from_torch` with both of torch's exporters: BatchNorm kept, state_dict names, attention exportable."""
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgetrain
from edgetrain.errors import DataError

torch = pytest.importorskip("torch")
nn = torch.nn


def _conv_net_model(reshape_target: list[int] | None, batch: int = 1, flatten_axis: int = 1) -> onnx.ModelProto:
    """Conv -> Relu -> (Reshape to target | Flatten) -> Gemm, exported at a fixed batch."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((3, 4 * 6 * 6)).astype(np.float32), "fc")
    inits = [w, fc]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    if reshape_target is not None:
        inits.append(numpy_helper.from_array(np.array(reshape_target, np.int64), "target"))
        nodes.append(helper.make_node("Reshape", ["r", "target"], ["f"], name="reshape"))
    else:
        nodes.append(helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=flatten_axis))
    nodes.append(helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _per_sample_reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime on the file as exported, one sample at a time (the batch it was exported with)."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


@pytest.mark.parametrize("target", [[1, -1], [1, 144], None])
def test_fixed_batch_one_runs_at_any_batch(target):
    onnx_model = _conv_net_model(target)
    model = edgetrain.load(onnx_model)
    assert model.graph.batch.free and model.graph.batch.exported == 1
    assert model.input_shape[0] is None
    x = np.random.default_rng(1).standard_normal((5, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(model.run(x)["y"], _per_sample_reference(onnx_model, x), rtol=1e-5, atol=1e-5)
    # and it trains at that batch: the gradient reaches every weight
    env, tape = model.forward_train(x)
    grads = model.backward(tape, {"y": np.ones_like(env["y"])})
    assert all(np.abs(grads[name]).sum() > 0 for name in ("w", "fc"))


def test_the_original_file_is_what_export_writes_back():
    onnx_model = _conv_net_model([1, -1])
    model = edgetrain.load(onnx_model)
    # The Reshape target rewritten for batch freedom lives only in the engine's graph.
    assert [t.name for t in model.graph.original.graph.initializer] == ["w", "fc", "target"]


def test_a_node_that_pins_the_batch_is_named():
    onnx_model = _conv_net_model(None, flatten_axis=0)  # Flatten(axis=0): every sample into one row
    model = edgetrain.load(onnx_model)
    assert not model.graph.batch.free
    assert "'fc' (Gemm)" in model.graph.batch.pinned_by
    assert model.input_shape[0] == 1
    with pytest.raises(DataError, match=r"batch fixed at 1: node 'fc' \(Gemm\).*re-export"):
        model.run(np.zeros((3, 1, 8, 8), np.float32))
    model.run(np.zeros((1, 1, 8, 8), np.float32))  # the exported batch still runs


def test_info_says_whether_the_batch_is_free():
    from edgetrain.info import summarize

    free = summarize(edgetrain.load(_conv_net_model([1, -1])))["batch"]
    pinned = summarize(edgetrain.load(_conv_net_model(None, flatten_axis=0)))["batch"]
    assert free["free"] and free["exported"] == 1 and "any batch size" in free["summary"]
    assert not pinned["free"] and "Gemm" in pinned["pinned_by"]


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        y, _ = self.attn(x, x, x)
        return self.fc(y.mean(1))


def _randomise_bn(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_from_torch_keeps_batchnorm_and_state_dict_names(tmp_path, exporter):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    net = _randomise_bn(SmallNet())
    path = tmp_path / "net.onnx"
    edgetrain.from_torch(net, torch.randn(2, 3, 8, 8), path, exporter=exporter)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "BatchNormalization" in ops, f"{exporter} folded BatchNorm away"
    model = edgetrain.load(path)
    assert set(model.graph.params) == {k for k in net.state_dict() if not k.startswith("bn.running")
                                       and not k.endswith("num_batches_tracked")}
    assert set(model.graph.buffers) == {"bn.running_mean", "bn.running_var"}
    x = torch.randn(5, 3, 8, 8)  # another batch than the example's: the batch is dynamic
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(model.run(x.numpy())["logits"], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_from_torch_exports_attention_with_every_weight_trainable(tmp_path, exporter):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    net = AttentionNet().eval()
    path = tmp_path / "attn.onnx"
    edgetrain.from_torch(net, torch.randn(2, 5, 16), path, exporter=exporter)
    model = edgetrain.load(path, dtype=np.float64)
    # in_proj_weight reaches its MatMuls only through Slice/Gather/Transpose: it must still train.
    assert set(model.graph.params) == set(net.state_dict())
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    net64 = net.double()
    want = net64(x)
    # rtol 1e-6, not 1e-12: the exported scale constants (1/sqrt(head_dim)) are float32 values
    np.testing.assert_allclose(model.run(x.numpy())["logits"], want.detach().numpy(), rtol=1e-6, atol=1e-9)
    # gradients of sum(R * logits) against autograd
    r = np.random.default_rng(3).standard_normal(want.shape)
    (want * torch.from_numpy(r)).sum().backward()
    _, tape = model.forward_train(x.numpy())  # no dropout or BatchNorm: the same function as eval
    grads = model.backward(tape, {"logits": r})
    for name, p in net64.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-6, atol=1e-9, err_msg=name)


def test_exporting_with_a_fixed_batch_through_torch_still_trains_at_any_batch(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 1, 8, 8),), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])  # PyTorch's default: batch fixed at 1
    model = edgetrain.load(onnx.load_from_string(buf.getvalue()))
    assert model.graph.batch.exported == 1 and model.graph.batch.free
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(model.run(x.numpy())["y"], net(x).numpy(), rtol=1e-5, atol=1e-6)
