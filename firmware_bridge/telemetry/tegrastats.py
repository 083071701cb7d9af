"""Parser for `tegrastats` lines: the fallback when the INA3221 sysfs files are not readable.

Lines seen across JetPack releases (abridged)::

    JP4 Nano:   RAM 1766/3964MB (lfb 197x4MB) SWAP 0/2048MB (cached 0MB) CPU [24%@1224,15%@1224,...]
                EMC_FREQ 0% GR3D_FREQ 0% PLL@21C CPU@25C ... POM_5V_IN 2545/2547 POM_5V_GPU 0/0
    JP4 NX:     ... CPU [12%@1479,...] ... VDD_IN 3960/3960 VDD_CPU_GPU_CV 640/640 VDD_SOC 1200/1200
    JP5/6 Orin: 09-24-2026 10:15:32 RAM 2467/7471MB ... CPU [2%@729,off,...] GR3D_FREQ 0%@[305]
                cpu@47.5C soc2@46.8C ... VDD_IN 4462mW/4462mW VDD_CPU_GPU_CV 480mW/480mW
    AGX Xavier: ... GPU 0mW/0mW CPU 465mW/465mW SOC 1242mW/1242mW CV 0mW/0mW SYS5V 2760mW/2760mW

Each rail is "current/average" in mW; the average runs over tegrastats' whole lifetime.
"""

from __future__ import annotations

import re
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from firmware_bridge.telemetry.energy import Sample, window_energy_j, window_mean_power_mw
from firmware_bridge.telemetry.jetson import board_power_mw

__all__ = ["CpuCore", "RailPower", "TegraStats", "TegrastatsSampler", "parse_tegrastats", "read_tegrastats_line"]

DEFAULT_INTERVAL_MS = 500
DEFAULT_TIMEOUT_S = 3.0
# The power sampler's rate: tegrastats itself reads every rail and clock each interval, so it costs
# the board a little CPU; 4 lines a second resolve a step of a few hundred ms and stay cheap.
SAMPLER_INTERVAL_MS = 250
STOP_TIMEOUT_S = 2.0
# NVIDIA reports a powered-down thermal sensor (e.g. CV0 on Orin) as -256 C.
SENSOR_OFF_C = -256.0

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
# "CPU [12%@1479,off]" (JP4+) or "cpu [17%,13%]@408" (older: one clock after the bracket).
_CPU = re.compile(r"\b(?:CPU|cpu) \[([^\]]*)\](?:@(\d+))?")
_CORE = re.compile(r"(\d+)%(?:@(\d+))?")
_GPU = re.compile(r"\bGR3D(?:_FREQ)? (\d+)%(?:@\[?(\d+))?")
_EMC = re.compile(r"\bEMC(?:_FREQ)? (\d+)%(?:@(\d+))?")
_TEMP = re.compile(r"\b([A-Za-z][\w-]*)@(-?\d+(?:\.\d+)?)C\b")
# A rail is NAME current/average, optionally in mW; the lookahead refuses "RAM 2298/3964MB".
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=[\s/]|$)")
_NOT_RAILS = frozenset({"RAM", "SWAP", "IRAM"})


@dataclass(frozen=True)
class CpuCore:
    """One core: load in % and clock in MHz, both None when the core is off."""

    index: int
    load_pct: int | None
    freq_mhz: int | None

    @property
    def online(self) -> bool:
        """Return False for a core tegrastats reports as "off"."""
        return self.load_pct is not None


@dataclass(frozen=True)
class RailPower:
    """A rail's instantaneous and running-average power, mW."""

    current_mw: int
    average_mw: int


@dataclass(frozen=True)
class TegraStats:
    """The fields of one tegrastats line this project uses."""

    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    cpus: tuple[CpuCore, ...] = ()
    gpu_load_pct: int | None = None
    gpu_freq_mhz: int | None = None
    emc_load_pct: int | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    rails: dict[str, RailPower] = field(default_factory=dict)

    @property
    def board_power_mw(self) -> float | None:
        """Return the module input power from the instantaneous rail readings."""
        return board_power_mw({name: rail.current_mw for name, rail in self.rails.items()})


def _int_or_none(text: str | None) -> int | None:
    return None if text is None else int(text)


def _parse_cpus(line: str) -> tuple[CpuCore, ...]:
    match = _CPU.search(line)
    if not match:
        return ()
    shared_freq = _int_or_none(match.group(2))
    cores = []
    for index, item in enumerate(part.strip() for part in match.group(1).split(",")):
        core = _CORE.fullmatch(item)
        if core is None:  # "off", or a field this parser does not know
            cores.append(CpuCore(index, None, None))
            continue
        freq = _int_or_none(core.group(2))
        cores.append(CpuCore(index, int(core.group(1)), shared_freq if freq is None else freq))
    return tuple(cores)


