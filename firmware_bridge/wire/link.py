"""Reliable, ordered message delivery over any byte stream with pyserial's interface.

The link is single-threaded: it only moves bytes while one of its methods runs
(`send`, `recv`, `flush`, `poll`, ...), so both sides must keep calling into it,
at least every `heartbeat_interval`, for heartbeats and acknowledgements to flow.

Reliability in brief (docs/PROTOCOL.md has the full story):

* Every message except ACK, NACK, HEARTBEAT, HELLO and HELLO_ACK carries a
  16-bit sequence number and stays in the sender's window until acknowledged.
* ACK, NACK and HEARTBEAT carry the receiver's next expected sequence number
  (a cumulative acknowledgement) in their sequence field.
* A receiver buffers frames that arrive after a gap and NACKs the missing one;
  the sender retransmits on NACK, or on its own when its retransmission timer runs out:
  `ack_timeout` until the round trip has been measured, then the measured round trip plus
  four deviations (RFC 6298's estimator, Karn's rule), doubling per retry of one frame and
  never above `ack_timeout`. A lost retransmission then costs tens of milliseconds on a fast
  line instead of `ack_timeout`; giving up still takes at least `max_retries * ack_timeout`.
* Duplicates (retransmissions, replays) are acknowledged again but delivered once.
* A message longer than one frame goes as consecutive fragments (FLAG_MORE on all but the
  last), so one damaged byte costs one small frame, not the whole message; the frame size
  follows the loss the sender observes (`sizing.FrameSizer`).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from firmware_bridge.wire.errors import (
    FrameTooLarge,
    LinkError,
    LinkTimeout,
    PeerGone,
    ProtocolError,
    ProtocolVersionError,
)
from firmware_bridge.wire.frame import (
    FLAG_MORE,
    FLAG_RETRANSMIT,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    SEQ_MODULUS,
    DecoderStats,
    Frame,
    FrameDecoder,
    encode_frame,
    seq_add,
    seq_before,
)
from firmware_bridge.wire.messages import (
    CATALOGUE,
    CHUNK_HEADER,
    MAX_ANNOUNCED_WINDOW,
    MAX_BLOB_SIZE,
    MIN_ANNOUNCED_PAYLOAD,
    BlobAssembler,
    Chunk,
    Message,
    MsgType,
    PayloadKind,
    decode_payload,
    encode_payload,
)
from firmware_bridge.wire.sizing import MIN_FRAME_PAYLOAD, FrameSizer
from firmware_bridge.wire.transport import BITS_PER_BYTE

__all__ = ["Link", "LinkStats", "MAX_MESSAGE", "MAX_WINDOW", "SerialLike"]

MAX_WINDOW = MAX_ANNOUNCED_WINDOW
# A message (all its fragments together) is bounded like one frame used to be: every buffer
# on the board stays within 64 KiB however the sender cuts it.
MAX_MESSAGE = MAX_PAYLOAD
DEFAULT_POLL_INTERVAL = 0.01
DEFAULT_PEER_TIMEOUT = 5.0
# A receiver repeats a NACK for the same gap at most this often (as a fraction
# of ack_timeout), so a burst of frames behind one hole costs one retransmission.
_NACK_REPEAT_FRACTION = 0.25
# Floor of the measured retransmission timer: the peer's poll loop (10 ms) plus a GIL switch or two
# on a board whose worker thread trains; below it, retransmissions would be mostly spurious.
MIN_RETRANSMIT_S = 0.05
# RFC 6298's gains for the smoothed round trip and its deviation, and the deviation's weight in the timer.
_RTT_GAIN, _RTTVAR_GAIN, _RTTVAR_WEIGHT = 1 / 8, 1 / 4, 4


def _type_name(msg_type: int) -> str:
    # send_raw can put any type byte in flight; error messages must not choke on it.
    try:
        return MsgType(msg_type).name
    except ValueError:
        return f"type 0x{msg_type:02x}"


class SerialLike(Protocol):
    """What the link needs from a port: pyserial's read/write with a settable timeout."""

    timeout: float | None

    def read(self, size: int = 1) -> bytes:
        """Return up to `size` bytes, waiting at most `timeout` seconds."""
        ...

    def write(self, data: bytes, /) -> int | None:
        """Write all of `data`."""
        ...


