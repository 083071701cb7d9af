"""Raspberry Pi firmware sensors via `vcgencmd`, with the command runner injectable for tests.

Outputs parsed here::

    vcgencmd measure_temp        temp=48.3'C
    vcgencmd measure_clock arm   frequency(48)=1500398464      (Hz; Pi 5 prints frequency(0)=...)
    vcgencmd get_throttled       throttled=0x50000
    vcgencmd measure_volts core  volt=0.8500V                  (every Pi; a voltage, no current: not power)
    vcgencmd pmic_read_adc       (Pi 5 only) one line per ADC channel:
                                   VDD_CORE_A current(7)=2.30318000A
                                   VDD_CORE_V volt(15)=0.86343650V
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from firmware_bridge.telemetry.throttle import ThrottleFlags, ThrottleState, decode_throttled

__all__ = [
    "PmicRail",
    "PmicReading",
    "Runner",
    "ThrottleFlags",
    "VCGENCMD_TIMEOUT_S",
    "Vcgencmd",
    "parse_get_throttled",
    "parse_measure_clock",
    "parse_measure_temp",
    "parse_measure_volts",
    "parse_pmic_read_adc",
    "run_vcgencmd",
]

# vcgencmd asks the VideoCore firmware over a mailbox; it answers in milliseconds
# unless the firmware is wedged, which must not wedge us too.
VCGENCMD_TIMEOUT_S = 2.0

Runner = Callable[[Sequence[str]], str | None]
"""Runs `vcgencmd <args>` and returns its stdout, or None when it cannot."""

_TEMP = re.compile(r"temp=(-?\d+(?:\.\d+)?)'C")
_CLOCK = re.compile(r"frequency\(\d+\)=(\d+)")
_VOLTS = re.compile(r"volt=(-?\d+(?:\.\d+)?)V")
_THROTTLED = re.compile(r"throttled=(0x[0-9a-fA-F]+|\d+)")
# "VDD_CORE_A current(7)=2.30318000A"; one third-party page shows "VDD_CORE_A=2.3031A" (no channel):
# no capture settles which firmware prints what, so both are read.
_ADC = re.compile(r"^\s*([^\s=]+)_([AV])(?:\s+(?:current|volt)\(\d+\))?=(-?\d+(?:\.\d+)?)[AV]\s*$")


def run_vcgencmd(
    args: Sequence[str], *, timeout: float = VCGENCMD_TIMEOUT_S, executable: str = "vcgencmd"
) -> str | None:
    """Run vcgencmd (found on PATH, or at `executable`); None if it is missing, fails, or exceeds `timeout`."""
    path = shutil.which(executable)
    if path is None:
        return None
    try:
        done = subprocess.run([path, *args], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def parse_measure_temp(text: str | None) -> float | None:
    """Return the SoC temperature in degrees C from `measure_temp` output."""
    match = _TEMP.search(text or "")
    return float(match.group(1)) if match else None


def parse_measure_clock(text: str | None) -> int | None:
    """Return the clock in Hz from `measure_clock <clock>` output."""
    match = _CLOCK.search(text or "")
    return int(match.group(1)) if match else None


def parse_measure_volts(text: str | None) -> float | None:
    """Return the voltage in V from `measure_volts <rail>` output."""
    match = _VOLTS.search(text or "")
    return float(match.group(1)) if match else None


def parse_get_throttled(text: str | None) -> ThrottleFlags | None:
    """Return the throttling flags from `get_throttled` output."""
    match = _THROTTLED.search(text or "")
    return ThrottleFlags(int(match.group(1), 0)) if match else None


@dataclass(frozen=True)
class PmicRail:
    """One Pi 5 PMIC rail; a rail may report only a voltage (EXT5V, BATT) or only a current."""

    name: str
    volts: float | None = None
    amps: float | None = None

    @property
    def watts(self) -> float | None:
        """Return V * A, or None unless both are known."""
        return None if self.volts is None or self.amps is None else self.volts * self.amps


@dataclass(frozen=True)
class PmicReading:
    """All rails of one `pmic_read_adc` call."""

    rails: dict[str, PmicRail]

    @property
    def total_power_w(self) -> float:
        """Return the sum of V * A over rails with both; the PMIC's rails, not USB or HATs."""
        return sum(w for rail in self.rails.values() if (w := rail.watts) is not None)

    @property
    def input_volts(self) -> float | None:
        """Return the 5 V input voltage (EXT5V), useful for spotting a weak supply."""
        rail = self.rails.get("EXT5V")
        return None if rail is None else rail.volts


def parse_pmic_read_adc(text: str | None) -> PmicReading | None:
    """Parse Pi 5 `pmic_read_adc` output; None if it has no ADC lines (older Pis, errors)."""
    volts: dict[str, float] = {}
    amps: dict[str, float] = {}
    for line in (text or "").splitlines():
        match = _ADC.match(line)
        if match:
            name, unit, value = match.groups()
            (amps if unit == "A" else volts)[name] = float(value)
    names = sorted(volts.keys() | amps.keys())
    if not names:
        return None
    return PmicReading({name: PmicRail(name, volts.get(name), amps.get(name)) for name in names})


class Vcgencmd:
    """Reads Pi firmware sensors through a runner; every method returns None when unavailable."""

    def __init__(self, runner: Runner = run_vcgencmd) -> None:
        self._run = runner

    def available(self) -> bool:
        """Return True if vcgencmd answers at all."""
        return self.temperature_c() is not None

    def temperature_c(self) -> float | None:
        """Return the SoC temperature in degrees C."""
        return parse_measure_temp(self._run(["measure_temp"]))

    def arm_clock_hz(self) -> int | None:
        """Return the ARM core clock in Hz."""
        return parse_measure_clock(self._run(["measure_clock", "arm"]))

    def throttled(self) -> ThrottleFlags | None:
        """Return the under-voltage / throttling flags."""
        return parse_get_throttled(self._run(["get_throttled"]))

    def throttle_state(self) -> ThrottleState | None:
        """Return the get_throttled flags decoded into conditions now and since boot."""
        flags = self.throttled()
        return None if flags is None else decode_throttled(int(flags))

    def core_volts(self) -> float | None:
        """Return the SoC core voltage in V (`measure_volts core`): a voltage only, not power."""
        return parse_measure_volts(self._run(["measure_volts", "core"]))

    def pmic(self) -> PmicReading | None:
        """Return the Pi 5 PMIC rail readings."""
        return parse_pmic_read_adc(self._run(["pmic_read_adc"]))

    def power_mw(self) -> float | None:
        """Return the PMIC total power in mW (Pi 5), for a PowerSampler."""
        reading = self.pmic()
        return None if reading is None else reading.total_power_w * 1000.0
