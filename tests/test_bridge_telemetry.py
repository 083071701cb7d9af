"""Telemetry readers against fake sysfs trees and recorded command outputs (tests/data/telemetry/)."""

from __future__ import annotations

import shutil
import stat
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from fake_sysfs import make_tree

from firmware_bridge.telemetry import (
    SENSORS,
    PowerSampler,
    ThrottleFlags,
    Vcgencmd,
    board_power_mw,
    find_power_source,
    integrate_energy_j,
    parse_get_throttled,
    parse_measure_clock,
    parse_measure_temp,
    parse_pmic_read_adc,
    parse_tegrastats,
    probe,
    read_cpufreq,
    read_ina3221,
    read_ina3221_hwmon,
    read_ina3221_iio,
    read_tegrastats_line,
    read_thermal_zones,
    run_vcgencmd,
)

DATA = Path(__file__).parent / "data" / "telemetry"


JP4_IIO = "/sys/bus/i2c/drivers/ina3221x"
JP5_HWMON = "/sys/bus/i2c/drivers/ina3221"

# Jetson Nano, JetPack 4: one INA3221 on the IIO driver, powers in mW.
NANO_JP4 = {
    f"{JP4_IIO}/6-0040/iio:device0/rail_name_0": "POM_5V_IN",
    f"{JP4_IIO}/6-0040/iio:device0/in_power0_input": 3004,
    f"{JP4_IIO}/6-0040/iio:device0/in_voltage0_input": 5000,
    f"{JP4_IIO}/6-0040/iio:device0/in_current0_input": 600,
    f"{JP4_IIO}/6-0040/iio:device0/rail_name_1": "POM_5V_GPU",
    f"{JP4_IIO}/6-0040/iio:device0/in_power1_input": 40,
    f"{JP4_IIO}/6-0040/iio:device0/rail_name_2": "POM_5V_CPU",
    f"{JP4_IIO}/6-0040/iio:device0/in_power2_input": 641,
}

# AGX Xavier, JetPack 4: two monitors, no input rail (board power is the sum).
AGX_XAVIER_JP4 = {
    **{f"{JP4_IIO}/1-0040/iio:device0/rail_name_{i}": name for i, name in enumerate(["GPU", "CPU", "SOC"])},
    **{f"{JP4_IIO}/1-0040/iio:device0/in_power{i}_input": mw for i, mw in enumerate([0, 310, 1242])},
    **{f"{JP4_IIO}/1-0041/iio:device1/rail_name_{i}": name for i, name in enumerate(["CV", "VDDRQ", "SYS5V"])},
    **{f"{JP4_IIO}/1-0041/iio:device1/in_power{i}_input": mw for i, mw in enumerate([0, 155, 2760])},
}

# Orin Nano, JetPack 5/6: upstream hwmon driver, mV and mA, plus the channel-7 shunt sum.
HW = f"{JP5_HWMON}/1-0040/hwmon/hwmon3"
ORIN_NANO_JP6 = {
    f"{HW}/name": "ina3221",
    f"{HW}/in1_label": "VDD_IN",
    f"{HW}/in1_input": 5072,
    f"{HW}/curr1_input": 1208,
    f"{HW}/in2_label": "VDD_CPU_GPU_CV",
    f"{HW}/in2_input": 5064,
    f"{HW}/curr2_input": 88,
    f"{HW}/in3_label": "VDD_SOC",
    f"{HW}/in3_input": 5064,
    f"{HW}/curr3_input": 487,
    f"{HW}/in7_label": "sum of shunt voltages",
    f"{HW}/in7_input": 1234,
    "/usr/bin/tegrastats": "#!/bin/sh",
}

THERMAL_AND_CPUFREQ = {
    "/sys/class/thermal/thermal_zone0/type": "cpu-thermal",
    "/sys/class/thermal/thermal_zone0/temp": 45500,
    "/sys/class/thermal/thermal_zone1/type": "gpu-thermal",
    "/sys/class/thermal/thermal_zone1/temp": 43000,
    "/sys/class/thermal/thermal_zone2/type": "cv0-thermal",
    "/sys/class/thermal/thermal_zone2/temp": -256000,  # powered-down sensor
    "/sys/class/thermal/thermal_zone3/type": "broken",  # no readable temp
    "/sys/class/thermal/thermal_zone10/type": "tj-thermal",
    "/sys/class/thermal/thermal_zone10/temp": 47250,
    "/sys/class/thermal/cooling_device0/type": "pwm-fan",
    "/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq": 1479000,
    "/sys/devices/system/cpu/cpu1/cpufreq/scaling_cur_freq": 1479000,
    "/sys/devices/system/cpu/cpu2/cpufreq/scaling_cur_freq": 729600,
    "/sys/devices/system/cpu/cpu10/cpufreq/scaling_cur_freq": 2201600,
    "/sys/devices/system/cpu/cpu3/online": 0,  # offline core: no cpufreq directory
    "/sys/devices/system/cpu/cpufreq/policy0/scaling_cur_freq": 1479000,
}


