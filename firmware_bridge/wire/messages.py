"""The message catalogue: every type the bridge speaks and how its payload is encoded.

Control messages carry a UTF-8 JSON object, checked against a small per-type
schema on both encode and decode. Bulk data (model chunks) is raw bytes behind
a 16-byte header. Nothing here ever unpickles or evaluates what it receives.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from firmware_bridge.wire.errors import FrameTooLarge, ProtocolError
from firmware_bridge.wire.frame import MAX_PAYLOAD

__all__ = [
    "ACCEPTED_MODEL_FORMATS",
    "BLOB_FORMATS",
    "BlobAssembler",
    "CATALOGUE",
    "CHUNK_HEADER",
    "Chunk",
    "DATA_FORMAT",
    "Field",
    "MAX_BLOB_SIZE",
    "MAX_CHUNK_DATA",
    "Message",
    "MsgType",
    "PayloadKind",
    "Spec",
    "WORKLOAD_TASKS",
    "chunk_blob",
    "decode_payload",
    "encode_payload",
]


class MsgType(enum.IntEnum):
    """Message type byte. 0x0_: link and session, 0x1_: models, 0x2_: work."""

    HELLO = 0x01
    HELLO_ACK = 0x02
    ACK = 0x03
    NACK = 0x04
    HEARTBEAT = 0x05
    ERROR = 0x06
    BYE = 0x07
    MODEL_QUERY = 0x10
    MODEL_HAVE = 0x11
    MODEL_CHUNK = 0x12
    MODEL_COMMIT = 0x13
    WORKLOAD = 0x20
    PROGRESS = 0x21
    RESULT = 0x22
    CANCEL = 0x23
    TELEMETRY = 0x24


class PayloadKind(enum.Enum):
    """How a message type's payload is laid out."""

    EMPTY = "empty"
    JSON = "json"
    CHUNK = "chunk"


CHUNK_HEADER = struct.Struct("<QQ")  # offset, total size of the blob
MAX_CHUNK_DATA = MAX_PAYLOAD - CHUNK_HEADER.size
# The agent holds a model in memory while it arrives; 1 GiB is far above any
# model a Pi or Jetson fine-tunes, and low enough to refuse a bogus total early.
MAX_BLOB_SIZE = 1 << 30
ACCEPTED_MODEL_FORMATS = ("onnx",)
# A training data set travels like a model (content-addressed chunks and a commit) but is
# NumPy .npz, which the agent opens with allow_pickle=False: arrays, never objects.
DATA_FORMAT = "npz"
BLOB_FORMATS = (*ACCEPTED_MODEL_FORMATS, DATA_FORMAT)
WORKLOAD_TASKS = ("train", "evaluate")
RESULT_STATUSES = ("ok", "error", "cancelled")
# Window and payload limits a peer may announce; the floor leaves room for any control message.
MIN_ANNOUNCED_PAYLOAD = 1024
MAX_ANNOUNCED_WINDOW = 256
# json.loads recurses per nesting level; a 64 KiB payload of "[" would otherwise hit RecursionError.
MAX_JSON_DEPTH = 16

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Chunk:
    """A slice of a blob: `data` starts at byte `offset` of a blob `total` bytes long."""

    offset: int
    total: int
    data: bytes

    def __repr__(self) -> str:
        return f"Chunk(offset={self.offset}, total={self.total}, len={len(self.data)})"


@dataclass(frozen=True)
class Field:
    """One JSON field of a message: its name, accepted types, and an optional value check."""

    name: str
    types: tuple[type, ...]
    required: bool = True
    check: Callable[[Any], bool] | None = None
    expect: str = ""


@dataclass(frozen=True)
class Spec:
    """How a message type is carried: payload kind, JSON fields, and whether it is sequenced."""

    kind: PayloadKind
    fields: tuple[Field, ...] = ()
    sequenced: bool = True


