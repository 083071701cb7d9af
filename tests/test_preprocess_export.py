"""Preprocessing travels with the model (issue 15, item 1) and exports users can trust (item 4): a run's
normalisation in its ONNX export (graph nodes or metadata), onnxruntime on raw input agreeing with
`edgetrain eval`, no double normalisation, training-mode BatchNorms and folded-BatchNorm warnings."""
import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgetrain.bn_audit import ModelWarning, folded_batchnorm_message
from edgetrain.cli.demo import demo_model_path
from edgetrain.cli.main import main
from edgetrain.data import load_data
from edgetrain.export import onnxruntime_outputs, to_onnx
from edgetrain.info import format_table, summarize
from edgetrain.model import load
from edgetrain.preprocess import METADATA_KEY, Preprocess, normalizes_in_graph, read_metadata
from edgetrain.train.checkpoint import load_checkpoint
from edgetrain.train.runstate import latest_checkpoint

STEPS = 12
COMMON = ["--data", "digits", "--batch-size", "32", "--seed", "3", "--steps", str(STEPS)]


def cli_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main([*map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    assert main(["train", demo_model_path(), *COMMON, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def raw_test():
    """The test split as the sensor gives it: uint8 / 255, not normalised."""
    return load_data("digits", normalize=False).test


def top1(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == y).mean())


def test_run_records_its_normalisation(run_dir):
    ckpt = latest_checkpoint(run_dir)
    pre = Preprocess.from_dict("test", ckpt.meta["preprocess"])
    split = load_data("digits")
    assert pre.mean == split.train.mean and pre.std == split.train.std


def test_graph_export_takes_raw_input(run_dir, raw_test, tmp_path, capsys):
    out = tmp_path / "ft.onnx"
    summary = cli_json(capsys, "export", run_dir, "--out", out)
    assert summary["preprocess"]["mode"] == "graph"
    proto = onnx.load(out)
    original_input = onnx.load(demo_model_path()).graph.input[0].name
    assert proto.graph.input[0].name == original_input  # the input keeps its name, now taking raw data
    assert [n.op_type for n in proto.graph.node[:2]] == ["Sub", "Div"]
    assert normalizes_in_graph(proto)
    reloaded = load(out)  # the mean and std are constants: retraining the export must not move them
    assert not any(k.startswith("edgetrain_preprocess/") for k in {**reloaded.parameters(), **reloaded.buffers()})

    ours = cli_json(capsys, "eval", run_dir)["accuracy"]
    theirs = top1(onnxruntime_outputs(out, raw_test.x), raw_test.y)
    exported = cli_json(capsys, "eval", out, "--data", "digits")  # edgetrain leaves the data raw for it
    assert theirs == ours == exported["accuracy"]
    assert ours > 0.3  # trained, not chance: a double or missing normalisation would show here

    # the exported model evaluated on normalised data would be the failure the issue describes
    normalised = load_data("digits").test
    assert top1(onnxruntime_outputs(out, normalised.x), normalised.y) < ours


def test_metadata_export_leaves_the_graph(run_dir, raw_test, tmp_path, capsys):
    out = tmp_path / "meta.onnx"
    cli_json(capsys, "export", run_dir, "--out", out, "--preprocess", "metadata")
    proto = onnx.load(out)
    assert not any(n.name.startswith("edgetrain_preprocess/") for n in proto.graph.node)
    meta = read_metadata(proto)
    assert meta["applied"] == "metadata" and not normalizes_in_graph(proto)
    pre = Preprocess.from_dict(METADATA_KEY, meta)
    ours = cli_json(capsys, "eval", run_dir)["accuracy"]
    assert top1(onnxruntime_outputs(out, pre.apply(raw_test.x)), raw_test.y) == ours

    none = tmp_path / "none.onnx"
    cli_json(capsys, "export", run_dir, "--out", none, "--preprocess", "none")
    assert read_metadata(onnx.load(none)) is None


def test_exported_model_trains_without_double_normalisation(run_dir, tmp_path, capsys):
    exported = tmp_path / "ft.onnx"
    cli_json(capsys, "export", run_dir, "--out", exported)
    again = tmp_path / "again"
    assert main(["train", str(exported), "--data", "digits", "--batch-size", "32", "--steps", "2",
                 "--lr", "1e-12", "--freeze-bn", "--out", str(again)]) == 0
    ckpt = load_checkpoint(latest_checkpoint(again).path)
    assert ckpt.meta["preprocess"] is None  # the data stayed raw: the model normalises it
    # a vanishing learning rate and frozen BatchNorms: the retrained model is the exported one, so its eval
    # matches the first run's (normalising twice would not)
    assert cli_json(capsys, "eval", again)["accuracy"] == cli_json(capsys, "eval", run_dir)["accuracy"]
    # its own export adds nothing: the normalisation is in the graph once
    twice = tmp_path / "twice.onnx"
    cli_json(capsys, "export", again, "--out", twice)
    assert sum(n.name == "edgetrain_preprocess/sub" for n in onnx.load(twice).graph.node) == 1


def test_trainer_warns_when_given_normalised_data_for_a_normalising_model(run_dir, tmp_path, capsys):
    from edgetrain.train.config import TrainConfig
    from edgetrain.train.trainer import Trainer

    exported = tmp_path / "ft.onnx"
    cli_json(capsys, "export", run_dir, "--out", exported)
    said: list[str] = []
    Trainer(load(exported), load_data("digits"), TrainConfig(steps=1, out=str(tmp_path / "t")), report=said.append)
    assert any("normalised too" in s for s in said)


# -- BatchNorms (item 4) --------------------------------------------------------------------------------
def _bn_model(training_mode: int, *, producer: str = "", opset: int = 15, with_bn: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array(rng.normal(size=(4 * 6 * 6, 3)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv")]
    if with_bn:
        inits += [numpy_helper.from_array(np.full(4, v, np.float32), n)
                  for n, v in (("g", 1.0), ("beta", 0.0), ("rm", 0.0), ("rv", 1.0))]
        outs = ["y", "rm_out", "rv_out"] if training_mode else ["y"]
        nodes.append(helper.make_node("BatchNormalization", ["c", "g", "beta", "rm", "rv"], outs, name="bn",
                                      **({"training_mode": 1} if training_mode else {})))
    else:
        nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    nodes += [helper.make_node("Flatten", ["y"], ["f"], name="flat"),
              helper.make_node("MatMul", ["f", "fc"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer)
    onnx.checker.check_model(model)
    return model


def test_training_mode_batchnorm_reported_and_exported_for_inference():
    with pytest.warns(ModelWarning, match=r"1 BatchNormalization node carries training_mode=1.*: bn;"):
        model = load(_bn_model(1))
    summary = summarize(model)
    assert any("training_mode=1" in w for w in summary["warnings"])
    assert "warning: 1 BatchNormalization node" in format_table(summary)
    proto = to_onnx(model)
    bn = next(n for n in proto.graph.node if n.op_type == "BatchNormalization")
    assert list(bn.output) == ["y"] and not any(a.name == "training_mode" for a in bn.attribute)
    # and it loads back silently, as the inference model it now is
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelWarning)
        load(proto)


def test_training_mode_warning_is_one_cli_line(tmp_path, capsys):
    path = tmp_path / "tm.onnx"
    onnx.save(_bn_model(1), path)
    assert main(["info", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.count("edgetrain: warning:") == 1 and "training_mode=1" in err and len(err.splitlines()) == 1


def test_folded_batchnorm_heuristic():
    folded = load(_bn_model(0, producer="pytorch", opset=18, with_bn=False))
    message = folded_batchnorm_message(folded.graph)
    assert message is not None and "heuristic" in message and "conv" in message
    assert any("folded" in w for w in summarize(folded)["warnings"])
    # not flagged: a model with BatchNorms, another producer, or an older opset
    assert folded_batchnorm_message(load(_bn_model(0, producer="pytorch", opset=18)).graph) is None
    assert folded_batchnorm_message(load(_bn_model(0, producer="other", opset=18, with_bn=False)).graph) is None
    assert folded_batchnorm_message(load(_bn_model(0, producer="pytorch", opset=17, with_bn=False)).graph) is None


def test_folded_batchnorm_warned_at_train(tmp_path, capsys):
    path = tmp_path / "folded.onnx"
    onnx.save(_bn_model(0, producer="pytorch", opset=18, with_bn=False), path)
    main(["train", str(path), "--data", "digits", "--steps", "1", "--out", str(tmp_path / "r")])
    assert "BatchNorms folded" in capsys.readouterr().err


# -- --format float|int8|both (item 5) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def static_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre8") / "run"
    assert main(["train", demo_model_path(), *COMMON, "--schedule", "static", "--bits", "8/8", "--out", str(out)]) == 0
    return out


def test_format_both_checks_each_export_in_onnxruntime(static_run, raw_test, tmp_path, capsys):
    out = tmp_path / "ft.onnx"
    summary = cli_json(capsys, "export", static_run, "--out", out, "--format", "both")
    assert summary["files"] == {"float": str(out), "int8": str(tmp_path / "ft.int8.onnx")}
    ours = cli_json(capsys, "eval", static_run)["accuracy"]  # at the trained 8/8
    checks = summary["onnxruntime"]
    assert set(checks) == {"float", "int8"}
    assert checks["float"]["top1_agreement"] == 1.0 and checks["float"]["max_relative_error"] < 1e-4
    assert checks["int8"]["top1_agreement"] >= 0.99
    assert abs(checks["int8"]["onnxruntime_top1"] - ours) <= 0.01
    assert all(set(c["latency_ms"]) == {"1", "64"} for c in checks.values())
    # the int8 file takes raw input too, and on it computes what the int8 export without preprocessing
    # computes on normalised input
    plain = tmp_path / "plain.int8.onnx"
    cli_json(capsys, "export", static_run, "--out", plain, "--int8", "--preprocess", "none")
    normalised = load_data("digits").test.x
    np.testing.assert_allclose(onnxruntime_outputs(tmp_path / "ft.int8.onnx", raw_test.x),
                               onnxruntime_outputs(plain, normalised), rtol=1e-5, atol=1e-5)
    # for people: one line per file
    capsys.readouterr()
    assert main(["export", str(static_run), "--out", str(tmp_path / "p.onnx"), "--format", "float"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime check on this machine:" in text and "float: onnxruntime top-1" in text


def test_format_contradicting_int8_is_one_line(static_run, tmp_path, capsys):
    assert main(["export", str(static_run), "--out", str(tmp_path / "x.onnx"), "--int8", "--format", "float"]) == 2
    assert capsys.readouterr().err.strip() == "edgetrain: error: --int8 contradicts --format float; give one of them"


def test_torch_training_mode_export_becomes_inference_batchnorm():
    torch = pytest.importorskip("torch")
    import io

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 3))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation chatter
        torch.onnx.export(net, torch.randn(2, 1, 8, 8), buf, training=torch.onnx.TrainingMode.TRAINING, dynamo=False,
                          do_constant_folding=False, input_names=["x"], dynamic_axes={"x": {0: "N"}})
    with pytest.warns(ModelWarning, match="training_mode=1"):
        model = load(onnx.load_from_string(buf.getvalue()))
    proto = to_onnx(model)
    bns = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 1 and len(bns[0].output) == 1
    assert not any(a.name == "training_mode" for a in bns[0].attribute)
    x = np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32)
    assert onnxruntime_outputs(proto, x).shape == (2, 3)


def test_the_runs_own_model_onnx_says_how_to_normalise(run_dir):
    meta = read_metadata(onnx.load(run_dir / "model.onnx"))
    assert meta["applied"] == "metadata"  # its graph still takes normalised input, as the run fed it
    split = load_data("digits")
    assert Preprocess.from_dict("model.onnx", meta) == Preprocess(split.train.mean, split.train.std)


def test_info_of_a_run_and_of_its_export_show_the_normalisation(run_dir, tmp_path, capsys):
    assert main(["info", str(run_dir)]) == 0
    assert "input preprocessing (by the run's data pipeline):" in capsys.readouterr().out
    out = tmp_path / "ft.onnx"
    cli_json(capsys, "export", run_dir, "--out", out)
    assert cli_json(capsys, "info", out)["preprocess"]["applied"] == "graph"
