"""How big a sender's frames should be: the goodput-optimal payload for the loss it observes.

A frame of `n` payload bytes costs `n + h` bytes on the wire (`h`: header, CRC, COBS, delimiter,
and a share of the acknowledgement it draws) and survives a line that damages each byte with
probability `p` with probability `(1 - p) ** (n + h)`. Goodput per wire byte is then

    g(n) = n / (n + h) * (1 - p) ** (n + h)

whose maximum is at `n* = (sqrt(h**2 + 4 h / a) - h) / 2` with `a = -ln(1 - p)`: about
`sqrt(h / p)`, so ~160 bytes at p = 1e-3, ~540 at 1e-4, the whole frame limit on a clean line.

The sender cannot see `p` directly, only which of its frames needed another copy. `FrameSizer`
keeps exponentially decayed counts of copies sent, copies lost and their wire bytes, turns the
loss share into a per-byte rate (`p = 1 - (1 - q) ** (1 / mean length)`, so it does not matter
what size the frames were when they were lost), and answers `n*`. A lost acknowledgement or a
slow peer also looks like loss; that errs towards smaller frames, which costs a little goodput
and never correctness. The prior is worth `PRIOR_FRAMES` frames whose optimum is the old fixed
size (1 KiB), so the first frames of a session behave as before and a few losses move it.
"""

from __future__ import annotations

import math

__all__ = ["DEFAULT_FRAME_PAYLOAD", "FRAME_COST", "FrameSizer", "MIN_FRAME_PAYLOAD", "optimal_payload"]

DEFAULT_FRAME_PAYLOAD = 1024
# Below this a frame is mostly overhead, and a 64 KiB message would need thousands of them.
MIN_FRAME_PAYLOAD = 64
# Header 9 + CRC 4 + COBS ~1 + delimiter 1, plus ~16 bytes for the ACK frame each one draws back.
FRAME_COST = 31
# Decay per recorded copy: the estimate follows a line whose noise changes within ~this many frames
# (at 1e-4 a 540-byte frame is lost 6% of the time: fewer frames leave the estimate to a handful of losses).
MEMORY_FRAMES = 256
PRIOR_FRAMES = 8
# A line that loses every frame still gets a finite rate (and so the smallest frames).
_MAX_LOSS_SHARE = 0.999


def optimal_payload(byte_error_rate: float, *, overhead: int = FRAME_COST, low: int = MIN_FRAME_PAYLOAD,
                    high: int = 1 << 16) -> int:
    """Return the payload size in [low, high] that maximises goodput at `byte_error_rate`."""
    if byte_error_rate <= 0.0:
        return high
    a = -math.log1p(-min(byte_error_rate, _MAX_LOSS_SHARE))
    best = (math.sqrt(overhead * overhead + 4.0 * overhead / a) - overhead) / 2.0
    return int(min(high, max(low, round(best))))


def _prior_loss_share(payload: int, overhead: int) -> float:
    # The loss share at which `payload` is the optimum: a = h / (n (n + h)), q = 1 - exp(-a (n + h)).
    return -math.expm1(-overhead / payload)


class FrameSizer:
    """Estimates the line's per-byte error rate from lost frame copies and answers the best frame payload."""

    def __init__(
        self,
        max_payload: int,
        *,
        initial: int = DEFAULT_FRAME_PAYLOAD,
        overhead: int = FRAME_COST,
        memory: int = MEMORY_FRAMES,
    ) -> None:
        if memory < 1:
            raise ValueError(f"memory must be >= 1 frame, got {memory}")
        self.max_payload = max_payload
        self.overhead = overhead
        self._keep = 1.0 - 1.0 / memory
        initial = min(initial, max_payload)
        self._copies = float(PRIOR_FRAMES)
        self._lost = PRIOR_FRAMES * _prior_loss_share(initial, overhead)
        self._bytes = PRIOR_FRAMES * float(initial + overhead)

    def record(self, wire_len: int, *, lost: bool) -> None:
        """Count one copy of a frame `wire_len` bytes long: lost (it had to be sent again) or acknowledged."""
        keep = self._keep
        self._copies = self._copies * keep + 1.0
        self._lost = self._lost * keep + (1.0 if lost else 0.0)
        self._bytes = self._bytes * keep + float(wire_len)

    @property
    def byte_error_rate(self) -> float:
        """Return the estimated probability that the line damages or loses any one byte."""
        share = min(self._lost / self._copies, _MAX_LOSS_SHARE)
        mean_len = self._bytes / self._copies
        return -math.expm1(math.log1p(-share) / mean_len)

    def payload_size(self) -> int:
        """Return the frame payload that maximises goodput at the estimated error rate."""
        return optimal_payload(self.byte_error_rate, overhead=self.overhead, high=self.max_payload)
