"""Message catalogue: every type round-trips, and bad payloads fail with a clear ProtocolError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.wire.errors import FrameTooLarge, ProtocolError
from firmware_bridge.wire.messages import (
    CATALOGUE,
    CHUNK_HEADER,
    MAX_BLOB_SIZE,
    BlobAssembler,
    Chunk,
    MsgType,
    PayloadKind,
    chunk_blob,
    decode_payload,
    encode_payload,
)

SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
HELLO = {"version": 1, "capabilities": {"board": "jetson-orin-nano", "npu": False}, "window": 8, "max_payload": 65536}

SAMPLES = {
    MsgType.HELLO: HELLO,
    MsgType.HELLO_ACK: HELLO | {"accepted": True},
    MsgType.ACK: None,
    MsgType.NACK: None,
    MsgType.HEARTBEAT: None,
    MsgType.ERROR: {"code": "model_missing", "message": "no model with that hash", "fatal": False},
    MsgType.BYE: {"reason": "host shutting down"},
    MsgType.MODEL_QUERY: {"sha256": SHA},
    MsgType.MODEL_HAVE: {"sha256": SHA, "have": True, "size": 1234},
    MsgType.MODEL_CHUNK: Chunk(offset=1024, total=4096, data=b"\x00\x01onnx\xff"),
    MsgType.MODEL_COMMIT: {"sha256": SHA, "size": 4096, "format": "onnx"},
    MsgType.WORKLOAD: {"id": "job-1", "model_sha256": SHA, "task": "train", "params": {"epochs": 2, "lr": 0.01}},
    MsgType.PROGRESS: {"id": "job-1", "step": 10, "total_steps": 100, "loss": 0.25},
    MsgType.RESULT: {"id": "job-1", "status": "ok", "metrics": {"acc": 0.9}, "energy_j": 12.5},
    MsgType.CANCEL: {"id": "job-1"},
    MsgType.TELEMETRY: {"time": 12.5, "values": {"power_mw": 4915, "tj_c": 46.9}},
}


def test_every_catalogued_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(MsgType) == set(CATALOGUE)


@pytest.mark.parametrize("msg_type", list(MsgType), ids=lambda t: t.name)
def test_every_type_round_trips(msg_type: MsgType) -> None:
    body = SAMPLES[msg_type]
    assert decode_payload(msg_type, encode_payload(msg_type, body)) == body


def test_json_payloads_are_compact_utf8() -> None:
    payload = encode_payload(MsgType.ERROR, {"code": "x", "message": "température"})
    assert payload == '{"code":"x","message":"température"}'.encode()


def test_unknown_type_is_named_in_the_error() -> None:
    with pytest.raises(ProtocolError, match="unknown message type 0x7f"):
        decode_payload(0x7F, b"{}")
    with pytest.raises(ProtocolError, match="unknown message type 0x7f"):
        encode_payload(0x7F, {})


@pytest.mark.parametrize(
    ("msg_type", "payload", "why"),
    [
        (MsgType.CANCEL, b"\xff\xfe", "not UTF-8"),
        (MsgType.CANCEL, b'{"id": ', "not valid JSON"),
        (MsgType.CANCEL, b'["id"]', "must be a JSON object"),
        (MsgType.CANCEL, b"{}", "lacks required field 'id'"),
        (MsgType.CANCEL, b'{"id": 5}', "'id' must be str"),
        (MsgType.CANCEL, b'{"id": "a", "id": "b"}', "duplicate key"),
        (MsgType.PROGRESS, b'{"id": "a", "step": true, "total_steps": 3}', "'step' must be int"),
        (MsgType.PROGRESS, b'{"id": "a", "step": -1, "total_steps": 3}', "non-negative"),
        (MsgType.PROGRESS, b'{"id": "a", "step": 1, "total_steps": 3, "loss": NaN}', "NaN is not valid JSON"),
        (MsgType.MODEL_QUERY, b'{"sha256": "ABC"}', "64 lowercase hex digits"),
        (MsgType.MODEL_COMMIT, b'{"sha256": "' + SHA.encode() + b'", "size": 1, "format": "pickle"}', "one of onnx"),
        (
            MsgType.WORKLOAD,
            b'{"id": "a", "model_sha256": "' + SHA.encode() + b'", "task": "exec", "params": {}}',
            "one of train, evaluate",
        ),
        (MsgType.ACK, b"\x00", "must carry no payload"),
        (MsgType.MODEL_CHUNK, b"\x00" * (CHUNK_HEADER.size - 1), "shorter than its 16-byte header"),
        (MsgType.MODEL_CHUNK, CHUNK_HEADER.pack(10, 12) + b"abc", "overruns the 12-byte blob"),
        (MsgType.MODEL_CHUNK, CHUNK_HEADER.pack(0, MAX_BLOB_SIZE + 1), "above the"),
        (MsgType.HELLO, json.dumps(HELLO | {"window": 0}).encode(), "'window' must be 1..256"),
    ],
)
def test_bad_payloads_raise_protocol_error_saying_why(msg_type: MsgType, payload: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode_payload(msg_type, payload)


def test_deeply_nested_json_is_refused_not_a_crash() -> None:
    bomb = b'{"id": "a", "model_sha256": "' + SHA.encode() + b'", "task": "train", "params": ' + b"[" * 20000
    with pytest.raises(ProtocolError, match="WORKLOAD"):
        decode_payload(MsgType.WORKLOAD, bomb + b"]" * 20000 + b"}")
    nested: dict = {}
    for _ in range(30):
        nested = {"x": nested}
    with pytest.raises(ProtocolError, match="nests deeper"):
        encode_payload(MsgType.WORKLOAD, SAMPLES[MsgType.WORKLOAD] | {"params": nested})


def test_encode_checks_the_schema_too() -> None:
    with pytest.raises(ProtocolError, match="lacks required field 'sha256'"):
        encode_payload(MsgType.MODEL_QUERY, {})
    with pytest.raises(ProtocolError, match="not plain JSON"):
        encode_payload(MsgType.CANCEL, {"id": "a", "extra": object()})
    with pytest.raises(ProtocolError, match="must be a Chunk"):
        encode_payload(MsgType.MODEL_CHUNK, b"raw bytes")
    with pytest.raises(FrameTooLarge):
        encode_payload(MsgType.ERROR, {"code": "x", "message": "y" * 70000})


def test_unknown_fields_are_kept_for_forward_compatibility() -> None:
    body = {"id": "a", "priority": "high"}
    assert decode_payload(MsgType.CANCEL, encode_payload(MsgType.CANCEL, body)) == body


def test_link_control_types_are_unsequenced_and_empty() -> None:
    for msg_type in (MsgType.ACK, MsgType.NACK, MsgType.HEARTBEAT):
        assert CATALOGUE[msg_type].kind is PayloadKind.EMPTY and not CATALOGUE[msg_type].sequenced


@given(st.binary(max_size=5000), st.integers(1, 700))
def test_chunking_and_reassembly_round_trip(blob: bytes, chunk_size: int) -> None:
    assembler = BlobAssembler()
    chunks = list(chunk_blob(blob, chunk_size))
    for chunk in chunks:
        wire = encode_payload(MsgType.MODEL_CHUNK, chunk)
        assembler.add(decode_payload(MsgType.MODEL_CHUNK, wire))
    assert assembler.done and assembler.data() == blob
    assert all(len(c.data) <= chunk_size for c in chunks)


def test_assembler_refuses_gaps_size_changes_and_excess() -> None:
    assembler = BlobAssembler()
    assembler.add(Chunk(0, 10, b"abcd"))
    with pytest.raises(ProtocolError, match="offset 6, expected 4"):
        assembler.add(Chunk(6, 10, b"gh"))
    with pytest.raises(ProtocolError, match="earlier chunks said 10"):
        assembler.add(Chunk(4, 11, b"ef"))
    with pytest.raises(ProtocolError, match="incomplete"):
        assembler.data()
    assembler.add(Chunk(4, 10, b"efghij"))
    with pytest.raises(ProtocolError, match="after the blob was complete"):
        assembler.add(Chunk(10, 10, b""))
    with pytest.raises(ProtocolError, match="exceeds the 100-byte limit"):
        BlobAssembler(max_size=100).add(Chunk(0, 101, b""))


def test_an_empty_blob_is_one_empty_chunk() -> None:
    (chunk,) = chunk_blob(b"")
    assembler = BlobAssembler()
    assert assembler.add(chunk) and assembler.data() == b""
