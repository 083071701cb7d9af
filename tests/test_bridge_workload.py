"""The pieces behind `edgetrain profile`, in process: workload checks, data, digest, cache, report, CLI wiring."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgetrain.cli.main
import models
from edgetrain.errors import DataError, ModelError
from firmware_bridge.board.cache import BlobCache, CacheError
from firmware_bridge.profile.errors import ProfileError, WorkloadError
from firmware_bridge.profile.report import latency_table, write_latency_table
from firmware_bridge.profile.workload import (
    TrainingData,
    Workload,
    apply_precision,
    load_model,
    parse_onnx,
    sha256_hex,
    synthetic_batches,
    train,
    weights_digest,
)

GOOD_PARAMS: dict[str, Any] = {"input_shape": [4, 1, 28, 28], "batch_size": 4, "steps": 3, "warmup_steps": 1,
                               "precision": "fp32", "seed": 5,
                               "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.5}}


@pytest.fixture(scope="module")
def lenet_blob() -> bytes:
    return models.build_model("lenet5").SerializeToString()


def npz_bytes(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


# -------------------------------------------------------------------------------------------- workload


def test_workload_round_trips_through_params() -> None:
    workload = Workload.from_params(GOOD_PARAMS)
    assert workload == Workload((4, 1, 28, 28), 3, 1, "fp32", 5, 0.05, 0.5)
    assert Workload.from_params(workload.to_params()) == workload
    assert Workload.from_params(dict(GOOD_PARAMS, unknown_field={"ignored": True})) == workload


@pytest.mark.parametrize(
    "change, words",
    [
        ({"steps": True}, ["steps"]),
        ({"steps": 0}, ["steps", "1.."]),
        ({"warmup_steps": -1}, ["warmup_steps"]),
        ({"input_shape": "4,1,28,28"}, ["input_shape"]),
        ({"input_shape": [4, 1, 28, 28.5]}, ["input_shape"]),
        ({"input_shape": [65536, 3, 1024, 1024], "batch_size": 65536}, ["MiB"]),
        ({"batch_size": 8}, ["disagrees"]),
        ({"precision": "../x"}, ["precision"]),
        ({"precision": "8 8"}, ["precision"]),
        ({"precision": "x" * 33}, ["precision"]),
        ({"data_sha256": "../../x"}, ["data_sha256"]),
        ({"optimizer": {"name": "adam"}}, ["optimizer"]),
        ({"optimizer": {"name": "sgd", "lr": 0}}, ["lr"]),
        ({"optimizer": {"name": "sgd", "momentum": 1.0}}, ["momentum"]),
        ({"seed": -3}, ["seed"]),
    ],
)
def test_workload_refuses_bad_fields(change: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(WorkloadError) as failure:
        Workload.from_params(dict(GOOD_PARAMS, **change))
    for word in words:
        assert word in str(failure.value)


def test_workload_requires_shape_and_steps() -> None:
    for missing in ("input_shape", "steps"):
        params = {k: v for k, v in GOOD_PARAMS.items() if k != missing}
        with pytest.raises(WorkloadError, match=missing):
            Workload.from_params(params)


def test_synthetic_batches_are_a_function_of_seed_and_step() -> None:
    first = list(zip(range(3), synthetic_batches(7, (4, 3), 5)))
    again = list(zip(range(3), synthetic_batches(7, (4, 3), 5)))
    other = next(synthetic_batches(8, (4, 3), 5))
    for (_, (x1, y1)), (_, (x2, y2)) in zip(first, again):
        assert x1.dtype == np.float32 and np.array_equal(x1, x2) and np.array_equal(y1, y2)
        assert y1.min() >= 0 and y1.max() < 5
    assert not np.array_equal(first[0][1][0], first[1][1][0])
    assert not np.array_equal(first[0][1][0], other[0])


# ---------------------------------------------------------------------------------------------- digest


def test_digest_covers_names_dtypes_shapes_and_bytes_not_order() -> None:
    params = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(3, np.float32)}
    digest = weights_digest(params)
    assert digest == weights_digest(dict(reversed(list(params.items()))))
    assert digest == weights_digest({k: v.astype(v.dtype.newbyteorder(">")) for k, v in params.items()})
    variants = [
        {"b": params["b"], "c": params["a"]},
        {"b": params["b"].astype(np.float64), "a": params["a"]},
        {"b": params["b"].reshape(3, 2), "a": params["a"]},
        {"b": params["b"], "a": np.nextafter(params["a"], 2, dtype=np.float32)},
    ]
    assert len({digest, *(weights_digest(v) for v in variants)}) == 1 + len(variants)


def test_training_is_deterministic_and_timed_after_warmup(lenet_blob: bytes) -> None:
    workload = Workload((2, 1, 28, 28), steps=2, warmup_steps=1, seed=3)
    entered: list[int] = []

    class Phase:
        def __enter__(self) -> None:
            entered.append(len(entered))

        def __exit__(self, *exc: object) -> None:
            pass

    run = train(load_model(lenet_blob, seed=3), workload, timed_phase=Phase)
    again = train(load_model(lenet_blob, seed=3), workload)
    assert run.digest == again.digest and run.losses == again.losses
    assert entered == [0] and len(run.step_s) == 2 and run.completed_steps == 3
    assert train(load_model(lenet_blob), Workload((2, 1, 28, 28), steps=2, seed=4)).digest != run.digest


def test_training_stops_when_asked(lenet_blob: bytes) -> None:
    calls = iter([False, False, True])
    run = train(load_model(lenet_blob), Workload((2, 1, 28, 28), steps=5), should_stop=lambda: next(calls))
    assert run.cancelled and run.completed_steps == 2


def test_precision_is_passed_through_to_the_engine(lenet_blob: bytes) -> None:
    model = load_model(lenet_blob)
    apply_precision(model, "fp32")
    seen: list[str] = []
    model.set_precision = seen.append  # type: ignore[attr-defined]
    apply_precision(model, "8/8")
    assert seen == ["8/8"]


def test_training_on_a_data_file(lenet_blob: bytes) -> None:
    rng = np.random.default_rng(0)
    data = TrainingData.from_npz(npz_bytes(x=rng.standard_normal((10, 1, 28, 28)), y=rng.integers(0, 10, 10)))
    assert data.x.dtype == np.float32 and data.y.dtype == np.int64
    workload = Workload((4, 1, 28, 28), steps=2)
    assert train(load_model(lenet_blob), workload, data).digest == train(load_model(lenet_blob), workload, data).digest
    with pytest.raises(DataError, match="labels must lie in 0..9"):
        train(load_model(lenet_blob), workload, TrainingData(data.x, data.y + 5))
    with pytest.raises(DataError, match="fewer than one batch"):
        train(load_model(lenet_blob), Workload((16, 1, 28, 28), steps=1), data)


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize(
    "blob, words",
    [
        (pickle.dumps({"x": [1.0], "y": [0]}), ["pickle"]),
        (b"x,y\n1,0\n", ["not a usable .npz"]),
        (npz_bytes(x=np.zeros((2, 3))), ["lacks array", "y"]),
        (npz_bytes(x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64)), ["cannot be read"]),
        (npz_bytes(x=np.zeros((2, 3)), y=np.zeros(2)), ["integer class labels"]),
        (npz_bytes(x=np.zeros((2, 3)), y=np.zeros(3, np.int64)), ["2 samples", "3"]),
        (npz_bytes(x=np.array(["a", "b"]), y=np.zeros(2, np.int64)), ["numbers"]),
    ],
)
def test_data_files_are_arrays_only(blob: bytes, words: list[str]) -> None:
    with pytest.raises(DataError) as failure:
        TrainingData.from_npz(blob, "upload")
    assert str(failure.value).startswith("upload: ")
    for word in words:
        assert word in str(failure.value)


def test_a_bare_npy_is_not_a_data_file() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    with pytest.raises(DataError, match="not an .npz"):
        TrainingData.from_npz(buffer.getvalue())


# ----------------------------------------------------------------------------------------------- model


def _tiny_model(tensor: onnx.TensorProto, domain: str = "") -> bytes:
    node = helper.make_node("Gemm", ["x", tensor.name], ["y"], name="fc", domain=domain)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [tensor],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_onnx_external_data_and_custom_domains_are_refused() -> None:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 0.0, 0.0, 1.0])
    assert parse_onnx(_tiny_model(weight), "ok").graph.node[0].name == "fc"
    external = onnx.TensorProto()
    external.CopyFrom(weight)
    external.ClearField("float_data")
    external.data_location = TensorProto.EXTERNAL
    external.external_data.add(key="location", value="../../etc/passwd")
    with pytest.raises(ModelError, match="external data"):
        parse_onnx(_tiny_model(external), "m")
    with pytest.raises(ModelError, match="custom-op domain 'evil.ops'"):
        parse_onnx(_tiny_model(weight, domain="evil.ops"), "m")
    with pytest.raises(ModelError, match="^m: not a"):
        parse_onnx(b"\xff\xff\xff\xff not protobuf", "m")


def test_importer_refusals_name_the_model(lenet_blob: bytes) -> None:
    with pytest.raises(ModelError) as failure:
        load_model(lenet_blob[: len(lenet_blob) // 3], where="model abc")
    assert str(failure.value).startswith("model abc: ") and "\n" not in str(failure.value)


# ----------------------------------------------------------------------------------------------- cache


def test_cache_names_only_hashes_and_checks_content(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache")
    blob = b"model bytes"
    sha = sha256_hex(blob)
    for bad in ("../../x", "A" * 64, "0" * 63, sha + "/x"):
        with pytest.raises(CacheError):
            cache.path(bad, "onnx")
    with pytest.raises(CacheError):
        cache.path(sha, "../py")
    path = cache.put(sha, "onnx", blob)
    assert path == tmp_path / "cache" / f"{sha}.onnx"
    assert cache.read_verified(sha, "onnx") == blob and cache.has(sha, "npz") is None
    path.write_bytes(b"tampered")
    assert cache.read_verified(sha, "onnx") is None and not path.exists()
    stale = tmp_path / "cache" / f".{sha}.onnx.abc123.tmp"
    stale.write_bytes(b"half")
    BlobCache(tmp_path / "cache")
    assert not stale.exists()
    assert {p.name for p in tmp_path.rglob("*")} == {"cache"}


# --------------------------------------------------------------------------------------- latency table


def _report(precision: str, scale: float) -> dict[str, Any]:
    layers = [{"name": "conv1", "forward_s": 1e-3 * scale, "backward_s": 2e-3 * scale},
              {"name": "flatten", "forward_s": 1e-5 * scale, "backward_s": None}]
    return {"workload": {"precision": precision}, "layers": layers}


def test_latency_table_collects_precisions(tmp_path: Path) -> None:
    path = tmp_path / "latency.json"
    assert latency_table(_report("fp32", 1)) == {
        "conv1": {"fp32": {"forward_s": 1e-3, "backward_s": 2e-3}},
        "flatten": {"fp32": {"forward_s": 1e-5, "backward_s": None}},
    }
    write_latency_table(path, _report("fp32", 1))
    write_latency_table(path, _report("8/8", 0.5))
    write_latency_table(path, _report("fp32", 2))
    table = json.loads(path.read_text())
    assert set(table["conv1"]) == {"fp32", "8/8"}
    assert table["conv1"]["fp32"]["forward_s"] == 2e-3 and table["conv1"]["8/8"]["backward_s"] == 1e-3
    path.write_text("[1, 2]")
    with pytest.raises(ProfileError, match="not a latency table"):
        write_latency_table(path, _report("fp32", 1))


# ------------------------------------------------------------------------------------------ CLI wiring


def test_profile_is_wired_into_edgetrains_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`edgetrain profile` exists and its user errors come out as one line with exit 2."""
    assert edgetrain.cli.main.main(["profile", str(tmp_path / "nope.onnx"), "--port", "loop://"]) == 2
    assert capsys.readouterr().err == f"edgetrain: error: {tmp_path / 'nope.onnx'}: no such file\n"
    assert edgetrain.cli.main.main(["profile", "m.onnx", "--steps", "x"]) == 2
    assert "positive integer" in capsys.readouterr().err
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'edgetrain-agent = "firmware_bridge.board.agent:main"' in pyproject


