"""Consistent Overhead Byte Stuffing (COBS) with 0x00 as the frame delimiter.

COBS rewrites a packet so that it contains no zero byte, at a cost of at most
one byte per 254, which lets a receiver that lost sync find the next frame
boundary simply by looking for the next 0x00.
"""

from __future__ import annotations

from firmware_bridge.wire.errors import CobsDecodeError

__all__ = ["CobsDecodeError", "decode", "encode", "max_encoded_len"]

# A code byte can vouch for at most 254 following non-zero bytes (0xFF = 254 bytes, no implied zero).
_MAX_RUN = 254
_FULL_BLOCK = 0xFF


def max_encoded_len(size: int) -> int:
    """Return the largest COBS encoding of `size` input bytes (without the delimiter)."""
    return size + size // _MAX_RUN + 1


def encode(data: bytes) -> bytes:
    """Encode `data` so that the result contains no 0x00 byte (delimiter not appended)."""
    out = bytearray()
    # Splitting on zeros lets the C-level split do the scanning; each segment
    # stands for "these bytes, then a zero", except the last one.
    segments = bytes(data).split(b"\x00")
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        start = 0
        while len(segment) - start >= _MAX_RUN:
            out.append(_FULL_BLOCK)
            out += segment[start : start + _MAX_RUN]
            start += _MAX_RUN
        if index == last and start == len(segment) and start > 0:
            # The data ended exactly on a full block: no zero follows, so no empty block is needed.
            break
        rest = segment[start:]
        out.append(len(rest) + 1)
        out += rest
    return bytes(out)


def decode(encoded: bytes) -> bytes:
    """Decode one COBS packet (without its delimiter); raise CobsDecodeError if it is malformed."""
    encoded = bytes(encoded)
    if not encoded:
        raise CobsDecodeError("empty input: a COBS encoding is at least one code byte")
    zero_at = encoded.find(0)
    if zero_at >= 0:
        raise CobsDecodeError(f"zero byte at offset {zero_at}: COBS data never contains the delimiter")
    out = bytearray()
    pos, size = 0, len(encoded)
    while pos < size:
        code = encoded[pos]
        end = pos + code
        if end > size:
            raise CobsDecodeError(
                f"truncated: code byte at offset {pos} announces {code - 1} data bytes, only {size - pos - 1} remain"
            )
        out += encoded[pos + 1 : end]
        pos = end
        if code != _FULL_BLOCK and pos < size:
            out.append(0)
    return bytes(out)
