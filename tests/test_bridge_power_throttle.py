"""Issue 17 items 18 and 19: power source chain, throttling, sampling cost, and the report's warnings.

Boards are fake sysfs trees in tmp_path; `vcgencmd` and `tegrastats` are small executable scripts at
their real paths inside those trees (the telemetry code runs commands found there), logging each call.
"""

from __future__ import annotations

import os
import stat
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from fake_sysfs import make_tree
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.board.measure import SIMULATED_ENV, BoardMeter
from firmware_bridge.profile.records import BoardRun, Prepared, ProfileRequest
from firmware_bridge.profile.report import build_report, format_markdown
from firmware_bridge.profile.spread import BUSY_MEDIAN_OVER_MIN, assess_timing
from firmware_bridge.profile.workload import TrainingRun, Workload
from firmware_bridge.telemetry import (
    CONDITIONS,
    NO_POWER_SOURCE,
    TegrastatsSampler,
    ThrottleFlags,
    decode_throttled,
    find_power_source,
    parse_get_throttled,
    parse_measure_volts,
    read_hwmon_power,
    read_sysfs_throttle,
    summarise_throttle,
)

DATA = Path(__file__).parent / "data" / "telemetry"
ORIN_LINE = (DATA / "tegrastats_jp6_orin_nano.txt").read_text().splitlines()[0]  # VDD_IN 6120mW
PMIC_PI5 = DATA / "vcgencmd_pi5_pmic_read_adc.txt"
PMIC_PI5_MW = 3309.8228  # hand-summed V*A of that file (test_bridge_telemetry)


def fake_command(root: Path, path: str, body: str) -> Path:
    """An executable shell script at `path` below `root`."""
    script = root / path.lstrip("/")
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def fake_vcgencmd(root: Path, *, throttled: tuple[str, str] = ("0x0", "0x0"), pmic: bool = False) -> Path:
    """A Pi's vcgencmd that logs each call; get_throttled answers the first value once, then the second."""
    log, flag = root / "vcgencmd.log", root / "throttled.once"
    pmic_answer = f'cat "{PMIC_PI5}"' if pmic else 'echo \'error=1 error_msg="Command not registered"\''
    fake_command(root, "/usr/bin/vcgencmd", f"""echo "$*" >> "{log}"
case "$1" in
  measure_temp) echo "temp=48.3'C" ;;
  measure_volts) echo "volt=0.8500V" ;;
  pmic_read_adc) {pmic_answer} ;;
  get_throttled) if [ -f "{flag}" ]; then echo "throttled={throttled[1]}"; else : > "{flag}"; \
echo "throttled={throttled[0]}"; fi ;;
  *) exit 1 ;;
esac
""")
    return log


def calls(log: Path, command: str) -> int:
    return sum(line.split()[0] == command for line in log.read_text().splitlines()) if log.exists() else 0


# ------------------------------------------------------------------------ throttling, decoded once

BIT_TABLE = [
    (0x0, [], []),
    (0x50000, [], ["under_voltage", "throttled"]),
    (0x50005, ["under_voltage", "throttled"], ["under_voltage", "throttled"]),
    (0xA000A, ["freq_capped", "soft_temp_limit"], ["freq_capped", "soft_temp_limit"]),
    (0x80008, ["soft_temp_limit"], ["soft_temp_limit"]),
    (0x2, ["freq_capped"], []),
]


@pytest.mark.parametrize(("value", "now", "occurred"), BIT_TABLE)
def test_get_throttled_bit_table(value: int, now: list[str], occurred: list[str]) -> None:
    state = decode_throttled(value)
    assert sorted(state.now) == sorted(now) and sorted(state.occurred) == sorted(occurred)
    assert state.raw == hex(value) and state.checked == set(CONDITIONS)


@given(st.integers(min_value=0, max_value=(1 << 20) - 1))
def test_decoding_agrees_with_the_firmware_flag_enum(value: int) -> None:
    state = decode_throttled(value)
    names = set(ThrottleFlags(value).names())
    assert {c for c in CONDITIONS if c.upper() in names} == state.now
    assert {c for c in CONDITIONS if f"{c.upper()}_OCCURRED" in names} == state.occurred


