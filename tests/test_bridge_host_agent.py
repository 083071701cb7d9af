"""`edgetrain profile` end to end: the real agent as a subprocess on pseudo-terminals, the host over pyserial.

Every test here talks to a live agent process through SimulatedBoard (two ptys and a relay), so
the bytes cross real tty devices, the agent's worker thread trains while its main thread keeps
the link alive, and killing the process is a real crash.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import bridge_peers
import numpy as np
import pytest
from bridge_peers import reply

import models
from edgetrain.cli.main import main as cli_main
from edgetrain.errors import EXIT_LINK_LOST
from firmware_bridge.profile.errors import BoardUnreachable
from firmware_bridge.profile.host import profile
from firmware_bridge.profile.records import ProfileRequest
from firmware_bridge.profile.report import format_markdown, write_latency_table, write_report
from firmware_bridge.profile.sim import SimulatedBoard
from firmware_bridge.profile.workload import Workload, load_model, sha256_hex, train
from firmware_bridge.wire.errors import LinkTimeout
from firmware_bridge.wire.frame import encode_frame, max_frame_len
from firmware_bridge.wire.link import Link
from firmware_bridge.wire.messages import MsgType, encode_payload
from firmware_bridge.wire.transport import open_pty

BAUD = 921600
BATCH = 4
STEPS = 5
WARMUP = 2
# Short enough to keep the suite fast, long enough for an agent to start on a loaded machine (4 s was not,
# with the suite sharing 2 cores with other work: the agent imports NumPy, ONNX and Numba first).
TIMEOUT_S = 8.0
# Scheduling slack when checking how long a failure took to surface.
SLACK_S = 1.5
# Agent start-up (Python, NumPy, ONNX imports) on a slow machine.
AGENT_START_S = 15.0
# A workload long enough to be killed in the middle of: far more steps than the kill needs.
LONG_STEPS = 5000
# Enough steps that the RESULT comes well (>= 0.2 s on a fast machine) after the first PROGRESS,
# which is sent after step 1 and triggers the crash.
RESTART_STEPS = 100
# The restarted agent must import NumPy, ONNX and edgetrain within the reconnection half of this.
RESTART_TIMEOUT_S = 6.0
# A batch whose steps keep the worker busy while the test pokes at the link.
BUSY_BATCH = 32
BUSY_WATCH_S = 1.5
# How long an ACK may take while the worker trains: normally tens of ms (poll interval, GIL
# switches); the bound leaves room for a loaded 2-core CI box, and is still far below the job's
# length, which is what an agent whose link loop waits for the job would show.
ACK_BOUND_S = 2.0

NANO_TELEMETRY = {
    "/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/rail_name_0": "POM_5V_IN",
    "/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power0_input": 3004,
    "/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/rail_name_1": "POM_5V_GPU",
    "/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power1_input": 40,
    "/sys/class/thermal/thermal_zone0/type": "CPU-therm",
    "/sys/class/thermal/thermal_zone0/temp": 41500,
    "/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq": 1479000,
    # The kernel is throttling for heat: the board must say so and the host's report must warn.
    "/sys/class/thermal/cooling_device0/type": "cpu-balanced",
    "/sys/class/thermal/cooling_device0/cur_state": 2,
    "/sys/class/thermal/cooling_device0/max_state": 10,
    "/proc/device-tree/model": "NVIDIA Jetson Nano Developer Kit",
}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("model") / "lenet5.onnx"
    models.save_model(models.build_model("lenet5"), path)
    return str(path)


@pytest.fixture(scope="module")
def expected_digest(model_path: str) -> str:
    """The digest of the standard workload, trained in this process with no link involved."""
    workload = Workload(input_shape=(BATCH, 1, 28, 28), steps=STEPS, warmup_steps=WARMUP)
    return train(load_model(Path(model_path).read_bytes()), workload).digest


@pytest.fixture(scope="module")
def jetson_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sysfs")
    for relative, value in NANO_TELEMETRY.items():
        path = root / relative.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    return root


def request(model: str, port: str, **overrides: Any) -> ProfileRequest:
    options: dict[str, Any] = {
        "batch_size": BATCH, "steps": STEPS, "warmup": WARMUP, "progress": False, "timeout_s": TIMEOUT_S,
    }
    options.update(overrides)
    return ProfileRequest(model=model, port=port, **options)


def connect(board: SimulatedBoard) -> Link:
    """A bare host link to the agent, for sending it things a well-behaved host never would."""
    return bridge_peers.connect(board, AGENT_START_S)


def expect(link: Link, msg_type: MsgType, timeout: float = 10.0) -> dict[str, Any]:
    """Return the body of the next reply, which must be of `msg_type`."""
    message = reply(link, timeout)
    assert message.type == msg_type, f"expected {msg_type.name}, got {message.type.name}: {message.body}"
    return message.body


def upload(link: Link, blob: bytes, *, fmt: str = "onnx", sha: str | None = None) -> dict[str, Any] | None:
    """Upload `blob` as a well-formed host would; return the agent's ERROR body, or None if it kept it."""
    sha = sha or sha256_hex(blob)
    link.send(MsgType.MODEL_QUERY, {"sha256": sha, "format": fmt})
    assert expect(link, MsgType.MODEL_HAVE)["have"] is False
    link.send_bulk(blob)
    link.send(MsgType.MODEL_COMMIT, {"sha256": sha, "size": len(blob), "format": fmt})
    message = reply(link)
    if message.type == MsgType.MODEL_HAVE:
        assert message.body["have"] is True
        return None
    assert message.type == MsgType.ERROR, message
    return message.body