def test_agent_with_a_bad_port_says_one_line_and_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "firmware_bridge.board.agent", "--port", "/dev/no-such-tty",
         "--cache", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("edgetrain-agent: error: cannot open port /dev/no-such-tty")
    assert done.stderr.count("\n") == 1


def test_differing_digests_are_reported_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lenet_blob: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    from firmware_bridge.profile import cli as bridge_cli
    from firmware_bridge.profile.host import prepare
    from firmware_bridge.profile.records import BoardRun, ProfileRequest
    from firmware_bridge.profile.report import build_report, format_markdown

    model_file = tmp_path / "m.onnx"
    model_file.write_bytes(lenet_blob)
    request = ProfileRequest(model=str(model_file), port="loop://", batch_size=2, steps=1, warmup=0, progress=False)
    prepared = prepare(request)
    local = train(load_model(lenet_blob), prepared.workload)
    metrics = {
        "layers": [[layer.name, layer.forward_s, layer.backward_s] for layer in local.layers],
        "timed_steps": 1, "warmup_steps": 0, "step_s": None, "digest": "0" * 64, "float_mode": "fast",
    }
    board = BoardRun(
        capabilities={"agent": "edgetrain-agent"}, result={"id": "x", "status": "ok", "metrics": metrics},
        uploaded=False, data_uploaded=None, upload_bytes=0, restarts=0, telemetry=[], link={}, seconds=1.0,
    )
    report = build_report(request, prepared, board, local, 0.1)
    assert report["digest"] == {"board": "0" * 64, "host": local.digest, "agree": False, "verdict": "DIGESTS DIFFER",
                                "float_mode": {"board": "fast", "host": local.float_mode}}
    markdown = format_markdown(report)  # also copes with a board that sent no memory or telemetry
    assert "**DIGESTS DIFFER**" in markdown and "energy: not measured" in markdown

    monkeypatch.setattr(bridge_cli, "profile", lambda request, prepared=None: report)
    argv = ["profile", str(model_file), "--port", "loop://", "--out", str(tmp_path / "out")]
    assert edgetrain.cli.main.main(argv) == 1
    assert "DIGESTS DIFFER" in capsys.readouterr().out
