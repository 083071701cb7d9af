"""Throttling and under-voltage, decoded in one place: the Pi's `get_throttled` bits and their Linux sysfs kin.

A reading is taken before and after the timed steps (never during: `vcgencmd` is a process spawn),
and `summarise_throttle` compares the two. Four conditions, named as the Pi firmware names them:

    under_voltage     the supply sagged below ~4.63 V (Pi), or a hwmon low-voltage alarm
    freq_capped       the ARM clock is held below its maximum
    throttled         the clock is being reduced (firmware, thermal cooling, or a CPU throttle counter)
    soft_temp_limit   the Pi's soft temperature limit is active

Sources:

* `vcgencmd get_throttled` (Pi): bits 0-3 say "now", bits 16-19 "has occurred since boot" (sticky).
  A sticky bit already set before the workload cannot be attributed to it; one that appears
  between the two readings happened during it.
* sysfs, on any Linux board (Jetson included, where there is no get_throttled):
  `hwmon/<rpi_volt>/in0_lcrit_alarm` (the Pi's under-voltage alarm as the kernel exposes it);
  thermal cooling devices other than fans with `cur_state` > 0 (the kernel is throttling for heat);
  cpufreq policies whose `scaling_max_freq` is below `cpuinfo_max_freq` (a power mode or a thermal cap);
  x86 `thermal_throttle/*_throttle_count` counters (an increase means throttling during the workload);
  Jetson Orin's `hwmon/<soctherm_oc>/oc<N>_event_cnt` counters (Linux tegra234 soctherm-oc driver):
  OC1 counts under-voltage events, OC2 average and OC3 instantaneous over-current events, each of
  which makes the firmware throttle CPU and GPU.

Conditions no source could check are reported as unknown, never as "fine".
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_bridge.telemetry._sysfs import glob_sorted, read_int, read_text, under

__all__ = [
    "CONDITIONS",
    "ThrottleFlags",
    "ThrottleState",
    "decode_throttled",
    "merge_states",
    "read_sysfs_throttle",
    "summarise_throttle",
]

UNDER_VOLTAGE = "under_voltage"
FREQ_CAPPED = "freq_capped"
THROTTLED = "throttled"
SOFT_TEMP_LIMIT = "soft_temp_limit"
CONDITIONS = (UNDER_VOLTAGE, FREQ_CAPPED, THROTTLED, SOFT_TEMP_LIMIT)
LABELS = {
    UNDER_VOLTAGE: "under-voltage",
    FREQ_CAPPED: "CPU frequency capped",
    THROTTLED: "throttled",
    SOFT_TEMP_LIMIT: "soft temperature limit",
}
# get_throttled: bit i (i < 4) is condition i now; bit 16 + i says it has occurred since boot.
STICKY_SHIFT = 16

HWMON_DIR = "/sys/class/hwmon"
RPI_VOLT_CHIP = "rpi_volt"
SOCTHERM_OC_CHIP = "soctherm_oc"
# soctherm_oc event counter -> the condition it stands for.
SOCTHERM_OC_EVENTS = {"oc1_event_cnt": UNDER_VOLTAGE, "oc2_event_cnt": THROTTLED, "oc3_event_cnt": THROTTLED}
THERMAL_DIR = "/sys/class/thermal"
CPUFREQ_DIR = "/sys/devices/system/cpu/cpufreq"
CPU_DIR = "/sys/devices/system/cpu"
# A fan spinning up cools without slowing anything; every other cooling device trades speed for heat.
FAN_WORD = "fan"


class ThrottleFlags(enum.IntFlag):
    """Bits of `vcgencmd get_throttled`: low half is "now", bits 16+ are "since boot"."""

    UNDER_VOLTAGE = 1 << 0
    FREQ_CAPPED = 1 << 1
    THROTTLED = 1 << 2
    SOFT_TEMP_LIMIT = 1 << 3
    UNDER_VOLTAGE_OCCURRED = 1 << 16
    FREQ_CAPPED_OCCURRED = 1 << 17
    THROTTLED_OCCURRED = 1 << 18
    SOFT_TEMP_LIMIT_OCCURRED = 1 << 19

    def names(self) -> list[str]:
        """Return the names of the set flags, lowest bit first."""
        return [name for name, flag in type(self).__members__.items() if flag in self]


@dataclass(frozen=True)
class ThrottleState:
    """One reading: conditions now, conditions that have occurred (sticky), counters, and what was checkable."""

    sources: tuple[str, ...]
    checked: frozenset[str]
    now: frozenset[str] = frozenset()
    occurred: frozenset[str] = frozenset()
    # condition -> a count that only grows (e.g. x86 throttle events); growth means "during".
    counters: dict[str, int] = field(default_factory=dict)
    raw: str | None = None
    details: tuple[str, ...] = ()


def decode_throttled(value: int) -> ThrottleState:
    """Decode a `get_throttled` value into conditions now and since boot."""
    now = frozenset(name for i, name in enumerate(CONDITIONS) if value >> i & 1)
    occurred = frozenset(name for i, name in enumerate(CONDITIONS) if value >> (STICKY_SHIFT + i) & 1)
    return ThrottleState(("vcgencmd get_throttled",), frozenset(CONDITIONS), now, occurred, raw=hex(value))


def _rpi_volt_alarm(root: str | Path) -> bool | None:
    for hwmon in glob_sorted(under(root, HWMON_DIR), "hwmon*"):
        if read_text(hwmon / "name") == RPI_VOLT_CHIP:
            alarm = read_int(hwmon / "in0_lcrit_alarm")
            if alarm is not None:
                return alarm != 0
    return None


def _soctherm_oc_events(root: str | Path) -> dict[str, int] | None:
    """Return condition -> Jetson over-current/under-voltage event count, or None without the driver."""
    for hwmon in glob_sorted(under(root, HWMON_DIR), "hwmon*"):
        if read_text(hwmon / "name") != SOCTHERM_OC_CHIP:
            continue
        counts: dict[str, int] = {}
        for attribute, condition in SOCTHERM_OC_EVENTS.items():
            count = read_int(hwmon / attribute)
            if count is not None:
                counts[condition] = counts.get(condition, 0) + count
        return counts or None
    return None


def _cooling_devices(root: str | Path) -> tuple[bool, list[str]]:
    """Return (any non-fan cooling device exists, names of those currently active)."""
    present, active = False, []
    for device in glob_sorted(under(root, THERMAL_DIR), "cooling_device*"):
        kind = read_text(device / "type") or device.name
        state = read_int(device / "cur_state")
        if FAN_WORD in kind.lower() or state is None:
            continue
        present = True
        if state > 0:
            active.append(f"{kind} state {state}/{read_int(device / 'max_state')}")
    return present, active


def _cpufreq_caps(root: str | Path) -> tuple[bool, list[str]]:
    """Return (any policy readable, policies whose ceiling is below the hardware maximum)."""
    present, capped = False, []
    for policy in glob_sorted(under(root, CPUFREQ_DIR), "policy*"):
        ceiling, hardware = read_int(policy / "scaling_max_freq"), read_int(policy / "cpuinfo_max_freq")
        if ceiling is None or hardware is None:
            continue
        present = True
        if ceiling < hardware:
            capped.append(f"{policy.name} max {ceiling} of {hardware} kHz")
    return present, capped


def _throttle_events(root: str | Path) -> int | None:
    counts = [
        read_int(path) for path in glob_sorted(under(root, CPU_DIR), "cpu[0-9]*/thermal_throttle/*_throttle_count")
    ]
    known = [count for count in counts if count is not None]
    return sum(known) if known else None


def read_sysfs_throttle(root: str | Path = "/") -> ThrottleState | None:
    """Read every sysfs throttling indicator under `root`; None if there is none."""
    sources: list[str] = []
    checked: set[str] = set()
    now: set[str] = set()
    counters: dict[str, int] = {}
    details: list[str] = []
    if (alarm := _rpi_volt_alarm(root)) is not None:
        sources.append("hwmon rpi_volt in0_lcrit_alarm")
        checked.add(UNDER_VOLTAGE)
        if alarm:
            now.add(UNDER_VOLTAGE)
    present, active = _cooling_devices(root)
    if present:
        sources.append("thermal cooling devices")
        checked.add(THROTTLED)
        if active:
            now.add(THROTTLED)
            details += active
    present, capped = _cpufreq_caps(root)
    if present:
        sources.append("cpufreq scaling_max_freq")
        checked.add(FREQ_CAPPED)
        if capped:
            now.add(FREQ_CAPPED)
            details += capped
    if (events := _throttle_events(root)) is not None:
        sources.append("cpu thermal_throttle counters")
        checked.add(THROTTLED)
        counters[THROTTLED] = events
    if (oc_events := _soctherm_oc_events(root)) is not None:
        sources.append("hwmon soctherm_oc event counters")
        checked |= set(oc_events)
        for condition, count in oc_events.items():
            counters[condition] = counters.get(condition, 0) + count
    if not sources:
        return None
    return ThrottleState(tuple(sources), frozenset(checked), frozenset(now), counters=counters, details=tuple(details))


def merge_states(states: Iterable[ThrottleState | None]) -> ThrottleState | None:
    """Combine readings from several sources taken at the same moment; None if there are none."""
    present = [state for state in states if state is not None]
    if not present:
        return None
    counters: dict[str, int] = {}
    for state in present:
        for name, count in state.counters.items():
            counters[name] = counters.get(name, 0) + count
    raws = [state.raw for state in present if state.raw is not None]
    return ThrottleState(
        sources=tuple(source for state in present for source in state.sources),
        checked=frozenset().union(*(state.checked for state in present)),
        now=frozenset().union(*(state.now for state in present)),
        occurred=frozenset().union(*(state.occurred for state in present)),
        counters=counters,
        raw=raws[0] if raws else None,
        details=tuple(detail for state in present for detail in state.details),
    )


def _ordered(names: Iterable[str]) -> list[str]:
    chosen = set(names)
    return [name for name in CONDITIONS if name in chosen]


def summarise_throttle(before: ThrottleState | None, after: ThrottleState | None) -> dict[str, Any]:
    """Compare readings taken before and after the timed steps; JSON-ready, with a warning when one is due.

    The warning covers a condition set now (at either reading) or one that first occurred between
    them; a sticky condition already set before the workload is listed but cannot be attributed.
    """
    states = [state for state in (before, after) if state is not None]
    if not states:
        return {"sources": [], "checked": [], "unknown": list(CONDITIONS), "now": [], "during": [],
                "before_workload": [], "raw": None, "details": [], "warning": None}
    checked = frozenset().union(*(state.checked for state in states))
    now = frozenset().union(*(state.now for state in states))
    during: set[str] = set()
    earlier: frozenset[str] = frozenset()
    if before is not None and after is not None:
        during |= after.occurred - before.occurred
        earlier = before.occurred
        during |= {name for name, count in after.counters.items() if count > before.counters.get(name, count)}
    else:  # one reading only: a sticky bit may or may not belong to this workload
        earlier = states[0].occurred
    # Events counted before the workload began happened earlier since boot, like a sticky bit.
    earlier = earlier | {name for name, count in states[0].counters.items() if count > 0}
    sources = list(dict.fromkeys(source for state in states for source in state.sources))
    summary: dict[str, Any] = {
        "sources": sources,
        "checked": _ordered(checked),
        "unknown": _ordered(set(CONDITIONS) - checked),
        "now": _ordered(now),
        "during": _ordered(during),
        "before_workload": _ordered(earlier - during),
        "raw": {"before": before.raw if before else None, "after": after.raw if after else None},
        "details": list(dict.fromkeys(detail for state in states for detail in state.details)),
        "warning": None,
    }
    parts = [f"{LABELS[name]} now" for name in summary["now"]]
    parts += [f"{LABELS[name]} during this workload" for name in summary["during"]]
    if parts:
        summary["warning"] = (
            "board throttled or under-voltage: " + ", ".join(parts)
            + "; timings and energy are not those of an unthrottled board "
            "(check the supply, the cooling and the power mode)"
        )
    return summary
