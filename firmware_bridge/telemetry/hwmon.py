"""Power monitor chips under /sys/class/hwmon (INA219/226/260/3221 and kin), in the kernel's documented units.

Per Documentation/hwmon/sysfs-interface.rst::

    power<N>_input   instantaneous power, microwatt
    curr<N>_input    current, milliampere
    in<N>_input      voltage, millivolt
    *_label          the channel's name, when the driver or device tree gives one

A chip with power channels is read from them; otherwise channel N's power is in<N> * curr<N>
(the INA3221 layout: bus voltage and current per channel, no power attribute).
Only known board power monitors are read: a GPU's or CPU's own power counter under hwmon
(amdgpu, for instance) measures that part, not the board.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from firmware_bridge.telemetry._sysfs import glob_sorted, read_int, read_text, under

__all__ = ["HWMON_DIR", "POWER_MONITOR_CHIPS", "HwmonChannel", "read_hwmon_power"]

HWMON_DIR = "/sys/class/hwmon"
POWER_MONITOR_CHIPS = frozenset(
    {"ina209", "ina219", "ina220", "ina226", "ina230", "ina231", "ina238", "ina260", "ina3221", "ina2xx"}
)
MICRO_PER_MILLI = 1000.0
NOT_CONNECTED_LABEL = "NC"
_CHANNEL = re.compile(r"(?:power|curr)(\d+)_input$")


@dataclass(frozen=True)
class HwmonChannel:
    """One monitored channel of a hwmon power monitor."""

    chip: str
    label: str
    power_mw: float
    voltage_mv: int | None
    current_ma: int | None
    path: str


def _channels(hwmon: Path, kind: str) -> list[int]:
    found = {int(m.group(1)) for p in hwmon.glob(f"{kind}*_input") if (m := _CHANNEL.match(p.name))}
    return sorted(found)


def _read_chip(hwmon: Path, chip: str) -> list[HwmonChannel]:
    channels = []
    powers = _channels(hwmon, "power")
    for n in powers:
        microwatts = read_int(hwmon / f"power{n}_input")
        if microwatts is None:
            continue
        label = read_text(hwmon / f"power{n}_label") or f"{chip}:power{n}"
        channels.append(
            HwmonChannel(chip, label, microwatts / MICRO_PER_MILLI, read_int(hwmon / f"in{n}_input"),
                         read_int(hwmon / f"curr{n}_input"), str(hwmon))
        )
    if powers:
        return channels
    for n in _channels(hwmon, "curr"):
        label = read_text(hwmon / f"in{n}_label") or read_text(hwmon / f"curr{n}_label") or f"{chip}:in{n}"
        if label.upper() == NOT_CONNECTED_LABEL or read_int(hwmon / f"in{n}_enable") == 0:
            continue
        millivolts, milliamps = read_int(hwmon / f"in{n}_input"), read_int(hwmon / f"curr{n}_input")
        if millivolts is None or milliamps is None:
            continue
        channels.append(HwmonChannel(chip, label, millivolts * milliamps / 1000.0, millivolts, milliamps, str(hwmon)))
    return channels


def read_hwmon_power(root: str | Path = "/") -> dict[str, HwmonChannel] | None:
    """Return label -> channel for every power monitor under /sys/class/hwmon; None if there is none."""
    found: dict[str, HwmonChannel] = {}
    for hwmon in glob_sorted(under(root, HWMON_DIR), "hwmon*"):
        chip = read_text(hwmon / "name")
        if chip not in POWER_MONITOR_CHIPS:
            continue
        for channel in _read_chip(hwmon, chip):
            # Two monitors may reuse a label; keep both apart.
            name = channel.label if channel.label not in found else f"{channel.label}@{hwmon.name}"
            found[name] = channel
    return found or None
