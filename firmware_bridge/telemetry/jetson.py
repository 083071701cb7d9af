"""NVIDIA Jetson INA3221 power monitors, in both sysfs layouts JetPack has used.

JetPack 4 (L4T r32) exposes the NVIDIA "ina3221x" IIO driver::

    /sys/bus/i2c/drivers/ina3221x/<bus-addr>/iio:device<N>/
        rail_name_{0,1,2}        rail label, e.g. VDD_IN, POM_5V_GPU
        in_power{0,1,2}_input    mW
        in_voltage{0,1,2}_input  mV
        in_current{0,1,2}_input  mA

JetPack 5 and 6 (L4T r35/r36) use the upstream hwmon driver::

    /sys/bus/i2c/drivers/ina3221/<bus-addr>/hwmon/hwmon<N>/
        name                     "ina3221"
        in{1,2,3}_label          rail label ("NC" when not connected)
        in{1,2,3}_input          bus voltage, mV
        curr{1,2,3}_input        current, mA
        in{1,2,3}_enable         0 when the channel is switched off
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from firmware_bridge.telemetry._sysfs import glob_sorted, read_int, read_text, under

__all__ = [
    "BOARD_INPUT_RAILS",
    "Rail",
    "board_power_mw",
    "read_board_power_mw",
    "read_ina3221",
    "read_ina3221_hwmon",
    "read_ina3221_iio",
]

IIO_DRIVER_DIR = "/sys/bus/i2c/drivers/ina3221x"
HWMON_DRIVER_DIR = "/sys/bus/i2c/drivers/ina3221"
IIO_CHANNELS = (0, 1, 2)
# Newer kernels add channel 7, "sum of shunt voltages": a diagnostic, not a rail.
HWMON_CHANNELS = (1, 2, 3)
HWMON_CHIP_NAME = "ina3221"
NOT_CONNECTED_LABEL = "NC"
# Rails that measure the whole module's input; when present they are the board
# power, and adding the other rails to them would count the same watts twice.
BOARD_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


@dataclass(frozen=True)
class Rail:
    """One monitored supply rail."""

    name: str
    power_mw: float
    voltage_mv: int | None = None
    current_ma: int | None = None
    source: str = ""


def _add(rails: dict[str, Rail], rail: Rail, device: Path) -> None:
    # Boards with several monitors could in principle reuse a label; keep both.
    name = rail.name if rail.name not in rails else f"{rail.name}@{device.name}"
    rails[name] = rail


def read_ina3221_iio(root: str | Path = "/") -> dict[str, Rail] | None:
    """Read JetPack 4 style INA3221 rails; None if that driver is absent."""
    rails: dict[str, Rail] = {}
    for device in glob_sorted(under(root, IIO_DRIVER_DIR), "*/iio:device*"):
        for channel in IIO_CHANNELS:
            name = read_text(device / f"rail_name_{channel}")
            power = read_int(device / f"in_power{channel}_input")
            if not name or power is None:
                continue
            voltage = read_int(device / f"in_voltage{channel}_input")
            current = read_int(device / f"in_current{channel}_input")
            _add(rails, Rail(name, float(power), voltage, current, str(device)), device.parent)
    return rails or None


def read_ina3221_hwmon(root: str | Path = "/") -> dict[str, Rail] | None:
    """Read JetPack 5/6 style INA3221 rails (power = mV * mA / 1000); None if absent."""
    rails: dict[str, Rail] = {}
    for hwmon in glob_sorted(under(root, HWMON_DRIVER_DIR), "*/hwmon/hwmon*"):
        if read_text(hwmon / "name") != HWMON_CHIP_NAME:
            continue
        for channel in HWMON_CHANNELS:
            label = read_text(hwmon / f"in{channel}_label") or f"in{channel}"
            if label.upper() == NOT_CONNECTED_LABEL or read_int(hwmon / f"in{channel}_enable") == 0:
                continue
            voltage = read_int(hwmon / f"in{channel}_input")
            current = read_int(hwmon / f"curr{channel}_input")
            if voltage is None or current is None:
                continue
            _add(rails, Rail(label, voltage * current / 1000.0, voltage, current, str(hwmon)), hwmon.parents[1])
    return rails or None


def read_ina3221(root: str | Path = "/") -> dict[str, Rail] | None:
    """Read INA3221 rails from whichever layout this system has; None if neither."""
    return read_ina3221_hwmon(root) or read_ina3221_iio(root)


def board_power_mw(rails: Mapping[str, float]) -> float | None:
    """Return the module's input power from rail name -> mW: the input rail if monitored, else the sum."""
    if not rails:
        return None
    for name in BOARD_INPUT_RAILS:
        if name in rails:
            return float(rails[name])
    # AGX Xavier and AGX Orin monitor no input rail; their rails are disjoint, so they add up.
    return float(sum(rails.values()))


def read_board_power_mw(root: str | Path = "/") -> float | None:
    """Return the INA3221 board power in mW, or None if there is no INA3221."""
    rails = read_ina3221(root)
    return None if rails is None else board_power_mw({name: r.power_mw for name, r in rails.items()})
