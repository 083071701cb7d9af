"""Binary frames: a fixed header, the payload and a CRC32, COBS-encoded and 0x00-terminated.

Wire layout before COBS (all integers little-endian)::

    offset  size  field
    0       1     protocol version (u8)
    1       1     message type (u8)
    2       1     flags (u8)
    3       2     sequence number (u16, wraps)
    5       4     payload length (u32)
    9       n     payload
    9+n     4     CRC32 (zlib.crc32) of bytes 0 .. 9+n-1

`FrameDecoder` turns an arbitrary, possibly damaged byte stream back into
frames: it never raises on bad input, it counts and skips it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import asdict, dataclass

from firmware_bridge.wire import cobs
from firmware_bridge.wire.errors import CobsDecodeError, FrameTooLarge

__all__ = [
    "CRC",
    "DELIMITER",
    "DecoderStats",
    "FLAG_MORE",
    "FLAG_RETRANSMIT",
    "Frame",
    "FrameDecoder",
    "HEADER",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "SEQ_MODULUS",
    "encode_frame",
    "max_frame_len",
    "seq_add",
    "seq_before",
]

# Version 2: messages longer than one frame travel as fragments (FLAG_MORE); version 1 peers would
# read each fragment as a message, so the handshake refuses them with a clear "update" line.
PROTOCOL_VERSION = 2
HEADER = struct.Struct("<BBBHI")
CRC = struct.Struct("<I")
DELIMITER = b"\x00"
# 64 KiB keeps a frame's worst-case buffer small enough for a board-side agent
# and a retransmission cheap, while a 1 MB model still needs only 16 frames.
MAX_PAYLOAD = 64 * 1024
SEQ_MODULUS = 1 << 16
_U8_MAX = 0xFF

# Set on every retransmitted copy of a frame; receivers only use it for statistics.
FLAG_RETRANSMIT = 0x01
# Set on every fragment of a message but its last: the message continues in the next sequence number.
FLAG_MORE = 0x02


def seq_add(seq: int, delta: int = 1) -> int:
    """Return `seq + delta` in the wrapping 16-bit sequence space."""
    return (seq + delta) % SEQ_MODULUS


def seq_before(a: int, b: int) -> bool:
    """Return True if `a` comes strictly before `b`, judging across the wrap (RFC 1982 style)."""
    return 0 < (b - a) % SEQ_MODULUS < SEQ_MODULUS // 2


def max_frame_len(max_payload: int = MAX_PAYLOAD) -> int:
    """Return the most bytes one encoded frame can take on the wire, delimiter included."""
    return cobs.max_encoded_len(HEADER.size + max_payload + CRC.size) + len(DELIMITER)


@dataclass(frozen=True)
class Frame:
    """One decoded frame; `msg_type` is a raw byte, the catalogue lives in messages.py."""

    msg_type: int
    seq: int
    payload: bytes = b""
    flags: int = 0
    version: int = PROTOCOL_VERSION


def _check_range(name: str, value: int, upper: int) -> None:
    if not 0 <= value <= upper:
        raise ValueError(f"{name} must be in 0..{upper}, got {value}")


def encode_frame(
    msg_type: int,
    seq: int,
    payload: bytes = b"",
    *,
    flags: int = 0,
    version: int = PROTOCOL_VERSION,
    max_payload: int = MAX_PAYLOAD,
) -> bytes:
    """Return the wire bytes of one frame: COBS(header + payload + CRC32) + 0x00."""
    _check_range("msg_type", msg_type, _U8_MAX)
    _check_range("flags", flags, _U8_MAX)
    _check_range("version", version, _U8_MAX)
    _check_range("seq", seq, SEQ_MODULUS - 1)
    if len(payload) > max_payload:
        raise FrameTooLarge(f"payload of {len(payload)} bytes exceeds the {max_payload}-byte frame limit")
    body = HEADER.pack(version, msg_type, flags, seq, len(payload)) + bytes(payload)
    return cobs.encode(body + CRC.pack(zlib.crc32(body))) + DELIMITER


@dataclass
class DecoderStats:
    """What the decoder has seen; every rejected packet lands in exactly one error counter."""

    frames_ok: int = 0
    crc_errors: int = 0
    oversize: int = 0
    malformed: int = 0
    truncated: int = 0
    bytes_discarded: int = 0

    @property
    def errors(self) -> int:
        """Return the number of rejected packets of any kind."""
        return self.crc_errors + self.oversize + self.malformed + self.truncated

    def as_dict(self) -> dict[str, int]:
        """Return the counters as a plain dict (for logs and telemetry)."""
        return asdict(self)


class FrameDecoder:
    """Streaming decoder: feed it chunks of any size, get back the valid frames they complete."""

    def __init__(self, *, max_payload: int = MAX_PAYLOAD) -> None:
        if not 0 <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in 0..{MAX_PAYLOAD}, got {max_payload}")
        self.max_payload = max_payload
        self.stats = DecoderStats()
        self._max_packet = max_frame_len(max_payload) - len(DELIMITER)
        self._pending = bytearray()
        # After an oversized run we drop everything up to the next delimiter,
        # rather than buffering an unbounded amount of line noise.
        self._skipping = False

    def reset(self) -> None:
        """Forget any partial frame (counters are kept)."""
        self._pending.clear()
        self._skipping = False

    def feed(self, data: bytes) -> list[Frame]:
        """Consume `data` and return the frames it completed, in order; bad input is counted, never raised."""
        data = bytes(data)
        frames: list[Frame] = []
        start = 0
        while True:
            end = data.find(0, start)
            if end < 0:
                self._buffer(data[start:])
                return frames
            piece = data[start:end]
            start = end + 1
            if self._skipping:
                self.stats.bytes_discarded += len(piece)
                self._skipping = False
                continue
            if self._pending:
                piece = bytes(self._pending) + piece
                self._pending.clear()
            if piece:  # back-to-back delimiters are idle fill, not an error
                frame = self._parse(piece)
                if frame is not None:
                    frames.append(frame)

    def _buffer(self, tail: bytes) -> None:
        if self._skipping:
            self.stats.bytes_discarded += len(tail)
            return
        self._pending += tail
        if len(self._pending) > self._max_packet:
            self.stats.oversize += 1
            self.stats.bytes_discarded += len(self._pending)
            self._pending.clear()
            self._skipping = True

    def _reject(self, counter: str, packet: bytes) -> None:
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self.stats.bytes_discarded += len(packet)

    def _parse(self, packet: bytes) -> Frame | None:
        if len(packet) > self._max_packet:
            self._reject("oversize", packet)
            return None
        try:
            raw = cobs.decode(packet)
        except CobsDecodeError:
            self._reject("malformed", packet)
            return None
        if len(raw) < HEADER.size + CRC.size:
            self._reject("truncated", packet)
            return None
        version, msg_type, flags, seq, length = HEADER.unpack_from(raw)
        body_len = len(raw) - HEADER.size - CRC.size
        (crc,) = CRC.unpack_from(raw, len(raw) - CRC.size)
        if crc != zlib.crc32(memoryview(raw)[: -CRC.size]):
            # Lost bytes also break the CRC; calling them truncation when the
            # header promised more makes the counters easier to read.
            self._reject("truncated" if length > body_len else "crc_errors", packet)
            return None
        if body_len > self.max_payload:
            self._reject("oversize", packet)
            return None
        if length != body_len:
            self._reject("malformed", packet)
            return None
        self.stats.frames_ok += 1
        return Frame(msg_type, seq, raw[HEADER.size : HEADER.size + length], flags, version)