def recorded(board: str):
    """A vcgencmd runner that answers from tests/data/telemetry/vcgencmd_<board>_<args>.txt."""

    def run(args: Sequence[str]) -> str | None:
        path = DATA / f"vcgencmd_{board}_{'_'.join(args)}.txt"
        return path.read_text() if path.exists() else None

    return run


def tegrastats_lines(name: str) -> list[str]:
    return (DATA / f"tegrastats_{name}.txt").read_text().splitlines()


# ------------------------------------------------------------------ INA3221


def test_ina3221_jetpack4_iio_layout(tmp_path: Path) -> None:
    rails = read_ina3221_iio(make_tree(tmp_path, NANO_JP4))
    assert list(rails) == ["POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU"]
    assert rails["POM_5V_IN"].power_mw == 3004
    assert (rails["POM_5V_IN"].voltage_mv, rails["POM_5V_IN"].current_ma) == (5000, 600)
    assert rails["POM_5V_GPU"].voltage_mv is None
    assert read_ina3221_hwmon(tmp_path) is None
    assert read_ina3221(tmp_path) == rails


def test_ina3221_jetpack4_with_two_monitors_sums_to_board_power(tmp_path: Path) -> None:
    rails = read_ina3221(make_tree(tmp_path, AGX_XAVIER_JP4))
    assert list(rails) == ["GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"]
    assert board_power_mw({name: rail.power_mw for name, rail in rails.items()}) == 310 + 1242 + 155 + 2760


def test_ina3221_jetpack5_hwmon_layout(tmp_path: Path) -> None:
    rails = read_ina3221_hwmon(make_tree(tmp_path, ORIN_NANO_JP6))
    assert list(rails) == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]  # channel 7 is not a rail
    assert rails["VDD_IN"].power_mw == pytest.approx(5072 * 1208 / 1000)
    assert rails["VDD_SOC"].power_mw == pytest.approx(5064 * 487 / 1000)
    assert read_ina3221_iio(tmp_path) is None
    assert read_ina3221(tmp_path) == rails


def test_ina3221_hwmon_skips_unconnected_disabled_and_foreign_channels(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {
            **ORIN_NANO_JP6,
            f"{HW}/in3_label": "NC",
            f"{HW}/in2_enable": 0,
            f"{JP5_HWMON}/1-0041/hwmon/hwmon4/name": "ina219",
            f"{JP5_HWMON}/1-0041/hwmon/hwmon4/in1_input": 5000,
            f"{JP5_HWMON}/1-0041/hwmon/hwmon4/curr1_input": 100,
        },
    )
    assert list(read_ina3221_hwmon(tmp_path)) == ["VDD_IN"]


def test_board_power_prefers_the_input_rail() -> None:
    assert board_power_mw({"VDD_IN": 5000.0, "VDD_SOC": 1200.0}) == 5000.0
    assert board_power_mw({"POM_5V_IN": 3004, "POM_5V_GPU": 40}) == 3004.0
    assert board_power_mw({}) is None


# --------------------------------------------------------- thermal, cpufreq


def test_thermal_zones_in_degrees_skipping_dead_sensors(tmp_path: Path) -> None:
    zones = read_thermal_zones(make_tree(tmp_path, THERMAL_AND_CPUFREQ))
    assert zones == {"cpu-thermal": 45.5, "gpu-thermal": 43.0, "tj-thermal": 47.25}
    assert list(zones) == ["cpu-thermal", "gpu-thermal", "tj-thermal"]  # zone10 sorts after zone2


def test_thermal_zones_sharing_a_type_are_kept_apart(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {
            "/sys/class/thermal/thermal_zone0/type": "soc-thermal",
            "/sys/class/thermal/thermal_zone0/temp": 40000,
            "/sys/class/thermal/thermal_zone1/type": "soc-thermal",
            "/sys/class/thermal/thermal_zone1/temp": 41000,
        },
    )
    assert read_thermal_zones(tmp_path) == {"soc-thermal": 40.0, "soc-thermal/thermal_zone1": 41.0}


