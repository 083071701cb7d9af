"""A real Flower deployment on 127.0.0.1: a flower-superlink, 3 flower-supernodes (insecure), `flwr run` of the
repository's Flower App (pyproject [tool.flwr.app]) for 2 rounds, with one SuperNode killed in round 2.

Opt-in (EDGETRAIN_FLEET_DEPLOY=1): it takes about 2 minutes here, most of it the SuperLink noticing the killed
node (a missed heartbeat). Every process it starts runs in a session of its own and is ended with it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "edgetrain" / "assets"
pytestmark = [
    pytest.mark.skipif(shutil.which("flower-superlink") is None,
                       reason="Flower is not installed: pip install 'edgetrain[fleet]'"),
    pytest.mark.skipif(not os.environ.get("EDGETRAIN_FLEET_DEPLOY"),
                       reason="a 2-minute real deployment: set EDGETRAIN_FLEET_DEPLOY=1 to run it"),
]
STARTUP_SECONDS, RUN_SECONDS = 60, 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, done, seconds: float) -> None:
    end = time.monotonic() + seconds
    while not done():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """End a process we started and everything it started (its own session)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)


def test_flwr_run_survives_a_supernode_killed_in_round_2(tmp_path):
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "PYTHONPATH": str(ROOT),
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    link_port = _free_port()
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)
        procs.append(proc)
        return proc

    link_log = tmp_path / "superlink.log"
    out = tmp_path / "out"
    try:
        start("superlink", ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                            "--port", str(link_port), "--database", str(tmp_path / "state.db")])
        nodes = [start(f"node{i}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                                    "--port", str(_free_port()), "--node-config",
                                    f"partition-id={i} num-partitions=3"]) for i in range(3)]
        _wait("3 SuperNodes to join", lambda: link_log.read_bytes().count(b"Activated node_id") >= 3,
              STARTUP_SECONDS)
        config = (f"model='{ASSETS / 'lenet5_digits.onnx'}' data='digits:{ASSETS / 'digits.npz'}' rounds=2 "
                  f"local-steps=3 out='{out}' export=false round-timeout=120.0")
        run = subprocess.run(["flwr", "run", str(ROOT), "local", "--run-config", config], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        rounds_log = out / "rounds.jsonl"
        _wait("round 1", rounds_log.is_file, RUN_SECONDS)
        _stop(nodes[2], signal.SIGKILL)  # mid-federation: round 2 has started, or starts without it
        _wait("round 2", lambda: len(rounds_log.read_text().splitlines()) >= 2, RUN_SECONDS)
    finally:
        for proc in reversed(procs):
            _stop(proc)
    rounds = [json.loads(line) for line in rounds_log.read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["accepted"] == 3
    assert rounds[1]["accepted"] == 2  # the killed node's update is missing; the round still completed
    assert (out / "ckpt-000002.npz").is_file() and 0.5 < rounds[1]["accuracy"] <= 1.0
