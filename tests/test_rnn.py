"""LSTM and GRU: forward against onnxruntime and PyTorch, backward through time against finite differences
and PyTorch autograd, torch's exported weights as trainable parameters."""
import numpy as np
import onnx
import pytest
from gradcheck import check_model_gradients
from onnx import TensorProto, helper, numpy_helper

import edgetrain
from edgetrain.errors import ModelError

R = np.random.default_rng(7)
T, N, IN, H = 5, 3, 4, 3  # steps, batch, input size, hidden size


def rnd(*shape, scale=0.5):
    return scale * R.standard_normal(shape)


def rnn_model(op, *, direction="forward", layout=0, opset=17, lens=None, peep=False, with_state=True,
              outputs=None, dtype=np.float64, **attrs):
    """One LSTM/GRU node: X, initial_h (and initial_c) graph inputs; W, R, B (and P) trainable initializers;
    sequence_lens a constant. Returns (ModelProto, feeds)."""
    d = 2 if direction == "bidirectional" else 1
    g = 4 if op == "LSTM" else 3
    xshape = (T, N, IN) if layout == 0 else (N, T, IN)
    sshape = (d, N, H) if layout == 0 else (N, d, H)
    tensor = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    feeds = {"x": rnd(*xshape, scale=1.0).astype(dtype)}
    inits = [numpy_helper.from_array(rnd(d, g * H, IN).astype(dtype), "w"),
             numpy_helper.from_array(rnd(d, g * H, H).astype(dtype), "r"),
             numpy_helper.from_array(rnd(d, 2 * g * H).astype(dtype), "b")]
    names = ["x", "w", "r", "b", "", "", ""]
    if lens is not None:
        inits.append(numpy_helper.from_array(np.array(lens, np.int32), "lens"))
        names[4] = "lens"
    if with_state:
        feeds["h0"] = rnd(*sshape).astype(dtype)
        names[5] = "h0"
        if op == "LSTM":
            feeds["c0"] = rnd(*sshape).astype(dtype)
            names[6] = "c0"
    if peep:
        inits.append(numpy_helper.from_array(rnd(d, 3 * H).astype(dtype), "p"))
        names.append("p")
    if op == "GRU":
        names = names[:6]
    while names[-1] == "":
        names.pop()
    outs = outputs or (["y", "yh", "yc"] if op == "LSTM" else ["y", "yh"])
    node = helper.make_node(op, names, outs, name="rnn", hidden_size=H, direction=direction, **attrs,
                            **({"layout": layout} if layout else {}))
    g_inputs = [helper.make_tensor_value_info(k, tensor, v.shape) for k, v in feeds.items()]
    g_outputs = [helper.make_tensor_value_info(o, tensor, None) for o in outs if o]
    model = helper.make_model(helper.make_graph([node], "t", g_inputs, g_outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model), feeds


VARIANTS = {
    "lstm": dict(op="LSTM"),
    "lstm_no_state": dict(op="LSTM", with_state=False),
    "lstm_reverse_peep": dict(op="LSTM", direction="reverse", peep=True),
    "lstm_bidir_layout1_lens": dict(op="LSTM", direction="bidirectional", layout=1, lens=[5, 2, 3], peep=True),
    "lstm_clip": dict(op="LSTM", clip=0.7),
    "lstm_only_yh": dict(op="LSTM", outputs=["", "yh"]),
    "gru_lbr0": dict(op="GRU"),
    "gru_lbr1": dict(op="GRU", linear_before_reset=1),
    "gru_bidir_lens_lbr1": dict(op="GRU", direction="bidirectional", lens=[1, 5, 3], linear_before_reset=1),
    "gru_reverse_layout1_lens": dict(op="GRU", direction="reverse", layout=1, lens=[4, 0, 5]),
    "gru_relu_clip_opset11": dict(op="GRU", opset=11, activations=["Sigmoid", "Relu"], clip=1.5),
}


def _as_layout0(proto, feeds):
    """The same node in layout 0 (onnxruntime runs no batch-first recurrence), with its feeds swapped."""
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    node = p.graph.node[0]
    keep = [a for a in node.attribute if a.name != "layout"]
    del node.attribute[:]
    node.attribute.extend(keep)
    feeds0 = {k: np.ascontiguousarray(np.swapaxes(v, 0, 1)) for k, v in feeds.items()}
    for vi in p.graph.input:
        dims = vi.type.tensor_type.shape.dim
        dims[0].dim_value, dims[1].dim_value = dims[1].dim_value, dims[0].dim_value
    del p.graph.value_info[:]
    for o in p.graph.output:
        o.type.tensor_type.ClearField("shape")
    return p, feeds0


def _from_layout0(outs):
    """Layout-0 outputs (Y (T, D, N, H), Y_h/Y_c (D, N, H)) in layout 1."""
    return [np.transpose(o, (2, 0, 1, 3)) if o.ndim == 4 else np.swapaxes(o, 0, 1) for o in outs]


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_matches_onnxruntime(name):
    ort = pytest.importorskip("onnxruntime")
    proto, feeds = rnn_model(**VARIANTS[name], dtype=np.float32)
    batchwise = VARIANTS[name].get("layout", 0) == 1
    ref_proto, ref_feeds = _as_layout0(proto, feeds) if batchwise else (proto, feeds)
    sess = ort.InferenceSession(ref_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, ref_feeds)
    want = _from_layout0(want) if batchwise else want
    got = edgetrain.load(proto, dtype=np.float32).run(feeds)
    for o, w in zip([o.name for o in proto.graph.output], want):
        assert got[o].shape == w.shape
        np.testing.assert_allclose(got[o], w, rtol=1e-4, atol=1e-5, err_msg=o)


@pytest.mark.parametrize("name", VARIANTS)
def test_gradients_match_finite_differences(name):
    proto, feeds = rnn_model(**VARIANTS[name])
    model = edgetrain.load(proto, dtype=np.float64)
    assert {"w", "r", "b"} <= set(model.parameters())
    errors = check_model_gradients(model, feeds, samples=16)
    assert max(errors.values()) < 1e-6, errors


def test_refuses_what_it_cannot_run():
    for attrs, words in [(dict(activations=["Sigmoid", "Softsign", "Tanh"]), "Softsign"),
                         (dict(input_forget=1), "input_forget"),
                         (dict(direction="sideways"), "direction")]:
        proto, _ = rnn_model("LSTM", **{k: v for k, v in attrs.items() if k != "direction"},
                             direction=attrs.get("direction", "forward"))
        with pytest.raises(ModelError, match=f"'rnn' \\(LSTM\\).*{words}"):
            edgetrain.load(proto)


# -- PyTorch ------------------------------------------------------------------------------------------------
def _torch_classifier(torch, cell, final_state=False, **kw):
    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cell(IN, 6, **kw)
            self.fc = torch.nn.Linear(6 * (2 if kw.get("bidirectional") else 1), 3)

        def forward(self, x):
            y, state = self.rnn(x)
            if final_state:  # the last layer's h_n: the LSTM/GRU node's Y_h output
                h = state[0] if isinstance(state, tuple) else state
                return self.fc(h[-1])
            return self.fc(y[:, -1] if self.rnn.batch_first else y[-1])

    return Classifier()


TORCH_VARIANTS = {
    "lstm": ("LSTM", {}),
    "lstm_bidir_2layer_batch_first": ("LSTM", dict(bidirectional=True, num_layers=2, batch_first=True)),
    "lstm_final_state": ("LSTM", dict(final_state=True)),
    "gru": ("GRU", {}),
    "gru_final_state_batch_first": ("GRU", dict(final_state=True, batch_first=True)),
    "gru_bidir_2layer_batch_first": ("GRU", dict(bidirectional=True, num_layers=2, batch_first=True)),
}


def _export(torch, module, x, path):
    """torch.onnx.export as the issue's users run it (TorchScript exporter, opset 17)."""
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), path, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], do_constant_folding=False)


