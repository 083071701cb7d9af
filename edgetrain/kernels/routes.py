"""Which integer route the kernels take: `EDGETRAIN_BACKEND=auto|vnni|onnxruntime|numba`, probed safely.

Every route gives the same bits (each is exact), so the choice only moves speed. What a route can do
wrong is crash: onnxruntime's library is reached through ctypes (`ort_capi`), and a library that does
not load cleanly (seen: a segfault under qemu-user on emulated arm64) would take the whole process
with it. So each route is probed once in a child process (`python -m edgetrain.kernels.route_probe
ROUTE`), whose crash, hang or wrong answer disables that route with one log line; only a route whose
child passed is ever loaded in this process. Results are cached on disk, keyed by everything that
could change them (CPU, Python and library versions), so the probe's few seconds are paid once per
machine and install.

Invariants: `choose` never raises for an unusable route (it falls back along `FALLBACK`, logging why);
the numba route needs no probe and is always usable; a route's probe never runs in this process
unless its child probe passed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from edgetrain.errors import EdgetrainError, OutputError
from edgetrain.fileio import make_folder, write_atomic

__all__ = ["ROUTES", "ENV_VAR", "route_ok", "usable_routes", "choose", "describe", "cpu_int8_features"]

ENV_VAR = "EDGETRAIN_BACKEND"
ROUTES = ("vnni", "onnxruntime", "numba")  # fastest first
CHOICES = ("auto",) + ROUTES
# Where each route steps down to when it cannot run (also the order `auto` tries them in).
FALLBACK = {"vnni": "onnxruntime", "onnxruntime": "numba", "numba": None}
# A probe compiles a few Numba kernels and runs worst-case products: seconds natively, minutes under
# emulation. Past this it counts as hung.
PROBE_TIMEOUT_S = 600.0
_CACHE_ENV = "EDGETRAIN_CACHE_DIR"

log = logging.getLogger("edgetrain.kernels")
_results: dict[str, tuple[bool, str]] = {}


def _cache_dir() -> Path:
    if os.environ.get(_CACHE_ENV):
        return Path(os.environ[_CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgetrain"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


@functools.lru_cache(maxsize=1)  # the CPU and the installed libraries do not change within a process
def _machine_key() -> str:
    """A digest of what a probe's answer depends on: CPU, Python and the libraries the routes load."""
    cpu = ""
    try:
        import llvmlite.binding as llvm

        cpu = llvm.get_host_cpu_name() + ":" + llvm.get_host_cpu_features().flatten()
    except Exception:  # no llvmlite means no Numba; the key then only needs the rest
        pass
    parts = [platform.machine(), platform.system(), sys.version, cpu, os.environ.get("NUMBA_CPU_NAME", ""),
             os.environ.get("NUMBA_CPU_FEATURES", ""), os.environ.get("EDGETRAIN_TILE_ISA", "")]
    parts += [f"{d}={_version(d)}" for d in ("edgetrain", "numpy", "numba", "onnxruntime")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cache_file() -> Path:
    """Where this machine's verdicts are kept."""
    return _cache_dir() / f"routes-{_machine_key()}.json"


def _read_cache() -> dict[str, list]:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(entries: dict[str, list]) -> None:
    """Keep the answers for the next process; an unwritable cache only costs the next one a probe."""
    try:
        make_folder(_cache_file().parent)
        write_atomic(_cache_file(), json.dumps(entries).encode())
    except OutputError:
        pass


def _probe_command(route: str) -> list[str]:
    return [sys.executable, "-m", "edgetrain.kernels.route_probe", route]


def _probe_in_child(route: str) -> tuple[bool, str]:
    """Run the route's probe in a fresh interpreter; a crash, a hang or a 'no' there is a 'no' here."""
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    try:
        done = subprocess.run(_probe_command(route), capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                              env=env)
    except subprocess.TimeoutExpired:
        return False, f"probe hung (no answer in {PROBE_TIMEOUT_S:.0f} s)"
    except OSError as exc:
        return False, f"probe could not start: {exc}"
    if done.returncode < 0:
        return False, f"probe crashed (signal {-done.returncode})"
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
        return bool(answer["ok"]), str(answer["why"])
    except (IndexError, ValueError, KeyError, TypeError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"probe failed (exit {done.returncode}): {tail}"


def _plainly_absent(route: str) -> str:
    """Why a route cannot be here, from checks that cannot crash (no child needed); '' if it may be."""
    import importlib.util

    if route == "vnni":
        from edgetrain.kernels import vnni

        return "" if vnni.available() else ("this CPU has neither AVX-512 VNNI, AVX2 nor Arm's dot product "
                                          "(or Numba targets a generic CPU)")
    if route == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    return ""


def route_ok(route: str) -> bool:
    """True when the route passed its probe on this machine (probed once, in a child process)."""
    if route == "numba":
        return True
    if route not in _results:
        absent = _plainly_absent(route)
        if absent:
            _results[route] = (False, absent)
            return False
        cache = _read_cache()
        if route in cache and isinstance(cache[route], list) and len(cache[route]) == 2:
            _results[route] = (bool(cache[route][0]), str(cache[route][1]))
        else:
            _results[route] = _probe_in_child(route)
            _write_cache({**cache, route: list(_results[route])})
        ok, why = _results[route]
        if not ok:  # a route that broke is news; one this machine simply lacks is not
            level = logging.WARNING if why.startswith("probe") else logging.INFO
            log.log(level, "edgetrain: warning: integer route %s disabled: %s", route, why)
    return _results[route][0]


def usable_routes() -> dict[str, bool]:
    """Every route and whether this machine can take it (what the board agent's handshake reports)."""
    return {route: route_ok(route) for route in ROUTES}


def describe() -> dict[str, str]:
    """Each route's probe verdict in words (probing what has not been), for reports and `--json` output."""
    usable_routes()
    return {route: ("ok" if route == "numba" else _results[route][1]) for route in ROUTES}


# The CPU's 8-bit dot-product instructions, by LLVM's feature names: what makes an integer route fast.
# x86: VNNI (vpdpbusd) in its AVX-512 and AVX forms; Arm: SDOT/UDOT (dotprod) and the 8-bit matrix
# multiply-accumulate (i8mm: SMMLA/UMMLA/USMMLA).
INT8_FEATURES = ("avx512vnni", "avxvnni", "avx2", "dotprod", "i8mm", "sve", "sve2")


def cpu_int8_features() -> list[str]:
    """The 8-bit dot-product features LLVM sees on this CPU (what `tools/bench_kernels.py` reports)."""
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features()
        return [name for name in INT8_FEATURES if features.get(name, False)]
    except Exception:
        return []


def _auto_takes_tiles() -> bool:
    """Whether `auto` may take the vnni route here: only in a form measured faster than the next route
    (`vnni.AUTO_FORMS`); the Arm `sdot` form is taken when asked for (`--backend vnni`) until it is measured
    on a board."""
    from edgetrain.kernels import vnni

    return vnni.isa() in vnni.AUTO_FORMS


_pointed = False  # whether this process was told of the tiles `auto` passes over


def _point_at_untimed_tiles() -> None:
    """Say once per process that `auto` passes over tiles this CPU has (the Arm `sdot` form, exact but not yet
    timed on a board), and how to take them."""
    global _pointed
    from edgetrain.kernels import vnni

    if _pointed or vnni.isa() != "sdot":
        return
    _pointed = True
    log.info("edgetrain: integer route auto passes over this CPU's 8-bit dot-product tiles (sdot: exact, not yet "
             "timed on a board); --backend vnni or EDGETRAIN_BACKEND=vnni takes them")


def choose(choice: str | None = None) -> str:
    """Resolve a backend choice (None: $EDGETRAIN_BACKEND, default auto) to a route this machine can take."""
    raw = choice if choice is not None else os.environ.get(ENV_VAR, "auto")
    wanted = raw.strip().lower() or "auto"
    if wanted not in CHOICES:
        source = f"{ENV_VAR}={raw}" if choice is None else f"--backend {raw}"
        raise EdgetrainError(f"{source}: unknown integer route; choose one of {', '.join(CHOICES)}")
    route = ROUTES[0] if wanted == "auto" else wanted
    if wanted == "auto" and not _auto_takes_tiles():
        route = FALLBACK["vnni"]
        _point_at_untimed_tiles()
    while not route_ok(route):
        if wanted != "auto":
            log.warning("edgetrain: warning: integer route %s is not usable here (%s); using %s",
                        route, _results[route][1], FALLBACK[route])
        route = FALLBACK[route]
    return route
