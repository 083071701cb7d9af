"""COBS and frame layer: round trips, and a decoder that survives garbage, corruption and truncation."""

from __future__ import annotations

import contextlib
import random
import struct
import zlib

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from firmware_bridge.wire import cobs
from firmware_bridge.wire.errors import CobsDecodeError, FrameTooLarge
from firmware_bridge.wire.frame import (
    CRC,
    FLAG_RETRANSMIT,
    HEADER,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    encode_frame,
    max_frame_len,
    seq_add,
    seq_before,
)

# ------------------------------------------------------------------- COBS


def _run(start: int, stop: int) -> bytes:
    return bytes(range(start, stop))


# Reference vectors from the COBS paper / Wikipedia, including every 254/255 boundary.
COBS_VECTORS = [
    (b"", b"\x01"),
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (_run(0x01, 0xFF), b"\xff" + _run(0x01, 0xFF)),
    (_run(0x00, 0xFF), b"\x01\xff" + _run(0x01, 0xFF)),
    (_run(0x01, 0x100), b"\xff" + _run(0x01, 0xFF) + b"\x02\xff"),
    (_run(0x02, 0x100) + b"\x00", b"\xff" + _run(0x02, 0x100) + b"\x01\x01"),
    (_run(0x03, 0x100) + b"\x00\x01", b"\xfe" + _run(0x03, 0x100) + b"\x02\x01"),
]


@pytest.mark.parametrize(("raw", "encoded"), COBS_VECTORS)
def test_cobs_matches_reference_vectors(raw: bytes, encoded: bytes) -> None:
    assert cobs.encode(raw) == encoded
    assert cobs.decode(encoded) == raw


@given(st.binary(max_size=3000))
@example(b"\x01" * 254)
@example(b"\x01" * 254 + b"\x00")
@example(b"\x01" * 508)
@example(b"\x00" * 300)
def test_cobs_round_trips_any_bytes(data: bytes) -> None:
    assert cobs.decode(cobs.encode(data)) == data


@given(st.binary(max_size=3000))
def test_cobs_output_never_contains_the_delimiter_and_respects_the_bound(data: bytes) -> None:
    encoded = cobs.encode(data)
    assert 0 not in encoded
    assert len(encoded) <= cobs.max_encoded_len(len(data))


@given(st.binary(max_size=600))
def test_cobs_decode_of_arbitrary_input_either_works_or_raises_cobs_error(data: bytes) -> None:
    with contextlib.suppress(CobsDecodeError):
        cobs.decode(data)


@pytest.mark.parametrize(
    ("bad", "why"),
    [(b"", "empty"), (b"\x05\x11\x22", "truncated"), (b"\x03\x11\x00\x22", "zero byte at offset 2")],
)
def test_cobs_decode_reports_what_is_wrong(bad: bytes, why: str) -> None:
    with pytest.raises(CobsDecodeError, match=why):
        cobs.decode(bad)


def test_cobs_decode_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        cobs.decode(b"")


# ------------------------------------------------------------------ frames

frame_fields = st.fixed_dictionaries(
    {
        "msg_type": st.integers(0, 0xFF),
        "seq": st.integers(0, 0xFFFF),
        "flags": st.integers(0, 0xFF),
        "version": st.integers(0, 0xFF),
    }
)


def _encode(frame: Frame, max_payload: int = MAX_PAYLOAD) -> bytes:
    return encode_frame(
        frame.msg_type, frame.seq, frame.payload, flags=frame.flags, version=frame.version, max_payload=max_payload
    )


@given(frame_fields, st.binary(max_size=4096))
def test_frame_round_trip(fields: dict[str, int], payload: bytes) -> None:
    frame = Frame(payload=payload, **fields)
    wire = _encode(frame)
    assert wire.endswith(b"\x00") and wire.count(0) == 1
    decoder = FrameDecoder()
    assert decoder.feed(wire) == [frame]
    assert decoder.stats.frames_ok == 1 and decoder.stats.errors == 0


@settings(max_examples=15, deadline=None)
@given(size=st.integers(0, MAX_PAYLOAD), seed=st.integers(0, 2**32 - 1))
@example(size=MAX_PAYLOAD, seed=0)
def test_frame_round_trip_up_to_the_maximum_payload(size: int, seed: int) -> None:
    payload = random.Random(seed).randbytes(size)
    frame = Frame(msg_type=0x12, seq=seed & 0xFFFF, payload=payload)
    wire = _encode(frame)
    assert len(wire) <= max_frame_len()
    assert FrameDecoder().feed(wire) == [frame]


