"""Opening byte streams: real serial ports and pyserial URLs, plus pseudo-terminals for tests."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import termios
import time
import tty
from dataclasses import dataclass
from typing import Any

import serial

__all__ = ["BITS_PER_BYTE", "DEFAULT_BAUD", "FdPort", "PtyPair", "open_port", "open_pty"]

# 921600 is the fastest rate the Pi's PL011 and the Jetson's UARTs both run reliably.
DEFAULT_BAUD = 921600
# 8N1 framing: start bit, eight data bits, stop bit.
BITS_PER_BYTE = 10


def open_port(url_or_path: str, baud: int = DEFAULT_BAUD, **kwargs: Any) -> serial.SerialBase:
    """Open a device path (/dev/ttyUSB0) or pyserial URL (loop://, socket://...) at `baud`."""
    return serial.serial_for_url(url_or_path, baudrate=baud, **kwargs)


@dataclass
class PtyPair:
    """A pseudo-terminal in raw mode: open `slave_path` like a device, drive `master_fd` directly."""

    master_fd: int
    slave_fd: int
    slave_path: str

    def close(self) -> None:
        """Close both ends (idempotent)."""
        for name in ("master_fd", "slave_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> PtyPair:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_pty() -> PtyPair:
    """Create a raw-mode pseudo-terminal pair and return it with the slave's device path."""
    master_fd, slave_fd = os.openpty()
    # Raw mode: no echo, no CR/LF translation, no ^C or XON/XOFF handling,
    # so the binary protocol passes through byte for byte.
    tty.setraw(slave_fd)
    # The slave end stays open so the master never reads EIO between the
    # moment the path is handed out and the moment someone opens it.
    return PtyPair(master_fd, slave_fd, os.ttyname(slave_fd))


class FdPort:
    """The part of pyserial's interface the Link uses, over a raw file descriptor such as a pty master."""

    baudrate: int | None = None  # no real line: nothing to budget transmit time against

    def __init__(self, fd: int, *, timeout: float | None = None, close_fd: bool = False) -> None:
        self.fd = fd
        self.timeout = timeout
        self._close_fd = close_fd

    @property
    def in_waiting(self) -> int:
        """Return how many bytes can be read without blocking."""
        raw = fcntl.ioctl(self.fd, termios.FIONREAD, struct.pack("i", 0))
        return struct.unpack("i", raw)[0]

    def fileno(self) -> int:
        """Return the underlying file descriptor."""
        return self.fd

    def read(self, size: int = 1) -> bytes:
        """Read up to `size` bytes, waiting at most `timeout` seconds for all of them (pyserial semantics)."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        data = bytearray()
        while len(data) < size:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                break
            try:
                chunk = os.read(self.fd, size - len(data))
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                # A pty master reads EIO while no slave is open: behave like a silent line.
                if remaining:
                    time.sleep(remaining)
                break
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def write(self, data: bytes) -> int:
        """Write all of `data`, blocking while the other side is not reading."""
        view = memoryview(bytes(data))
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [])
                continue
            view = view[written:]
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered in user space; present for pyserial compatibility."""

    def close(self) -> None:
        """Close the descriptor if this port owns it."""
        if self._close_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
