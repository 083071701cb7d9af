"""Host side of `edgetrain profile`: reach the agent, upload, run the workload, collect, check locally.

The host is single-threaded like the link: it only ever waits for the board, so its loop of short
`recv` calls keeps ACKs and heartbeats flowing. The board counts as silent when no application
message has arrived for `timeout_s * DETECT_FRACTION` (a busy agent sends a status TELEMETRY
every second, so silence means trouble, not a long step). The rest of the timeout goes to finding
it again: a restarted agent answers a fresh HELLO, and the profile restarts from the upload query,
which the agent's cache makes cheap. Only when that fails too does the user see
"board stopped answering on PORT after N s".
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import serial
from tqdm import tqdm

from edgetrain.errors import DataError, EdgetrainError, ModelError
from edgetrain.info import summarize
from firmware_bridge.profile.errors import BoardRefused, BoardUnreachable, ProfileError, WorkloadError
from firmware_bridge.profile.records import (
    DEFAULT_BATCH,
    DEFAULT_TIMEOUT_S,
    BoardRun,
    Prepared,
    ProfileRequest,
)
from firmware_bridge.profile.report import build_report
from firmware_bridge.profile.workload import (
    TrainingData,
    TrainingRun,
    Workload,
    check_model_fits,
    check_precision,
    load_model,
    sha256_hex,
    train,
)
from firmware_bridge.wire.counters import LinkCounters
from firmware_bridge.wire.errors import LinkTimeout, PeerGone, ProtocolError, ProtocolVersionError
from firmware_bridge.wire.link import Link
from firmware_bridge.wire.messages import ACCEPTED_MODEL_FORMATS, DATA_FORMAT, Message, MsgType
from firmware_bridge.wire.transport import DEFAULT_BAUD, open_port

__all__ = [
    "BoardClient",
    "prepare",
    "profile",
    "run_locally",
    "run_on_board",
]

HOST_NAME = "edgetrain-profile"
AGENT_NAME = "edgetrain-agent"
# Half the timeout to notice a silent board, half to find it again before giving up.
DETECT_FRACTION = 0.5
# A profile restarts at most this often after the board was lost and found again.
MAX_RESTARTS = 2
# Handshakes (each a burst of HELLOs) per attempt to reach the board.
HANDSHAKE_ATTEMPTS = 3
# A reconnection always gets at least this long, even if the silence ate the timeout.
MIN_RECONNECT_S = 1.0
ACK_TIMEOUT_S = 0.5
RECV_SLICE_S = 0.2
BYE_TIMEOUT_S = 1.0
MAX_TELEMETRY_KEPT = 1000


class _Lost(Exception):
    """The board fell silent or the port failed; `silent_s` is how long it has been quiet."""

    def __init__(self, silent_s: float, why: str) -> None:
        super().__init__(why)
        self.silent_s = silent_s


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class BoardClient:
    """One port, one agent: connect, upload, run. Link failures surface as `_Lost`, user errors as ProfileError."""

    def __init__(
        self,
        port_name: str,
        *,
        baud: int = DEFAULT_BAUD,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        progress: bool = True,
        on_progress: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_s <= 0:
            raise ProfileError(f"timeout must be positive, got {timeout_s:g} s")
        self.port_name = port_name
        self.baud = baud
        self.timeout_s = timeout_s
        self.detect_s = timeout_s * DETECT_FRACTION
        self.progress = progress
        self.on_progress = on_progress
        self.telemetry: list[dict[str, Any]] = []
        self._clock = clock
        self._port: serial.SerialBase | None = None
        self._link: Link | None = None
        self._link_totals = LinkCounters()
        self._last_alive = clock()

    # ------------------------------------------------------------------------- connection

    @property
    def link(self) -> Link:
        """Return the current link (after connect)."""
        if self._link is None:
            raise ProfileError("not connected")
        return self._link

    def _open_port(self) -> None:
        try:
            # A write that blocks this long means nobody drains the line: treat it as silence.
            self._port = open_port(self.port_name, self.baud, write_timeout=self.detect_s)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise BoardUnreachable(f"cannot open port {self.port_name}: {_one_line(exc)}") from None

    def _new_link(self) -> Link:
        assert self._port is not None
        self._drop_link()
        max_retries = max(1, round(self.detect_s / ACK_TIMEOUT_S))
        # A fresh nonce per handshake tells the agent this is a new session even if nothing else differs.
        capabilities = {"host": HOST_NAME, "session": secrets.token_hex(8)}
        self._link = Link(
            self._port,
            ack_timeout=ACK_TIMEOUT_S,
            max_retries=max_retries,
            peer_timeout=self.detect_s,
            capabilities=capabilities,
            baud=self.baud,
            clock=self._clock,
        )
        return self._link

    def _drop_link(self) -> None:
        if self._link is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                self._link.close(bye=False)
            self._link_totals.retire(self._link)
            self._link = None

    def _handshake(self, budget_s: float) -> dict[str, Any] | None:
        deadline = self._clock() + budget_s
        for _ in range(HANDSHAKE_ATTEMPTS):
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            link = self._new_link()
            try:
                capabilities = link.handshake(timeout=remaining)
            except ProtocolVersionError as exc:
                raise BoardRefused(f"board on {self.port_name}: {exc}") from None
            except (LinkTimeout, ProtocolError):
                continue  # nobody there yet, or a garbled answer: say HELLO again
            except (serial.SerialException, OSError):
                if not self._reopen_port(deadline):
                    break
                continue
            self._check_peer(capabilities, link)
            self._last_alive = self._clock()
            return capabilities
        return None

    def _check_peer(self, capabilities: dict[str, Any], link: Link) -> None:
        # A loopback (loop://, a terminal echoing) hands our own HELLO back, and the link
        # happily completes a session with itself.
        if capabilities.get("session") == link.capabilities.get("session"):
            raise BoardUnreachable(
                f"{self.port_name} echoes back what the host sends (a loopback?); no edgetrain agent there"
            )
        if capabilities.get("agent") != AGENT_NAME:
            raise BoardRefused(f"the peer on {self.port_name} is not an edgetrain agent: {capabilities}")

    def _reopen_port(self, deadline: float) -> bool:
        # A USB serial device vanishes while its board reboots; wait for it to come back.
        self._close_port()
        while self._clock() < deadline:
            try:
                self._open_port()
                return True
            except BoardUnreachable:
                time.sleep(min(ACK_TIMEOUT_S, max(0.0, deadline - self._clock())))
        return False

    def _close_port(self) -> None:
        self._drop_link()
        if self._port is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                self._port.close()
            self._port = None

    def connect(self) -> dict[str, Any]:
        """Open the port and handshake; return the agent's capabilities."""
        self._open_port()
        capabilities = self._handshake(self.timeout_s)
        if capabilities is None:
            self.close(bye=False)
            raise BoardUnreachable(
                f"no edgetrain agent answered on {self.port_name} within {self.timeout_s:g} s "
                "(is `edgetrain-agent --port DEVICE` running on the board?)"
            )
        return capabilities

    def reconnect(self, lost: _Lost) -> dict[str, Any]:
        """Find the board again after `lost`, within what is left of the timeout, or raise BoardUnreachable."""
        started = self._clock()
        budget = max(self.timeout_s - lost.silent_s, MIN_RECONNECT_S)
        capabilities = None
        if self._reopen_port(started + budget):
            capabilities = self._handshake(budget - (self._clock() - started))
        if capabilities is None:
            silent = lost.silent_s + self._clock() - started
            self.close(bye=False)
            raise BoardUnreachable(f"board stopped answering on {self.port_name} after {silent:.1f} s")
        return capabilities

    def close(self, *, bye: bool = True) -> None:
        """Close the port, after a best-effort BYE if `bye` (pointless to a board that is gone)."""
        if self._link is not None and bye:
            with contextlib.suppress(serial.SerialException, OSError):
                self._link.close("profile done", timeout=BYE_TIMEOUT_S)
        self._close_port()

    # -------------------------------------------------------------------------- messaging

    def _silence(self) -> float:
        # A message still arriving fragment by fragment (a long RESULT on a noisy line) is a board
        # that is talking, not a silent one.
        heard = self._last_alive if self._link is None else max(self._last_alive, self._link.progress_at)
        return self._clock() - heard

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except LinkTimeout as exc:  # PeerGone included
            raise _Lost(self._silence(), str(exc)) from None
        except (serial.SerialException, OSError) as exc:
            raise _Lost(self._silence(), f"port failed: {_one_line(exc)}") from None

    def _send(self, msg_type: MsgType, body: Any) -> None:
        with self._guard():
            self.link.send(msg_type, body)
        self._last_alive = self._clock()

    def _recv(self) -> Message:
        """Return the next application message; raise _Lost once the board has been silent too long."""
        while True:
            try:
                message = self.link.recv(timeout=RECV_SLICE_S)
            except PeerGone as exc:
                raise _Lost(self._silence(), str(exc)) from None
            except LinkTimeout:
                # Only a slice ran out; the board may simply be busy, and says so every second.
                if self._silence() > self.detect_s:
                    raise _Lost(self._silence(), "no message from the board") from None
                continue
            except ProtocolError as exc:
                raise ProfileError(f"board on {self.port_name} sent a message this host cannot read: {exc}") from None
            except (serial.SerialException, OSError) as exc:
                raise _Lost(self._silence(), f"port failed: {_one_line(exc)}") from None
            self._last_alive = self._clock()
            if message.type == MsgType.TELEMETRY and len(self.telemetry) < MAX_TELEMETRY_KEPT:
                self.telemetry.append(message.body)
            return message

    @staticmethod
    def _refusal(what: str, body: dict[str, Any]) -> BoardRefused:
        return BoardRefused(f"board refused {what} ({body['code']}): {body['message']}")

    def _await_have(self, sha: str, what: str) -> bool:
        while True:
            message = self._recv()
            if message.type == MsgType.MODEL_HAVE and message.body["sha256"] == sha:
                return bool(message.body["have"])
            if message.type == MsgType.ERROR:
                raise self._refusal(what, message.body)

    def ensure_blob(self, blob: bytes, sha: str, fmt: str, what: str) -> bool:
        """Upload `blob` unless the board has it cached; return True if it was uploaded."""
        self._send(MsgType.MODEL_QUERY, {"sha256": sha, "format": fmt, "size": len(blob)})
        if self._await_have(sha, what):
            return False
        bar = tqdm(
            total=len(blob), unit="B", unit_scale=True, desc=f"upload {what}", disable=not self.progress, leave=False
        )
        try:
            with self._guard():
                self.link.send_bulk(blob, on_chunk=bar.update)
            self._last_alive = self._clock()
            self._send(MsgType.MODEL_COMMIT, {"sha256": sha, "size": len(blob), "format": fmt})
        finally:
            bar.close()
        if not self._await_have(sha, what):
            raise BoardRefused(f"board did not keep the {what} after its upload")
        return True

    def run_workload(self, workload_id: str, model_sha: str, workload: Workload) -> dict[str, Any]:
        """Send the workload, follow its progress, and return the RESULT body."""
        body = {"id": workload_id, "model_sha256": model_sha, "task": "train", "params": workload.to_params()}
        self._send(MsgType.WORKLOAD, body)
        bar = tqdm(total=workload.total_steps, desc="board", unit="step", disable=not self.progress, leave=False)
        try:
            while True:
                message = self._recv()
                kind, body = message.type, message.body
                if kind == MsgType.PROGRESS and body["id"] == workload_id:
                    bar.update(body["step"] - bar.n)
                    if "loss" in body:
                        bar.set_postfix(loss=f"{body['loss']:.4f}")
                    if self.on_progress is not None:
                        self.on_progress(body["step"], body["total_steps"])
                elif kind == MsgType.RESULT and body["id"] == workload_id:
                    if body["status"] == "ok":
                        return body
                    if body["status"] == "cancelled":
                        raise ProfileError("the board cancelled the workload")
                    raise BoardRefused(f"board could not run the workload: {body.get('message', 'no reason given')}")
                elif kind == MsgType.ERROR:
                    raise self._refusal("the workload", body)
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                self.link.send(MsgType.CANCEL, {"id": workload_id}, timeout=BYE_TIMEOUT_S)
            raise
        finally:
            bar.close()

    def link_counters(self) -> dict[str, Any]:
        """Return this host's link and decoder counters over every link of this client (reconnections included)."""
        if self._link is None and not self._link_totals.links_retired:
            return {}
        links = self._link_totals.links_retired + (self._link is not None)
        return {**self._link_totals.totals(self._link), "links": links}


