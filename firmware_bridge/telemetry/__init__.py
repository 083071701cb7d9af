"""Board telemetry: power, throttling, temperatures and clocks on Jetson, Raspberry Pi and generic Linux.

Every sysfs reader takes a `root` (default "/") so tests can point it at a fake
tree, and returns None rather than raising when its sensor is absent.
"""

from firmware_bridge.telemetry.energy import PowerSampler, integrate_energy_j
from firmware_bridge.telemetry.hwmon import HwmonChannel, read_hwmon_power
from firmware_bridge.telemetry.jetson import (
    Rail,
    board_power_mw,
    read_board_power_mw,
    read_ina3221,
    read_ina3221_hwmon,
    read_ina3221_iio,
)
from firmware_bridge.telemetry.linux import read_cpufreq, read_thermal_zones
from firmware_bridge.telemetry.power import NO_POWER_SOURCE, PowerSource, default_runner, find_power_source
from firmware_bridge.telemetry.probe import SENSORS, ProbeResult, probe
from firmware_bridge.telemetry.raspberrypi import (
    PmicRail,
    PmicReading,
    Vcgencmd,
    parse_get_throttled,
    parse_measure_clock,
    parse_measure_temp,
    parse_measure_volts,
    parse_pmic_read_adc,
    run_vcgencmd,
)
from firmware_bridge.telemetry.tegrastats import (
    CpuCore,
    RailPower,
    TegraStats,
    TegrastatsSampler,
    parse_tegrastats,
    read_tegrastats_line,
)
from firmware_bridge.telemetry.throttle import (
    CONDITIONS,
    ThrottleFlags,
    ThrottleState,
    decode_throttled,
    merge_states,
    read_sysfs_throttle,
    summarise_throttle,
)

__all__ = [
    "CONDITIONS",
    "CpuCore",
    "HwmonChannel",
    "NO_POWER_SOURCE",
    "PmicRail",
    "PmicReading",
    "PowerSampler",
    "PowerSource",
    "ProbeResult",
    "Rail",
    "RailPower",
    "SENSORS",
    "TegraStats",
    "TegrastatsSampler",
    "ThrottleFlags",
    "ThrottleState",
    "Vcgencmd",
    "board_power_mw",
    "decode_throttled",
    "default_runner",
    "find_power_source",
    "integrate_energy_j",
    "merge_states",
    "parse_get_throttled",
    "parse_measure_clock",
    "parse_measure_temp",
    "parse_measure_volts",
    "parse_pmic_read_adc",
    "parse_tegrastats",
    "probe",
    "read_board_power_mw",
    "read_cpufreq",
    "read_hwmon_power",
    "read_ina3221",
    "read_ina3221_hwmon",
    "read_ina3221_iio",
    "read_sysfs_throttle",
    "read_tegrastats_line",
    "read_thermal_zones",
    "run_vcgencmd",
    "summarise_throttle",
]
