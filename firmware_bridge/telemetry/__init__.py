"""Board telemetry: power, temperatures and clocks on Jetson, Raspberry Pi and generic Linux.

Every sysfs reader takes a `root` (default "/") so tests can point it at a fake
tree, and returns None rather than raising when its sensor is absent.
"""

from firmware_bridge.telemetry.energy import PowerSampler, integrate_energy_j
from firmware_bridge.telemetry.jetson import (
    Rail,
    board_power_mw,
    read_board_power_mw,
    read_ina3221,
    read_ina3221_hwmon,
    read_ina3221_iio,
)
from firmware_bridge.telemetry.linux import read_cpufreq, read_thermal_zones
from firmware_bridge.telemetry.probe import SENSORS, ProbeResult, power_reader, probe
from firmware_bridge.telemetry.raspberrypi import (
    PmicRail,
    PmicReading,
    ThrottleFlags,
    Vcgencmd,
    parse_get_throttled,
    parse_measure_clock,
    parse_measure_temp,
    parse_pmic_read_adc,
    run_vcgencmd,
)
from firmware_bridge.telemetry.tegrastats import CpuCore, RailPower, TegraStats, parse_tegrastats, read_tegrastats_line

__all__ = [
    "CpuCore",
    "PmicRail",
    "PmicReading",
    "PowerSampler",
    "ProbeResult",
    "Rail",
    "RailPower",
    "SENSORS",
    "TegraStats",
    "ThrottleFlags",
    "Vcgencmd",
    "board_power_mw",
    "integrate_energy_j",
    "parse_get_throttled",
    "parse_measure_clock",
    "parse_measure_temp",
    "parse_pmic_read_adc",
    "parse_tegrastats",
    "power_reader",
    "probe",
    "read_board_power_mw",
    "read_cpufreq",
    "read_ina3221",
    "read_ina3221_hwmon",
    "read_ina3221_iio",
    "read_tegrastats_line",
    "read_thermal_zones",
    "run_vcgencmd",
]
