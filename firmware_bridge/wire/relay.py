"""A byte relay that behaves like a noisy serial line: drops, corrupts, duplicates, injects noise and paces bytes.

Faults are drawn from seeded RNGs as gaps between events counted in bytes of
the stream, so a given seed damages the same stream positions however the
bytes happen to be chunked by the OS.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import random
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from firmware_bridge.wire.transport import BITS_PER_BYTE

__all__ = ["ByteMangler", "Relay", "RelayStats"]

# A paced direction wakes once per quantum of line time rather than per byte,
# and may bank up to two quanta so that a thread woken late loses no line time.
PACING_QUANTUM_S = 0.002
_BANKED_QUANTA = 2
# Stop reading a source while this much is queued for a slow line, so the
# writer feels back-pressure the way it would from a UART driver's buffer.
MAX_PENDING = 64 * 1024
_READ_SIZE = 64 * 1024
# Stream position of an event that never comes (a zero rate): beyond any stream.
_NEVER = 1 << 62
T = TypeVar("T")


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


Endpoint = int | _HasFileno


class ByteMangler:
    """Deterministically drops, corrupts, duplicates bytes of one stream and injects noise bursts into it.

    Each fault is a Bernoulli process per byte of the incoming stream with its own seeded RNG, so
    adding one kind of fault leaves where the others strike unchanged. A noise burst inserts
    1..`max_burst` random bytes before a byte (line noise while nobody is sending, a glitching
    level shifter); a duplicate repeats a byte (a UART FIFO re-read).
    """

    def __init__(
        self,
        *,
        drop_rate: float = 0.0,
        corrupt_rate: float = 0.0,
        duplicate_rate: float = 0.0,
        burst_rate: float = 0.0,
        max_burst: int = 32,
        seed: int | str = 0,
    ) -> None:
        rates = (("drop_rate", drop_rate), ("corrupt_rate", corrupt_rate), ("duplicate_rate", duplicate_rate),
                 ("burst_rate", burst_rate))
        for name, rate in rates:
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        if max_burst < 1:
            raise ValueError(f"max_burst must be >= 1, got {max_burst}")
        self.drop_rate = drop_rate
        self.corrupt_rate = corrupt_rate
        self.duplicate_rate = duplicate_rate
        self.burst_rate = burst_rate
        self.max_burst = max_burst
        self.dropped = 0
        self.corrupted = 0
        self.duplicated = 0
        self.burst_bytes = 0
        self._drop_rng = random.Random(f"{seed}/drop")
        self._corrupt_rng = random.Random(f"{seed}/corrupt")
        self._duplicate_rng = random.Random(f"{seed}/duplicate")
        self._burst_rng = random.Random(f"{seed}/burst")
        self._position = 0
        self._next_drop = self._gap(self._drop_rng, drop_rate)
        self._next_corrupt = self._gap(self._corrupt_rng, corrupt_rate)
        self._next_duplicate = self._gap(self._duplicate_rng, duplicate_rate)
        self._next_burst = self._gap(self._burst_rng, burst_rate)

    @staticmethod
    def _gap(rng: random.Random, rate: float) -> int:
        # Bytes until the next event of a Bernoulli(rate) process: geometric, drawn in one step.
        if rate == 0.0:
            return _NEVER
        return math.floor(math.log1p(-rng.random()) / math.log1p(-rate))

    def _events(
        self, which: str, rng: random.Random, rate: float, end: int, draw: Callable[[], T] | None = None
    ) -> dict[int, T | None]:
        """Return {position: draw()} for the positions below `end` where this process strikes."""
        # Each event's own draws come right after its gap, from the same RNG, so the sequence of
        # draws (and so the faults) is the same however the stream is cut into reads.
        attr = f"_next_{which}"
        events: dict[int, T | None] = {}
        position = getattr(self, attr)
        while position < end:
            events[position] = None if draw is None else draw()
            position += 1 + self._gap(rng, rate)
        setattr(self, attr, position)
        return events

    def process(self, data: bytes) -> bytes:
        """Return `data` with this stream's faults applied."""
        start, end = self._position, self._position + len(data)
        self._position = end
        out = bytearray(data)
        # XOR with a non-zero mask so a "corrupted" byte always differs.
        masks = self._events("corrupt", self._corrupt_rng, self.corrupt_rate, end,
                             lambda: self._corrupt_rng.randrange(1, 256))
        for position, mask in masks.items():
            out[position - start] ^= mask
        self.corrupted += len(masks)
        drops = set(self._events("drop", self._drop_rng, self.drop_rate, end))
        duplicates = set(self._events("duplicate", self._duplicate_rng, self.duplicate_rate, end))
        bursts = self._events("burst", self._burst_rng, self.burst_rate, end,
                              lambda: self._burst_rng.randbytes(self._burst_rng.randint(1, self.max_burst)))
        if not (drops or duplicates or bursts):
            return bytes(out)
        self.dropped += len(drops)
        self.duplicated += len(duplicates - drops)
        self.burst_bytes += sum(map(len, bursts.values()))
        kept = bytearray()
        previous = 0
        for position in sorted(drops | duplicates | set(bursts)):
            index = position - start
            kept += out[previous:index]
            kept += bursts.get(position) or b""
            if position not in drops:
                kept.append(out[index])
                if position in duplicates:
                    kept.append(out[index])
            previous = index + 1
        kept += out[previous:]
        return bytes(kept)


@dataclass
class RelayStats:
    """Byte counts of one direction of the relay."""

    bytes_in: int = 0
    bytes_out: int = 0
    dropped: int = 0
    corrupted: int = 0
    duplicated: int = 0
    burst_bytes: int = 0


