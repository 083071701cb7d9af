"""Board power sources in one ordered chain, and the sampler each one runs during the timed steps.

The chain, first available wins:

1. `ina3221_hwmon` / `ina3221_iio`: Jetson INA3221 rails in sysfs (JetPack 5/6, JetPack 4 layouts);
2. `hwmon`: any other power monitor chip under /sys/class/hwmon (an INA219/226/260 on a carrier board);
3. `tegrastats`: the rails tegrastats prints (VDD_IN ...), for a Jetson whose INA3221 sysfs is not readable;
4. `pmic_adc`: the Pi 5 PMIC through `vcgencmd pmic_read_adc` (current and voltage pairs per rail).

Pi 4 and older have none of these: `measure_volts` is a voltage, not a power, so the report says
"no power source" (energy unknown, not zero) and the meter records the core voltage only.

How each is sampled matters, because sampling runs while steps are being timed:

* sysfs sources are file reads polled in a thread every SYSFS_INTERVAL_S: one small pseudo-file
  read from Python takes ~50 us on the 2-core x86 CI machine (/proc/self/statm, median of 2000),
  0.1% of the 50 ms interval;
* `tegrastats` is one long-lived process printing a line every TEGRASTATS_INTERVAL_MS;
* `pmic_adc` costs a process spawn per sample. Measured on the same machine,
  `subprocess.run(["/bin/true"])` takes 0.77 ms median (also from a process holding 200 MB): a
  third of the 2.4 ms MLP step of issue 17, 0.8% of a 100 ms step; on a Pi's slower cores, plus
  vcgencmd's firmware mailbox round trip, expect a few ms, i.e. a whole short step. The old
  50 ms rate put a spawn into one step in twenty of such an MLP. So spawn sources are sampled just
  before the first timed step, just after the last, and every SPAWN_INTERVAL_S in between: at
  1 s, at most one step per second is disturbed, by about one spawn (~0.1-0.5% of the window);
  a window under 1 s gets the two edge samples only.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from firmware_bridge.telemetry._sysfs import under
from firmware_bridge.telemetry.energy import PowerSampler, Sample
from firmware_bridge.telemetry.hwmon import read_hwmon_power
from firmware_bridge.telemetry.jetson import board_power_mw, read_ina3221_hwmon, read_ina3221_iio
from firmware_bridge.telemetry.raspberrypi import Runner, Vcgencmd, run_vcgencmd
from firmware_bridge.telemetry.tegrastats import SAMPLER_INTERVAL_MS, TegrastatsSampler

__all__ = [
    "NO_POWER_SOURCE",
    "PowerSource",
    "WindowSampler",
    "default_runner",
    "find_power_source",
    "find_tegrastats",
    "find_vcgencmd",
]

SYSFS_INTERVAL_S = 0.05
SPAWN_INTERVAL_S = 1.0
TEGRASTATS_INTERVAL_MS = SAMPLER_INTERVAL_MS
TEGRASTATS_PATH = "/usr/bin/tegrastats"
VCGENCMD_PATH = "/usr/bin/vcgencmd"
NO_POWER_SOURCE = (
    "no power source: this board has no current sensor the agent can read (no INA3221/INA2xx in sysfs, "
    "no tegrastats rails, no Pi 5 PMIC), so energy is unknown, not zero; measure it with an external "
    "USB power meter"
)


class WindowSampler(Protocol):
    """What the meter needs from a sampler: start, stop (-> joules or None), samples, mean power."""

    interval_s: float

    @property
    def samples(self) -> list[Sample]: ...

    @property
    def mean_power_mw(self) -> float | None: ...

    def start(self) -> WindowSampler: ...

    def stop(self) -> float | None: ...


@dataclass(frozen=True)
class PowerSource:
    """A board power source: its name, what it reads, how it is sampled, and a factory for its sampler."""

    name: str
    detail: str
    method: str
    interval_s: float
    open_sampler: Callable[[], WindowSampler]

    def describe(self) -> dict[str, object]:
        """Return the JSON-ready description the report shows."""
        return {"source": self.name, "detail": self.detail, "method": self.method, "interval_s": self.interval_s}


def _is_real_root(root: str | Path) -> bool:
    return Path(root).resolve() == Path("/")


def _find_command(root: str | Path, name: str, default_path: str) -> str | None:
    # Below a fake tree, a command is an executable at its real path in that tree (tests put scripts
    # there); the host's own command would make the result depend on the machine the test runs on.
    if _is_real_root(root):
        return shutil.which(name)
    path = under(root, default_path)
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def find_vcgencmd(root: str | Path = "/") -> str | None:
    """Return the vcgencmd executable for this root, or None."""
    return _find_command(root, "vcgencmd", VCGENCMD_PATH)


def find_tegrastats(root: str | Path = "/") -> str | None:
    """Return the tegrastats executable for this root, or None."""
    return _find_command(root, "tegrastats", TEGRASTATS_PATH)


def _no_commands(args: object) -> str | None:
    return None


def default_runner(root: str | Path = "/") -> Runner:
    """Return a vcgencmd runner for this root: the one found there, or one that always answers None."""
    executable = find_vcgencmd(root)
    if executable is None:
        return _no_commands
    return lambda args: run_vcgencmd(args, executable=executable)


def _polled(read: Callable[[], float | None], interval_s: float) -> Callable[[], WindowSampler]:
    return lambda: PowerSampler(read, interval_s=interval_s)


def _ina3221(root: str | Path) -> PowerSource | None:
    for name, reader in (("ina3221_hwmon", read_ina3221_hwmon), ("ina3221_iio", read_ina3221_iio)):
        rails = reader(root)
        if rails:

            def read(reader: Callable[..., dict | None] = reader) -> float | None:
                now = reader(root)
                return None if now is None else board_power_mw({n: r.power_mw for n, r in now.items()})

            detail = "INA3221 rails " + ", ".join(rails)
            method = f"sysfs reads every {SYSFS_INTERVAL_S * 1000:g} ms in a thread"
            return PowerSource(name, detail, method, SYSFS_INTERVAL_S, _polled(read, SYSFS_INTERVAL_S))
    return None


def _hwmon(root: str | Path) -> PowerSource | None:
    channels = read_hwmon_power(root)
    if not channels:
        return None

    def read() -> float | None:
        now = read_hwmon_power(root)
        return None if now is None else board_power_mw({n: c.power_mw for n, c in now.items()})

    detail = "hwmon " + ", ".join(f"{c.chip} {label}" for label, c in channels.items())
    method = f"sysfs reads every {SYSFS_INTERVAL_S * 1000:g} ms in a thread"
    return PowerSource("hwmon", detail, method, SYSFS_INTERVAL_S, _polled(read, SYSFS_INTERVAL_S))


def _tegrastats(root: str | Path) -> PowerSource | None:
    executable = find_tegrastats(root)
    if executable is None:
        return None
    method = f"one `tegrastats --interval {TEGRASTATS_INTERVAL_MS}` process for the window, its lines parsed"
    return PowerSource(
        "tegrastats", f"{executable} rails (VDD_IN, or the sum of the rails)", method,
        TEGRASTATS_INTERVAL_MS / 1000.0, lambda: TegrastatsSampler(executable, interval_ms=TEGRASTATS_INTERVAL_MS),
    )


def _pmic(runner: Runner) -> PowerSource | None:
    vcgencmd = Vcgencmd(runner)
    reading = vcgencmd.pmic()
    if reading is None:
        return None
    detail = f"Pi 5 PMIC, {len(reading.rails)} rails (sum of V*A; excludes USB and HAT loads)"
    method = (
        f"`vcgencmd pmic_read_adc` spawned before the first timed step, after the last, and every "
        f"{SPAWN_INTERVAL_S:g} s between (a spawn per sample would disturb the steps)"
    )
    return PowerSource("pmic_adc", detail, method, SPAWN_INTERVAL_S, _polled(vcgencmd.power_mw, SPAWN_INTERVAL_S))


def find_power_source(root: str | Path = "/", *, runner: Runner | None = None) -> PowerSource | None:
    """Return the first available board power source in the chain, or None when the board has none."""
    return _ina3221(root) or _hwmon(root) or _tegrastats(root) or _pmic(runner or default_runner(root))