def test_throttling_during_the_workload_is_a_warning_and_earlier_throttling_is_not() -> None:
    # Reproducer: a Pi whose supply sags during the timed steps.
    during = summarise_throttle(decode_throttled(0x0), decode_throttled(0x50005))
    assert during["now"] == ["under_voltage", "throttled"] and during["during"] == ["under_voltage", "throttled"]
    assert "under-voltage now" in during["warning"] and "under-voltage during this workload" in during["warning"]
    assert during["raw"] == {"before": "0x0", "after": "0x50005"}
    # Sticky bits from before the workload, nothing now: listed, not blamed on this workload.
    earlier = summarise_throttle(decode_throttled(0x50000), decode_throttled(0x50000))
    assert earlier["warning"] is None and earlier["before_workload"] == ["under_voltage", "throttled"]
    # A sticky bit that appears between the readings happened during the workload, even if over now.
    over = summarise_throttle(decode_throttled(0x0), decode_throttled(0x80000))
    assert over["now"] == [] and over["during"] == ["soft_temp_limit"] and "soft temperature" in over["warning"]
    unknown = summarise_throttle(None, None)
    assert unknown["unknown"] == list(CONDITIONS) and unknown["warning"] is None


def test_sysfs_throttling_on_a_jetson_like_tree(tmp_path: Path) -> None:
    base = {
        "/sys/class/thermal/cooling_device0/type": "pwm-fan",
        "/sys/class/thermal/cooling_device0/cur_state": 3,  # a fan at speed is not throttling
        "/sys/class/thermal/cooling_device1/type": "cpu-balanced",
        "/sys/class/thermal/cooling_device1/cur_state": 0,
        "/sys/class/thermal/cooling_device1/max_state": 10,
        "/sys/devices/system/cpu/cpufreq/policy0/scaling_max_freq": 1510400,
        "/sys/devices/system/cpu/cpufreq/policy0/cpuinfo_max_freq": 1510400,
    }
    calm = read_sysfs_throttle(make_tree(tmp_path / "calm", base))
    assert calm.now == set() and calm.checked == {"throttled", "freq_capped"}
    assert summarise_throttle(calm, calm)["unknown"] == ["under_voltage", "soft_temp_limit"]
    hot = read_sysfs_throttle(make_tree(tmp_path / "hot", {
        **base,
        "/sys/class/thermal/cooling_device1/cur_state": 4,
        "/sys/devices/system/cpu/cpufreq/policy0/scaling_max_freq": 1113600,  # 7 W power mode, or heat
    }))
    assert hot.now == {"throttled", "freq_capped"}
    summary = summarise_throttle(hot, hot)
    assert "CPU frequency capped now" in summary["warning"]
    assert "cpu-balanced state 4/10" in summary["details"]
    assert "policy0 max 1113600 of 1510400 kHz" in summary["details"]


def test_pi_under_voltage_alarm_and_x86_throttle_counters(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, {
        "/sys/class/hwmon/hwmon1/name": "rpi_volt",
        "/sys/class/hwmon/hwmon1/in0_lcrit_alarm": 1,
        "/sys/devices/system/cpu/cpu0/thermal_throttle/core_throttle_count": 7,
        "/sys/devices/system/cpu/cpu1/thermal_throttle/core_throttle_count": 0,
    })
    before = read_sysfs_throttle(tree)
    assert before.now == {"under_voltage"} and before.counters == {"throttled": 7}
    (tree / "sys/devices/system/cpu/cpu1/thermal_throttle/core_throttle_count").write_text("2\n")
    summary = summarise_throttle(before, read_sysfs_throttle(tree))
    assert summary["now"] == ["under_voltage"] and summary["during"] == ["throttled"]
    assert read_sysfs_throttle(tmp_path / "empty") is None


def test_measure_volts_and_get_throttled_parsers() -> None:
    assert parse_measure_volts("volt=0.8500V\n") == 0.85
    assert parse_measure_volts('error=1 error_msg="Command not registered"') is None
    assert parse_get_throttled("throttled=0x50005") == ThrottleFlags(0x50005)


# ------------------------------------------------------------------------------- power sources


HWMON = "/sys/class/hwmon"


