"""Stop signals: SIGINT (Ctrl-C), SIGTERM (systemd, docker, a scheduler) and SIGHUP (a closed terminal) all
mean "stop": a training run saves a checkpoint between steps and exits 130; any other command stops at once
with one line and exits 130.

A signal the process inherited as ignored (SIGHUP under nohup, SIGTERM set to SIG_IGN) stays ignored: the
one who started us asked for that.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def signal_name(signum: int) -> str:
    """'SIGTERM' for signal.SIGTERM."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal_name(signum))


@contextlib.contextmanager
def _handlers(handler: Any, signums: tuple[int, ...]) -> Iterator[None]:
    """Install handler for signums (main thread only; inherited SIG_IGN kept, except SIGINT, which Python
    itself handles); put the previous handlers back after."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signums:
            old = signal.getsignal(signum)
            if old == signal.SIG_IGN and signum != signal.SIGINT:
                continue
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def interrupt_on_stop_signals() -> Iterator[None]:
    """While inside: SIGTERM and SIGHUP raise KeyboardInterrupt, as SIGINT does (the CLI's commands)."""
    with _handlers(_interrupt, tuple(s for s in STOP_SIGNALS if s != signal.SIGINT)):
        yield


class StopFlag:
    """Turns the first stop signal into a request to stop between steps; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None  # the name of the signal that asked
        self._context: Any = None

    def __enter__(self) -> StopFlag:
        self._context = _handlers(self._handle, STOP_SIGNALS)
        self._context.__enter__()
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:  # a second signal should not wait for the checkpoint to be written
            raise KeyboardInterrupt(signal_name(signum))
        self.requested = signal_name(signum)

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)