@pytest.mark.parametrize("name", TORCH_VARIANTS)
def test_torch_export_forward_and_gradients(name, tmp_path):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    cell, kw = TORCH_VARIANTS[name]
    module = _torch_classifier(torch, getattr(torch.nn, cell), **kw)
    x = torch.randn(N, T, IN) if kw.get("batch_first") else torch.randn(T, N, IN)
    path = tmp_path / "m.onnx"
    _export(torch, module, x, path)
    model = edgetrain.load(path, dtype=np.float32)
    # torch's own tensors are the parameters, under their state_dict names
    assert set(model.parameters()) == set(module.state_dict())
    with torch.no_grad():
        want = module(x).numpy()
    np.testing.assert_allclose(model(x.numpy()), want, rtol=1e-4, atol=1e-5)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(model(x.numpy()), sess.run(None, {"input": x.numpy()})[0], rtol=1e-4, atol=1e-5)

    module.double()
    x64 = x.double().requires_grad_()
    out = module(x64)
    seed = torch.randn_like(out)
    (out * seed).sum().backward()
    m64 = model.astype(np.float64)
    _, tape = m64.forward_train(x64.detach().numpy())
    grads = m64.backward(tape, {m64.output_name: seed.numpy()})
    for k, p in module.named_parameters():
        ref = p.grad.numpy()
        assert np.linalg.norm(grads[k] - ref) <= 1e-6 * np.linalg.norm(ref), k


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_from_torch_trains_and_exports_torch_weights(cell, tmp_path):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(1)
    module = _torch_classifier(torch, getattr(torch.nn, cell), batch_first=True)
    x = torch.randn(N, T, IN)
    edgetrain.from_torch(module, x, tmp_path / "m.onnx")
    model = edgetrain.load(tmp_path / "m.onnx")
    before = {k: v.copy() for k, v in model.parameters().items()}
    labels = np.array([0, 1, 2])
    _, grads = model.loss_and_grad(x.numpy(), labels)
    for k, g in grads.items():
        model.parameters()[k] -= 0.5 * g
    for k in ("rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"):
        assert not np.array_equal(model.parameters()[k], before[k]), k
    # the trained values land in torch's own initializers, and onnxruntime serves the trained model
    from edgetrain.export import export_onnx

    export_onnx(model, tmp_path / "trained.onnx")
    saved = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "trained.onnx").graph.initializer}
    np.testing.assert_array_equal(saved["rnn.weight_hh_l0"], model.parameters()["rnn.weight_hh_l0"])
    sess = ort.InferenceSession(str(tmp_path / "trained.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], model(x.numpy()), rtol=1e-4, atol=1e-5)
    # any batch size: from_torch exports the batch dimension free
    x7 = np.random.default_rng(0).standard_normal((7, T, IN)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"input": x7})[0], model(x7), rtol=1e-4, atol=1e-5)