# ----------------------------------------------------------------------------------------- profiling


def _read(path: str, error: type[EdgetrainError]) -> bytes:
    if not os.path.exists(path):
        raise error(f"{path}: no such file")
    if os.path.isdir(path):
        raise error(f"{path}: is a directory, not a file")
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None


def _input_shape(model_shape: tuple[Any, ...], batch_size: int | None) -> tuple[int, ...]:
    fixed = model_shape[0] if model_shape and isinstance(model_shape[0], int) else None
    if fixed is not None and batch_size is not None and batch_size != fixed:
        raise WorkloadError(
            f"the model was exported with a fixed batch of {fixed}; --batch-size {batch_size} cannot run"
        )
    batch = fixed or batch_size or DEFAULT_BATCH
    return (batch, *model_shape[1:])


def prepare(request: ProfileRequest) -> Prepared:
    """Read and check the model, data and workload before touching the board."""
    blob = _read(request.model, ModelError)
    model = load_model(blob, seed=request.seed, where=request.model)
    check_precision(request.precision)
    data_blob = data_sha = data = None
    if request.data is not None:
        data_blob = _read(request.data, DataError)
        data_sha = sha256_hex(data_blob)
        data = TrainingData.from_npz(data_blob, request.data)
    workload = Workload(
        input_shape=_input_shape(tuple(model.input_shape), request.batch_size),
        steps=request.steps,
        warmup_steps=request.warmup,
        precision=request.precision,
        seed=request.seed,
        data_sha256=data_sha,
        backend=request.backend,
        deterministic=request.deterministic,
    )
    classes = check_model_fits(model, workload)
    if data is not None:
        data.check_fits(workload.input_shape, classes, request.data or "data")
    return Prepared(blob, sha256_hex(blob), workload, summarize(model), data_blob, data_sha, data)