@dataclass
class LinkStats:
    """Counters of link activity, for diagnostics and tests."""

    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_delivered: int = 0
    retransmits: int = 0
    acks_sent: int = 0
    nacks_sent: int = 0
    nacks_received: int = 0
    heartbeats_sent: int = 0
    duplicates: int = 0
    out_of_window: int = 0
    foreign_version: int = 0
    fragments_sent: int = 0
    fragments_received: int = 0

    def as_dict(self) -> dict[str, int]:
        """Return the counters as a plain dict."""
        return asdict(self)


@dataclass
class _InFlight:
    msg_type: int
    payload: bytes
    first_sent: float
    wire_len: int = 0
    left_wire_at: float = 0.0
    due: float = 0.0
    retries: int = 0
    copies: int = 0
    flags: int = 0


class _Partial:
    """The fragments of one message received so far, bounded by MAX_MESSAGE."""

    def __init__(self, msg_type: int, first_seq: int) -> None:
        self.msg_type = msg_type
        self.first_seq = first_seq
        self.problem = ""
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def broken(self) -> bool:
        return bool(self.problem)

    def fail(self, problem: str) -> None:
        self.problem = problem
        self._parts.clear()  # the rest is only counted, never kept

    def add(self, piece: bytes) -> None:
        self._size += len(piece)
        if self.broken:
            return
        if self._size > MAX_MESSAGE:
            self.fail(f"{_type_name(self.msg_type)} message runs past {MAX_MESSAGE} bytes")
            return
        self._parts.append(piece)

    def payload(self) -> bytes:
        return b"".join(self._parts)


