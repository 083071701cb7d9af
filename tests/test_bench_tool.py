"""tools.bench and tools.bench_step: FracTrain mixes and their BitOPs, bad input, the cold-start child.

Small and real: tiny models through the real training step; no speed is asserted (shared machines).
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetrain.errors import EdgetrainError
from edgetrain.precision.dfq.controller import DFQ
from tools import bench, bench_step

ROOT = Path(__file__).resolve().parent.parent

TINY = {"num_classes": 10, "in_channels": 1, "input_size": 12, "width": 8}  # a ResNet-8 that steps in ms


def _tiny_step(mix: str | None):
    """Run one training step of the tiny ResNet-8 at batch 4 (static 8/8, or FracTrain at `mix`); its model."""
    step, model = bench_step.make_edgetrain_step("resnet8", 4, (1, 12, 12), "8/8",
                                                 bench_step.parse_mix(mix) if mix else None, **TINY)
    step()
    return model


def test_fractrain_mix_bitops_lie_between_all_skip_and_all_computing():
    static = bench_step.step_bitops(_tiny_step(None))
    skip_model = _tiny_step("0")
    percent = {mix: 100 * bench_step.step_bitops(m) / static
               for mix, m in (("0", skip_model), ("half", _tiny_step("0:0.5,6/8:0.5")), ("6/8", _tiny_step("6/8")))}
    assert percent["0"] < percent["half"] < percent["6/8"] < 100
    # every gated layer is skipped by every sample: it costs nothing; the stem and shortcuts still do
    gated = DFQ.of(skip_model).gated_layers
    assert gated and all(skip_model.last_cost[n].total == 0 for n in gated)
    assert percent["0"] > 0


def test_forced_mix_is_reproducible_and_interleaved():
    texts = ["skip", "3/6", "4/6", "4/8", "6/8", "6/12"]
    choices = bench_step.mix_choices(bench_step.parse_mix("0:0.5,6/8:0.5"), texts, 16)
    assert np.bincount(choices, minlength=6).tolist() == [8, 0, 0, 0, 8, 0]
    np.testing.assert_array_equal(choices, bench_step.mix_choices({"skip": 0.5, "6/8": 0.5}, texts, 16))
    assert not (np.diff(choices) >= 0).all()  # shuffled, not one block per group
    # shares that do not divide the batch still give it whole: largest remainder
    assert np.bincount(bench_step.mix_choices({"3/6": 1 / 3, "4/8": 2 / 3}, texts, 4), minlength=6).sum() == 4


def test_parse_mix_reads_shares_and_skip_words():
    assert bench_step.parse_mix("3/6") == {"3/6": 1.0}
    assert bench_step.parse_mix("0:1, 6/8:3") == {"skip": 0.25, "6/8": 0.75}


@pytest.mark.parametrize("text, words", [
    ("7/7", "'7/7' is not a DFQ candidate"),
    ("fp32", "'fp32' is not a DFQ candidate"),
    ("0:0", "must add up to more than 0"),
    ("0:0,3/6:0", "must add up to more than 0"),
    ("3/6:x", "is not a number"),
    ("3/6:-1", ">= 0"),
    ("3/6,3/6", "appears twice"),
    ("", "is empty"),
])
def test_parse_mix_rejects_bad_input_in_one_line(text, words):
    with pytest.raises(EdgetrainError) as e:
        bench_step.parse_mix(text)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, words", [
    (["--mixes", "7/7"], "bench: mix '7/7': '7/7' is not a DFQ candidate"),
    (["--mixes", "3/6", "0:0"], "bench: mix '0:0': the shares must add up to more than 0"),
    (["--dfq-mixes", "0:0.5,6/8:0.5"], "bench: mix '0:0.5,6/8:0.5': '6/8' is not a DFQ candidate"),
    (["--cases", "resnet99-b1"], "bench: unknown case 'resnet99-b1'"),
    (["--rounds", "0"], "bench: --rounds must be at least 1"),
])
def test_command_line_rejects_bad_input_with_one_line_exit(argv, words):
    r = subprocess.run([sys.executable, "-m", "tools.bench", *argv, "--no-cold-start"], check=False,
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and words in r.stderr


def test_dfq_mix_on_the_hardware_candidates_skips_half_and_computes_the_rest_at_8_bits():
    """The --dfq-mixes path: candidates skip and 8/8 with 8-bit weights; half skipping sits between static's
    BitOPs and none, and every computing sample's gated layers run at 8/8:w8."""
    from edgetrain.precision.dfq.config import DFQConfig

    static = bench_step.step_bitops(_tiny_step(None))
    config = DFQConfig(candidates=bench.DFQ_CANDIDATES, weight_bits=bench.DFQ_WEIGHT_BITS)
    step, model = bench_step.make_edgetrain_step("resnet8", 4, (1, 12, 12), "8/8",
                                                 bench_step.parse_mix("0:0.5,8/8:0.5", bench.DFQ_CANDIDATES),
                                                 config, **TINY)
    step()
    dfq = DFQ.of(model)
    assert [c.text for c in dfq.candidates] == ["skip", "8/8"] and dfq.config.weight_bits == 8
    assert all(np.bincount(c, minlength=2).tolist() == [2, 2] for c in dfq.record.choices.values())
    assert 40 < 100 * bench_step.step_bitops(model) / static < 100
    row = bench.fractrain_row("0:0.5,8/8:0.5", 51, 100, med=0.6, static_med=1.0, per_round=[],
                              bar_points=bench.DFQ_BAR_POINTS)
    assert row["bar_limit_percent"] == 60 and row["bar_holds"]