def test_hwmon_power_monitors_in_kernel_units(tmp_path: Path) -> None:
    make_tree(tmp_path, {
        f"{HWMON}/hwmon0/name": "amdgpu",  # a GPU's own counter: not board power
        f"{HWMON}/hwmon0/power1_input": 30_000_000,
        f"{HWMON}/hwmon1/name": "ina219",
        f"{HWMON}/hwmon1/power1_input": 2_500_000,  # microwatt
        f"{HWMON}/hwmon1/in1_input": 5050,
        f"{HWMON}/hwmon1/curr1_input": 495,
        f"{HWMON}/hwmon2/name": "ina3221",  # no power attribute: in<N> mV * curr<N> mA
        f"{HWMON}/hwmon2/in1_label": "VDD_IN",
        f"{HWMON}/hwmon2/in1_input": 5000,
        f"{HWMON}/hwmon2/curr1_input": 1000,
        f"{HWMON}/hwmon2/in2_label": "NC",
        f"{HWMON}/hwmon2/in2_input": 0,
        f"{HWMON}/hwmon2/curr2_input": 0,
    })
    channels = read_hwmon_power(tmp_path)
    assert set(channels) == {"ina219:power1", "VDD_IN"}
    assert channels["ina219:power1"].power_mw == 2500.0 and channels["ina219:power1"].current_ma == 495
    assert channels["VDD_IN"].power_mw == 5000.0
    source = find_power_source(tmp_path)
    assert source.name == "hwmon" and source.open_sampler()._read() == 5000.0  # the input rail, not the sum


def test_power_chain_order_and_no_source_on_a_pi4(tmp_path: Path) -> None:
    ina3221 = {
        "/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/rail_name_0": "POM_5V_IN",
        "/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power0_input": 3004,
    }
    hwmon = {f"{HWMON}/hwmon1/name": "ina226", f"{HWMON}/hwmon1/power1_input": 4_000_000}
    board = tmp_path / "board"
    make_tree(board, {**ina3221, **hwmon})
    fake_command(board, "/usr/bin/tegrastats", f"echo '{ORIN_LINE}'\n")
    fake_vcgencmd(board, pmic=True)
    assert find_power_source(board).name == "ina3221_iio"
    (board / "sys/bus").rename(board / "gone-bus")
    assert find_power_source(board).name == "hwmon"
    (board / "sys/class").rename(board / "gone-class")
    assert find_power_source(board).name == "tegrastats"
    (board / "usr/bin/tegrastats").unlink()
    pi5 = find_power_source(board)
    assert pi5.name == "pmic_adc" and pi5.interval_s >= 1.0 and "every 1 s" in pi5.method
    pi4 = tmp_path / "pi4"
    fake_vcgencmd(pi4, pmic=False)
    assert find_power_source(pi4) is None


def test_tegrastats_is_one_long_lived_process_stopped_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "tegrastats.log"
    script = fake_command(tmp_path, "/usr/bin/tegrastats", f"""echo "$*" >> "{log}"
while true; do echo '{ORIN_LINE}'; sleep 0.05; done
""")
    sampler = TegrastatsSampler(str(script), interval_ms=50).start()
    assert sampler.samples, "start() waits for the first line, so the window opens with a sample"
    time.sleep(0.4)
    pid = sampler._proc.pid
    energy = sampler.stop()
    assert log.read_text().splitlines() == ["--interval 50"]  # one process for the whole window
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # terminated and reaped
    samples = sampler.samples
    assert len(samples) >= 4 and sampler.lines >= 3
    assert sampler.mean_power_mw == pytest.approx(6120)
    assert energy == pytest.approx(6.120 * (samples[-1][0] - samples[0][0]))


# ---------------------------------------------------------------------------- the board's meter


def test_pi5_meter_spawns_no_vcgencmd_while_steps_are_timed(tmp_path: Path) -> None:
    # Reproducer: the old meter spawned `vcgencmd pmic_read_adc` every 50 ms during the steps (8 in 0.4 s).
    log = fake_vcgencmd(tmp_path, pmic=True)
    meter = BoardMeter(tmp_path)
    with meter:
        spawned_at_start = log.read_text().count("\n")
        time.sleep(0.4)  # the timed steps
        spawned_in_window = log.read_text().count("\n") - spawned_at_start
    assert spawned_in_window == 0
    report = meter.report(timed_steps=4)["telemetry"]
    assert report["power"]["source"] == "pmic_adc"
    assert "spawned before the first timed step" in report["power"]["method"]
    assert report["power_samples"] == 2 and report["mean_power_mw"] == pytest.approx(PMIC_PI5_MW, abs=1e-3)
    assert report["energy_j"] == pytest.approx(PMIC_PI5_MW / 1000 * 0.4, rel=0.25)
    assert calls(log, "get_throttled") == 2  # before and after, not during
    assert report["throttle"]["warning"] is None and report["throttle"]["raw"] == {"before": "0x0", "after": "0x0"}