def run_on_board(request: ProfileRequest, prepared: Prepared, client: BoardClient | None = None) -> BoardRun:
    """Connect, upload what the board lacks, run the workload, and reconnect/restart if the board is lost."""
    client = client or BoardClient(
        request.port,
        baud=request.baud,
        timeout_s=request.timeout_s,
        progress=request.progress,
        on_progress=request.on_progress,
    )
    started = time.monotonic()
    capabilities = client.connect()
    uploaded, data_uploaded, upload_bytes, restarts = False, None, 0, 0
    try:
        while True:
            try:
                if client.ensure_blob(prepared.model_blob, prepared.model_sha, ACCEPTED_MODEL_FORMATS[0], "model"):
                    uploaded, upload_bytes = True, upload_bytes + len(prepared.model_blob)
                if prepared.data_blob is not None and prepared.data_sha is not None:
                    sent = client.ensure_blob(prepared.data_blob, prepared.data_sha, DATA_FORMAT, "data")
                    data_uploaded = bool(data_uploaded) or sent
                    upload_bytes += len(prepared.data_blob) if sent else 0
                result = client.run_workload(prepared.workload_id, prepared.model_sha, prepared.workload)
                break
            except _Lost as lost:
                if restarts >= MAX_RESTARTS:
                    raise BoardUnreachable(
                        f"board stopped answering on {request.port} after {lost.silent_s:.1f} s "
                        f"(lost {restarts + 1} times; giving up)"
                    ) from None
                restarts += 1
                capabilities = client.reconnect(lost)
    except BoardUnreachable:
        client.close(bye=False)  # a BYE to a board that is gone would only delay the error
        raise
    except BaseException:
        client.close()  # a board that refused something still deserves its BYE
        raise
    run = BoardRun(
        capabilities=capabilities,
        result=result,
        uploaded=uploaded,
        data_uploaded=data_uploaded,
        upload_bytes=upload_bytes,
        restarts=restarts,
        telemetry=client.telemetry,
        link=client.link_counters(),
        seconds=time.monotonic() - started,
    )
    client.close()
    return run


def run_locally(request: ProfileRequest, prepared: Prepared) -> tuple[TrainingRun, float]:
    """Run the same workload on this machine with the same engine; return the run and its seconds."""
    model = load_model(prepared.model_blob, seed=prepared.workload.seed, where=request.model)
    bar = tqdm(
        total=prepared.workload.total_steps, desc="host check", unit="step", disable=not request.progress, leave=False
    )
    started = time.monotonic()
    try:
        run = train(model, prepared.workload, prepared.data, on_step=lambda done, total, loss: bar.update(1))
    finally:
        bar.close()
    return run, time.monotonic() - started


def profile(request: ProfileRequest, prepared: Prepared | None = None) -> dict[str, Any]:
    """Profile the model on the board, check it against this machine, and return the report."""
    prepared = prepared or prepare(request)
    board = run_on_board(request, prepared)
    local, local_seconds = run_locally(request, prepared)
    return build_report(request, prepared, board, local, local_seconds)