def test_fractrain_bar_is_bitops_percent_plus_15_points():
    row = bench.fractrain_row("3/6", 30, 100, med=0.44, static_med=1.0, per_round=[0.4, 0.5])
    assert row["bitops_percent_of_static"] == 30 and row["time_percent_of_static"] == pytest.approx(44)
    assert row["bar_limit_percent"] == 45 and row["bar_holds"]
    assert row["time_percent_rounds_range"] == pytest.approx([40, 50])
    assert not bench.fractrain_row("3/6", 30, 100, med=0.46, static_med=1.0, per_round=[])["bar_holds"]


def test_cold_start_child_runs_one_step_and_reports_its_split(monkeypatch):
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # as some environments set it: the child reads .pyc all the same
    r = bench.run_cold_start("mlp", 4, 1)
    assert r["writes_bytecode"]
    for key in ("wall_s", "python_start_s", "import_s", "build_s", "first_step_s", "peak_rss_mb"):
        assert r[key] > 0, key
    # the parent's wall time covers the child's whole life up to the end of its step
    assert r["wall_s"] >= r["python_start_s"] + r["import_s"] + r["build_s"] + r["first_step_s"] - 1e-3
    assert r["cache_before"]["location"] and r["cache_after"]["index_files"] >= r["cache_before"]["index_files"]


def test_torch_reference_resnet8_matches_edgetrain_architecture():
    torch = pytest.importorskip("torch")
    import edgetrain
    from models import build_model

    for name in ("resnet8", "resnet20"):
        twin = bench_step._torch_model(name)
        ours = edgetrain.load(build_model(name, seed=0))
        assert sum(p.numel() for p in twin.parameters()) == sum(v.size for v in ours.parameters().values()), name
        assert sum(isinstance(m, torch.nn.Conv2d) for m in twin.modules()) == \
            sum(n.op_type == "Conv" for n in ours.graph.nodes), name


def test_profile_breaks_gated_units_down_by_inner_op():
    """--profile: a gated unit's gate, convolutions, BatchNorms and ReLUs appear as its own breakdown, and
    together take no longer than the GatedUnit entries they are part of."""
    step, model = bench_step.make_edgetrain_step("resnet8", 4, (1, 12, 12), "8/8",
                                                 bench_step.parse_mix("3/6"), **TINY)
    step()
    prof = bench._profile(step, model)
    inner = {k: v for k, v in prof.items() if k.startswith("GatedUnit > ")}
    assert {"GatedUnit > gate.forward", "GatedUnit > gate.backward", "GatedUnit > Conv.forward",
            "GatedUnit > Conv.backward", "GatedUnit > BatchNormalization.forward"} <= set(inner)
    assert sum(inner.values()) <= prof["GatedUnit.forward"] + prof["GatedUnit.backward"]
    assert model.executor.timings is None  # switched off again: no timing cost on later steps


def test_torch_twins_of_the_batch_8_models_match_edgetrain_parameter_counts():
    pytest.importorskip("torch")
    import edgetrain
    from models import build_model

    for name in ("lenet5", "mobilenetv2"):
        kwargs = bench.MODEL_KWARGS.get(name, {})
        twin = bench_step._torch_model(name, **kwargs)
        ours = edgetrain.load(build_model(name, seed=0, **kwargs))
        assert sum(p.numel() for p in twin.parameters()) == sum(v.size for v in ours.parameters().values()), name


def test_thread_scaling_reads_amdahl_from_two_thread_counts():
    case = lambda t, rate: {"key": "k", "case": "K", "threads": t, "paths": {"int": {"img_s": rate}}}
    (row,) = bench.thread_scaling([case(1, 100.0), case(2, 160.0)], board_threads=4)
    assert row["speedup"] == pytest.approx(1.6) and row["threads"] == [1, 2]
    p = row["parallel_fraction"]  # 1 / 1.6 = (1 - p) + p / 2
    assert p == pytest.approx(0.75)
    assert row["predicted_speedup_4_threads"] == pytest.approx(1 / ((1 - p) + p / 4))
    assert bench.thread_scaling([case(2, 160.0)]) == []  # one count: nothing to scale


