"""Choosing the integer route: probes that crash, hang or answer wrong leave the engine working.

The probes run real child interpreters; the ones that misbehave are real too (a process killed by
SIGSEGV, one that sleeps past the timeout), substituted for the route's probe command.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetrain import kernels
from edgetrain.errors import EdgetrainError
from edgetrain.kernels import routes
from edgetrain.kernels.numba_backend import NumbaBackend
from edgetrain.kernels.ort_backend import OrtBackend

SEGFAULT = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
HANG = "import time; time.sleep(60)"
SAYS_NO = "print('some noise'); print('{\"ok\": false, \"why\": \"answers off by one\"}')"


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """No remembered verdicts: an empty cache folder and no results from earlier tests."""
    monkeypatch.setenv("EDGETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(routes.ENV_VAR, raising=False)
    monkeypatch.setattr(routes, "_results", {})
    monkeypatch.setattr(routes, "_plainly_absent", lambda route: "")
    active = list(kernels._active)
    yield tmp_path
    kernels._active[:] = active


def _child(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    monkeypatch.setattr(routes, "_probe_command", lambda route: [sys.executable, "-c", code])


def _exact_gemm_still_works() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (9, 70), dtype=np.int8)
    b = rng.integers(-128, 128, (11, 70), dtype=np.int8)
    assert np.array_equal(kernels.gemm_nt(a, b), a.astype(np.int64) @ b.astype(np.int64).T)


@pytest.mark.parametrize("code, why", [(SEGFAULT, "probe crashed (signal 11)"),
                                       (SAYS_NO, "answers off by one"),
                                       ("import sys; sys.exit(3)", "probe failed (exit 3)")])
def test_a_failing_probe_disables_the_route_and_the_engine_carries_on(
    fresh, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: str, why: str
) -> None:
    _child(monkeypatch, code)
    with caplog.at_level(logging.INFO, logger="edgetrain.kernels"):
        assert routes.choose("auto") == "numba"
    assert routes.describe()["onnxruntime"].startswith(why)
    assert any("integer route onnxruntime disabled" in r.getMessage() for r in caplog.records)
    backend = OrtBackend(NumbaBackend())
    assert not backend.usable  # never loaded in this process: the child said no
    assert backend._api is None
    kernels.use_backend("onnxruntime")  # asked for by name: steps down to numba, with a warning
    assert kernels.get_backend().name == "numba"
    _exact_gemm_still_works()


def test_a_hanging_probe_times_out(fresh, monkeypatch: pytest.MonkeyPatch) -> None:
    _child(monkeypatch, HANG)
    monkeypatch.setattr(routes, "PROBE_TIMEOUT_S", 2.0)
    assert not routes.route_ok("onnxruntime")
    assert routes.describe()["onnxruntime"] == "probe hung (no answer in 2 s)"


def test_verdicts_are_cached_per_machine(fresh, monkeypatch: pytest.MonkeyPatch) -> None:
    _child(monkeypatch, SAYS_NO)
    assert not routes.route_ok("onnxruntime")
    [cached] = list(fresh.glob("routes-*.json"))
    assert json.loads(cached.read_text()) == {"onnxruntime": [False, "answers off by one"]}

    def no_child(*args, **kwargs):
        raise AssertionError("a cached verdict must not start a probe")

    monkeypatch.setattr(routes, "_results", {})
    monkeypatch.setattr(subprocess, "run", no_child)
    assert not routes.route_ok("onnxruntime")


def test_the_real_probe_answers_in_one_json_line() -> None:
    done = subprocess.run([sys.executable, "-m", "edgetrain.kernels.route_probe", "onnxruntime"], capture_output=True,
                          text=True, timeout=300)
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and set(answer) == {"ok", "why"}
    # This very process agrees with its child: the probe is the same check.
    assert answer["ok"] == OrtBackend(NumbaBackend()).library_passes()[0]


def test_numba_is_always_a_route_and_the_default_resolves(fresh, monkeypatch: pytest.MonkeyPatch) -> None:
    _child(monkeypatch, SEGFAULT)
    assert routes.usable_routes()["numba"] is True
    monkeypatch.setenv(routes.ENV_VAR, "numba")
    assert kernels.use_backend() == "numba"
    monkeypatch.setenv(routes.ENV_VAR, "gpu")
    with pytest.raises(EdgetrainError, match=r"EDGETRAIN_BACKEND=gpu: unknown integer route; choose one of auto"):
        kernels.use_backend()


def test_every_route_gives_the_same_bits() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 8, 9, 9), dtype=np.uint8)
    w = rng.integers(-128, 128, (6, 8, 3, 3), dtype=np.int8)
    results = []
    previous = kernels.set_backend("numba")
    try:
        for route in routes.ROUTES:
            kernels.set_backend(route)
            results.append(kernels.conv2d_forward(x, w, 1, (1, 1, 1, 1)).astype(np.int64))
    finally:
        kernels.set_backend(previous)
    for other in results[1:]:
        assert np.array_equal(results[0], other)


def test_the_cli_and_the_agent_take_a_backend_flag(tmp_path: Path) -> None:
    from edgetrain.cli.main import main
    from firmware_bridge.board.agent import board_capabilities, build_parser

    model = Path(kernels.__file__).parent.parent / "assets" / "lenet5_digits.onnx"
    assert main(["eval", str(model), "--data", "digits", "--bits", "8/8", "--backend", "numba", "--json"]) == 0
    assert kernels.get_backend().name == "numba"
    assert build_parser().parse_args(["--port", "x", "--backend", "onnxruntime"]).backend == "onnxruntime"
    caps = board_capabilities(tmp_path)
    assert set(caps["integer_routes"]) == set(routes.ROUTES) and caps["integer_routes"]["numba"] is True
    assert caps["integer_route"] in routes.ROUTES


def test_auto_says_once_which_tiles_it_passes_over(fresh, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from edgetrain.kernels import vnni

    monkeypatch.setenv(vnni.ISA_ENV, "sdot")  # the Arm form, forced: auto does not take it yet
    monkeypatch.setattr(routes, "_pointed", False)
    monkeypatch.setattr(routes, "route_ok", lambda route: route == "numba")
    with caplog.at_level(logging.INFO, logger="edgetrain.kernels"):
        assert routes.choose("auto") == "numba"
        assert routes.choose("auto") == "numba"
    told = [r.getMessage() for r in caplog.records if "passes over" in r.getMessage()]
    assert len(told) == 1 and "--backend vnni" in told[0]
    monkeypatch.setattr(routes, "_pointed", False)
    monkeypatch.setenv(vnni.ISA_ENV, "avx2")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgetrain.kernels"):
        routes.choose("auto")
    assert not any("passes over" in r.getMessage() for r in caplog.records)