@dataclass(frozen=True)
class Message:
    """A delivered message: its type, its decoded body and the sequence number it came with."""

    type: MsgType
    body: Any = None
    seq: int | None = None


def _sha256(name: str, required: bool = True) -> Field:
    return Field(name, (str,), required, lambda v: bool(_SHA256_HEX.fullmatch(v)), "64 lowercase hex digits")


def _count(name: str, required: bool = True) -> Field:
    return Field(name, (int,), required, lambda v: v >= 0, "a non-negative integer")


def _one_of(name: str, choices: tuple[str, ...], required: bool = True) -> Field:
    return Field(name, (str,), required, lambda v: v in choices, f"one of {', '.join(choices)}")


_NUMBER = (int, float)
_HELLO_FIELDS = (
    Field("version", (int,), check=lambda v: 0 <= v <= 0xFF, expect="0..255"),
    Field("capabilities", (dict,)),
    Field("window", (int,), check=lambda v: 1 <= v <= MAX_ANNOUNCED_WINDOW, expect=f"1..{MAX_ANNOUNCED_WINDOW}"),
    Field(
        "max_payload",
        (int,),
        check=lambda v: MIN_ANNOUNCED_PAYLOAD <= v <= MAX_PAYLOAD,
        expect=f"{MIN_ANNOUNCED_PAYLOAD}..{MAX_PAYLOAD}",
    ),
)

CATALOGUE: dict[MsgType, Spec] = {
    # HELLO / HELLO_ACK are frozen across protocol versions so a mismatch can always be reported.
    MsgType.HELLO: Spec(PayloadKind.JSON, _HELLO_FIELDS, sequenced=False),
    MsgType.HELLO_ACK: Spec(PayloadKind.JSON, (*_HELLO_FIELDS, Field("accepted", (bool,))), sequenced=False),
    MsgType.ACK: Spec(PayloadKind.EMPTY, sequenced=False),
    MsgType.NACK: Spec(PayloadKind.EMPTY, sequenced=False),
    MsgType.HEARTBEAT: Spec(PayloadKind.EMPTY, sequenced=False),
    MsgType.ERROR: Spec(
        PayloadKind.JSON,
        (Field("code", (str,)), Field("message", (str,)), Field("fatal", (bool,), required=False)),
    ),
    MsgType.BYE: Spec(PayloadKind.JSON, (Field("reason", (str,), required=False),)),
    # `size` (optional) lets the agent refuse a blob it has no room for before any of it is sent.
    MsgType.MODEL_QUERY: Spec(
        PayloadKind.JSON,
        (_sha256("sha256"), _one_of("format", BLOB_FORMATS, required=False), _count("size", required=False)),
    ),
    MsgType.MODEL_HAVE: Spec(
        PayloadKind.JSON, (_sha256("sha256"), Field("have", (bool,)), _count("size", required=False))
    ),
    MsgType.MODEL_CHUNK: Spec(PayloadKind.CHUNK),
    MsgType.MODEL_COMMIT: Spec(
        PayloadKind.JSON,
        (_sha256("sha256"), _count("size"), _one_of("format", BLOB_FORMATS)),
    ),
    MsgType.WORKLOAD: Spec(
        PayloadKind.JSON,
        (
            Field("id", (str,)),
            _sha256("model_sha256"),
            _one_of("task", WORKLOAD_TASKS),
            Field("params", (dict,)),
        ),
    ),
    MsgType.PROGRESS: Spec(
        PayloadKind.JSON,
        (
            Field("id", (str,)),
            _count("step"),
            _count("total_steps"),
            Field("loss", _NUMBER, required=False),
            Field("metrics", (dict,), required=False),
        ),
    ),
    MsgType.RESULT: Spec(
        PayloadKind.JSON,
        (
            Field("id", (str,)),
            _one_of("status", RESULT_STATUSES),
            Field("metrics", (dict,), required=False),
            Field("energy_j", _NUMBER, required=False),
            Field("message", (str,), required=False),
        ),
    ),
    MsgType.CANCEL: Spec(PayloadKind.JSON, (Field("id", (str,)),)),
    MsgType.TELEMETRY: Spec(PayloadKind.JSON, (Field("time", _NUMBER), Field("values", (dict,)))),
}