def test_threads_and_backends_options():
    assert bench.thread_counts("2,1") == [1, 2] and bench.thread_counts("2") == [2]
    with pytest.raises(SystemExit, match="at least 1"):
        bench.thread_counts("0,2")
    assert bench.backend_paths("numba, numba") == ["int8@numba"]
    assert "int8@numba" in bench.backend_paths("all")  # numba is always usable


def test_results_name_the_cpu_they_come_from():
    """A ratio to PyTorch depends on the CPU (1.9x on one 2-core VM, 1.3x on another): the result names it."""
    from edgetrain.kernels.routes import INT8_FEATURES

    described = bench.cpu_description()
    assert isinstance(described["cpu"], str) and described["llvm_cpu"]
    assert set(described["cpu_int8"]) <= set(INT8_FEATURES)


def test_cache_state_tells_when_kernels_were_compiled(tmp_path):
    """The run flags a worker that compiled (its peak memory then holds the compiler's): the newest cache
    file's time moves past the run's start exactly when something was written."""
    import os
    import time

    empty = bench.numba_cache_state(str(tmp_path))
    assert empty["index_files"] == empty["compiled_files"] == 0 and empty["newest_mtime"] == 0.0
    started = time.time()
    sub = tmp_path / "mod"
    sub.mkdir()
    for name in ("kernel.f-3.py311.nbi", "kernel.f-3.py311.1.nbc"):
        (sub / name).write_bytes(b"cache")
        os.utime(sub / name, (started + 5, started + 5))
    state = bench.numba_cache_state(str(tmp_path))
    assert state["index_files"] == state["compiled_files"] == 1 and state["newest_mtime"] > started
    for path in sub.iterdir():
        os.utime(path, (started - 60, started - 60))
    assert bench.numba_cache_state(str(tmp_path))["newest_mtime"] < started


def test_bars_list_the_throughput_and_memory_bars_of_the_issue():
    """bars() names every bar of issue 18 a run measured: the batch-128 throughput bars (2.0x, 1.5x, 1.5x, 1.3x),
    batch 8's 1.0x, peak memory at or below PyTorch's, and says which hold."""
    from tools import bench

    def case(key, batch, vs_torch, peak, torch_peak):
        return {"case": key, "key": key, "batch": batch, "threads": 2,
                "paths": {"edgetrain int 8/8": {"vs_torch": vs_torch, "img_s": 10.0 * vs_torch, "peak_rss_mb": peak},
                          bench.TORCH: {"img_s": 10.0, "peak_rss_mb": torch_peak}}}

    result = {"cases": [case("resnet20-b128", 128, 1.99, 500.0, 700.0), case("mlp-b128", 128, 1.31, 400.0, 390.0),
                        case("lenet5-b8", 8, 1.2, 200.0, 300.0)]}
    got = {(b["bar"], b["case"]): (b["value"], b["limit"], b["holds"]) for b in bench.bars(result)}
    assert got[("static 8/8 >= 2x PyTorch fp32", "resnet20-b128")] == (1.99, 2.0, False)
    assert got[("static 8/8 >= 1.3x PyTorch fp32", "mlp-b128")] == (1.31, 1.3, True)
    assert got[("peak memory <= PyTorch fp32's", "resnet20-b128")] == (500.0, 700.0, True)
    assert got[("peak memory <= PyTorch fp32's", "mlp-b128")] == (400.0, 390.0, False)
    assert got[("batch 8: static 8/8 >= 1.0x PyTorch fp32", "lenet5-b8")] == (1.2, 1.0, True)
    assert not any(bar.startswith("static 8/8 >=") and name == "lenet5-b8" for bar, name in got)  # batch 8's own


def test_zoo_check_runs_the_three_paths_and_writes_its_json(tmp_path):
    """tools.bench_zoo on a torchvision-style SqueezeNet at 32 px: every path steps, the JSON holds positive
    times and ratios that are the times' quotients; an unknown model is one line and exit 2."""
    pytest.importorskip("torch")
    from tools import bench_zoo

    out = tmp_path / "zoo.json"
    assert bench_zoo.main(["--models", "squeezenet", "--size", "32", "--batch", "2", "--rounds", "1", "--steps", "1",
                           "--warmup", "0", "--json", "--out", str(out)]) == 0
    import json
    (row,) = json.loads(out.read_text())["models"]
    med = row["median_step_s"]
    assert set(med) == set(bench_zoo.PATHS) and all(v > 0 for v in med.values())
    assert row["vs_torch"]["edgetrain int 8/8"] == pytest.approx(med["torch fp32"] / med["edgetrain int 8/8"])
    assert row["int_vs_edgetrain_fp32"] == pytest.approx(med["edgetrain fp32"] / med["edgetrain int 8/8"])
    proc = subprocess.run([sys.executable, "-m", "tools.bench_zoo", "--models", "alexnet"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown model(s) alexnet" in proc.stderr and "Traceback" not in proc.stderr