def files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


# ---------------------------------------------------------------------------------------- end to end


def test_profile_over_a_pty_is_complete_and_digests_agree(
    tmp_path: Path, model_path: str, expected_digest: str, jetson_tree: Path
) -> None:
    with SimulatedBoard(telemetry_root=jetson_tree) as board:
        report = profile(request(model_path, board.host_port))

    assert report["uploaded"] is True and report["reconnects"] == 0
    assert report["digest"]["board"] == report["digest"]["host"] == expected_digest
    assert report["digest"]["verdict"] == "digests agree"

    nodes = [node.name for node in load_model(Path(model_path).read_bytes()).graph.nodes]
    assert [layer["name"] for layer in report["layers"]] == nodes
    assert all(layer["forward_s"] > 0 for layer in report["layers"])
    assert all(layer["backward_s"] is not None and layer["backward_s"] > 0 for layer in report["layers"])
    assert report["timing"]["timed_steps"] == STEPS and report["timing"]["warmup_steps"] == WARMUP
    assert len(report["timing"]["step_times_s"]) == STEPS

    telemetry = report["telemetry"]
    assert {"ina3221_iio", "thermal_zones", "cpufreq"} <= set(telemetry["found"])
    assert {"tegrastats", "vcgencmd", "ina3221_hwmon"} <= set(telemetry["missing"])
    assert telemetry["power_source"] == "ina3221_iio"
    # A constant 3004 mW input rail: energy per step is power times step time.
    assert telemetry["mean_power_mw"] == pytest.approx(3004)
    assert telemetry["energy_per_step_j"] > 0
    assert telemetry["thermal_c_before"] == {"CPU-therm": 41.5}
    assert report["board"]["capabilities"]["board"] == "NVIDIA Jetson Nano Developer Kit"
    # Items 18 and 19: the sampling method, throttling read on the board, and a simulated board said so.
    assert telemetry["power"]["method"].startswith("sysfs reads every 50 ms")
    assert telemetry["throttle"]["now"] == ["throttled"] and telemetry["throttle"]["unknown"] == [
        "under_voltage", "freq_capped", "soft_temp_limit"]
    assert telemetry["throttle"]["warning"] in report["warnings"]
    assert report["simulated"] is True and telemetry["simulated"] is True
    assert report["timing"]["spread"]["busy"] in (True, False)  # this shared 2-core machine may well be busy

    memory = report["memory"]
    assert memory["peak_rss_bytes"] > 10 * (1 << 20)
    assert memory["sampled_peak_rss_bytes"] > 0
    assert "ru_maxrss" in memory["methods"]["peak_rss_bytes"]

    written = write_report(report, tmp_path / "out")
    table = write_latency_table(tmp_path / "latency.json", report)
    assert json.loads(Path(written["json"]).read_text())["digest"]["agree"] is True
    markdown = Path(written["markdown"]).read_text()
    assert "digests agree" in markdown and all(f"| {name} |" in markdown for name in nodes)
    assert "> **SIMULATED BOARD" in markdown
    assert "> **Warning:** board throttled or under-voltage: throttled now" in markdown
    assert Path(written["plot"]).read_bytes().startswith(b"\x89PNG")
    assert set(table) == set(nodes)
    assert set(table["conv1"]["fp32"]) == {"forward_s", "backward_s"}


