"""A real Flower deployment on 127.0.0.1: a flower-superlink, 3 flower-supernodes (insecure), `flwr run` of the
repository's Flower App (pyproject [tool.flwr.app]) for 2 rounds, with one SuperNode killed before round 2.

Cost: the SuperLink notices a dead SuperNode only when its heartbeat lapses (2 x the interval the node
announced). Flower 1.42 hard-codes that interval at 30 s (no flag, no variable), so the test starts each
SuperNode through a launcher that lowers its node heartbeat to the SuperLink's accepted minimum (10 s): a dead node
is reported about 20 s after its last heartbeat instead of 60 s. The SuperLink and its liveness rule are untouched.
Every process the test starts runs in a session of its own, and each session is killed whole, also on failure;
the test checks that none is left.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "edgetrain" / "assets"
MISSING = [exe for exe in ("flower-superlink", "flower-supernode", "flwr") if shutil.which(exe) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"Flower is not installed ({', '.join(MISSING)} missing): "
                                                      "pip install 'edgetrain[fleet]'")
STARTUP_SECONDS, RUN_SECONDS = 60, 300
# Board 1 is slower: its SuperNode carries its own precision policy (DFQ at a low cost target) in its node config.
NODE_POLICY = {1: """ precision-policy='{"schedule": "dfq", "dfq_target": 3.0}'"""}
# flower-supernode with a shorter node heartbeat: the interval it announces (fleet_http_connection) and the one it
# keeps (HeartbeatSender), read from their modules' globals at call time. Flower's constant itself stays 30 s: the
# SuperNode's own state also gives a ClientApp process that long to start (10 s failed them on a loaded machine).
SUPERNODE = """import sys
import flwr.common.constant as constant
import flwr.supercore.heartbeat as sender
import flwr.supernode.fleet_http_connection as connection
connection.HEARTBEAT_DEFAULT_INTERVAL = sender.HEARTBEAT_DEFAULT_INTERVAL = constant.HEARTBEAT_MIN_INTERVAL
from importlib.metadata import entry_points
(entry,) = entry_points(group="console_scripts", name="flower-supernode")
sys.argv[0] = "flower-supernode"
sys.exit(entry.load()())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, done, seconds: float) -> None:
    end = time.monotonic() + seconds
    while not done():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a recycled id owned by someone else: not ours any more
        return False
    return True


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """End a process we started and everything it started (its own session): `sig`, then SIGKILL for stragglers."""
    if _group_alive(proc.pid):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    if _group_alive(proc.pid):  # children that outlived the leader, or a leader that ignored `sig`
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    _wait(f"process group {proc.pid} to end", lambda: not _group_alive(proc.pid), 10)


@pytest.mark.stage  # ~1.5-2.5 min of Flower processes starting: a CI stage of its own (.ci/run)
def test_flwr_run_survives_a_supernode_killed_in_round_2(tmp_path):
    started = time.monotonic()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "PYTHONPATH": str(ROOT),
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    link_port = _free_port()
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    launcher = tmp_path / "supernode.py"
    launcher.write_text(SUPERNODE)
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
        nodes = [start(f"node{i}", [sys.executable, str(launcher), "--insecure", "--superlink",
                                    f"127.0.0.1:{link_port}", "--port", str(_free_port()), "--node-config",
                                    f"partition-id={i} num-partitions=3" + NODE_POLICY.get(i, "")])
                 for i in range(3)]
        _wait("3 SuperNodes to join", lambda: link_log.read_bytes().count(b"Activated node_id") >= 3,
              STARTUP_SECONDS)
        # min-clients=2: round 2 goes ahead with the two live nodes whether the SuperLink has noticed the dead
        # one before round 2 is sent (2 nodes sampled) or after (its message comes back "node unavailable").
        config = (f"model='{ASSETS / 'lenet5_digits.onnx'}' data='digits:{ASSETS / 'digits.npz'}' rounds=2 "
                  f"local-steps=2 min-clients=2 out='{out}' export=false round-timeout=120.0")
        run = subprocess.run(["flwr", "run", str(ROOT), "local", "--run-config", config], env=env,
                             capture_output=True, text=True, timeout=120, start_new_session=True)
        assert run.returncode == 0, run.stdout + run.stderr
        # Kill node 2 as soon as its round-1 reply is uploaded (its own log says so; the SuperLink's "Push
        # replies" line comes before the arrays): it never sees round 2, and the SuperLink's heartbeat clock
        # runs while the server aggregates, evaluates and checkpoints round 1.
        _wait("node 2's round-1 reply", lambda: (tmp_path / "node2.log").read_bytes().count(b"Sent successfully") >= 1,
              RUN_SECONDS)
        _stop(nodes[2], signal.SIGKILL)
        rounds_log = out / "rounds.jsonl"
        _wait("round 2", lambda: rounds_log.is_file() and len(rounds_log.read_text().splitlines()) >= 2,
              RUN_SECONDS)
    finally:
        for proc in reversed(procs):
            _stop(proc)
    assert not [p.pid for p in procs if _group_alive(p.pid)]  # nothing left behind
    rounds = [json.loads(line) for line in rounds_log.read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["accepted"] == 3
    costs = {c["client"]: c for c in rounds[0]["costs"]}  # the server sees board 1's own, cheaper policy
    assert costs[1]["own_policy"] and not costs[0]["own_policy"] and costs[1]["bitops"] < costs[0]["bitops"]
    assert rounds[1]["accepted"] == 2  # the killed node's update is missing; the round still completed
    assert sorted(c["partition-id"] for c in rounds[1]["clients"]) == [0, 1]
    # if the SuperLink had not yet noticed the dead node when round 2 was sent, its error names board 2
    assert [r["client"] for r in rounds[1]["rejected"]] in ([], [2])
    assert (out / "ckpt-000002.npz").is_file() and 0.5 < rounds[1]["accuracy"] <= 1.0
    print(f"deployment test: {time.monotonic() - started:.1f} s")
