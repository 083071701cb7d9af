"""Host <-> board serial bridge for edgetrain.

Layers, bottom up:

* `cobs`, `frame`: COBS-framed, CRC-checked binary frames and a resynchronising stream decoder.
* `messages`: the message catalogue and payload encoding (JSON or raw chunks; never pickle).
* `link`: reliable, ordered, windowed delivery with handshake and heartbeats over any
  object with pyserial's read/write/timeout interface.
* `transport`: opening ports and pyserial URLs; pseudo-terminals for tests.
* `relay`: a lossy, paced byte relay that simulates a noisy UART.
* `telemetry`: power, temperature and clock readers for Jetson, Raspberry Pi and Linux.

Profiling on top of the link (these import edgetrain, so they are not imported here):

* `agent`: the board agent (`edgetrain-agent`); `host`: the host side of `edgetrain profile`.
* `workload`: the workload, training loop and weights digest both sides share.
* `cache`, `measure`, `report`, `sim`, `cli`: blob cache, memory/power measurement, report
  rendering, the simulated board, and the command-line glue.

The wire protocol is specified in docs/PROTOCOL.md.
"""

from .errors import (
    BridgeError,
    CobsDecodeError,
    FrameTooLarge,
    LinkError,
    LinkTimeout,
    PeerGone,
    ProtocolError,
    ProtocolVersionError,
)
from .frame import MAX_PAYLOAD, PROTOCOL_VERSION, DecoderStats, Frame, FrameDecoder, encode_frame
from .link import Link, LinkStats
from .messages import Chunk, Message, MsgType, decode_payload, encode_payload
from .relay import ByteMangler, Relay
from .transport import FdPort, PtyPair, open_port, open_pty

__all__ = [
    "BridgeError",
    "ByteMangler",
    "Chunk",
    "CobsDecodeError",
    "DecoderStats",
    "FdPort",
    "Frame",
    "FrameDecoder",
    "FrameTooLarge",
    "Link",
    "LinkError",
    "LinkStats",
    "LinkTimeout",
    "MAX_PAYLOAD",
    "Message",
    "MsgType",
    "PROTOCOL_VERSION",
    "PeerGone",
    "ProtocolError",
    "ProtocolVersionError",
    "PtyPair",
    "Relay",
    "decode_payload",
    "encode_frame",
    "encode_payload",
    "open_port",
    "open_pty",
]
