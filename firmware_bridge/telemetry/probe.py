"""Sensor discovery: which sensors a system has, and which one should measure board power."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from firmware_bridge.telemetry._sysfs import under
from firmware_bridge.telemetry.jetson import read_board_power_mw, read_ina3221_hwmon, read_ina3221_iio
from firmware_bridge.telemetry.linux import read_cpufreq, read_thermal_zones
from firmware_bridge.telemetry.raspberrypi import Runner, Vcgencmd, run_vcgencmd

__all__ = ["ProbeResult", "SENSORS", "power_reader", "probe"]

SENSORS = ("ina3221_hwmon", "ina3221_iio", "tegrastats", "vcgencmd", "pmic_adc", "thermal_zones", "cpufreq")
TEGRASTATS_PATH = "/usr/bin/tegrastats"


@dataclass(frozen=True)
class ProbeResult:
    """Sensors found (name -> short description) and sensors looked for but missing."""

    found: dict[str, str]
    missing: tuple[str, ...]

    def __contains__(self, sensor: object) -> bool:
        return sensor in self.found


def _no_commands(args: Sequence[str]) -> str | None:
    return None


def _default_runner(root: str | Path) -> Runner:
    # A fake sysfs tree comes with no firmware to ask: running the host's real
    # vcgencmd would make a test's result depend on the machine it runs on.
    return run_vcgencmd if Path(root).resolve() == Path("/") else _no_commands


def probe(root: str | Path = "/", *, runner: Runner | None = None) -> ProbeResult:
    """Look for every supported sensor under `root` (and via `runner` for vcgencmd)."""
    vcgencmd = Vcgencmd(runner or _default_runner(root))
    found: dict[str, str] = {}
    if rails := read_ina3221_hwmon(root):
        found["ina3221_hwmon"] = ", ".join(rails)
    if rails := read_ina3221_iio(root):
        found["ina3221_iio"] = ", ".join(rails)
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


def power_reader(root: str | Path = "/", *, runner: Runner | None = None) -> Callable[[], float | None] | None:
    """Return a zero-argument board-power reader in mW for a PowerSampler, or None if there is none."""
    if read_board_power_mw(root) is not None:
        return lambda: read_board_power_mw(root)
    vcgencmd = Vcgencmd(runner or _default_runner(root))
    if vcgencmd.power_mw() is not None:
        return vcgencmd.power_mw
    return None
