"""Issue 17, items 10-12 and 14: memory bombs refused before allocation, malformed input as one line, typed errors.

Every bad file here is tiny; the budget is set small (EDGETRAIN_MAX_MEMORY) where a test needs one, and the
bombs claim terabytes, so nothing is ever allocated: a refusal that came after allocating would fail the test
with MemoryError rather than pass slowly.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgetrain
import models
from edgetrain import limits
from edgetrain.cli.main import main as cli_main
from edgetrain.errors import EXIT_BAD_INPUT, DataError, EdgetrainError, ModelError, ResourceLimitError
from tools.hostile_files import BIG, bomb_model, fold_bomb, forged_npz, huge_input_model, idx

SMALL_BUDGET = "64M"


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `edgetrain ARGS` in this process (a subprocess would spend seconds importing), default budget."""
    monkeypatch.delenv(limits.ENV_VAR, raising=False)

    def run(*args: str) -> Outcome:
        capsys.readouterr()
        try:
            code = cli_main(list(args))
        finally:
            limits.set_max_memory(None)
            os.environ.pop(limits.ENV_VAR, None)  # --max-memory exports it for child processes
        out = capsys.readouterr()
        return Outcome(code, out.out, out.err)

    return run


def one_line_exit_2(r: Outcome, *needles: str) -> str:
    """The CLI's answer must be exit 2 and one `edgetrain: error:` line naming what is at fault."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == EXIT_BAD_INPUT, r.stderr
    assert len(lines) == 1 and lines[0].startswith("edgetrain: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------------------------------ the bombs


def chained_bomb(op: str) -> onnx.ModelProto:
    """A bomb whose size is itself computed by a folded node, so only the fold check can see it."""
    n, one = np.array([BIG], np.int64), np.ones((1, 1), np.float32)
    concat = helper.make_node("Concat", ["n", "n"], ["s"], name="shape", axis=0)
    if op == "ConstantOfShape":
        return bomb_model([concat, helper.make_node(op, ["s"], ["c"], name="bomb")], {"n": n})
    if op in ("Expand", "Tile"):
        return bomb_model([concat, helper.make_node(op, ["one", "s"], ["c"], name="bomb")], {"n": n, "one": one})
    if op == "Pad":
        pads = helper.make_node("Concat", ["z", "z", "n", "n"], ["s"], name="shape", axis=0)
        return bomb_model([pads, helper.make_node(op, ["one", "s"], ["c"], name="bomb")],
                           {"n": n, "one": one, "z": np.array([0], np.int64)})
    if op == "Range":
        return bomb_model([helper.make_node("Mul", ["k", "k"], ["limit"], name="limit"),
                            helper.make_node(op, ["zero", "limit", "step"], ["r"], name="bomb"),
                            helper.make_node("Cast", ["r"], ["c"], name="cast", to=TensorProto.FLOAT)],
                           {"k": np.array(BIG, np.int64), "zero": np.array(0, np.int64),
                            "step": np.array(1, np.int64)})
    assert op == "Resize"
    scales = helper.make_node("Concat", ["k", "k"], ["scales"], name="scales", axis=0)
    return bomb_model([scales, helper.make_node(op, ["img", "", "scales"], ["c"], name="bomb")],
                       {"k": np.array([BIG], np.float32), "img": one})


def no_output_model() -> onnx.ModelProto:
    model = models.build_model("lenet5")
    del model.graph.output[:]
    return model


def pickle_member_npz(suffix: str = ".npy") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("x" + suffix, pickle.dumps(np.zeros(3)))
        zf.writestr("y" + suffix, pickle.dumps([1, 2, 3]))
    return buffer.getvalue()


def write(tmp_path: Path, name: str, content: bytes | onnx.ModelProto) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.SerializeToString())
    return str(path)


# --------------------------------------------------------------------------- item 10: memory bombs


def test_the_budget_reads_the_flag_the_environment_and_a_default(monkeypatch):
    monkeypatch.delenv(limits.ENV_VAR, raising=False)
    assert limits.parse_size("512M") == 512 << 20 and limits.parse_size("1.5GiB") == 3 << 29
    assert limits.parse_size("100") == 100
    with pytest.raises(ValueError):
        limits.parse_size("lots")
    default = limits.budget()
    assert default.max_bytes == int(limits.available_memory() * limits.DEFAULT_FRACTION)
    monkeypatch.setenv(limits.ENV_VAR, "2G")
    assert limits.budget().max_bytes == 2 << 30 and limits.ENV_VAR in limits.budget().source
    try:
        limits.set_max_memory("1G")
        assert limits.budget().max_bytes == 1 << 30 and limits.FLAG in limits.budget().source
    finally:
        limits.set_max_memory(None)
    monkeypatch.setenv(limits.ENV_VAR, "nonsense")
    with pytest.raises(ResourceLimitError, match=limits.ENV_VAR):
        limits.budget()


@pytest.mark.parametrize("op", ["ConstantOfShape", "Expand", "Tile", "Pad", "Range", "Resize"])
def test_a_fold_bomb_is_refused_before_it_is_evaluated(op):
    with pytest.raises(ResourceLimitError, match=rf"node 'bomb' \({op}\) folds to .* TiB, above the memory budget"):
        edgetrain.load(chained_bomb(op))


def test_a_bomb_inside_a_constant_if_is_not_folded():
    then = helper.make_graph([helper.make_node("ConstantOfShape", ["s"], ["big"], name="inner"),
                              helper.make_node("ReduceSum", ["big"], ["out"], name="sum", keepdims=0)], "then", [],
                             [helper.make_tensor_value_info("out", TensorProto.FLOAT, [])])
    zero = numpy_helper.from_array(np.array(0, np.float32))
    other = helper.make_graph([helper.make_node("Constant", [], ["out2"], value=zero)], "else", [],
                              [helper.make_tensor_value_info("out2", TensorProto.FLOAT, [])])
    model = bomb_model([helper.make_node("If", ["cond"], ["c"], name="bomb", then_branch=then, else_branch=other)],
                        {"cond": np.array(True), "s": np.array([BIG, BIG], np.int64)})
    with pytest.raises(ModelError, match="node 'bomb' \\(If\\): its subgraph computes sizes from values"):
        edgetrain.load(model)


def test_the_issues_fold_bomb_is_refused_by_info_train_and_profile(tmp_path, cli):
    path = write(tmp_path, "bomb.onnx", fold_bomb())
    assert Path(path).stat().st_size < 200
    with pytest.raises(ResourceLimitError, match="bomb"):
        edgetrain.load(path)
    for command in (["info", path], ["train", path, "--data", "digits", "--steps", "1", "--out", str(tmp_path / "r")],
                    ["profile", path, "--simulate", "--steps", "1", "--warmup", "0"]):
        one_line_exit_2(cli(*command), "bomb.onnx", "'bomb'", "memory budget")


def test_constants_that_fit_alone_but_not_together_are_refused(monkeypatch):
    monkeypatch.setenv(limits.ENV_VAR, "1M")
    weights = {f"w{i}": np.ones((600, 256), np.float32) for i in range(2)}  # 600 KiB each
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
         helper.make_node("MatMul", ["h", "w1t"], ["y"], name="mm1"),
         helper.make_node("Transpose", ["w1"], ["w1t"], name="t")], "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 600])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 600])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ResourceLimitError, match="initializer 'w1' .* with the 600 KiB of constants before it"):
        edgetrain.load(model)
    monkeypatch.setenv(limits.ENV_VAR, "4M")
    assert edgetrain.load(model) is not None  # the same model under a budget that holds it


def test_a_declared_input_over_budget_is_refused_naming_the_input(tmp_path, cli):
    path = write(tmp_path, "huge.onnx", huge_input_model())
    for command in ("info", "profile"):
        args = [command, path] + (["--simulate"] if command == "profile" else [])
        one_line_exit_2(cli(*args), "huge.onnx", "input 'x'", "(N, 3, 100000, 100000)", "memory budget")


def test_an_npz_whose_header_claims_a_terabyte_is_refused_before_reading(tmp_path, cli):
    blob = forged_npz()
    assert len(blob) < 600
    path = write(tmp_path, "forged.npz", blob)
    lenet = write(tmp_path, "lenet.onnx", models.build_model("lenet5"))
    from edgetrain.data.npzfile import read_npz

    with pytest.raises(ResourceLimitError, match=r"forged.npz: member 'x.npy' \(1000000000000,\) float32 .* TiB"):
        read_npz(path)
    r = cli("train", lenet, "--data", f"npz:{path}", "--steps", "1", "--out", str(tmp_path / "run"))
    one_line_exit_2(r, "forged.npz", "'x.npy'", "memory budget")
    one_line_exit_2(cli("info", path), "forged.npz", "'x.npy'", "memory budget")  # read as a checkpoint


def test_an_npz_member_inflating_past_the_budget_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, x=np.zeros((64, 1, 32, 32), np.float32), y=np.zeros(64, np.int64))  # 256 KiB of x
    assert path.stat().st_size < 4096
    from edgetrain.data.npzfile import read_npz

    monkeypatch.setenv(limits.ENV_VAR, "100K")
    with pytest.raises(ResourceLimitError, match="member 'x.npy'"):
        read_npz(path)


def _mnist_folder(tmp_path: Path, images_gz: bytes) -> Path:
    folder = tmp_path / "mnist"
    folder.mkdir(parents=True)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(images_gz)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx((4,), bytes(4)))
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx((4, 28, 28), bytes(4 * 784)))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx((4,), bytes(4)))
    return folder


def test_an_mnist_gzip_is_inflated_only_as_far_as_its_header_and_the_budget_allow(tmp_path, cli):
    from edgetrain.data import load_data

    # The header says 4 images, the stream inflates to 8 MiB: refused after 4 images and one byte.
    long = gzip.compress(idx((4, 28, 28), bytes(8 << 20)), compresslevel=9)
    assert len(long) < 16 << 10
    with pytest.raises(DataError, match="has trailing bytes: more bytes, the header's shape 4x28x28 needs"):
        load_data(f"mnist:{_mnist_folder(tmp_path / 'a', long)}")
    # The header claims 2^31 images: refused from the header, before inflating anything.
    huge = gzip.compress(idx((1 << 31, 28, 28), bytes(1024)))
    with pytest.raises(ResourceLimitError, match=r"train-images-idx3-ubyte.gz: data of shape 2147483648x28x28"):
        load_data(f"mnist:{_mnist_folder(tmp_path / 'b', huge)}")
    # An honest header within the budget of the CLI: over a small budget it is one line, exit 2.
    honest = gzip.compress(idx((4, 28, 28), bytes(4 * 784)))
    r = cli("train", write(tmp_path, "lenet.onnx", models.build_model("lenet5")),
                "--data", f"mnist:{_mnist_folder(tmp_path / 'c', honest)}", "--steps", "1",
                "--out", str(tmp_path / "run"), "--max-memory", "1K")
    one_line_exit_2(r, "train-images-idx3-ubyte.gz", "memory budget", "--max-memory")


def test_an_agent_under_a_memory_limit_answers_a_fold_bomb_with_an_error_and_keeps_serving(tmp_path, monkeypatch):
    from test_bridge_host_agent import connect, reply, upload

    from firmware_bridge.profile.sim import SimulatedBoard
    from firmware_bridge.profile.workload import Workload, sha256_hex
    from firmware_bridge.wire.messages import MsgType

    monkeypatch.delenv(limits.ENV_VAR, raising=False)  # the agent's default: half of its 1.5 GiB
    bomb = fold_bomb().SerializeToString()
    lenet = models.build_model("lenet5").SerializeToString()
    cache = tmp_path / "cache"
    with SimulatedBoard(cache, memory_limit=3 << 29) as board:  # 1.5 GiB of address space
        link = connect(board)
        for _ in range(2):  # a host that retries gets the same answer, from the same live agent
            error = upload(link, bomb)
            assert error is not None and error["code"] == "model_invalid", error
            assert "'bomb'" in error["message"] and "memory budget" in error["message"], error
        assert board.agent.poll() is None
        assert upload(link, lenet) is None  # still importing, and caching what fits
        params = Workload(input_shape=(4, 1, 28, 28), steps=1).to_params()
        link.send(MsgType.WORKLOAD, {"id": "after", "model_sha256": sha256_hex(lenet), "task": "train",
                                     "params": params})
        message = reply(link, timeout=60)
        while message.type == MsgType.PROGRESS:
            message = reply(link, timeout=60)
        assert message.type == MsgType.RESULT and message.body["status"] == "ok", message
        link.close("done")
        link.port.close()
        log = board.agent_log()
    assert not list(cache.glob(f"{sha256_hex(bomb)}*"))
    assert "MemoryError" not in log and "Traceback" not in log



# ------------------------------------------------------------------------ item 11: malformed input


def test_a_model_with_no_outputs_is_one_line_in_every_command(tmp_path, cli):
    path = write(tmp_path, "no_outputs.onnx", no_output_model())
    with pytest.raises(ModelError, match="no outputs"):
        edgetrain.load(path)
    for command in (["info", path], ["eval", path, "--data", "digits"],
                    ["train", path, "--data", "digits", "--steps", "1", "--out", str(tmp_path / "r")],
                    ["profile", path, "--simulate"]):
        one_line_exit_2(cli(*command), "no_outputs.onnx", "no outputs")


def test_a_string_attribute_that_is_not_utf8_is_one_line(tmp_path, cli):
    model = huge_input_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 8
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 8
    model.graph.node[0].attribute.append(helper.make_attribute("auto_pad", b"\xff\xfe"))
    one_line_exit_2(cli("info", write(tmp_path, "attr.onnx", model)), "attr.onnx", "node 'conv'", "'auto_pad'",
                    "not UTF-8")


@pytest.mark.parametrize("suffix", [".npy", ""])
def test_an_npz_member_that_is_a_pickle_is_refused_as_such_and_never_loaded(tmp_path, cli, suffix):
    from edgetrain.data.npzfile import NOT_NPY, NpzError, read_npz

    path = write(tmp_path, "pickled.npz", pickle_member_npz(suffix))
    with pytest.raises(NpzError) as info:
        read_npz(path, ("x", "y"))
    assert info.value.kind == NOT_NPY and "is a Python pickle" in str(info.value)
    lenet = write(tmp_path, "lenet.onnx", models.build_model("lenet5"))
    line = one_line_exit_2(cli("train", lenet, "--data", f"npz:{path}", "--steps", "1", "--out", str(tmp_path / "r")),
                           "pickled.npz", "'x", "pickle")
    assert "allow_pickle" not in line


def test_numpys_load_unsafely_hint_never_reaches_the_user(tmp_path, cli):
    lenet = write(tmp_path, "lenet.onnx", models.build_model("lenet5"))
    for name, blob in (("raw.npz", pickle.dumps({"x": np.zeros(3)})), ("garbage.npz", b"not an archive" * 4),
                       ("objects.npz", _object_npz())):
        path = write(tmp_path, name, blob)
        for command in (["train", lenet, "--data", f"npz:{path}", "--steps", "1", "--out", str(tmp_path / "r")],
                        ["info", path]):
            line = one_line_exit_2(cli(*command), name).replace(str(tmp_path), "")
            assert "unsafely" not in line and "allow_pickle=True" not in line and "pickle.load" not in line, line


def _object_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))
    return buffer.getvalue()


def test_pfq_normaliser_periods_zero_is_refused_from_a_toml_file_and_the_api(tmp_path):
    from edgetrain.precision.pfq import PFQController
    from edgetrain.train.config import read_toml, resolve

    config = tmp_path / "c.toml"
    for value in (0, -3):
        config.write_text(f'schedule = "pfq"\npfq_normaliser_periods = {value}\n')
        with pytest.raises(EdgetrainError, match=f"'pfq_normaliser_periods' must be at least 1, got {value}"):
            resolve({"model": "m.onnx"}, read_toml(config))
        with pytest.raises(EdgetrainError, match="normaliser_periods must be >= 1"):
            PFQController(normaliser_periods=value)


def _step(step: int) -> dict:
    return {"type": "step", "step": step, "loss": 2.0 / step, "lr": 0.01, "precision": "fp32 x1",
            "percent_of_fp32": 100.0, "time": 0.1 * step}


def _log(tmp_path: Path, lines: list[str], name: str = "run") -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "log.jsonl").write_text("".join(lines))
    return run


def test_plot_skips_a_half_written_last_line_and_refuses_corruption_in_the_middle(tmp_path, cli):
    pytest.importorskip("matplotlib")
    whole = [json.dumps(_step(i)) + "\n" for i in range(1, 6)]
    half = _log(tmp_path, whole + [json.dumps(_step(6))[:25]], "half")
    r = cli("plot", str(half))
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == f"edgetrain: warning: {half / 'log.jsonl'}: line 6 is half-written (a run stopped " \
                               "mid-write); skipped"
    middle = _log(tmp_path, whole[:2] + [whole[2][:25] + "\n"] + whole[3:], "middle")
    one_line_exit_2(cli("plot", str(middle)), "middle/log.jsonl", "line 3", "not JSON")


def test_a_log_line_with_a_non_integer_step_is_one_line_naming_the_file_and_line(tmp_path):
    from edgetrain.train.runlog import LogError, RunLog, read_log

    lines = [json.dumps(_step(i)) + "\n" for i in range(1, 4)]
    lines[1] = lines[1].replace('"step": 2', '"step": "abc"')
    run = _log(tmp_path, lines)
    for read in (lambda: RunLog(run, resume_step=2), lambda: read_log(run / "log.jsonl")):
        with pytest.raises(LogError, match=r"run/log.jsonl: line 2: 'step' must be an integer >= 0, got \"abc\""):
            read()


# ------------------------------------------------------------------------------ item 14: typed API errors


def test_api_mistakes_raise_the_packages_typed_errors(tmp_path):
    from edgetrain.errors import NonFiniteError, OutputError
    from edgetrain.export import export_onnx
    from edgetrain.precision.dfq import DFQConfig

    lenet = models.build_model("lenet5")
    with pytest.raises(ModelError, match="float16, float32 or float64"):
        edgetrain.load(lenet, dtype=np.int32)  # used to load, with every weight truncated to zero
    for bad in (None, 3):
        with pytest.raises(ModelError, match="an ONNX file path or an onnx.ModelProto"):
            edgetrain.load(bad)
    for field, value in (("target", -1), ("target", 101), ("target", float("nan")), ("beta", -1.0)):
        with pytest.raises(EdgetrainError, match=f"dfq {field} must be"):
            DFQConfig(**{field: value})
    model = edgetrain.load(lenet)
    model.set_precision("8/8")
    x = np.zeros((2, 1, 28, 28), np.float32)
    x[1, 0, 3, 3] = np.nan
    with pytest.raises(DataError, match="input 'input' holds 1 NaN or infinite values"):
        model(x)
    assert issubclass(NonFiniteError, DataError) and issubclass(NonFiniteError, ValueError)
    for path in (tmp_path / "no" / "such" / "folder" / "m.onnx", tmp_path):
        with pytest.raises(OutputError, match="does not exist|is a folder"):
            export_onnx(model, path)
    with pytest.raises(ResourceLimitError):
        edgetrain.load(fold_bomb())