@given(
    st.lists(st.tuples(frame_fields, st.binary(max_size=300)), min_size=1, max_size=10),
    st.lists(st.integers(1, 50), min_size=1, max_size=40),
)
def test_decoder_output_does_not_depend_on_how_the_stream_is_chunked(
    specs: list[tuple[dict[str, int], bytes]], cuts: list[int]
) -> None:
    frames = [Frame(payload=payload, **fields) for fields, payload in specs]
    stream = b"".join(_encode(f) for f in frames)
    decoder, out, pos = FrameDecoder(), [], 0
    for size in cuts * (len(stream) // max(1, sum(cuts)) + 1):
        out += decoder.feed(stream[pos : pos + size])
        pos += size
        if pos >= len(stream):
            break
    out += decoder.feed(stream[pos:])
    assert out == frames


TEST_MAX_PAYLOAD = 256  # small, so runs of garbage regularly trip the oversize path


# Line noise: short bursts (often with zeros), and long zero-free runs that overflow the decoder.
garbage = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.binary(min_size=TEST_MAX_PAYLOAD + 20, max_size=3 * TEST_MAX_PAYLOAD).map(lambda b: bytes(x or 0x55 for x in b)),
    st.binary(min_size=TEST_MAX_PAYLOAD + 20, max_size=3 * TEST_MAX_PAYLOAD).map(
        lambda b: bytes(x or 0x55 for x in b) + b"\x00"
    ),
)


@st.composite
def noisy_streams(draw: st.DrawFn) -> tuple[list[Frame], bytes, list[int]]:
    """Frames interleaved with garbage, then corrupted and shortened at random positions.

    Returns the frames sent, the damaged stream, and the indices of frames that
    damage cannot have touched: intact themselves and preceded by an intact 0x00
    (or the start of the stream), which is exactly what a receiver needs to find them.
    """
    frames: list[Frame] = []
    stream = bytearray()
    spans: list[tuple[int, int]] = []
    for _ in range(draw(st.integers(1, 12))):
        if draw(st.booleans()):
            stream += draw(garbage)
        fields = draw(frame_fields)
        frame = Frame(payload=draw(st.binary(max_size=TEST_MAX_PAYLOAD)), **fields)
        wire = _encode(frame, TEST_MAX_PAYLOAD)
        spans.append((len(stream), len(stream) + len(wire)))
        frames.append(frame)
        stream += wire
    original = bytes(stream)
    positions = st.integers(0, len(stream) - 1)
    touched: set[int] = set()
    for pos, mask in draw(st.lists(st.tuples(positions, st.integers(1, 0xFF)), max_size=6)):
        stream[pos] ^= mask
        touched.add(pos)
    deleted = draw(st.lists(positions, max_size=3, unique=True))
    for pos in sorted(deleted, reverse=True):
        del stream[pos]
    touched.update(deleted)
    clean = [
        i
        for i, (start, end) in enumerate(spans)
        if not touched.intersection(range(start - 1, end)) and (start == 0 or original[start - 1] == 0)
    ]
    return frames, bytes(stream), clean


def _is_subsequence(items: list[Frame], of: list[Frame]) -> bool:
    it = iter(of)
    return all(any(item == candidate for candidate in it) for item in items)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(noisy_streams(), st.integers(1, 97))
def test_decoder_never_accepts_a_damaged_frame_and_recovers_every_clean_one(
    case: tuple[list[Frame], bytes, list[int]], chunk: int
) -> None:
    frames, stream, clean = case
    decoder = FrameDecoder(max_payload=TEST_MAX_PAYLOAD)
    received: list[Frame] = []
    for pos in range(0, len(stream), chunk):
        received += decoder.feed(stream[pos : pos + chunk])
    received += decoder.feed(b"\x00")  # flush a last frame whose delimiter was damaged
    # No false accepts: everything yielded was sent, in the order it was sent.
    assert _is_subsequence(received, frames)
    # No false rejects: every frame damage could not reach came through.
    assert _is_subsequence([frames[i] for i in clean], received)
    assert decoder.stats.frames_ok == len(received)


@given(st.binary(max_size=5000))
def test_decoder_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    decoder = FrameDecoder(max_payload=TEST_MAX_PAYLOAD)
    assert decoder.feed(data) == []
    assert decoder.stats.frames_ok == 0