def _msg_type(value: int) -> MsgType:
    try:
        return MsgType(value)
    except ValueError:
        raise ProtocolError(f"unknown message type 0x{value:02x}") from None


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    # bool is an int subclass; a flag where a count belongs is a peer bug, not a number.
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _check_fields(msg_type: MsgType, body: Any, spec: Spec) -> None:
    if not isinstance(body, dict):
        raise ProtocolError(f"{msg_type.name} payload must be a JSON object, got {type(body).__name__}")
    for field in spec.fields:
        if field.name not in body:
            if field.required:
                raise ProtocolError(f"{msg_type.name} payload lacks required field '{field.name}'")
            continue
        value = body[field.name]
        if not _is_instance(value, field.types):
            names = "/".join(t.__name__ for t in field.types)
            raise ProtocolError(f"{msg_type.name} field '{field.name}' must be {names}, got {type(value).__name__}")
        if field.check is not None and not field.check(value):
            raise ProtocolError(f"{msg_type.name} field '{field.name}' must be {field.expect}, got {value!r}")


def _json_depth_ok(value: Any, depth: int = 0) -> bool:
    if depth > MAX_JSON_DEPTH:
        return False
    if isinstance(value, dict):
        return all(_json_depth_ok(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_json_depth_ok(v, depth + 1) for v in value)
    return True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys are how two parsers get to disagree about one message; refuse them.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _encode_json(msg_type: MsgType, body: Any, spec: Spec) -> bytes:
    _check_fields(msg_type, body, spec)
    if not _json_depth_ok(body):
        raise ProtocolError(f"{msg_type.name} payload nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{msg_type.name} payload is not plain JSON: {exc}") from None
    return text.encode("utf-8")


def _decode_json(msg_type: MsgType, payload: bytes, spec: Spec) -> dict[str, Any]:
    try:
        text = payload.decode("utf-8")
        body = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{msg_type.name} payload is not UTF-8: {exc}") from None
    except RecursionError:
        raise ProtocolError(f"{msg_type.name} payload nests too deeply") from None
    except ValueError as exc:
        raise ProtocolError(f"{msg_type.name} payload is not valid JSON: {exc}") from None
    _check_fields(msg_type, body, spec)
    if not _json_depth_ok(body):
        raise ProtocolError(f"{msg_type.name} payload nests deeper than {MAX_JSON_DEPTH} levels")
    return body


def _check_chunk(msg_type: MsgType, chunk: Chunk) -> None:
    if chunk.total > MAX_BLOB_SIZE:
        raise ProtocolError(f"{msg_type.name} announces a {chunk.total}-byte blob, above the {MAX_BLOB_SIZE} limit")
    if chunk.offset + len(chunk.data) > chunk.total:
        raise ProtocolError(
            f"{msg_type.name} at offset {chunk.offset} with {len(chunk.data)} bytes overruns the "
            f"{chunk.total}-byte blob"
        )


def encode_payload(msg_type: int, body: Any = None) -> bytes:
    """Return the payload bytes of a message of `msg_type` with `body` (dict, Chunk or None)."""
    msg_type = _msg_type(msg_type)
    spec = CATALOGUE[msg_type]
    if spec.kind is PayloadKind.EMPTY:
        if body not in (None, b"", {}):
            raise ProtocolError(f"{msg_type.name} carries no payload")
        return b""
    if spec.kind is PayloadKind.CHUNK:
        if not isinstance(body, Chunk):
            raise ProtocolError(f"{msg_type.name} body must be a Chunk, got {type(body).__name__}")
        if body.offset < 0 or body.total < 0:
            raise ProtocolError(f"{msg_type.name} offset and total must be non-negative")
        _check_chunk(msg_type, body)
        payload = CHUNK_HEADER.pack(body.offset, body.total) + bytes(body.data)
    else:
        payload = _encode_json(msg_type, body, spec)
    if len(payload) > MAX_PAYLOAD:
        raise FrameTooLarge(f"{msg_type.name} payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return payload


def decode_payload(msg_type: int, payload: bytes) -> Any:
    """Return the body of a received payload; raise ProtocolError for unknown types or bad payloads."""
    msg_type = _msg_type(msg_type)
    spec = CATALOGUE[msg_type]
    payload = bytes(payload)
    if spec.kind is PayloadKind.EMPTY:
        if payload:
            raise ProtocolError(f"{msg_type.name} must carry no payload, got {len(payload)} bytes")
        return None
    if spec.kind is PayloadKind.CHUNK:
        if len(payload) < CHUNK_HEADER.size:
            raise ProtocolError(
                f"{msg_type.name} payload of {len(payload)} bytes is shorter than its {CHUNK_HEADER.size}-byte header"
            )
        offset, total = CHUNK_HEADER.unpack_from(payload)
        chunk = Chunk(offset, total, payload[CHUNK_HEADER.size :])
        _check_chunk(msg_type, chunk)
        return chunk
    return _decode_json(msg_type, payload, spec)


def chunk_blob(blob: bytes, chunk_size: int = MAX_CHUNK_DATA) -> Iterator[Chunk]:
    """Yield `blob` as consecutive chunks of at most `chunk_size` bytes (one empty chunk for b"")."""
    if not 1 <= chunk_size <= MAX_CHUNK_DATA:
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_DATA}, got {chunk_size}")
    view = memoryview(blob)
    total = len(view)
    yield Chunk(0, total, bytes(view[:chunk_size]))
    for offset in range(chunk_size, total, chunk_size):
        yield Chunk(offset, total, bytes(view[offset : offset + chunk_size]))


class BlobAssembler:
    """Rebuilds a blob from in-order chunks, refusing gaps, overlaps and inconsistent totals.

    With a `sink`, each chunk's data goes to it as it arrives (a spool file) instead of being kept.
    """

    def __init__(self, max_size: int = MAX_BLOB_SIZE, sink: Callable[[bytes], None] | None = None) -> None:
        self.max_size = max_size
        self.total: int | None = None
        self._parts: list[bytes] = []
        self._sink = sink if sink is not None else self._parts.append
        self._received = 0

    @property
    def done(self) -> bool:
        """Return True once every byte of the blob has arrived."""
        return self.total is not None and self._received == self.total

    def add(self, chunk: Chunk) -> bool:
        """Append `chunk`; return True when the blob is complete."""
        if self.total is None:
            if chunk.total > self.max_size:
                raise ProtocolError(f"blob of {chunk.total} bytes exceeds the {self.max_size}-byte limit")
            self.total = chunk.total
        elif self.done:
            raise ProtocolError("chunk arrived after the blob was complete")
        elif chunk.total != self.total:
            raise ProtocolError(f"chunk says the blob is {chunk.total} bytes, earlier chunks said {self.total}")
        if chunk.offset != self._received:
            raise ProtocolError(f"chunk at offset {chunk.offset}, expected {self._received}")
        if self._received + len(chunk.data) > self.total:
            raise ProtocolError("chunk runs past the end of the blob")
        self._sink(chunk.data)
        self._received += len(chunk.data)
        return self.done

    def data(self) -> bytes:
        """Return the assembled blob; raise ProtocolError if it is still incomplete."""
        if not self.done:
            raise ProtocolError(f"blob incomplete: {self._received} of {self.total} bytes")
        if self._sink != self._parts.append:
            raise ValueError("this blob went to its sink; read it from there")
        return b"".join(self._parts)
