"""What the agent measures around the timed steps: memory, power and energy, throttling, temperatures and clocks.

Power comes from the first source of the chain in `firmware_bridge.telemetry.power`, sampled as
that source allows (sysfs in a thread, one tegrastats process, or rare vcgencmd spawns); throttling
and under-voltage are read just before the first timed step and just after the last, never during.

Memory is measured without tracemalloc, which slows every allocation and sees only what goes
through Python's allocators (not BLAS workspaces, not Numba's). Two methods, both reported:

* `getrusage(RUSAGE_SELF).ru_maxrss`: the kernel's exact peak resident set size of the agent
  process over its whole life (so a later, smaller workload reports the earlier peak);
* `/proc/self/statm` resident pages, sampled every RSS_SAMPLE_INTERVAL_S during the timed steps:
  the peak of this workload alone, but a spike shorter than the interval can slip through.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path
from typing import Any

from firmware_bridge.telemetry import (
    NO_POWER_SOURCE,
    ThrottleState,
    Vcgencmd,
    default_runner,
    find_power_source,
    merge_states,
    probe,
    read_cpufreq,
    read_sysfs_throttle,
    read_thermal_zones,
    summarise_throttle,
)
from firmware_bridge.telemetry.power import WindowSampler

__all__ = ["BoardMeter", "MEMORY_METHODS", "RssSampler", "SIMULATED_ENV", "current_rss_bytes", "peak_rss_bytes"]

RSS_SAMPLE_INTERVAL_S = 0.01
# Set by SimulatedBoard for the agent it starts, so the board itself says it is this host, not a board.
SIMULATED_ENV = "EDGETRAIN_SIMULATED_BOARD"
KIB = 1024
STATM_PATH = "/proc/self/statm"
MEMORY_METHODS = {
    "peak_rss_bytes": "getrusage(RUSAGE_SELF).ru_maxrss: exact peak RSS of the agent process over its life",
    "sampled_peak_rss_bytes": (
        f"/proc/self/statm resident pages sampled every {RSS_SAMPLE_INTERVAL_S * 1000:g} ms "
        "during the timed steps (may miss shorter spikes)"
    ),
    "tracemalloc": "not used: it slows allocation and misses memory outside Python's allocators",
}


def peak_rss_bytes() -> int:
    """Return the process's peak resident set size in bytes (ru_maxrss)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * KIB


def current_rss_bytes() -> int | None:
    """Return the current resident set size in bytes from /proc/self/statm, or None off Linux."""
    try:
        with open(STATM_PATH, encoding="ascii") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Samples the current RSS in a thread and keeps the highest value seen."""

    def __init__(self, interval_s: float = RSS_SAMPLE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        rss = current_rss_bytes()
        if rss is not None and (self.peak is None or rss > self.peak):
            self.peak = rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> RssSampler:
        """Take a first sample and keep sampling until stop()."""
        self._sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int | None:
        """Take a last sample, stop the thread and return the peak in bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        return self.peak


class BoardMeter:
    """Context manager around the timed steps: power, RSS, throttling, thermal and clock snapshots."""

    def __init__(self, telemetry_root: str | Path = "/") -> None:
        self.root = telemetry_root
        runner = default_runner(telemetry_root)
        self.sensors = probe(telemetry_root, runner=runner)
        self._vcgencmd = Vcgencmd(runner)
        self.power_source = find_power_source(telemetry_root, runner=runner)
        self._power: WindowSampler | None = None
        self._rss = RssSampler()
        self.energy_j: float | None = None
        self.mean_power_mw: float | None = None
        self.power_samples = 0
        self.rss_before: int | None = None
        self.sampled_peak: int | None = None
        self.thermal_before: dict[str, float] | None = None
        self.thermal_after: dict[str, float] | None = None
        self.cpufreq_khz: dict[int, int] | None = None
        self.throttle_before: ThrottleState | None = None
        self.throttle_after: ThrottleState | None = None
        self.core_volts: dict[str, float | None] = {}
        self.simulated = os.environ.get(SIMULATED_ENV) == "1"

    def _throttle(self) -> ThrottleState | None:
        return merge_states([self._vcgencmd.throttle_state(), read_sysfs_throttle(self.root)])

    def __enter__(self) -> BoardMeter:
        # Spawning reads first: their cost must land before the first timed step, not in it.
        self.throttle_before = self._throttle()
        self.core_volts["before"] = self._vcgencmd.core_volts()
        self.thermal_before = read_thermal_zones(self.root)
        self.cpufreq_khz = read_cpufreq(self.root)
        self.rss_before = current_rss_bytes()
        self._rss.start()
        if self.power_source is not None:
            self._power = self.power_source.open_sampler().start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._power is not None:
            self.energy_j = self._power.stop()
            self.mean_power_mw = self._power.mean_power_mw
            self.power_samples = len(self._power.samples)
        self.sampled_peak = self._rss.stop()
        self.thermal_after = read_thermal_zones(self.root)
        self.throttle_after = self._throttle()
        self.core_volts["after"] = self._vcgencmd.core_volts()

    def _power_report(self) -> dict[str, Any]:
        if self.power_source is None:
            return {"source": None, "method": None, "interval_s": None, "note": NO_POWER_SOURCE}
        power: dict[str, Any] = {**self.power_source.describe(), "note": None}
        if self._power is not None and self.energy_j is None:
            power["note"] = f"{self.power_source.name} gave fewer than two readings: energy unknown, not zero"
        return power

    def report(self, timed_steps: int) -> dict[str, Any]:
        """Return the measurements as JSON-ready `memory` and `telemetry` sections."""
        per_step = None if self.energy_j is None or timed_steps == 0 else self.energy_j / timed_steps
        volts = self.core_volts if any(v is not None for v in self.core_volts.values()) else None
        return {
            "memory": {
                "peak_rss_bytes": peak_rss_bytes(),
                "sampled_peak_rss_bytes": self.sampled_peak,
                "rss_before_bytes": self.rss_before,
                "methods": MEMORY_METHODS,
            },
            "telemetry": {
                "simulated": self.simulated,
                "found": dict(self.sensors.found),
                "missing": list(self.sensors.missing),
                "power_source": None if self.power_source is None else self.power_source.name,
                "power": self._power_report(),
                "energy_j": self.energy_j,
                "energy_per_step_j": per_step,
                "mean_power_mw": self.mean_power_mw,
                "power_samples": self.power_samples,
                "throttle": summarise_throttle(self.throttle_before, self.throttle_after),
                "core_volts": volts,
                "thermal_c_before": self.thermal_before,
                "thermal_c_after": self.thermal_after,
                "cpufreq_khz": None if self.cpufreq_khz is None else {str(k): v for k, v in self.cpufreq_khz.items()},
            },
        }