def test_encode_rejects_oversized_payloads() -> None:
    with pytest.raises(FrameTooLarge, match="65537 bytes exceeds the 65536-byte"):
        encode_frame(0x12, 0, bytes(MAX_PAYLOAD + 1))
    with pytest.raises(FrameTooLarge):
        encode_frame(0x12, 0, bytes(101), max_payload=100)
    encode_frame(0x12, 0, bytes(MAX_PAYLOAD))  # the limit itself is fine


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [("seq", {"seq": 0x10000}), ("seq", {"seq": -1}), ("msg_type", {"msg_type": 256}), ("flags", {"flags": 256})],
)
def test_encode_rejects_out_of_range_header_fields(field: str, kwargs: dict[str, int]) -> None:
    args = {"msg_type": 1, "seq": 0} | kwargs
    with pytest.raises(ValueError, match=field):
        encode_frame(args.pop("msg_type"), args.pop("seq"), b"", **args)


def test_decoder_drops_an_oversized_frame_and_keeps_the_next() -> None:
    decoder = FrameDecoder(max_payload=1024)
    big = encode_frame(0x12, 1, bytes(2000))
    small = encode_frame(0x12, 2, b"ok")
    assert decoder.feed(big + small) == [Frame(0x12, 2, b"ok")]
    assert decoder.stats.oversize == 1 and decoder.stats.bytes_discarded == len(big) - 1


def test_decoder_bounds_memory_on_an_endless_run_without_delimiters() -> None:
    decoder = FrameDecoder(max_payload=1024)
    noise = bytes(random.Random(3).randrange(1, 256) for _ in range(50_000))
    for pos in range(0, len(noise), 1000):
        assert decoder.feed(noise[pos : pos + 1000]) == []
    frame = encode_frame(0x21, 7, b"after the noise")
    assert decoder.feed(b"\x00" + frame) == [Frame(0x21, 7, b"after the noise")]
    assert decoder.stats.oversize == 1
    assert decoder.stats.bytes_discarded == len(noise)


def _raw_frame(length_field: int, payload: bytes) -> bytes:
    body = HEADER.pack(PROTOCOL_VERSION, 0x12, 0, 5, length_field) + payload
    return cobs.encode(body + CRC.pack(zlib.crc32(body))) + b"\x00"


def test_decoder_drops_truncated_frames() -> None:
    decoder = FrameDecoder()
    good = encode_frame(0x21, 3, b"x" * 40)
    short_packet = cobs.encode(b"\x01\x02\x03") + b"\x00"  # shorter than header + CRC
    lost_tail = good[:20] + b"\x00"  # delimiter arrived, the rest of the frame did not
    frames = decoder.feed(short_packet + lost_tail + good)
    assert frames == [Frame(0x21, 3, b"x" * 40)]
    assert decoder.stats.truncated >= 1
    assert decoder.stats.errors == 2


def test_decoder_classifies_header_length_disagreements() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(_raw_frame(10, b"abc")) == []  # promised 10 bytes, CRC covers 3
    assert decoder.feed(_raw_frame(2, b"abc")) == []  # promised 2, carries 3
    assert decoder.stats.malformed == 2


def test_decoder_counts_crc_errors() -> None:
    wire = bytearray(encode_frame(0x21, 3, b"payload"))
    wire[len(wire) // 2] ^= 0x40
    decoder = FrameDecoder()
    assert decoder.feed(bytes(wire)) == []
    assert decoder.stats.crc_errors + decoder.stats.malformed == 1


def test_back_to_back_delimiters_are_idle_fill_not_errors() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x00" + encode_frame(1, 2, b"") + b"\x00\x00") == [Frame(1, 2, b"")]
    assert decoder.stats.errors == 0 and decoder.stats.bytes_discarded == 0


def test_retransmit_flag_survives_the_round_trip() -> None:
    (frame,) = FrameDecoder().feed(encode_frame(0x21, 9, b"", flags=FLAG_RETRANSMIT))
    assert frame.flags & FLAG_RETRANSMIT


def test_sequence_arithmetic_wraps() -> None:
    assert seq_add(0xFFFF) == 0
    assert seq_add(0xFFFE, 5) == 3
    assert seq_before(0xFFFF, 0) and not seq_before(0, 0xFFFF)
    assert seq_before(10, 20) and not seq_before(20, 10) and not seq_before(7, 7)


def test_header_layout_is_little_endian_as_documented() -> None:
    raw = cobs.decode(encode_frame(0xAB, 0x1234, b"\x99", flags=0x01, version=1)[:-1])
    assert raw[:9] == bytes([1, 0xAB, 0x01, 0x34, 0x12, 1, 0, 0, 0])
    assert raw[9:10] == b"\x99"
    assert struct.unpack("<I", raw[10:]) == (zlib.crc32(raw[:10]),)