class Link:
    """A reliable, ordered, windowed message link over a pyserial-like port."""

    def __init__(
        self,
        port: SerialLike,
        *,
        window: int = 8,
        ack_timeout: float = 0.5,
        max_retries: int = 10,
        heartbeat_interval: float = 1.0,
        peer_timeout: float | None = DEFAULT_PEER_TIMEOUT,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_payload: int = MAX_PAYLOAD,
        capabilities: dict[str, Any] | None = None,
        protocol_version: int = PROTOCOL_VERSION,
        baud: int | None = None,
        frame_size: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Wrap `port`; `baud` budgets transmit time (None: port.baudrate if any, 0: off).

        `frame_size` fixes the payload bytes per frame; None (the default) adapts it to the loss observed.
        """
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be in 1..{MAX_WINDOW}, got {window}")
        if not MIN_ANNOUNCED_PAYLOAD <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in {MIN_ANNOUNCED_PAYLOAD}..{MAX_PAYLOAD}, got {max_payload}")
        for name, value in (
            ("ack_timeout", ack_timeout),
            ("heartbeat_interval", heartbeat_interval),
            ("poll_interval", poll_interval),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.window = window
        self.ack_timeout = ack_timeout
        self.max_retries = max_retries
        self.heartbeat_interval = heartbeat_interval
        self.peer_timeout = peer_timeout
        self.max_payload = max_payload
        self.capabilities = dict(capabilities or {})
        self.protocol_version = protocol_version
        self.stats = LinkStats()

        self._port = port
        self._clock = clock
        if baud is None:
            baud = getattr(port, "baudrate", None) or 0
        # Seconds one byte occupies the line; frames queued behind others get their ack timer late.
        self._byte_time = BITS_PER_BYTE / baud if baud else 0.0
        self._wire_clear_at = 0.0
        # The link reads in short slices so timers keep running; the caller's timeout comes back on close().
        self._saved_timeout = port.timeout
        port.timeout = poll_interval

        self._decoder = FrameDecoder(max_payload=max_payload)
        self._tx_next = 0
        self._inflight: OrderedDict[int, _InFlight] = OrderedDict()
        self._send_window = window
        self._send_max_payload = max_payload
        self._rx_next = 0
        self._rx_buffer: dict[int, Frame] = {}
        self._partial: _Partial | None = None
        self._sizer = FrameSizer(max_payload)
        if frame_size is not None and not MIN_FRAME_PAYLOAD <= frame_size <= max_payload:
            raise ValueError(f"frame_size must be in {MIN_FRAME_PAYLOAD}..{max_payload}, got {frame_size}")
        self._fixed_frame = frame_size
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._progress_at = clock()
        self._inbox: deque[Message | ProtocolError] = deque()
        self._deferred: deque[Message] = deque()
        self._ack_pending = False
        self._last_nack: tuple[int, float] | None = None
        self._last_tx = clock()
        self._last_rx: float | None = None
        self._last_pump = clock()
        self._listening_since = clock()
        self._pending_error: Exception | None = None
        self._awaiting_hello_ack = False
        self._hello_reply: dict[str, Any] | None = None
        self._peer: dict[str, Any] | None = None
        self._closed = False

    # ----------------------------------------------------------------- public

    @property
    def port(self) -> SerialLike:
        """Return the port this link drives."""
        return self._port

    @property
    def peer_capabilities(self) -> dict[str, Any] | None:
        """Return the capabilities the peer announced, or None before any handshake."""
        return None if self._peer is None else self._peer["capabilities"]

    @property
    def peer_version(self) -> int | None:
        """Return the protocol version the peer announced, or None before any handshake."""
        return None if self._peer is None else self._peer["version"]

    @property
    def in_flight(self) -> int:
        """Return how many sent messages still await acknowledgement."""
        return len(self._inflight)

    @property
    def can_send(self) -> bool:
        """Return True if a message can be sent now without waiting for the window to open."""
        return len(self._inflight) < self._send_window

    @property
    def frame_payload(self) -> int:
        """Return the payload bytes this side now puts in one frame (adapted to the loss it sees)."""
        wanted = self._sizer.payload_size() if self._fixed_frame is None else self._fixed_frame
        return min(wanted, self._send_max_payload)

    @property
    def byte_error_rate(self) -> float:
        """Return the per-byte loss rate this side estimates for its direction of the line."""
        return self._sizer.byte_error_rate

    @property
    def progress_at(self) -> float:
        """Return when (on the link's clock) the peer last got a new sequenced frame through, fragments included."""
        return self._progress_at

    @property
    def decoder_stats(self) -> DecoderStats:
        """Return the frame decoder's counters (garbage, CRC errors, ...)."""
        return self._decoder.stats

    def handshake(self, timeout: float | None = None) -> dict[str, Any]:
        """Start a session: send HELLO until HELLO_ACK (until `timeout`, else max_retries + 1 times), check versions,
        return the peer's capabilities."""
        self._check_open()
        self._start_session()
        deadline = None if timeout is None else self._clock() + timeout
        self._hello_reply = None
        self._awaiting_hello_ack = True
        try:
            # With a timeout, HELLOs go on until it runs out: a board agent still importing its
            # engine (seconds) must not lose to a retry count tuned for a peer that is already up.
            attempt = 0
            while True:
                reply = self._say_hello(retransmit=attempt > 0, deadline=deadline)
                if reply is not None:
                    break
                attempt += 1
                if deadline is not None and self._clock() >= deadline:
                    raise LinkTimeout(f"handshake: no HELLO_ACK from the peer within {timeout:.3g} s")
                if deadline is None and attempt > self.max_retries:
                    raise PeerGone(f"handshake: no HELLO_ACK after {attempt} HELLOs")
        finally:
            self._awaiting_hello_ack = False
        if reply["version"] != self.protocol_version or not reply["accepted"]:
            raise ProtocolVersionError(
                f"protocol version mismatch: this side speaks v{self.protocol_version}, "
                f"the peer speaks v{reply['version']}; update the older side"
            )
        return reply["capabilities"]

    def send(self, msg_type: MsgType, payload: Any = None, *, wait: bool = True, timeout: float | None = None) -> int:
        """Send one message (payload: dict, Chunk or None); with `wait`, return once acknowledged."""
        self._check_open()
        msg_type = MsgType(msg_type)
        if not CATALOGUE[msg_type].sequenced:
            raise ValueError(f"{msg_type.name} is sent by the link itself")
        return self._send_sequenced(msg_type, encode_payload(msg_type, payload), wait=wait, timeout=timeout)

    def send_raw(self, msg_type: int, payload: bytes = b"", *, wait: bool = True, timeout: float | None = None) -> int:
        """Send raw payload bytes under any non-control type byte, unchecked: for probing a peer (tests)."""
        self._check_open()
        if not 0 <= msg_type <= 0xFF:
            raise ValueError(f"msg_type must be a byte, got {msg_type}")
        if msg_type in CATALOGUE and not CATALOGUE[MsgType(msg_type)].sequenced:
            raise ValueError(f"{MsgType(msg_type).name} is sent by the link itself")
        return self._send_sequenced(msg_type, bytes(payload), wait=wait, timeout=timeout)

    def _send_sequenced(self, msg_type: int, data: bytes, *, wait: bool, timeout: float | None) -> int:
        if len(data) > MAX_MESSAGE:
            raise FrameTooLarge(f"{_type_name(msg_type)} payload of {len(data)} bytes exceeds {MAX_MESSAGE}")
        deadline = None if timeout is None else self._clock() + timeout
        size = self.frame_payload
        # Cut once, at the size of the moment: the receiver only needs the fragments in order.
        pieces = [data[start : start + size] for start in range(0, len(data), size)] or [b""]
        if len(pieces) > 1:
            self.stats.fragments_sent += len(pieces)
        for index, piece in enumerate(pieces):
            self._wait_until(
                lambda: len(self._inflight) < self._send_window, self._remaining(deadline), "send: window still full"
            )
            seq = self._tx_next
            self._tx_next = seq_add(seq)
            flags = FLAG_MORE if index < len(pieces) - 1 else 0
            entry = _InFlight(msg_type, piece, first_sent=self._clock(), flags=flags)
            self._inflight[seq] = entry
            self._transmit(seq, entry, retransmit=False)
            self._pump(block=False)
        if wait:
            self._wait_until(
                lambda: seq not in self._inflight, self._remaining(deadline), f"send: frame {seq} not acknowledged"
            )
        return seq

    def send_bulk(
        self,
        blob: bytes,
        *,
        msg_type: MsgType = MsgType.MODEL_CHUNK,
        chunk_size: int | None = None,
        timeout: float | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> int:
        """Send `blob` as chunks with a full window in flight; return the chunk count once all are acked.

        Without `chunk_size`, each chunk fills one frame of the size the link currently finds best
        (`frame_payload`), so the chunks shrink on a noisy line and grow on a clean one.
        `on_chunk(n)` is called with each chunk's data length as it is queued (progress bars).
        """
        if CATALOGUE[MsgType(msg_type)].kind is not PayloadKind.CHUNK:
            raise ValueError(f"{MsgType(msg_type).name} does not carry chunks")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        deadline = None if timeout is None else self._clock() + timeout
        view, total = memoryview(blob), len(blob)
        count = offset = 0
        while count == 0 or offset < total:
            if chunk_size is None:
                size = max(1, self.frame_payload - CHUNK_HEADER.size)
            else:
                size = min(chunk_size, self._send_max_payload - CHUNK_HEADER.size)
            chunk = Chunk(offset, total, bytes(view[offset : offset + size]))
            self.send(msg_type, chunk, wait=False, timeout=self._remaining(deadline))
            count += 1
            offset += len(chunk.data)
            if on_chunk is not None:
                on_chunk(len(chunk.data))
        self.flush(timeout=self._remaining(deadline))
        return count

    def recv(self, timeout: float | None = None) -> Message:
        """Return the next message in order; raise LinkTimeout if none arrives within `timeout` s."""
        self._check_open()
        if self._deferred:
            return self._deferred.popleft()
        self._wait_until(lambda: bool(self._inbox), timeout, "recv: no message")
        return self._take()

    def recv_bulk(
        self,
        timeout: float | None = None,
        *,
        msg_type: MsgType = MsgType.MODEL_CHUNK,
        max_size: int = MAX_BLOB_SIZE,
    ) -> bytes:
        """Receive chunks until a whole blob is in; other messages wait for the next recv()."""
        self._check_open()
        assembler = BlobAssembler(max_size)
        deadline = None if timeout is None else self._clock() + timeout
        while not assembler.done:
            self._wait_until(lambda: bool(self._inbox), self._remaining(deadline), "recv_bulk: blob incomplete")
            message = self._take()
            if message.type == msg_type:
                assembler.add(message.body)
            else:
                self._deferred.append(message)
        return assembler.data()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every sent message is acknowledged."""
        self._wait_until(lambda: not self._inflight, timeout, "flush: messages still unacknowledged")

    def poll(self) -> None:
        """Process whatever has arrived and run timers, without blocking."""
        self._pump(block=False)

    def close(self, reason: str = "", *, bye: bool = True, timeout: float | None = None) -> None:
        """Say BYE (best effort, at most `timeout` s) and hand the port its original timeout back."""
        if self._closed:
            return
        try:
            if bye:
                body = {"reason": reason} if reason else {}
                self.send(MsgType.BYE, body, timeout=2 * self.ack_timeout if timeout is None else timeout)
        except (LinkTimeout, OSError):
            pass  # the peer may already be gone; closing must not fail because of it
        finally:
            self._closed = True
            self._port.timeout = self._saved_timeout

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --------------------------------------------------------------- internals

    def _remaining(self, deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - self._clock())

    def _hello_body(self) -> dict[str, Any]:
        return {
            "version": self.protocol_version,
            "capabilities": self.capabilities,
            "window": self.window,
            "max_payload": self.max_payload,
        }

    def _start_session(self) -> None:
        # A new session owes nothing to the old one: unacknowledged frames and
        # half-received ones belong to a conversation that is over.
        self._inflight.clear()
        self._rx_buffer.clear()
        self._partial = None
        self._srtt, self._rttvar = None, 0.0
        self._decoder.reset()
        self._pending_error = None

    def _say_hello(self, *, retransmit: bool, deadline: float | None) -> dict[str, Any] | None:
        """Send one HELLO and pump until HELLO_ACK, its retry time or the deadline; return the answer."""
        payload = encode_payload(MsgType.HELLO, self._hello_body())
        flags = FLAG_RETRANSMIT if retransmit else 0
        wire = encode_frame(MsgType.HELLO, self._tx_next, payload, flags=flags, version=self.protocol_version)
        retry_at = self._write(wire) + self.ack_timeout  # no round trip measured yet in a new session
        if deadline is not None:
            retry_at = min(retry_at, deadline)
        while self._hello_reply is None and self._clock() < retry_at:
            self._pump(block=True)
        return self._hello_reply

    def _check_open(self) -> None:
        if self._closed:
            raise LinkError("the link is closed")

    def _take(self) -> Message:
        item = self._inbox.popleft()
        if isinstance(item, ProtocolError):
            raise item
        return item

    def _wait_until(self, done: Callable[[], bool], timeout: float | None, failure: str) -> None:
        deadline = None if timeout is None else self._clock() + timeout
        self._pump(block=False)
        while not done():
            now = self._clock()
            if deadline is not None and now >= deadline:
                raise LinkTimeout(f"{failure} within {timeout:.3g} s")
            self._check_peer_alive(now)
            self._pump(block=True)

    def _check_peer_alive(self, now: float) -> None:
        if self.peer_timeout is None or self._last_rx is None:
            return
        silent = now - max(self._last_rx, self._listening_since)
        if silent > self.peer_timeout:
            raise PeerGone(f"nothing heard from the peer for {silent:.2f} s (peer_timeout {self.peer_timeout:g} s)")

    def _pump(self, *, block: bool) -> None:
        now = self._clock()
        if now - self._last_pump > self.heartbeat_interval:
            # We were not listening (the caller was busy elsewhere), so the peer's
            # silence until now proves nothing: give it a full peer_timeout from here.
            self._listening_since = now
        self._last_pump = now
        data = self._read(block)
        if data:
            self.stats.bytes_received += len(data)
            errors_before = self._decoder.stats.errors
            for frame in self._decoder.feed(data):
                self._on_frame(frame)
            if self._decoder.stats.errors > errors_before:
                # The damaged frame may well have been the one we expect next; asking
                # now beats waiting for the sender's timer.
                self._send_nack()
        if self._ack_pending:
            self._send_control(MsgType.ACK)
            self.stats.acks_sent += 1
        self._service_timers(self._clock())
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error

    def _waiting(self) -> int:
        # in_waiting is optional: without it the link reads byte by byte, slower but correct.
        return getattr(self._port, "in_waiting", 0)

    def _read(self, block: bool) -> bytes:
        waiting = self._waiting()
        if waiting:
            return self._port.read(waiting)
        if not block:
            return b""
        first = self._port.read(1)  # waits at most poll_interval
        waiting = self._waiting() if first else 0
        return first + self._port.read(waiting) if waiting else first

    def _write(self, wire: bytes) -> float:
        """Write one frame; return when it should have left the wire."""
        self._port.write(wire)
        now = self._clock()
        self._last_tx = now
        self.stats.frames_sent += 1
        self.stats.bytes_sent += len(wire)
        if not self._byte_time:
            return now
        self._wire_clear_at = max(now, self._wire_clear_at) + len(wire) * self._byte_time
        return self._wire_clear_at

    def _send_control(self, msg_type: MsgType) -> None:
        # Every control frame carries our next expected sequence number, so each one is also an ACK.
        self._write(encode_frame(msg_type, self._rx_next, version=self.protocol_version))
        self._ack_pending = False

    def _send_nack(self) -> None:
        now = self._clock()
        if self._last_nack is not None:
            seq, at = self._last_nack
            if seq == self._rx_next and now - at < self.ack_timeout * _NACK_REPEAT_FRACTION:
                return
        self._last_nack = (self._rx_next, now)
        self._send_control(MsgType.NACK)
        self.stats.nacks_sent += 1

    def _transmit(self, seq: int, entry: _InFlight, *, retransmit: bool) -> None:
        if retransmit:
            self._sizer.record(entry.wire_len, lost=True)  # the copy before this one did not make it
        flags = entry.flags | (FLAG_RETRANSMIT if retransmit else 0)
        wire = encode_frame(entry.msg_type, seq, entry.payload, flags=flags, version=self.protocol_version)
        entry.wire_len = len(wire)
        entry.left_wire_at = self._write(wire)
        entry.due = entry.left_wire_at + self._retransmit_after(entry.retries)
        entry.copies += 1
        if retransmit:
            self.stats.retransmits += 1

    def _sample_round_trip(self, sample: float) -> None:
        if sample < 0:
            return  # acknowledged before our wire budget said it left: the port is faster than its baud
        if self._srtt is None:
            self._srtt, self._rttvar = sample, sample / 2
            return
        self._rttvar += _RTTVAR_GAIN * (abs(self._srtt - sample) - self._rttvar)
        self._srtt += _RTT_GAIN * (sample - self._srtt)

    def _retransmit_after(self, retries: int) -> float:
        """Return how long a frame retransmitted `retries` times waits for its ACK before the next copy."""
        if self._srtt is None:
            return self.ack_timeout
        measured = max(MIN_RETRANSMIT_S, self._srtt + _RTTVAR_WEIGHT * self._rttvar)
        return min(self.ack_timeout, measured * (1 << min(retries, 16)))

    def _service_timers(self, now: float) -> None:
        for seq, entry in self._inflight.items():
            if now < entry.due:
                continue
            if entry.retries >= self.max_retries and now - entry.first_sent >= self.max_retries * self.ack_timeout:
                raise PeerGone(
                    f"peer stopped answering: {_type_name(entry.msg_type)} frame {seq} unacknowledged "
                    f"after {entry.retries} retransmissions over {now - entry.first_sent:.2f} s"
                )
            entry.retries += 1
            self._transmit(seq, entry, retransmit=True)
        if self._rx_buffer:
            # Still a gap: the retransmission we asked for may itself have been lost.
            self._send_nack()
        if now - self._last_tx >= self.heartbeat_interval:
            self._send_control(MsgType.HEARTBEAT)
            self.stats.heartbeats_sent += 1

    def _on_frame(self, frame: Frame) -> None:
        self.stats.frames_received += 1
        self._last_rx = self._clock()
        if frame.msg_type in (MsgType.HELLO, MsgType.HELLO_ACK):
            self._on_hello(frame)
            return
        if frame.version != self.protocol_version:
            # Only the handshake is readable across versions; the rest may mean something else.
            self.stats.foreign_version += 1
            return
        if frame.msg_type in (MsgType.ACK, MsgType.HEARTBEAT):
            self._on_ack(frame.seq)
        elif frame.msg_type == MsgType.NACK:
            self.stats.nacks_received += 1
            self._on_ack(frame.seq)
            self._on_nack(frame.seq)
        else:
            self._on_sequenced(frame)

    def _on_ack(self, next_expected: int) -> None:
        if not self._inflight:
            return
        oldest = next(iter(self._inflight))
        # Only frames we have actually sent can be acknowledged; anything past
        # our next sequence number is a stale ACK from an earlier session.
        if (next_expected - oldest) % SEQ_MODULUS > (self._tx_next - oldest) % SEQ_MODULUS:
            return
        acked = False
        now = self._clock()
        while self._inflight and seq_before(next(iter(self._inflight)), next_expected):
            _, entry = self._inflight.popitem(last=False)
            self._sizer.record(entry.wire_len, lost=False)
            if entry.copies == 1:  # Karn: the round trip of a retransmitted frame is ambiguous
                self._sample_round_trip(now - entry.left_wire_at)
            acked = True
        if acked and self._byte_time:
            self._correct_budget()

    def _correct_budget(self) -> None:
        # An ACK proves the acknowledged frames left the wire, so at most the
        # unacknowledged ones are still queued. This pulls the estimate back
        # when the port is faster than its baudrate says (ptys, USB CDC gadgets).
        now = self._clock()
        bound = now + sum(entry.wire_len for entry in self._inflight.values()) * self._byte_time
        self._wire_clear_at = min(self._wire_clear_at, bound)
        for entry in self._inflight.values():
            if entry.left_wire_at > bound:
                entry.left_wire_at = bound
                entry.due = bound + self._retransmit_after(entry.retries)

    def _on_nack(self, seq: int) -> None:
        entry = self._inflight.get(seq)
        if entry is None:
            return
        # A NACK that arrives before our last retransmission could have left the
        # wire was sent before the peer could see it: it asks for nothing new.
        if entry.copies > 1 and self._clock() < entry.left_wire_at:
            return
        self._transmit(seq, entry, retransmit=True)

    def _on_sequenced(self, frame: Frame) -> None:
        self._ack_pending = True
        ahead = (frame.seq - self._rx_next) % SEQ_MODULUS
        if ahead < self.window and frame.seq not in self._rx_buffer:
            self._progress_at = self._clock()
        if ahead == 0:
            self._deliver(frame)
            self._rx_next = seq_add(self._rx_next)
            while self._rx_next in self._rx_buffer:
                self._deliver(self._rx_buffer.pop(self._rx_next))
                self._rx_next = seq_add(self._rx_next)
            if self._rx_buffer:
                self._send_nack()  # frames are buffered behind a second gap
        elif ahead < self.window:
            if frame.seq in self._rx_buffer:
                self.stats.duplicates += 1
            else:
                self._rx_buffer[frame.seq] = frame
            self._send_nack()
        elif ahead >= SEQ_MODULUS // 2:
            # Behind us: already delivered. The ACK we now owe tells the sender so.
            self.stats.duplicates += 1
        else:
            self.stats.out_of_window += 1

    def _deliver(self, frame: Frame) -> None:
        payload = self._reassemble(frame)
        if payload is None:
            return
        try:
            body = decode_payload(frame.msg_type, payload)
        except ProtocolError as exc:
            # Acknowledged (it arrived intact) but surfaced in order, so the
            # receiver learns its peer sent something it cannot read.
            self._inbox.append(ProtocolError(f"frame {frame.seq}: {exc}"))
            return
        self.stats.messages_delivered += 1
        self._inbox.append(Message(MsgType(frame.msg_type), body, frame.seq))

    def _reassemble(self, frame: Frame) -> bytes | None:
        """Return the whole payload once `frame` completes a message; None while fragments are still due."""
        more = bool(frame.flags & FLAG_MORE)
        partial = self._partial
        if partial is None:
            if not more:
                return frame.payload
            self._partial = partial = _Partial(frame.msg_type, frame.seq)
        elif frame.msg_type != partial.msg_type and not partial.broken:
            partial.fail(f"{_type_name(frame.msg_type)} fragment inside a {_type_name(partial.msg_type)} message")
        self.stats.fragments_received += 1
        partial.add(frame.payload)
        if more:
            return None
        self._partial = None
        if partial.broken:
            # Every fragment was acknowledged; the message as a whole is refused once, in order.
            self._inbox.append(ProtocolError(f"frames {partial.first_seq}..{frame.seq}: {partial.problem}"))
            return None
        return partial.payload()

    def _on_hello(self, frame: Frame) -> None:
        try:
            body: dict[str, Any] | None = decode_payload(frame.msg_type, frame.payload)
            problem = ""
        except ProtocolError as exc:
            body, problem = None, str(exc)
        if frame.msg_type == MsgType.HELLO_ACK:
            self._on_hello_ack(frame, body, problem)
            return
        peer_version = frame.version if body is None else body["version"]
        accepted = body is not None and peer_version == self.protocol_version
        reply = encode_payload(MsgType.HELLO_ACK, dict(self._hello_body(), accepted=accepted))
        # Answered even when refused, so the peer learns which version we speak.
        self._write(encode_frame(MsgType.HELLO_ACK, self._tx_next, reply, version=self.protocol_version))
        if body is None:
            self._pending_error = ProtocolError(f"refused an unreadable HELLO: {problem}")
        elif not accepted:
            self._pending_error = ProtocolVersionError(
                f"refused a HELLO for protocol v{peer_version}: this side speaks v{self.protocol_version}"
            )
        else:
            self._adopt_peer(body, frame.seq)

    def _on_hello_ack(self, frame: Frame, body: dict[str, Any] | None, problem: str) -> None:
        if not self._awaiting_hello_ack:
            return  # an answer to a HELLO that already has one
        if body is None:
            self._pending_error = ProtocolError(f"unreadable HELLO_ACK: {problem}")
            return
        self._hello_reply = body
        if body["accepted"] and body["version"] == self.protocol_version:
            self._adopt_peer(body, frame.seq)

    def _adopt_peer(self, body: dict[str, Any], peer_start_seq: int) -> None:
        # HELLO and HELLO_ACK announce where the sender's sequence numbers start.
        self._peer = body
        self._rx_next = peer_start_seq
        self._rx_buffer.clear()
        self._partial = None
        self._send_window = min(self.window, body["window"])
        self._send_max_payload = min(self.max_payload, body["max_payload"])
