"""Generic Linux sensors: thermal zones and CPU clocks, present on Jetsons and Pis alike."""

from __future__ import annotations

from pathlib import Path

from firmware_bridge.telemetry._sysfs import glob_sorted, read_int, read_text, under

__all__ = ["read_cpufreq", "read_thermal_zones"]

THERMAL_DIR = "/sys/class/thermal"
CPU_DIR = "/sys/devices/system/cpu"
MILLI = 1000.0
# NVIDIA reports a powered-down thermal sensor as -256 C (in millidegrees here).
SENSOR_OFF_MILLI_C = -256000


def read_thermal_zones(root: str | Path = "/") -> dict[str, float] | None:
    """Return zone type -> temperature in degrees C; None if there are no readable zones."""
    temps: dict[str, float] = {}
    for zone in glob_sorted(under(root, THERMAL_DIR), "thermal_zone*"):
        milli = read_int(zone / "temp")
        if milli is None or milli == SENSOR_OFF_MILLI_C:
            continue
        name = read_text(zone / "type") or zone.name
        if name in temps:  # several zones can share a type; keep them apart
            name = f"{name}/{zone.name}"
        temps[name] = milli / MILLI
    return temps or None


def read_cpufreq(root: str | Path = "/") -> dict[int, int] | None:
    """Return CPU index -> current clock in kHz; None if cpufreq is absent."""
    clocks: dict[int, int] = {}
    for freq_file in glob_sorted(under(root, CPU_DIR), "cpu[0-9]*/cpufreq/scaling_cur_freq"):
        khz = read_int(freq_file)
        index = freq_file.parent.parent.name[len("cpu") :]
        if khz is not None and index.isdigit():
            clocks[int(index)] = khz
    return clocks or None
