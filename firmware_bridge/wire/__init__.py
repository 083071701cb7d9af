"""The wire: COBS-framed, CRC-checked frames, the message catalogue, a reliable windowed link,
ports and pseudo-terminals, and a lossy relay that simulates a noisy UART (docs/PROTOCOL.md).

Nothing here imports edgetrain: the board agent and the host share this layer as it is.
"""


from firmware_bridge.wire.errors import (
    BridgeError,
    CobsDecodeError,
    FrameTooLarge,
    LinkError,
    LinkTimeout,
    PeerGone,
    ProtocolError,
    ProtocolVersionError,
)
from firmware_bridge.wire.frame import MAX_PAYLOAD, PROTOCOL_VERSION, DecoderStats, Frame, FrameDecoder, encode_frame
from firmware_bridge.wire.link import Link, LinkStats
from firmware_bridge.wire.messages import Chunk, Message, MsgType, decode_payload, encode_payload
from firmware_bridge.wire.relay import ByteMangler, Relay
from firmware_bridge.wire.transport import FdPort, PtyPair, open_port, open_pty

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