def test_noisy_line_gives_the_same_result_and_the_cache_skips_the_second_upload(
    model_path: str, expected_digest: str
) -> None:
    with SimulatedBoard(corrupt_rate=1e-4, drop_rate=1e-5, seed=3) as board:
        first = profile(request(model_path, board.host_port))
        second = profile(request(model_path, board.host_port))
    relay = board.relay_stats
    assert relay["a->b"].corrupted + relay["b->a"].corrupted > 0, "the line was meant to be noisy"

    assert first["uploaded"] is True and second["uploaded"] is False
    assert second["upload_bytes"] == 0
    for report in (first, second):
        assert report["digest"]["board"] == report["digest"]["host"] == expected_digest
    damage = sum(
        report["link"]["board"]["decoder"][counter] for counter in ("crc_errors", "truncated", "malformed")
    )
    retransmits = first["link"]["host"]["link"]["retransmits"] + second["link"]["board"]["link"]["retransmits"]
    assert damage + retransmits > 0


# ----------------------------------------------------------------------------------------- lost board


def test_a_killed_agent_is_reported_within_the_timeout(model_path: str) -> None:
    killed_at: list[float] = []
    with SimulatedBoard() as board:

        def kill_on_first_progress(step: int, total: int) -> None:
            if not killed_at:
                board.kill_agent()
                killed_at.append(time.monotonic())

        with pytest.raises(BoardUnreachable) as failure:
            profile(request(model_path, board.host_port, steps=LONG_STEPS, on_progress=kill_on_first_progress))
        took = time.monotonic() - killed_at[0]

    message = str(failure.value)
    assert message.startswith(f"board stopped answering on {board.host_port} after ")
    assert "\n" not in message
    assert took <= TIMEOUT_S + SLACK_S


def test_a_restarted_agent_is_reconnected_and_the_profile_completes(model_path: str, expected_digest: str) -> None:
    restarted = threading.Event()
    with SimulatedBoard() as board:

        def crash_and_restart(step: int, total: int) -> None:
            if not restarted.is_set():
                board.kill_agent()
                board.start_agent()
                restarted.set()

        report = profile(
            request(model_path, board.host_port, on_progress=crash_and_restart, steps=RESTART_STEPS,
                    timeout_s=RESTART_TIMEOUT_S)
        )
        log = board.agent_log()

    assert restarted.is_set()
    assert report["reconnects"] == 1
    # The host's link counters cover both links, not only the one that finished the profile.
    assert report["link"]["host"]["links"] == 2
    # Uploaded before the crash; the restarted agent found it in its cache.
    assert report["uploaded"] is True
    assert report["link"]["board"]["agent"]["sessions"] == 1, log
    workload = Workload(input_shape=(BATCH, 1, 28, 28), steps=RESTART_STEPS, warmup_steps=WARMUP)
    assert report["digest"]["board"] == report["digest"]["host"] == train(
        load_model(Path(model_path).read_bytes()), workload
    ).digest
    assert expected_digest != report["digest"]["board"]  # a different workload really ran


# ---------------------------------------------------------------------------------- responsiveness


def test_the_link_answers_while_training_runs_and_cancel_stops_it(model_path: str) -> None:
    blob = Path(model_path).read_bytes()
    with SimulatedBoard() as board:
        link = connect(board)
        assert upload(link, blob) is None
        params = Workload(input_shape=(BUSY_BATCH, 1, 28, 28), steps=LONG_STEPS).to_params()
        link.send(MsgType.WORKLOAD, {"id": "busy", "model_sha256": sha256_hex(blob), "task": "train", "params": params})
        assert expect(link, MsgType.PROGRESS)["id"] == "busy"

        # The worker is training; the main thread must still acknowledge at once and report status.
        worst_ack, statuses = 0.0, 0
        until = time.monotonic() + BUSY_WATCH_S
        while time.monotonic() < until:
            started = time.monotonic()
            link.send(MsgType.MODEL_QUERY, {"sha256": "0" * 64}, timeout=LONG_STEPS)
            worst_ack = max(worst_ack, time.monotonic() - started)
            with contextlib.suppress(LinkTimeout):
                while True:
                    message = link.recv(timeout=0.05)
                    statuses += message.type == MsgType.TELEMETRY and message.body["values"]["state"] == "busy"
        assert worst_ack < ACK_BOUND_S and statuses >= 1

        link.send(MsgType.CANCEL, {"id": "busy"})
        deadline = time.monotonic() + 30
        while True:
            message = link.recv(timeout=max(0.01, deadline - time.monotonic()))
            if message.type == MsgType.RESULT:
                break
        assert message.body == {"id": "busy", "status": "cancelled"}
        link.close()
        link.port.close()


