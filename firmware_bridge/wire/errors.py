"""Exception hierarchy of the bridge, so callers can catch by intent rather than by module."""

from __future__ import annotations


class BridgeError(Exception):
    """Base class of every error the bridge raises on purpose."""


class ProtocolError(BridgeError):
    """Bytes or a message that break the protocol (bad encoding, unknown type, bad payload)."""


class CobsDecodeError(ProtocolError, ValueError):
    """Input that is not a valid COBS encoding."""


class FrameTooLarge(ProtocolError, ValueError):
    """A payload larger than the frame size limit."""


class ProtocolVersionError(ProtocolError):
    """The peer speaks a protocol version this side does not."""


class LinkError(BridgeError):
    """The link cannot deliver what it was asked to."""


class LinkTimeout(LinkError, TimeoutError):
    """An operation did not complete within its time limit."""


class PeerGone(LinkTimeout):
    """The peer stopped answering: retransmissions ran out or it fell silent."""