def test_pi4_meter_reports_no_power_source_voltage_and_throttling(tmp_path: Path) -> None:
    # Reproducer: a Pi 4 that goes under-voltage during the workload, with no current sensor.
    fake_vcgencmd(tmp_path, throttled=("0x0", "0x50005"), pmic=False)
    with BoardMeter(tmp_path) as meter:
        time.sleep(0.05)
    telemetry = meter.report(timed_steps=2)["telemetry"]
    assert telemetry["power"]["source"] is None and telemetry["power"]["note"] == NO_POWER_SOURCE
    assert telemetry["energy_j"] is None and telemetry["energy_per_step_j"] is None
    assert telemetry["core_volts"] == {"before": 0.85, "after": 0.85}
    assert telemetry["throttle"]["now"] == ["under_voltage", "throttled"]
    assert "under-voltage during this workload" in telemetry["throttle"]["warning"]
    assert telemetry["simulated"] is False


def test_meter_says_simulated_when_the_simulated_board_started_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SIMULATED_ENV, "1")
    with BoardMeter(tmp_path) as meter:
        pass
    assert meter.report(timed_steps=1)["telemetry"]["simulated"] is True


# ----------------------------------------------------------------------------- the host's report


def make_report(step_times: list[float] | None, telemetry: dict[str, Any], summary_only: bool = False) -> dict:
    times = step_times or [0.01]
    workload = Workload(input_shape=(2, 4), steps=len(times))
    prepared = Prepared(model_blob=b"m", model_sha="0" * 64, workload=workload,
                        summary={"layers": [], "parameters": 0, "macs_per_sample": 0})
    metrics = {
        "layers": [], "timed_steps": len(times), "warmup_steps": 0, "digest": "a" * 64, "float_mode": "x",
        "step_s": {"mean": statistics.fmean(times), "median": statistics.median(times), "min": min(times),
                   "max": max(times), "total": sum(times)},
        "telemetry": telemetry,
    }
    if not summary_only:
        metrics["step_times_s"] = times
    board = BoardRun(capabilities={"board": "Raspberry Pi 4 Model B"}, result={"metrics": metrics}, uploaded=False,
                     data_uploaded=None, upload_bytes=0, restarts=0, telemetry=[], link={}, seconds=1.0)
    local = TrainingRun(layers=[], step_s=[], losses=[], digest="a" * 64, completed_steps=len(times))
    return build_report(ProfileRequest(model="mlp.onnx", port="/dev/ttyUSB0"), prepared, board, local, 0.1)


MLP_BUSY = [0.0024, 0.109, 0.112, 0.104, 0.109, 0.0031, 0.115, 0.108, 0.110, 0.109]  # min 2.4 ms, median 109 ms


@pytest.mark.parametrize("summary_only", [False, True])
def test_report_flags_timings_whose_spread_says_the_board_was_busy(summary_only: bool) -> None:
    # Reproducer of item 19: the MLP profile with min 2.4 ms and median 109 ms.
    report = make_report(MLP_BUSY, {}, summary_only=summary_only)
    spread = report["timing"]["spread"]
    assert spread["busy"] is True and spread["median_over_min"] == pytest.approx(0.109 / 0.0024)
    assert report["warnings"] == [spread["warning"]]
    markdown = format_markdown(report)
    assert "> **Warning:** step times vary too much" in markdown and "BUSY (median/min 45.42)" in markdown


def test_steady_timings_are_not_flagged() -> None:
    steady = [0.0100, 0.0101, 0.0103, 0.0100, 0.0104, 0.0102, 0.0101, 0.0108]
    report = make_report(steady, {})
    assert report["timing"]["spread"]["busy"] is False and report["warnings"] == []
    markdown = format_markdown(report)
    assert "Warning" not in markdown and "steady (median/min 1.01)" in markdown


