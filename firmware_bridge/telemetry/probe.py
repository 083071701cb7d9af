"""Sensor discovery: which sensors a system has (the power source itself is chosen by `power`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from firmware_bridge.telemetry._sysfs import under
from firmware_bridge.telemetry.hwmon import read_hwmon_power
from firmware_bridge.telemetry.jetson import read_ina3221_hwmon, read_ina3221_iio
from firmware_bridge.telemetry.linux import read_cpufreq, read_thermal_zones
from firmware_bridge.telemetry.power import TEGRASTATS_PATH, default_runner
from firmware_bridge.telemetry.raspberrypi import Runner, Vcgencmd

__all__ = ["ProbeResult", "SENSORS", "probe"]

SENSORS = (
    "ina3221_hwmon", "ina3221_iio", "hwmon_power", "tegrastats", "vcgencmd", "pmic_adc", "thermal_zones", "cpufreq"
)


@dataclass(frozen=True)
class ProbeResult:
    """Sensors found (name -> short description) and sensors looked for but missing."""

    found: dict[str, str]
    missing: tuple[str, ...]

    def __contains__(self, sensor: object) -> bool:
        return sensor in self.found


def probe(root: str | Path = "/", *, runner: Runner | None = None) -> ProbeResult:
    """Look for every supported sensor under `root` (and via `runner` for vcgencmd)."""
    vcgencmd = Vcgencmd(runner or default_runner(root))
    found: dict[str, str] = {}
    if rails := read_ina3221_hwmon(root):
        found["ina3221_hwmon"] = ", ".join(rails)
    if rails := read_ina3221_iio(root):
        found["ina3221_iio"] = ", ".join(rails)
    if channels := read_hwmon_power(root):
        found["hwmon_power"] = ", ".join(channels)
    if under(root, TEGRASTATS_PATH).is_file():
        found["tegrastats"] = TEGRASTATS_PATH
    if (temp := vcgencmd.temperature_c()) is not None:
        found["vcgencmd"] = f"soc {temp:.1f} C"
    if (pmic := vcgencmd.pmic()) is not None:
        found["pmic_adc"] = f"{len(pmic.rails)} rails, {pmic.total_power_w:.2f} W"
    if zones := read_thermal_zones(root):
        found["thermal_zones"] = ", ".join(zones)
    if clocks := read_cpufreq(root):
        found["cpufreq"] = f"{len(clocks)} cpus"
    return ProbeResult(found, tuple(name for name in SENSORS if name not in found))