# -- the integer path ---------------------------------------------------------------------------------------
def _int64_gemm_nt(a_q, b_q):
    return a_q.astype(np.int64) @ b_q.astype(np.int64).T


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_integer_gate_products_match_int64_reference(op):
    from edgetrain.ops.base import Run
    from edgetrain.quant import quantize
    from edgetrain.quant.rnn import QuantGRU, QuantLSTM

    proto, _ = rnn_model(op, dtype=np.float32)
    model = edgetrain.load(proto)
    model.set_precision("8/8", quantize_classifier=True)  # the lone node is also the classifier
    layer = model.executor.ops["rnn"]
    assert isinstance(layer, QuantLSTM if op == "LSTM" else QuantGRU)
    g = (4 if op == "LSTM" else 3) * H
    rng = np.random.default_rng(3)
    x2, w = rng.standard_normal((T * N, IN)).astype(np.float32), rng.standard_normal((g, IN)).astype(np.float32)
    h, r = np.tanh(rng.standard_normal((N, H))).astype(np.float32), rng.standard_normal((g, H)).astype(np.float32)
    prod = layer.products(0, Run(True, (5, 9)), {})

    def dequantized(acc, s_a, s_b):
        return acc.astype(np.float32) * (np.float32(s_a) * np.asarray(s_b, np.float32)).astype(np.float32)

    xq, wq = quantize(x2, 8), quantize(w, 8, axis=0)
    np.testing.assert_array_equal(prod.input(x2, w), dequantized(_int64_gemm_nt(xq.q, wq.q), xq.scale, wq.scale))
    hq, rq = quantize(h, 8), quantize(r, 8, axis=0)
    np.testing.assert_array_equal(prod.recurrent("r", h, r), dequantized(_int64_gemm_nt(hq.q, rq.q), hq.scale,
                                                                            rq.scale))
    # backward: the step's gate gradient, stochastically rounded from the layer's stream, feeds dH and dR
    dg = rng.standard_normal((N, g)).astype(np.float32)
    dgq = quantize(dg, 8, rounding="stochastic", key=(5, 9, layer.layer_index), index_offset=0)
    assert np.abs(dgq.q.astype(np.float64) * dgq.scale - dg).max() > 0  # rounding happened
    rv = quantize(r, 8)
    dh = prod.recurrent_back("r", dg)
    np.testing.assert_array_equal(dh, dequantized(dgq.q.astype(np.int64) @ rv.q.astype(np.int64), dgq.scale,
                                                  rv.scale))
    np.testing.assert_array_equal(prod.grads["r"], dequantized(_int64_gemm_nt(dgq.q.T, hq.q.T), dgq.scale,
                                                               hq.scale))
    # the gradient over all steps draws the stream's next elements: dW and dX
    dg2 = rng.standard_normal((T * N, g)).astype(np.float32)
    dg2q = quantize(dg2, 8, rounding="stochastic", key=(5, 9, layer.layer_index), index_offset=dg.size)
    wv = quantize(w, 8)
    dx, dw = prod.input_back(dg2, True)
    np.testing.assert_array_equal(dw, dequantized(_int64_gemm_nt(dg2q.q.T, xq.q.T), dg2q.scale, xq.scale))
    np.testing.assert_array_equal(dx, dequantized(dg2q.q.astype(np.int64) @ wv.q.astype(np.int64), dg2q.scale,
                                                  wv.scale))