def test_cpufreq_per_core_in_khz(tmp_path: Path) -> None:
    clocks = read_cpufreq(make_tree(tmp_path, THERMAL_AND_CPUFREQ))
    assert clocks == {0: 1479000, 1: 1479000, 2: 729600, 10: 2201600}
    assert list(clocks) == [0, 1, 2, 10]


def test_every_sysfs_reader_returns_none_on_an_empty_system(tmp_path: Path) -> None:
    for reader in (read_ina3221, read_ina3221_iio, read_ina3221_hwmon, read_thermal_zones, read_cpufreq):
        assert reader(tmp_path) is None


# --------------------------------------------------------------- tegrastats


def test_tegrastats_jetpack4_nano() -> None:
    first, second = (parse_tegrastats(line) for line in tegrastats_lines("jp4_nano"))
    assert (first.ram_used_mb, first.ram_total_mb, first.swap_used_mb, first.swap_total_mb) == (2298, 3964, 0, 1982)
    assert [(c.load_pct, c.freq_mhz) for c in first.cpus] == [(12, 1479), (8, 1479), (None, None), (None, None)]
    assert [c.online for c in first.cpus] == [True, True, False, False]
    assert (first.gpu_load_pct, first.gpu_freq_mhz, first.emc_load_pct) == (0, 76, 3)
    assert first.temperatures_c == {"PLL": 38.0, "CPU": 41.5, "PMIC": 100.0, "GPU": 39.0, "AO": 46.0, "thermal": 40.25}
    assert {n: (r.current_mw, r.average_mw) for n, r in first.rails.items()} == {
        "POM_5V_IN": (3004, 3004),
        "POM_5V_GPU": (40, 40),
        "POM_5V_CPU": (641, 641),
    }
    assert first.board_power_mw == 3004
    assert second.rails["POM_5V_IN"].current_mw == 4521 and second.rails["POM_5V_IN"].average_mw == 3762
    assert second.gpu_load_pct == 41 and second.gpu_freq_mhz == 921


def test_tegrastats_jetpack4_xavier_nx_without_units() -> None:
    (stats,) = (parse_tegrastats(line) for line in tegrastats_lines("jp4_xavier_nx"))
    assert {n: r.current_mw for n, r in stats.rails.items()} == {"VDD_IN": 3960, "VDD_CPU_GPU_CV": 640, "VDD_SOC": 1200}
    assert stats.board_power_mw == 3960
    assert stats.temperatures_c["CPU"] == 45.5 and stats.temperatures_c["iwlwifi"] == 42.0
    assert len(stats.cpus) == 6 and stats.gpu_freq_mhz is None


def test_tegrastats_jetpack5_agx_xavier_rails_have_no_input_rail() -> None:
    (stats,) = (parse_tegrastats(line) for line in tegrastats_lines("jp5_agx_xavier"))
    assert list(stats.rails) == ["GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"]  # not RAM, SWAP, APE, VIC_FREQ
    assert stats.board_power_mw == 310 + 1242 + 155 + 2760
    assert stats.gpu_freq_mhz == 318 and stats.temperatures_c["Tdiode"] == 37.25


def test_tegrastats_jetpack5_orin_nx_drops_powered_down_sensors() -> None:
    (stats,) = (parse_tegrastats(line) for line in tegrastats_lines("jp5_orin_nx"))
    assert "CV0" not in stats.temperatures_c and "CV2" not in stats.temperatures_c
    assert stats.temperatures_c["tj"] == 46.968 and stats.temperatures_c["SOC1"] == 46.968
    assert stats.rails["VDD_IN"].current_mw == 4915 and stats.board_power_mw == 4915
    assert stats.gpu_freq_mhz == 305 and stats.swap_used_mb == 430


def test_tegrastats_jetpack6_orin_nano() -> None:
    idle, busy = (parse_tegrastats(line) for line in tegrastats_lines("jp6_orin_nano"))
    assert idle.board_power_mw == 6120 and idle.gpu_load_pct == 0 and idle.gpu_freq_mhz == 305
    assert [c.load_pct for c in busy.cpus] == [64, 58, 71, 60, None, None]
    assert {c.freq_mhz for c in busy.cpus if c.online} == {1510}
    assert (busy.gpu_load_pct, busy.gpu_freq_mhz) == (87, 624)
    assert (busy.rails["VDD_IN"].current_mw, busy.rails["VDD_IN"].average_mw) == (11873, 8996)
    assert busy.temperatures_c["cpu"] == 51.5 and busy.temperatures_c["tj"] == 52.75


