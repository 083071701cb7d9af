"""Numba's thread pool is up before any cached kernel that calls a parallel one runs (kernels.threads.ensure_pool).

Numba loads such a kernel from its cache without starting the pool its parallel callee needs (numba
issues 4807 and 8578), and the process dies of a segmentation fault on the first call: it happened in a
fresh process whose first kernel was `quantize_weights`."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import edgetrain

PACKAGE = Path(edgetrain.__file__).resolve().parent

# Cached kernels that are not parallel themselves but call one that is, and the public functions whose
# first call reaches each. gemm_large's caller passes it pool_threads(), which starts the pool.
NESTED = {
    "edgetrain.quant.quantizer._quantize_both": "quantize_weights",
    "edgetrain.quant.quantizer._quantize_flat": "quantize",
    "edgetrain.quant.quantizer._quantize_rows": "quantize_rows",
    "edgetrain.kernels.vnni_gemm.gemm_large": "VnniBackend.gemm_nt",
}


def _jit_functions() -> dict[str, tuple[bool, set[str]]]:
    """Every module-level Numba function of the package: whether it is parallel, and what it calls."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        tree = ast.parse(path.read_text())
        names = {a.asname or a.name: f"{n.module}.{a.name}" for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module for a in n.names}
        parallel_dicts = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                          if isinstance(t, ast.Name) and "parallel=True" in ast.unparse(n.value)}
        for fn in tree.body:
            jit = [ast.unparse(d) for d in getattr(fn, "decorator_list", []) if "jit" in ast.unparse(d)]
            if not isinstance(fn, ast.FunctionDef) or not jit:
                continue
            parallel = "parallel=True" in jit[0] or any(f"**{d}" in jit[0] for d in parallel_dicts)
            calls = {names.get(c.func.id, f"{module}.{c.func.id}") for c in ast.walk(fn)
                     if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
            calls |= {f"{names.get(c.func.value.id, c.func.value.id)}.{c.func.attr}" for c in ast.walk(fn)
                      if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
                      and isinstance(c.func.value, ast.Name)}
            found[f"{module}.{fn.name}"] = (parallel, calls)
    return found


def test_every_serial_kernel_that_calls_a_parallel_one_is_known() -> None:
    """A new one needs its public caller to start the pool first (and a line in NESTED)."""
    functions = _jit_functions()
    assert any(parallel for parallel, _ in functions.values())  # the scan sees the parallel kernels

    def reaches_parallel(name: str, seen: frozenset = frozenset()) -> bool:
        _, calls = functions[name]
        return any(c in functions and c not in seen and (functions[c][0] or reaches_parallel(c, seen | {name}))
                   for c in calls)

    nested = {name for name, (parallel, _) in functions.items() if not parallel and reaches_parallel(name)}
    assert nested == set(NESTED)


def test_a_cached_serial_caller_of_a_parallel_kernel_runs_first_in_a_new_process(tmp_path: Path) -> None:
    """The sequence that crashed: the parallel kernels compiled and cached by themselves (per-channel
    codes, the parallel range scan), then their serial callers compiled in a process that loaded them
    from the cache, then those callers loaded in a new process whose first kernels they are."""
    prelude = textwrap.dedent("""
        import numpy as np
        from edgetrain.quant import quantizer
        w = np.linspace(-1, 1, 6 * 25, dtype=np.float32).reshape(6, 25)
        x = np.linspace(-3, 3, 1 << 19, dtype=np.float32)  # big enough for the parallel range scan
        key = (1, 2, 3)
        rows = np.arange(0, 64, 2)  # half of x's 64 rows: big enough for the parallel row scan
    """)
    steps = [
        "quantizer._flat_extrema(x); quantizer.quantize(w, 8, axis=0);"
        " quantizer.quantize(w, 8, axis=0, rounding='stochastic', key=key)",
        "quantizer.quantize_weights(w, 8); quantizer.quantize(x, 8);"
        " quantizer.quantize(x, 8, rounding='stochastic', key=key);"
        " quantizer.quantize_rows(x.reshape(64, -1), rows, 8)",
        "print(int(quantizer.quantize_weights(w, 8)[0].q.sum()))",
        "print(int(quantizer.quantize(x, 8).q.astype(np.int64).sum()))",
        "print(int(quantizer.quantize(x, 8, rounding='stochastic', key=key).q.astype(np.int64).sum()))",
        "print(int(quantizer.quantize_rows(x.reshape(64, -1), rows, 8).q.astype(np.int64).sum()))",
    ]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_NUM_THREADS": "2"}
    for i, step in enumerate(steps):
        done = subprocess.run([sys.executable, "-c", prelude + step], env=env, capture_output=True, text=True,
                              timeout=600)
        if done.returncode < 0:
            pytest.fail(f"step {i} ({step!r}) was killed by signal {-done.returncode}")
        assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "cache").rglob("*.nbc"))  # the kernels were cached, and loaded from there
