"""Numba's caches are dropped when a Numba-using source changes (edgetrain.numba_caches), and only then."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from edgetrain import numba_caches


def _touch_later(path: Path, text: str) -> None:
    """Rewrite path with text and a modification time clearly after the old one."""
    old = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(old + 2_000_000_000, old + 2_000_000_000))


def _caches(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".nbi", ".nbc"))


def test_caches_go_when_a_numba_source_changes_and_stay_otherwise(tmp_path: Path) -> None:
    (tmp_path / "kernel.py").write_text("import numba\n")
    (tmp_path / "plain.py").write_text("x = 1\n")
    sub = tmp_path / "sub" / "__pycache__"
    sub.mkdir(parents=True)

    def fill() -> None:
        for name in ("kernel.f-3.py311.nbi", "kernel.f-3.py311.1.nbc"):
            (sub / name).write_bytes(b"cache")
        (sub / "plain.cpython-311.pyc").write_bytes(b"bytecode")

    fill()
    assert numba_caches.refresh(tmp_path)  # no fingerprint yet: caches of unknown origin go
    assert _caches(tmp_path) == [] and (sub / "plain.cpython-311.pyc").exists()
    fill()
    assert not numba_caches.refresh(tmp_path) and len(_caches(tmp_path)) == 2
    _touch_later(tmp_path / "plain.py", "x = 2\n")  # no Numba in it: the caches stay
    assert not numba_caches.refresh(tmp_path) and len(_caches(tmp_path)) == 2
    _touch_later(tmp_path / "kernel.py", "import numba  # edited\n")
    assert numba_caches.refresh(tmp_path) and _caches(tmp_path) == []
    assert not numba_caches.refresh(tmp_path)


def test_a_cached_caller_sees_its_callee_edited_in_another_module(tmp_path: Path) -> None:
    """The case the module exists for: g (cached, in one module) calls f (in another); f changes, g's file
    does not. With the refresh at import, a new process runs the new f."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from pathlib import Path
        from edgetrain import numba_caches
        numba_caches.refresh(Path(__file__).parent)
    """))
    (pkg / "callee.py").write_text(textwrap.dedent("""
        from numba import njit
        @njit(cache=True)
        def f():
            return 1
    """))
    (pkg / "caller.py").write_text(textwrap.dedent("""
        from numba import njit
        from pkg.callee import f
        @njit(cache=True)
        def g():
            return f() * 10
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(numba_caches.PACKAGE).parent)])}

    def run() -> str:
        return subprocess.run([sys.executable, "-c", "from pkg.caller import g; print(g())"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()

    assert run() == "10"
    assert _caches(pkg)  # compiled and cached
    _touch_later(pkg / "callee.py", (pkg / "callee.py").read_text().replace("return 1", "return 2"))
    assert run() == "20"