def test_tegrastats_pre_jetpack4_shared_clock_format() -> None:
    stats = parse_tegrastats(
        "RAM 3468/3983MB (lfb 48x4MB) SWAP 873/8192MB (cached 295MB) "
        "cpu [17%,13%,29%,off]@408 EMC 1%@408 APE 25 GR3D 3%@76"
    )
    assert [(c.load_pct, c.freq_mhz) for c in stats.cpus] == [(17, 408), (13, 408), (29, 408), (None, None)]
    assert (stats.gpu_load_pct, stats.gpu_freq_mhz, stats.emc_load_pct) == (3, 76, 1)
    assert stats.rails == {} and stats.board_power_mw is None


def test_tegrastats_rejects_lines_that_are_not_tegrastats() -> None:
    assert parse_tegrastats("") is None
    assert parse_tegrastats("tegrastats: command not found") is None


# ----------------------------------------------------------------- vcgencmd


def test_vcgencmd_pi4_recorded_outputs() -> None:
    pi4 = Vcgencmd(recorded("pi4"))
    assert pi4.temperature_c() == 48.3
    assert pi4.arm_clock_hz() == 1500398464
    assert pi4.throttled() == ThrottleFlags.UNDER_VOLTAGE_OCCURRED | ThrottleFlags.THROTTLED_OCCURRED
    assert pi4.pmic() is None and pi4.power_mw() is None  # no PMIC ADC before the Pi 5
    assert pi4.available()


def test_vcgencmd_pi5_pmic_total_power() -> None:
    reading = Vcgencmd(recorded("pi5")).pmic()
    assert len(reading.rails) == 14
    assert reading.rails["VDD_CORE"].watts == pytest.approx(2.30318 * 0.8634365)
    assert reading.rails["EXT5V"].watts is None and reading.input_volts == pytest.approx(5.1513)
    # Hand-summed V*A over the twelve rails that report both.
    assert reading.total_power_w == pytest.approx(3.3098228, abs=1e-6)
    assert Vcgencmd(recorded("pi5")).power_mw() == pytest.approx(3309.8228, abs=1e-3)


@pytest.mark.parametrize(
    ("text", "flags"),
    [
        ("throttled=0x0", []),
        ("throttled=0x50000", ["UNDER_VOLTAGE_OCCURRED", "THROTTLED_OCCURRED"]),
        ("throttled=0x50005", ["UNDER_VOLTAGE", "THROTTLED", "UNDER_VOLTAGE_OCCURRED", "THROTTLED_OCCURRED"]),
        ("throttled=0xa000a", ["FREQ_CAPPED", "SOFT_TEMP_LIMIT", "FREQ_CAPPED_OCCURRED", "SOFT_TEMP_LIMIT_OCCURRED"]),
    ],
)
def test_get_throttled_decodes_named_flags(text: str, flags: list[str]) -> None:
    assert parse_get_throttled(text).names() == flags


def test_vcgencmd_parsers_return_none_for_unexpected_output() -> None:
    error = (DATA / "vcgencmd_pi4_pmic_read_adc.txt").read_text()
    for parser in (parse_measure_temp, parse_measure_clock, parse_get_throttled, parse_pmic_read_adc):
        assert parser(error) is None and parser(None) is None
    assert parse_measure_clock("frequency(0)=2400029184") == 2400029184


def test_missing_vcgencmd_means_no_readings() -> None:
    nothing = Vcgencmd(lambda args: None)
    assert not nothing.available()
    assert (nothing.temperature_c(), nothing.arm_clock_hz(), nothing.throttled(), nothing.pmic()) == (None,) * 4


SLEEP = shutil.which("sleep")  # by absolute path: the tests below empty PATH


def _fake_command(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script.replace("sleep", SLEEP))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_real_runner_calls_vcgencmd_and_survives_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert run_vcgencmd(["measure_temp"]) is None  # not installed
    answer = 'echo "temp=50.5\'C"'
    _fake_command(tmp_path, "vcgencmd", f'if [ "$1" = measure_temp ]; then {answer}; else exec sleep 5; fi\n')
    assert parse_measure_temp(run_vcgencmd(["measure_temp"])) == 50.5
    start = time.monotonic()
    assert run_vcgencmd(["get_throttled"], timeout=0.2) is None
    assert 0.2 <= time.monotonic() - start < 2


def test_tegrastats_runner_returns_the_first_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert read_tegrastats_line() is None
    line = tegrastats_lines("jp6_orin_nano")[0]
    _fake_command(tmp_path, "tegrastats", f"echo '{line}'\nexec sleep 30\n")
    assert read_tegrastats_line(timeout=2) == line
    _fake_command(tmp_path, "tegrastats", "exec sleep 30\n")
    start = time.monotonic()
    assert read_tegrastats_line(timeout=0.2) is None
    assert 0.2 <= time.monotonic() - start < 2