# ------------------------------------------------------------------------------------- hostile input


def test_hostile_frames_and_uploads_are_refused_and_the_agent_keeps_serving(tmp_path: Path, model_path: str) -> None:
    cache = tmp_path / "a" / "b" / "cache"
    with SimulatedBoard(cache) as board:
        link = connect(board)
        before = files_under(tmp_path)
        probe_sha = "0" * 64
        seq = link.send(MsgType.MODEL_QUERY, {"sha256": probe_sha})
        assert expect(link, MsgType.MODEL_HAVE)["have"] is False

        port = link.port
        garbage = bytes(range(1, 256)) * 3
        port.write(garbage + b"\x00")  # CRC cannot match
        port.write(b"\x01" * (max_frame_len() + 100) + b"\x00")  # longer than any frame
        whole = encode_frame(MsgType.MODEL_QUERY, seq + 1, encode_payload(MsgType.MODEL_QUERY, {"sha256": probe_sha}))
        port.write(whole[: len(whole) // 2] + b"\x00")  # cut short
        port.write(encode_frame(MsgType.MODEL_QUERY, seq, encode_payload(MsgType.MODEL_QUERY, {"sha256": probe_sha})))
        # None of those deserves an answer; the replayed query in particular must not be served twice.
        with pytest.raises(LinkTimeout):
            message = link.recv(timeout=0.8)
            pytest.fail(f"the agent answered {message}")

        link.send_raw(0x7E, b"who knows")
        assert "unknown message type 0x7e" in expect(link, MsgType.ERROR)["message"]
        link.send_raw(MsgType.WORKLOAD, b'{"id": 7}')
        assert expect(link, MsgType.ERROR)["code"] == "bad_message"
        link.send_raw(MsgType.MODEL_QUERY, b'{"sha256": "../../x"}')
        assert expect(link, MsgType.ERROR)["code"] == "bad_message"

        # Not ONNX, whatever the commit says: refused with the importer's one line, nothing cached.
        for blob in (pickle.dumps({"weights": [1, 2, 3]}), b"import os\nos.system('touch /tmp/pwned')\n"):
            error = upload(link, blob)
            assert error is not None and error["code"] == "model_invalid", error
            assert "\n" not in error["message"] and sha256_hex(blob)[:12] in error["message"]
        error = upload(link, pickle.dumps(np.arange(3)), fmt="npz")
        assert error is not None and error["code"] == "data_invalid" and "pickle" in error["message"]
        objects = io.BytesIO()
        np.savez(objects, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))
        error = upload(link, objects.getvalue(), fmt="npz")
        assert error is not None and error["code"] == "data_invalid", error
        error = upload(link, b"some bytes", sha="f" * 64)
        assert error is not None and error["code"] == "hash_mismatch"

        # A workload naming files outside the cache: refused, and nothing appears anywhere.
        traversal = {
            "id": "escape", "model_sha256": "1" * 64, "task": "train",
            "params": {"input_shape": [1, 1, 28, 28], "steps": 1, "data_sha256": "../../x",
                       "data": "../../x", "model_path": "../../../x"},
        }
        link.send(MsgType.WORKLOAD, traversal)
        error = expect(link, MsgType.ERROR)
        assert error["code"] == "workload_invalid" and "data_sha256" in error["message"]
        link.send_raw(MsgType.MODEL_COMMIT, json.dumps({"sha256": "2" * 64, "size": 0, "format": "../../x"}).encode())
        assert expect(link, MsgType.ERROR)["code"] == "bad_message"
        link.send(MsgType.WORKLOAD, dict(traversal, params={"input_shape": [1, 1, 28, 28], "steps": 1}))
        assert expect(link, MsgType.RESULT)["metrics"]["code"] == "model_missing"

        link.close("done probing")
        link.port.close()
        created = files_under(tmp_path) - before
        assert all(cache in path.parents for path in created), created
        assert not any(path.name == "x" for path in files_under(tmp_path))

        # Still serving: a real profile works, and its counters show what was thrown away.
        report = profile(request(model_path, board.host_port))
    assert report["digest"]["agree"]
    board_link = report["link"]["board"]
    assert board_link["decoder"]["oversize"] >= 1
    assert board_link["decoder"]["crc_errors"] + board_link["decoder"]["malformed"] + board_link["decoder"][
        "truncated"
    ] >= 2
    assert board_link["link"]["duplicates"] >= 1
    assert board_link["agent"]["errors_sent"] >= 9


# ------------------------------------------------------------------------------------------- the CLI


def test_cli_simulate_writes_the_report_and_the_latency_table(
    tmp_path: Path, model_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out, table, data = tmp_path / "report", tmp_path / "latency.json", tmp_path / "digits.npz"
    rng = np.random.default_rng(1)
    np.savez(data, x=rng.standard_normal((10, 1, 28, 28)).astype(np.float32), y=rng.integers(0, 10, 10))
    argv = ["profile", model_path, "--simulate", "--json", "--batch-size", str(BATCH), "--steps", "3",
            "--warmup", "1", "--data", str(data), "--out", str(out), "--latency-table", str(table),
            "--timeout", str(TIMEOUT_S)]
    assert cli_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["digest"]["verdict"] == "digests agree"
    assert report["uploaded"] is True and report["data_uploaded"] is True
    assert report["simulated"] is True and report["board"]["simulated"]["corrupt_rate"] == 0.0
    assert report["workload"]["data"] == str(data) and report["workload"]["data_sha256"] == sha256_hex(
        data.read_bytes()
    )
    assert {"profile.json", "profile.md", "profile.png"} <= {path.name for path in out.iterdir()}
    assert set(json.loads(table.read_text())["conv1"]) == {"fp32"}
    assert format_markdown(report).count("digests agree") == 2


@pytest.mark.parametrize(
    "argv, words",
    [
        (["profile", "{tmp}/missing.onnx", "--port", "loop://"], ["missing.onnx", "no such file"]),
        (["profile", "{model}"], ["--port", "--simulate"]),
        (["profile", "{model}", "--port", "loop://", "--simulate"], ["not both"]),
        (["profile", "{model}", "--port", "loop://", "--sim-drop", "0.1"], ["--sim-drop", "--simulate"]),
        (["profile", "{model}", "--simulate", "--steps", "0"], ["positive integer"]),
        (["profile", "{model}", "--simulate", "--precision", "../x"], ["precision"]),
        (["profile", "{model}", "--port", "loop://", "--data", "{tmp}/none.npz"], ["none.npz", "no such file"]),
    ],
)
def test_cli_mistakes_are_one_line_and_exit_2(
    argv: list[str], words: list[str], tmp_path: Path, model_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [arg.format(tmp=tmp_path, model=model_path) for arg in argv]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgetrain: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("port", ["/dev/no-such-tty", "nosuchscheme://x"])
def test_a_port_that_cannot_be_opened_is_one_line_and_exit_3(
    port: str, model_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["profile", model_path, "--port", port]) == EXIT_LINK_LOST
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"edgetrain: error: cannot open port {port}"), err


def test_no_agent_on_the_port_is_one_clear_line(model_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    # loop:// echoes our own HELLO back: a line with something on it, but no agent.
    started = time.monotonic()
    assert cli_main(["profile", model_path, "--port", "loop://", "--timeout", "1"]) == EXIT_LINK_LOST
    err = capsys.readouterr().err
    assert "loop:// echoes back what the host sends" in err and err.count("\n") == 1
    assert time.monotonic() - started < 1 + SLACK_S + 2  # plus the model import
    assert os.path.exists(model_path)


def test_a_silent_port_is_one_clear_line(model_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with open_pty() as nobody:  # a tty with nothing on the other end
        started = time.monotonic()
        assert cli_main(["profile", model_path, "--port", nobody.slave_path, "--timeout", "1"]) == EXIT_LINK_LOST
        took = time.monotonic() - started
    err = capsys.readouterr().err
    assert f"no edgetrain agent answered on {nobody.slave_path} within 1 s" in err and err.count("\n") == 1
    assert took < 1 + SLACK_S + 2  # plus the model import
