"""edgetrain plot: PNG figures from a run's log, and clear errors for folders that are not runs."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "edgetrain.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_plot_writes_three_pngs_from_a_pfq_run(tmp_path):
    from edgetrain.cli.demo import demo_model_path

    r = _cli("train", demo_model_path(), "--data", "digits", "--schedule", "pfq", "--pfq-switch-steps", "3,6,9",
             "--steps", "12", "--eval-every", "6", "--batch-size", "16", "--out", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    layer_records = [e for e in log if e["type"] == "layers"]
    assert [e["layers"]["conv1"] for e in layer_records] == ["3/6", "4/6", "6/8", "8/8"]
    assert all(e["layers"]["fc3"] == "fp32" for e in layer_records)
    r = _cli("plot", tmp_path / "run", "--out", tmp_path / "figs", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["layers.png", "precision.png", "training.png"]
    for p in (tmp_path / "figs").iterdir():
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000


def test_plot_of_a_folder_without_a_log_is_one_line(tmp_path):
    r = _cli("plot", tmp_path, cwd=tmp_path)
    assert r.returncode == 2 and "no log.jsonl here" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
