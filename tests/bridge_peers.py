"""A bare host link to a simulated board's agent, for tests that send what a well-behaved host never would."""

from __future__ import annotations

import time

from firmware_bridge.profile.sim import SimulatedBoard
from firmware_bridge.wire.link import Link
from firmware_bridge.wire.messages import Message, MsgType
from firmware_bridge.wire.transport import open_port

BAUD = 921600


def connect(board: SimulatedBoard, start_timeout: float) -> Link:
    """Open the board's host port and handshake, giving the agent `start_timeout` s to come up."""
    port = open_port(board.host_port, BAUD)
    link = Link(port, ack_timeout=0.2, heartbeat_interval=0.5, peer_timeout=None, capabilities={"host": "test"})
    link.handshake(timeout=start_timeout)
    return link


def reply(link: Link, timeout: float = 10.0) -> Message:
    """Return the next message that is not a status TELEMETRY."""
    deadline = time.monotonic() + timeout
    while True:
        message = link.recv(timeout=max(0.01, deadline - time.monotonic()))
        if message.type != MsgType.TELEMETRY:
            return message