def test_spread_rule_thresholds() -> None:
    assert assess_timing([0.01, 0.01 * BUSY_MEDIAN_OVER_MIN * 1.01, 0.01 * BUSY_MEDIAN_OVER_MIN * 1.01])["busy"]
    assert not assess_timing([0.01, 0.01 * BUSY_MEDIAN_OVER_MIN * 0.99, 0.01 * BUSY_MEDIAN_OVER_MIN * 0.99])["busy"]
    # Median near the minimum, but every other step stalls: the p10-p90 rule catches it.
    alternating = [0.010] * 6 + [0.030] * 4
    assert assess_timing(alternating)["busy"]
    assert assess_timing(alternating)["p90_minus_p10_over_median"] == pytest.approx(2.0)
    assert assess_timing(None)["busy"] is None and assess_timing([], None)["warning"] is None


def test_report_warns_of_throttling_and_names_the_missing_power_source() -> None:
    telemetry = {
        "power": {"source": None, "method": None, "interval_s": None, "note": NO_POWER_SOURCE},
        "power_source": None, "energy_j": None,
        "throttle": summarise_throttle(decode_throttled(0x0), decode_throttled(0x50005)),
        "core_volts": {"before": 0.85, "after": 0.8375},
    }
    report = make_report([0.0100, 0.0101, 0.0102], telemetry)
    assert report["warnings"] == [telemetry["throttle"]["warning"]]
    markdown = format_markdown(report)
    assert "> **Warning:** board throttled or under-voltage: under-voltage now" in markdown
    assert "energy: not measured: no power source" in markdown and "energy is unknown, not zero" in markdown
    assert "external USB power meter" in markdown
    assert "get_throttled 0x0 -> 0x50005" in markdown and "before 0.8500 V, after 0.8375 V" in markdown


def test_report_says_prominently_when_the_board_was_simulated() -> None:
    simulated = make_report([0.01, 0.0101], {"simulated": True})
    assert simulated["simulated"] is True and simulated["board"]["simulated"]
    title, blank, banner = format_markdown(simulated).splitlines()[:3]
    assert banner.startswith("> **SIMULATED BOARD: the agent ran as a local process on the host")
    real = make_report([0.01, 0.0101], {"simulated": False})
    assert real["simulated"] is False and "SIMULATED" not in format_markdown(real)


def test_power_source_and_sampling_method_appear_in_the_report(tmp_path: Path) -> None:
    fake_vcgencmd(tmp_path, pmic=True)
    with BoardMeter(tmp_path) as meter:
        pass
    report = make_report([0.01, 0.0101], meter.report(timed_steps=2)["telemetry"])
    markdown = format_markdown(report)
    assert "power source: pmic_adc (Pi 5 PMIC, 14 rails" in markdown
    assert "`vcgencmd pmic_read_adc` spawned before the first timed step, after the last, and every 1 s" in markdown
    assert "throttling and under-voltage (before and after the timed steps, from vcgencmd get_throttled" in markdown


def test_pmic_lines_without_a_channel_number_are_read_too() -> None:
    # The form one third-party page shows (tests/data/telemetry/README.md): unverified, so accepted as well.
    from firmware_bridge.telemetry import parse_pmic_read_adc

    reading = parse_pmic_read_adc("VDD_CORE_V=0.8750V\nVDD_CORE_A=1.2340A\nEXT5V_V=5.1000V\n")
    assert reading.rails["VDD_CORE"].watts == pytest.approx(0.875 * 1.234) and reading.input_volts == 5.1


def test_jetson_over_current_and_under_voltage_event_counters(tmp_path: Path) -> None:
    # Reproducer: an Orin whose supply sags mid-workload (soctherm_oc OC1 counts under-voltage events).
    oc = "/sys/class/hwmon/hwmon3"
    tree = make_tree(tmp_path, {f"{oc}/name": "soctherm_oc", f"{oc}/oc1_event_cnt": 0,
                                f"{oc}/oc2_event_cnt": 0, f"{oc}/oc3_event_cnt": 5})
    before = read_sysfs_throttle(tree)
    assert before.checked == {"under_voltage", "throttled"} and before.counters == {"under_voltage": 0, "throttled": 5}
    (tree / oc.lstrip("/") / "oc1_event_cnt").write_text("2\n")
    summary = summarise_throttle(before, read_sysfs_throttle(tree))
    assert summary["during"] == ["under_voltage"] and summary["before_workload"] == ["throttled"]
    assert "under-voltage during this workload" in summary["warning"]
    assert summarise_throttle(before, before)["warning"] is None  # old events alone: listed, no warning