def parse_tegrastats(line: str) -> TegraStats | None:
    """Parse one tegrastats line; None if it does not look like one."""
    ram, swap = _RAM.search(line), _SWAP.search(line)
    rails = {
        name: RailPower(int(current), int(average))
        for name, current, average in _RAIL.findall(line)
        if name not in _NOT_RAILS
    }
    cpus = _parse_cpus(line)
    if ram is None and not rails and not cpus:
        return None
    gpu, emc = _GPU.search(line), _EMC.search(line)
    temperatures = {name: float(value) for name, value in _TEMP.findall(line) if float(value) != SENSOR_OFF_C}
    return TegraStats(
        ram_used_mb=int(ram.group(1)) if ram else None,
        ram_total_mb=int(ram.group(2)) if ram else None,
        swap_used_mb=int(swap.group(1)) if swap else None,
        swap_total_mb=int(swap.group(2)) if swap else None,
        cpus=cpus,
        gpu_load_pct=int(gpu.group(1)) if gpu else None,
        gpu_freq_mhz=_int_or_none(gpu.group(2)) if gpu else None,
        emc_load_pct=int(emc.group(1)) if emc else None,
        temperatures_c=temperatures,
        rails=rails,
    )


def read_tegrastats_line(
    *,
    interval_ms: int = DEFAULT_INTERVAL_MS,
    timeout: float = DEFAULT_TIMEOUT_S,
    executable: str = "tegrastats",
) -> str | None:
    """Run tegrastats until it prints one line and return it; None if it is absent or silent."""
    path = shutil.which(executable)
    if path is None:
        return None
    try:
        proc = subprocess.Popen(
            [path, "--interval", str(interval_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
    except OSError:
        return None
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        # tegrastats never exits on its own; wait for its first line, not for EOF.
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = proc.stdout.readline().strip() if ready else ""
        return line or None
    finally:
        proc.kill()
        proc.wait()


class TegrastatsSampler:
    """One long-lived `tegrastats --interval N` for the timed window; every line it prints is one power sample.

    No process is spawned per sample: the one process is started (and its first line awaited, so
    its start-up cost falls before the first timed step) in start(), and terminated in stop().
    The window's energy holds the first reading back to start() and the last forward to stop().
    """

    def __init__(
        self,
        executable: str,
        *,
        interval_ms: int = SAMPLER_INTERVAL_MS,
        first_line_timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_ms <= 0:
            raise ValueError(f"interval_ms must be positive, got {interval_ms}")
        self.executable = executable
        self.interval_s = interval_ms / 1000.0
        self._interval_ms = interval_ms
        self._first_line_timeout_s = first_line_timeout_s
        self._clock = clock
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._stopped_at: float | None = None
        self.lines = 0

    @property
    def samples(self) -> list[Sample]:
        """Return a copy of the (time, mW) samples so far, the window's closing edge included after stop()."""
        with self._lock:
            samples = list(self._samples)
        if samples and self._stopped_at is not None and self._stopped_at > samples[-1][0]:
            samples.append((self._stopped_at, samples[-1][1]))
        return samples

    @property
    def energy_j(self) -> float | None:
        """Return the energy of the window; None without two samples."""
        return window_energy_j(self.samples)

    @property
    def mean_power_mw(self) -> float | None:
        """Return the time-weighted mean power; None until two samples span some time."""
        return window_mean_power_mw(self.samples)

    def start(self) -> TegrastatsSampler:
        """Start tegrastats, wait for its first line (the window's first sample) and read the rest in a thread."""
        if self._proc is not None:
            raise RuntimeError("sampler already running")
        self._samples.clear()
        self._stopped_at = None
        self._proc = subprocess.Popen(
            [self.executable, "--interval", str(self._interval_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], self._first_line_timeout_s)
        if ready:
            self._take(self._proc.stdout.readline())
        self._thread = threading.Thread(target=self._run, name="tegrastats-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> float | None:
        """Terminate tegrastats, close the window now and return its energy in joules (None if unmeasured)."""
        if self._proc is None:
            raise RuntimeError("sampler is not running")
        self._stopped_at = self._clock()
        self._proc.terminate()
        try:
            self._proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
            self._thread = None
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None
        return self.energy_j

    def __enter__(self) -> TegrastatsSampler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        if self._proc is not None:
            self.stop()

    def _take(self, line: str) -> None:
        now = self._clock()
        if self._stopped_at is not None or not line:
            return
        self.lines += 1
        stats = parse_tegrastats(line)
        power = None if stats is None else stats.board_power_mw
        if power is not None:
            with self._lock:
                self._samples.append((now, float(power)))

    def _run(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        try:
            for line in proc.stdout:
                self._take(line)
        except (OSError, ValueError):  # the pipe closed under us at stop()
            return