@dataclass
class _Direction:
    src: int
    dst: int
    mangler: ByteMangler
    stats: RelayStats
    bytes_per_s: float | None
    quantum: float
    credit: float = 0.0
    refilled_at: float = 0.0
    pending: bytearray = field(default_factory=bytearray)
    src_open: bool = True

    def refill(self, now: float) -> None:
        if self.bytes_per_s is None:
            self.credit = math.inf
            return
        # An idle line does not bank time beyond a couple of quanta.
        cap = self.quantum * _BANKED_QUANTA
        self.credit = min(cap, self.credit + (now - self.refilled_at) * self.bytes_per_s)
        self.refilled_at = now

    def wait_for_credit(self) -> float | None:
        if not self.pending or self.bytes_per_s is None or self.credit >= 1:
            return None
        target = min(len(self.pending), self.quantum)
        return (target - self.credit) / self.bytes_per_s


def _fd(endpoint: Endpoint) -> int:
    return endpoint if isinstance(endpoint, int) else endpoint.fileno()


class Relay:
    """Copies bytes both ways between two file descriptors (or objects with fileno()) in a thread."""

    def __init__(
        self,
        a: Endpoint,
        b: Endpoint,
        *,
        drop_rate: float = 0.0,
        corrupt_rate: float = 0.0,
        duplicate_rate: float = 0.0,
        burst_rate: float = 0.0,
        baud: int | None = None,
        seed: int = 0,
        bits_per_byte: int = BITS_PER_BYTE,
    ) -> None:
        if baud is not None and baud <= 0:
            raise ValueError(f"baud must be positive, got {baud}")
        self.baud = baud
        fd_a, fd_b = _fd(a), _fd(b)
        bytes_per_s = None if baud is None else baud / bits_per_byte
        quantum = 1.0 if bytes_per_s is None else max(1.0, bytes_per_s * PACING_QUANTUM_S)

        def direction(src: int, dst: int, name: str) -> _Direction:
            mangler = ByteMangler(drop_rate=drop_rate, corrupt_rate=corrupt_rate, duplicate_rate=duplicate_rate,
                                  burst_rate=burst_rate, seed=f"{seed}/{name}")
            return _Direction(src, dst, mangler, RelayStats(), bytes_per_s, quantum)

        self._forward = direction(fd_a, fd_b, "a->b")
        self._backward = direction(fd_b, fd_a, "b->a")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._saved_blocking: dict[int, bool] = {}
        self.error: BaseException | None = None

    @property
    def stats(self) -> dict[str, RelayStats]:
        """Return per-direction statistics, keyed "a->b" and "b->a"."""
        for d in (self._forward, self._backward):
            m = d.mangler
            d.stats.dropped, d.stats.corrupted = m.dropped, m.corrupted
            d.stats.duplicated, d.stats.burst_bytes = m.duplicated, m.burst_bytes
        return {"a->b": self._forward.stats, "b->a": self._backward.stats}

    def start(self) -> Relay:
        """Start relaying in a background thread."""
        if self._thread is not None:
            raise RuntimeError("relay already started")
        for fd in {self._forward.src, self._backward.src}:
            self._saved_blocking[fd] = os.get_blocking(fd)
            os.set_blocking(fd, False)
        self._wake_r, self._wake_w = os.pipe()
        now = time.monotonic()
        for d in (self._forward, self._backward):
            d.refilled_at = now
        self._thread = threading.Thread(target=self._run, name="firmware-bridge-relay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and restore the descriptors' blocking mode; queued bytes are discarded."""
        if self._thread is None:
            return
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join()
        self._thread = None
        os.close(self._wake_r)
        os.close(self._wake_w)
        for fd, blocking in self._saved_blocking.items():
            with contextlib.suppress(OSError):  # already closed by its owner
                os.set_blocking(fd, blocking)
        if self.error is not None:
            raise RuntimeError("relay thread failed") from self.error

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        directions = (self._forward, self._backward)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for d in directions:
                    d.refill(now)
                readable = [self._wake_r] + [d.src for d in directions if d.src_open and len(d.pending) < MAX_PENDING]
                writable = [d.dst for d in directions if d.pending and d.credit >= 1]
                waits = [w for w in (d.wait_for_credit() for d in directions) if w is not None]
                # Writable destinations wake select themselves; only a line short of credit needs a timer.
                timeout = min(waits) if waits else None
                ready_r, ready_w, _ = select.select(readable, writable, [], timeout)
                if self._wake_r in ready_r:
                    return
                for d in directions:
                    if d.src in ready_r:
                        self._pull(d)
                for d in directions:
                    if d.dst in ready_w and d.pending and d.credit >= 1:
                        self._push(d)
        except BaseException as exc:  # surfaced by stop(), not lost in a thread
            self.error = exc

    @staticmethod
    def _pull(d: _Direction) -> None:
        try:
            data = os.read(d.src, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            # EOF or a pty whose slave closed: nothing more will come this way.
            d.src_open = False
            return
        d.stats.bytes_in += len(data)
        d.pending += d.mangler.process(data)

    @staticmethod
    def _push(d: _Direction) -> None:
        count = min(len(d.pending), int(d.credit)) if d.bytes_per_s is not None else len(d.pending)
        try:
            written = os.write(d.dst, d.pending[:count])
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            d.pending.clear()  # the far end is gone: the line swallows the bytes
            return
        del d.pending[:written]
        d.stats.bytes_out += written
        if d.bytes_per_s is not None:
            d.credit -= written