@pytest.mark.parametrize("name", VARIANTS)
def test_integer_layer_at_16_bits_follows_the_float_one(name):
    """Every product of every variant is wired right: at 16/16 outputs and gradients sit within
    quantisation noise (2^-15 relative) of the float layer's."""
    proto, feeds = rnn_model(**VARIANTS[name])
    quantised, exact = edgetrain.load(proto, dtype=np.float64), edgetrain.load(proto, dtype=np.float64)
    quantised.set_precision("16/16", quantize_classifier=True)
    (env_q, tape_q), (env_f, tape_f) = quantised.forward_train(feeds), exact.forward_train(feeds)
    seeds = {o.name: np.random.default_rng(0).standard_normal(env_f[o.name].shape) for o in exact.graph.outputs}
    for o in seeds:
        np.testing.assert_allclose(env_q[o], env_f[o], atol=1e-3)
    got, want = quantised.backward(tape_q, seeds), exact.backward(tape_f, seeds)
    for k in want:
        assert np.linalg.norm(got[k] - want[k]) < 1e-3 * np.linalg.norm(want[k]), k


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_static_8_8_training_step(cell, tmp_path):
    torch = pytest.importorskip("torch")
    from edgetrain.quant.rnn import QuantRecurrent
    from edgetrain.train.loop import TrainStep
    from edgetrain.train.optim import SGD

    torch.manual_seed(2)
    module = _torch_classifier(torch, getattr(torch.nn, cell), batch_first=True, bidirectional=True)
    x = torch.randn(N, T, IN).numpy()
    edgetrain.from_torch(module, torch.from_numpy(x), tmp_path / "m.onnx")
    model = edgetrain.load(tmp_path / "m.onnx")
    precision = model.set_precision("8/8")
    rnn = next(n for n in model.mac_layers if n.op_type == cell)
    assert str(precision[rnn.name]) == "8/8" and isinstance(model.executor.ops[rnn.name], QuantRecurrent)
    float_out = edgetrain.load(tmp_path / "m.onnx")(x)
    before = {k: v.copy() for k, v in model.parameters().items()}
    step = TrainStep(model, SGD(model.parameters(), lr=0.5))
    loss = step(0, x, np.array([0, 1, 2]))
    assert np.isfinite(loss)
    for k in ("rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l0_reverse", "rnn.bias_hh_l0"):
        assert not np.array_equal(model.parameters()[k], before[k]), k
    # MACs for BitOPs: X W^T and H R^T at every step, sample and direction
    gates = 4 if cell == "LSTM" else 3
    assert model.last_cost[rnn.name].macs == T * N * 2 * gates * 6 * (IN + 6)
    # `edgetrain info`: the layer is quantised, its MACs per sample are the model's per sample
    from edgetrain.info import summarize

    layer = next(la for la in summarize(edgetrain.load(tmp_path / "m.onnx"))["layers"] if la["name"] == rnn.name)
    assert layer["precision"] == "int" and layer["macs"] == T * 2 * gates * 6 * (IN + 6)
    # eval runs on the ranges training saw, close to the float model before the step
    model.load_state_dict(before)
    np.testing.assert_allclose(model(x), float_out, atol=0.05)


def test_fine_tuning_selects_the_recurrent_layers_torch_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    from edgetrain.train.finetune import bias_names, last_layers_names

    module = _torch_classifier(torch, torch.nn.GRU, batch_first=True)
    edgetrain.from_torch(module, torch.randn(N, T, IN), tmp_path / "m.onnx")
    model = edgetrain.load(tmp_path / "m.onnx")
    assert last_layers_names(model, 1) == {"fc.weight", "fc.bias"}
    assert last_layers_names(model, 2) == set(module.state_dict())
    assert bias_names(model) == {"fc.bias", "rnn.bias_ih_l0", "rnn.bias_hh_l0"}