# -------------------------------------------------------------------- probe


def test_probe_on_an_empty_tree_finds_nothing(tmp_path: Path) -> None:
    result = probe(tmp_path)
    assert result.found == {} and result.missing == SENSORS


def test_probe_on_a_jetpack6_orin(tmp_path: Path) -> None:
    make_tree(tmp_path, {**ORIN_NANO_JP6, **THERMAL_AND_CPUFREQ})
    result = probe(tmp_path)
    assert set(result.found) == {"ina3221_hwmon", "tegrastats", "thermal_zones", "cpufreq"}
    assert set(result.missing) == {"ina3221_iio", "hwmon_power", "vcgencmd", "pmic_adc"}
    assert "VDD_IN" in result.found["ina3221_hwmon"] and "ina3221_hwmon" in result


def test_probe_on_a_jetpack4_nano(tmp_path: Path) -> None:
    result = probe(make_tree(tmp_path, NANO_JP4))
    assert set(result.found) == {"ina3221_iio"}


def test_probe_on_a_pi5_and_a_pi4(tmp_path: Path) -> None:
    make_tree(tmp_path, THERMAL_AND_CPUFREQ)
    pi5 = probe(tmp_path, runner=recorded("pi5"))
    assert set(pi5.found) == {"vcgencmd", "pmic_adc", "thermal_zones", "cpufreq"}
    assert pi5.found["vcgencmd"] == "soc 61.2 C"
    pi4 = probe(tmp_path, runner=recorded("pi4"))
    assert "vcgencmd" in pi4 and "pmic_adc" in pi4.missing


def test_power_chain_picks_the_board_power_source(tmp_path: Path) -> None:
    jetson = find_power_source(make_tree(tmp_path / "jetson", ORIN_NANO_JP6))
    assert jetson.name == "ina3221_hwmon" and jetson.method.startswith("sysfs")
    sampler = jetson.open_sampler()
    assert sampler._read() == pytest.approx(5072 * 1208 / 1000)  # the reader the sampler polls
    pi5 = find_power_source(tmp_path / "pi5", runner=recorded("pi5"))
    assert pi5.name == "pmic_adc" and pi5.open_sampler()._read() == pytest.approx(3309.8228, abs=1e-3)
    assert find_power_source(tmp_path / "pi4", runner=recorded("pi4")) is None


# ------------------------------------------------------------------- energy


def test_trapezoidal_energy_matches_the_hand_computed_value() -> None:
    # 1 s ramping 1 W -> 3 W (2 J), 2 s at 3 W (6 J), 1 s ramping 3 W -> 0 (1.5 J): 9.5 J.
    samples = [(10.0, 1000.0), (11.0, 3000.0), (13.0, 3000.0), (14.0, 0.0)]
    assert integrate_energy_j(samples) == pytest.approx(9.5)
    assert integrate_energy_j([]) == 0.0 and integrate_energy_j([(1.0, 500.0)]) == 0.0


def test_energy_refuses_time_going_backwards() -> None:
    with pytest.raises(ValueError, match="must not go backwards"):
        integrate_energy_j([(2.0, 1.0), (1.0, 1.0)])


def test_power_sampler_collects_around_a_step() -> None:
    with PowerSampler(lambda: 2000.0, interval_s=0.01) as sampler:
        time.sleep(0.1)
    samples = sampler.samples
    assert len(samples) >= 4
    span = samples[-1][0] - samples[0][0]
    assert sampler.energy_j == pytest.approx(2.0 * span)
    assert sampler.mean_power_mw == pytest.approx(2000.0)


def test_power_sampler_without_a_sensor_reports_no_energy() -> None:
    sampler = PowerSampler(lambda: None, interval_s=0.01).start()
    time.sleep(0.03)
    assert sampler.stop() is None and sampler.samples == []


def test_power_sampler_surfaces_reader_failures() -> None:
    calls = iter([1000.0])

    def flaky() -> float:
        return next(calls)  # StopIteration on the second call

    sampler = PowerSampler(flaky, interval_s=0.01).start()
    time.sleep(0.05)
    with pytest.raises(RuntimeError, match="power reader failed"):
        sampler.stop()


def test_probe_of_the_real_system_answers_without_raising() -> None:
    result = probe()  # whatever this machine has, every sensor is either found or missing
    assert set(result.found) | set(result.missing) == set(SENSORS)
