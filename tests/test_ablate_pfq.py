"""tools.ablate_pfq: the CI-size eps/alpha grid writes consistent figures, a heatmap, and refuses bad input."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tools.ablate_pfq", *map(str, args)], check=False,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One --small ablation shared by the checks below (it is the slow part)."""
    tmp = tmp_path_factory.mktemp("ablate")
    r = _run("--small", "--out", tmp / "out")
    assert r.returncode == 0, r.stderr
    out = tmp / "out"
    return r, out, json.loads((out / "ablate_pfq.json").read_text())


def test_one_row_per_grid_cell_with_finite_accuracy(small):
    _, out, result = small
    cells = [(row["eps"], row["alpha"]) for row in result["rows"]]
    assert len(result["eps"]) == len(result["alpha"]) == 2
    assert sorted(cells) == sorted((e, a) for e in result["eps"] for a in result["alpha"])
    for row in [result["static"], result["static_first_stage"], *result["rows"]]:
        assert math.isfinite(row["test_accuracy"]) and 0.0 <= row["test_accuracy"] <= 1.0
        assert row["seconds"] > 0
        assert (out / row["run"] / "log.jsonl").is_file()  # every run in its own sub-folder
    assert result["static"]["bits"] == result["stages"][-1]


def test_bitops_savings_agree_with_the_static_run(small):
    _, _, result = small
    static = result["static"]
    last = len(result["stages"]) - 1
    for row in result["rows"]:
        assert row["bitops_saving_percent"] == pytest.approx(100 * (1 - row["bitops"] / static["bitops"]))
        assert row["accuracy_delta_points"] == pytest.approx(100 * (row["test_accuracy"] - static["test_accuracy"]))
        assert row["final_stage"] == len(row["switch_steps"])
        assert row["reached_final_stage"] == (row["final_stage"] == last)
        assert row["switch_steps"] == sorted(set(row["switch_steps"]))
        assert all(0 < s <= result["steps"] for s in row["switch_steps"])
        if not row["reached_final_stage"]:
            assert row["bitops"] < static["bitops"] and row["bitops_saving_percent"] > 0
        # Every stage before the last is cheaper than it, so any run that started there saves something.
        assert row["bitops"] <= static["bitops"]
    floor = result["static_first_stage"]
    assert floor["bitops"] <= min(row["bitops"] for row in result["rows"]) <= static["bitops"]


def test_heatmap_and_table(small):
    r, out, result = small
    png = out / "ablate_pfq.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    assert f"static {result['static']['bits']}" in r.stdout and "ablate_pfq.json" in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args,words", [
    (["--eps", "-1"], ["--eps", "'-1'"]),
    (["--alpha", "0.3,2"], ["--alpha", "'2'"]),
    (["--model", "missing.onnx"], ["missing.onnx", "no such file"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, words):
    r = _run(*args, "--small", "--out", tmp_path / "out", timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ablate_pfq: error:"), r.stderr
    assert all(w in lines[0] for w in words) and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written
