"""tools/federated_experiment.py's bookkeeping on made-up figures (no federation runs): the mean and spread over
seeds, the issue's bars on the seeds a comparison's runs share, the table and the plot."""
from __future__ import annotations

import pytest

from tools.federated_experiment import bars, plot, summarise, table


def _fed(acc: float, up: float = 600e3, ops: float = 2e12) -> dict:
    return {"accuracy": acc, "failed": None, "accuracy_per_round": [acc / 2, acc], "uplink_bytes_per_round": up,
            "downlink_bytes_per_round": 2400e3, "client_bitops": ops, "seconds": 10.0}


def _per_seed() -> dict:
    seed = {"centralised": {"accuracy": 0.96, "bitops": 2e12, "seconds": 5.0},
            "fedavg-8bit": _fed(0.95), "fedavg-fp32": _fed(0.95, up=2400e3), "garbage-fedavg": _fed(0.10),
            "garbage-fedtrimmedavg": _fed(0.94), "garbage-krum": _fed(0.80), "fractrain-8bit": _fed(0.94, ops=1e12)}
    other = {**seed, "centralised": {"accuracy": 0.98, "bitops": 2e12, "seconds": 5.0}, "fedavg-8bit": _fed(0.93),
             "fedavgm-8bit": _fed(0.97)}
    seed = {**seed, "fedavgm-8bit": _fed(0.955)}
    # seed 2 has only the clean pair: the other bars must not see it
    return {"0": seed, "1": other, "2": {"centralised": other["centralised"], "fedavg-8bit": _fed(0.90)}}


def test_summary_is_the_mean_and_spread_over_seeds():
    s = summarise(_per_seed())
    assert s["fedavg-8bit"]["seeds"] == [0, 1, 2] and s["fedavg-fp32"]["seeds"] == [0, 1]
    assert s["fedavg-8bit"]["accuracy"] == pytest.approx((0.95 + 0.93 + 0.90) / 3)
    assert s["fedavg-8bit"]["accuracy_std"] == pytest.approx(0.020548, abs=1e-6)  # population sd of the three
    assert (s["fedavg-8bit"]["accuracy_min"], s["fedavg-8bit"]["accuracy_max"]) == (0.90, 0.95)
    assert s["fedavg-8bit"]["accuracy_per_round"] == pytest.approx([0.463333, 0.926667], abs=1e-6)


def test_bars_compare_on_shared_seeds():
    b = bars(_per_seed())
    gap = b["8bit_within_2_points_of_centralised"]
    assert gap["seeds"] == ["0", "1", "2"] and gap["gap_points_per_seed"] == pytest.approx([1.0, 5.0, 8.0])
    assert gap["gap_points"] == pytest.approx(14 / 3) and not gap["holds"] and not gap["holds_at_every_seed"]
    momentum = b["8bit_fedavgm_within_2_points_of_centralised"]  # measured on seeds 0-1 only
    assert momentum["seeds"] == ["0", "1"] and momentum["gap_points_per_seed"] == pytest.approx([0.5, 1.0])
    assert momentum["holds"] and momentum["holds_at_every_seed"]
    up = b["uplink_at_most_30_percent_of_fp32"]
    assert up["seeds"] == ["0", "1"] and up["share"] == pytest.approx(0.25) and up["holds"]
    robust = b["robust_within_2_points_where_fedavg_is_not"]
    assert robust["seeds"] == ["0", "1"]  # the clean mean here is seeds 0-1's, 94%, not seeds 0-2's
    assert robust["drop_points_vs_clean"] == pytest.approx({"garbage-fedavg": 84.0, "garbage-fedtrimmedavg": 0.0,
                                                            "garbage-krum": 14.0})
    assert robust["within"] == ["garbage-fedtrimmedavg"] and robust["holds"]
    drops = dict(robust["drop_points_vs_clean_fedavgm"])
    assert drops.pop("seeds") == ["0", "1"]  # pytest.approx takes no nested lists (pytest 9.2)
    assert drops == pytest.approx(  # clean with momentum: (95.5 + 97) / 2
        {"garbage-fedavg": 86.25, "garbage-fedtrimmedavg": 2.25, "garbage-krum": 16.25})
    assert robust["within_vs_fedavgm"] == []
    assert b["fractrain"]["bitops_saved_percent"] == pytest.approx(50.0)
    assert b["fractrain"]["accuracy_cost_points"] == pytest.approx(0.0, abs=1e-9)


def test_table_and_plot(tmp_path):
    s = summarise(_per_seed())
    lines = table(s).splitlines()
    assert len(lines) == 2 + 8 and "| 0,1,2 | 92.7% ± 2.1 (90.0-95.0) |" in lines[3]
    pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install 'edgetrain[plot]'")
    plot(s, tmp_path / "p.png", "made-up figures")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
