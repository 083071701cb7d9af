"""Energy from power samples, and a background sampler to collect them around a training step."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

__all__ = ["PowerSampler", "integrate_energy_j"]

MW_PER_W = 1000.0
DEFAULT_INTERVAL_S = 0.1

Sample = tuple[float, float]
"""(monotonic time in s, power in mW)."""


def integrate_energy_j(samples: Iterable[Sample]) -> float:
    """Return the energy in joules under (time s, power mW) samples, by the trapezoidal rule."""
    energy_mj = 0.0
    previous: Sample | None = None
    for t, p in samples:
        if previous is not None:
            t0, p0 = previous
            if t < t0:
                raise ValueError(f"sample times must not go backwards ({t} after {t0})")
            energy_mj += (p0 + p) / 2.0 * (t - t0)
        previous = (t, p)
    return energy_mj / MW_PER_W


def window_energy_j(samples: list[Sample]) -> float | None:
    """Return the energy of a sampling window; None without two samples."""
    return integrate_energy_j(samples) if len(samples) >= 2 else None


def window_mean_power_mw(samples: list[Sample]) -> float | None:
    """Return the time-weighted mean power of a window; None until two samples span some time."""
    if len(samples) < 2 or samples[-1][0] == samples[0][0]:
        return None
    return integrate_energy_j(samples) * MW_PER_W / (samples[-1][0] - samples[0][0])


class PowerSampler:
    """Polls a power reader (mW, or None when it has no reading) in a thread between start() and stop()."""

    def __init__(
        self,
        read_power_mw: Callable[[], float | None],
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self._read = read_power_mw
        self.interval_s = interval_s
        self._clock = clock
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def samples(self) -> list[Sample]:
        """Return a copy of the samples taken so far."""
        with self._lock:
            return list(self._samples)

    @property
    def energy_j(self) -> float | None:
        """Return the energy of the samples so far; None until there are two."""
        return window_energy_j(self.samples)

    @property
    def mean_power_mw(self) -> float | None:
        """Return the time-weighted mean power; None until two samples span some time."""
        return window_mean_power_mw(self.samples)

    def start(self) -> PowerSampler:
        """Take a first sample now and keep sampling every `interval_s` in a thread."""
        if self._thread is not None:
            raise RuntimeError("sampler already running")
        with self._lock:
            self._samples.clear()
        self._stop.clear()
        self._error = None
        self._sample()
        self._thread = threading.Thread(target=self._run, name="power-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> float | None:
        """Take a last sample, stop the thread and return the energy in joules (None if unmeasured)."""
        if self._thread is None:
            raise RuntimeError("sampler is not running")
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise RuntimeError("power reader failed") from self._error
        # Close the window at the moment of stop(), so the step's tail is counted.
        self._sample()
        return self.energy_j

    def __enter__(self) -> PowerSampler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is not None:
            self.stop()

    def _sample(self) -> None:
        power = self._read()
        if power is not None:
            now = self._clock()
            with self._lock:
                self._samples.append((now, float(power)))

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self._sample()
        except BaseException as exc:  # handed to stop(), not lost in the thread
            self._error = exc
