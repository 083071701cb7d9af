"""The board agent: runs profiling workloads for a host over a serial link.

    edgetrain-agent --port /dev/ttyGS0 [--cache DIR] [--baud N]
    python -m firmware_bridge.board.agent --port /dev/ttyAMA0

Threading. The Link is single-threaded, so the main thread owns it and never does anything slow:
it receives, hands each message to a small handler, sends what the worker has queued, and sends a
status TELEMETRY every STATUS_INTERVAL_S while the worker is busy. Everything slow (hashing, ONNX
import, writing the cache, training) runs as a job on one worker thread, which never touches the
link: it puts outgoing messages on a queue. A training step therefore never holds up an ACK or a
heartbeat for longer than the main loop's poll interval plus a GIL switch interval.

Sessions. Each HELLO starts a session (the link adopts a fresh capabilities object). A new
session, a BYE or a lost host cancels the running job and drops everything queued for the old
session, so a host that reconnects starts from a clean slate. Messages that arrive before any
HELLO are ignored: they belong to a conversation this agent never had.

Trust. The agent accepts ONNX models and .npz data (allow_pickle=False) through the content-
addressed cache, and JSON workloads; nothing received is executed or used as a path.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import platform
import queue
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import serial

from edgetrain import limits
from edgetrain.cli.argtypes import memory_size
from edgetrain.errors import DataError, EdgetrainError, ModelError, ResourceLimitError
from edgetrain.kernels import use_backend
from edgetrain.kernels.routes import CHOICES, ENV_VAR, usable_routes
from firmware_bridge.board.cache import BlobCache, Upload, default_cache_dir
from firmware_bridge.board.measure import BoardMeter
from firmware_bridge.profile.errors import WorkloadError
from firmware_bridge.profile.workload import (
    TASK_TRAIN,
    TrainingData,
    TrainingRun,
    Workload,
    engine_info,
    load_model,
    train,
)
from firmware_bridge.telemetry import probe
from firmware_bridge.telemetry._sysfs import read_text, under
from firmware_bridge.wire.counters import LinkCounters
from firmware_bridge.wire.errors import FrameTooLarge, LinkTimeout, PeerGone, ProtocolError, ProtocolVersionError
from firmware_bridge.wire.link import Link
from firmware_bridge.wire.messages import ACCEPTED_MODEL_FORMATS, BLOB_FORMATS, Message, MsgType
from firmware_bridge.wire.transport import DEFAULT_BAUD, open_port

__all__ = ["Agent", "ErrorCode", "board_capabilities", "build_parser", "main"]

log = logging.getLogger("edgetrain.agent")

AGENT_NAME = "edgetrain-agent"
# The main loop returns from recv at least this often to send what the worker queued; this is
# the added latency of PROGRESS and RESULT, at a cost of ~100 wake-ups a second.
LOOP_POLL_S = 0.01
STATUS_INTERVAL_S = 1.0
# PROGRESS at most this often: enough for a smooth bar, few enough not to crowd a slow UART.
PROGRESS_INTERVAL_S = 0.1
PORT_RETRY_S = 1.0
BYE_TIMEOUT_S = 1.0
# ERROR and RESULT texts are one line for a terminal; a runaway message must not fill a frame.
MAX_ERROR_TEXT = 1000
MAX_JOB_ID = 128
# Per-step times are sent individually only for short runs; longer ones get the summary alone.
MAX_STEP_TIMES_SENT = 256
DEVICE_TREE_MODEL = "/proc/device-tree/model"
EXIT_USAGE = 2
# Left free on the cache's file system after an upload: logs, the OS and other writers need room too.
CACHE_DISK_RESERVE = 64 << 20


class ErrorCode:
    """ERROR and failed-RESULT codes (docs/PROTOCOL.md, section 3.2 and 6)."""

    BAD_MESSAGE = "bad_message"
    MODEL_MISSING = "model_missing"
    MODEL_INVALID = "model_invalid"
    DATA_MISSING = "data_missing"
    DATA_INVALID = "data_invalid"
    HASH_MISMATCH = "hash_mismatch"
    WORKLOAD_INVALID = "workload_invalid"
    UNSUPPORTED = "unsupported"
    INTERNAL = "internal"
    NO_ROOM = "no_room"


def _clip(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_ERROR_TEXT else line[: MAX_ERROR_TEXT - 1] + "\u2026"


def _blob_name(fmt: str, sha: str) -> str:
    return f"{'model' if fmt in ACCEPTED_MODEL_FORMATS else 'data'} {sha[:12]}"


@dataclass
class Outgoing:
    """A message the worker wants sent, tagged with the session it belongs to."""

    generation: int
    msg_type: MsgType
    body: Any


@dataclass
class Job:
    """One unit of slow work, run on the worker thread."""

    kind: str
    job_id: str
    generation: int
    action: Callable[[Job], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    step: int = 0
    total_steps: int = 0


class Worker:
    """Runs jobs one at a time on a daemon thread."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="agent-worker", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Return True while a job is queued or running."""
        with self._lock:
            return self._pending > 0

    def submit(self, job: Job) -> None:
        """Queue `job` behind any others."""
        with self._lock:
            self._pending += 1
        self._jobs.put(job)

    def cancel_all(self) -> None:
        """Drop queued jobs and ask the running one to stop at its next step."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                with self._lock:
                    self._pending -= 1
        current = self.current
        if current is not None:
            current.cancel.set()

    def stop(self, timeout: float | None = None) -> None:
        """Cancel everything and let the thread finish."""
        self.cancel_all()
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self.current = job
            try:
                job.action(job)
            except Exception:  # a job's own errors are answered by the job; this is a bug
                log.exception("job %s %s failed", job.kind, job.job_id)
            finally:
                self.current = None
                with self._lock:
                    self._pending -= 1


def board_capabilities(telemetry_root: str | Path = "/") -> dict[str, Any]:
    """Return the HELLO capabilities describing this board."""
    model = read_text(under(telemetry_root, DEVICE_TREE_MODEL))
    board = model.rstrip("\x00").strip() if model else f"{platform.system().lower()}-{platform.machine()}"
    ram_mb = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        ram_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1 << 20)
    return {
        "agent": AGENT_NAME,
        "board": board,
        "ram_mb": ram_mb,
        "cpus": os.cpu_count(),
        "telemetry": sorted(probe(telemetry_root).found),
        "formats": list(BLOB_FORMATS),
        "tasks": [TASK_TRAIN],
        "integer_engine": True,  # every edgetrain since the integer engine; kept in HELLO for hosts that ask
        "integer_routes": usable_routes(),
        **engine_info(),
    }


def _summary(step_s: list[float]) -> dict[str, float] | None:
    if not step_s:
        return None
    return {
        "mean": statistics.fmean(step_s),
        "median": statistics.median(step_s),
        "min": min(step_s),
        "max": max(step_s),
        "total": math.fsum(step_s),
    }


def _finite(value: float | None) -> float | None:
    # JSON has no NaN: a diverged loss is reported as missing, not as a broken message.
    return value if value is not None and math.isfinite(value) else None


def run_metrics(run: TrainingRun, workload: Workload, meter: BoardMeter) -> dict[str, Any]:
    """Return the RESULT metrics of a finished training run."""
    metrics: dict[str, Any] = {
        "layers": [[layer.name, layer.forward_s, layer.backward_s] for layer in run.layers],
        "timed_steps": len(run.step_s),
        "warmup_steps": workload.warmup_steps,
        "step_s": _summary(run.step_s),
        "loss_first": _finite(run.losses[0] if run.losses else None),
        "loss_last": _finite(run.losses[-1] if run.losses else None),
        "digest": run.digest,
        "float_mode": run.float_mode,
        "engine": engine_info(),
        **meter.report(len(run.step_s)),
    }
    if len(run.step_s) <= MAX_STEP_TIMES_SENT:
        metrics["step_times_s"] = run.step_s
    return metrics


class Agent:
    """Serves one serial port: handshakes, uploads into the cache, workloads, errors."""

    def __init__(
        self,
        port_name: str,
        *,
        cache_dir: str | os.PathLike[str],
        baud: int = DEFAULT_BAUD,
        telemetry_root: str | Path = "/",
        link_options: dict[str, Any] | None = None,
        poll_s: float = LOOP_POLL_S,
    ) -> None:
        self.port_name = port_name
        self.baud = baud
        self.cache = BlobCache(cache_dir)
        self.telemetry_root = telemetry_root
        self.poll_s = poll_s
        self.capabilities = board_capabilities(telemetry_root)
        self.link_options = {"peer_timeout": None, **(link_options or {})}
        self.worker = Worker()
        self.outbox: queue.Queue[Outgoing] = queue.Queue()
        self.generation = 0
        self.counters = {"sessions": 0, "errors_sent": 0, "ignored_outside_session": 0, "links_replaced": 0}
        self._link_totals = LinkCounters()
        self._session_caps: dict[str, Any] | None = None
        self._in_session = False
        self._upload: Upload | None = None
        # Total of an upload refused at its first chunk: the rest of it is dropped without an ERROR each.
        self._refused_upload: int | None = None
        self._result_in_flight = False
        self._last_status = 0.0
        # One small handler per message type a host may send, all with the same signature.
        self.handlers: dict[MsgType, Callable[[Message], None]] = {
            MsgType.MODEL_QUERY: self._on_model_query,
            MsgType.MODEL_CHUNK: self._on_model_chunk,
            MsgType.MODEL_COMMIT: self._on_model_commit,
            MsgType.WORKLOAD: self._on_workload,
            MsgType.CANCEL: self._on_cancel,
            MsgType.BYE: self._on_bye,
            MsgType.ERROR: self._on_host_error,
        }

    # ------------------------------------------------------------------------------ serving

    def serve_forever(self, stop: threading.Event, port: serial.SerialBase | None = None) -> None:
        """Serve until `stop` is set, reopening the port whenever it fails (a USB gadget re-enumerating)."""
        while not stop.is_set():
            if port is None:
                try:
                    port = open_port(self.port_name, self.baud)
                except (serial.SerialException, OSError, ValueError) as exc:
                    log.warning("cannot open %s (%s); retrying in %g s", self.port_name, exc, PORT_RETRY_S)
                    stop.wait(PORT_RETRY_S)
                    continue
            try:
                # Bytes queued before we listened belong to nobody's session.
                with contextlib.suppress(serial.SerialException, OSError, AttributeError):
                    port.reset_input_buffer()
                self.serve(port, stop)
            except (serial.SerialException, OSError) as exc:
                log.warning("port %s failed (%s); reopening", self.port_name, exc)
                self._end_session("port failed")
            finally:
                with contextlib.suppress(serial.SerialException, OSError):
                    port.close()
                port = None
        self.worker.stop(timeout=BYE_TIMEOUT_S)

    def serve(self, port: serial.SerialBase, stop: threading.Event) -> None:
        """Run the link loop on an open port until `stop` is set."""
        link = self._new_link(port)
        try:
            while not stop.is_set():
                try:
                    self._serve_once(link)
                except PeerGone as exc:
                    log.info("host gone: %s", exc)
                    self._end_session("host gone")
                    link = self._replace_link(link, port)
        finally:
            self._end_session("link closed")
            self._retire(link)
            link.close("agent stopping" if stop.is_set() else "port failed", timeout=BYE_TIMEOUT_S)

    def _serve_once(self, link: Link) -> None:
        message: Message | None = None
        try:
            message = link.recv(timeout=self.poll_s)
        except PeerGone:
            raise
        except LinkTimeout:
            pass
        except ProtocolVersionError as exc:
            log.warning("%s", exc)
        except ProtocolError as exc:
            # Intact but unreadable (unknown type, broken schema): acknowledged by the link, refused here.
            self._track_session(link)
            self._refuse(ErrorCode.BAD_MESSAGE, str(exc))
        self._track_session(link)
        if message is not None:
            self._dispatch(message)
        self._flush(link)
        self._send_status(link)

    def _new_link(self, port: serial.SerialBase) -> Link:
        return Link(port, capabilities=self.capabilities, **self.link_options)

    def _replace_link(self, link: Link, port: serial.SerialBase) -> Link:
        # A link that gave up on its peer keeps failing; a fresh one waits for the next HELLO.
        self._retire(link)
        link.close(bye=False)
        self.counters["links_replaced"] += 1
        return self._new_link(port)

    def _retire(self, link: Link) -> None:
        self._link_totals.retire(link)

    def link_counters(self, link: Link) -> dict[str, dict[str, int]]:
        """Return decoder, link and agent counters since the agent started (all links together)."""
        return {"agent": dict(self.counters), **self._link_totals.totals(link)}

    # ----------------------------------------------------------------------------- sessions

    def _track_session(self, link: Link) -> None:
        caps = link.peer_capabilities
        if caps is None or caps is self._session_caps:
            return
        # The link adopts a new capabilities object on every accepted HELLO: a new session.
        self._end_session("new session")
        self._session_caps = caps
        self._in_session = True
        self.counters["sessions"] += 1
        log.info("session %d with %s", self.counters["sessions"], caps.get("host", "a host"))

    def _end_session(self, reason: str) -> None:
        if self._in_session or self.worker.busy:
            log.info("session over: %s", reason)
        self.generation += 1
        self.worker.cancel_all()
        self._drop_upload()
        self._in_session = False

    def _dispatch(self, message: Message) -> None:
        if not self._in_session:
            self.counters["ignored_outside_session"] += 1
            return
        handler = self.handlers.get(message.type)
        if handler is None:
            self._refuse(ErrorCode.BAD_MESSAGE, f"{message.type.name} is not something a host sends")
            return
        try:
            handler(message)
        except ProtocolError as exc:
            self._refuse(ErrorCode.BAD_MESSAGE, str(exc))

    # ------------------------------------------------------------------------------ sending

    def _post(self, generation: int, msg_type: MsgType, body: Any) -> None:
        self.outbox.put(Outgoing(generation, msg_type, body))

    def _refuse(self, code: str, text: str) -> None:
        if not self._in_session:
            return
        log.warning("refused (%s): %s", code, text)
        self._post(self.generation, MsgType.ERROR, {"code": code, "message": _clip(text)})

    def _flush(self, link: Link) -> None:
        while link.can_send:
            try:
                item = self.outbox.get_nowait()
            except queue.Empty:
                return
            if item.generation != self.generation:
                continue  # belongs to a session that is over
            if item.msg_type == MsgType.RESULT and item.body.get("status") == "ok":
                # Link counters are read here, on the thread that owns the link.
                item.body["metrics"]["agent_link"] = self.link_counters(link)
            if item.msg_type == MsgType.ERROR:
                self.counters["errors_sent"] += 1
            self._result_in_flight = self._result_in_flight or item.msg_type == MsgType.RESULT
            try:
                link.send(item.msg_type, item.body, wait=False)
            except (FrameTooLarge, ProtocolError) as exc:
                log.error("cannot send %s: %s", item.msg_type.name, exc)
                self._send_unsendable(link, item, exc)

    def _send_unsendable(self, link: Link, item: Outgoing, exc: Exception) -> None:
        if item.msg_type == MsgType.RESULT:
            body = {"id": item.body["id"], "status": "error", "message": _clip(f"result cannot be sent: {exc}")}
            link.send(MsgType.RESULT, body, wait=False)
        else:
            link.send(MsgType.ERROR, {"code": ErrorCode.INTERNAL, "message": _clip(str(exc))}, wait=False)

    def _send_status(self, link: Link) -> None:
        job = self.worker.current
        now = time.monotonic()
        # Also while what a job produced is still on its way (a RESULT crossing a noisy line fragment by
        # fragment): the host hears the board between the last PROGRESS and the RESULT.
        if self._result_in_flight and link.in_flight == 0:
            self._result_in_flight = False
        sending = job is None and self._result_in_flight
        if (job is None and not sending) or not self._in_session or now - self._last_status < STATUS_INTERVAL_S \
                or not link.can_send:
            return
        self._last_status = now
        if job is None:
            values: dict[str, Any] = {"state": "sending", "in_flight": link.in_flight}
        else:
            values = {"state": "busy", "job": job.kind, "id": job.job_id, "step": job.step,
                      "total_steps": job.total_steps}
        link.send(MsgType.TELEMETRY, {"time": now, "values": values}, wait=False)

    # ----------------------------------------------------------------------------- handlers

    def _submit(
        self, kind: str, job_id: str, action: Callable[[Job], None], on_drop: Callable[[], None] | None = None
    ) -> None:
        def run_if_current(job: Job) -> None:
            # Queued before its session ended but dequeued after: nobody is waiting for it.
            if job.generation == self.generation and not job.cancel.is_set():
                action(job)
            elif on_drop is not None:
                on_drop()

        self.worker.submit(Job(kind, job_id, self.generation, run_if_current))

    def _on_model_query(self, message: Message) -> None:
        body = message.body
        sha, fmt = body["sha256"], body.get("format", ACCEPTED_MODEL_FORMATS[0])
        self._submit("verify", sha[:12], lambda job: self._verify(job, sha, fmt, body.get("size")))

    def _no_room(self, size: int, what: str) -> str | None:
        """Return why a blob of `size` bytes cannot be taken now, or None if it fits."""
        # It is spooled to the cache's disk, then read back whole to be imported: both must hold it.
        limit = limits.budget()
        if size > self.cache.max_blob:
            return f"{what} of {limits.format_size(size)} exceeds the agent's blob limit of " \
                   f"{limits.format_size(self.cache.max_blob)}"
        if size > limit.max_bytes:
            return f"{what} of {limits.format_size(size)} does not fit the board's memory budget of " \
                   f"{limits.format_size(limit.max_bytes)} ({limit.source})"
        free = self.cache.free_bytes()
        if free is not None and size + CACHE_DISK_RESERVE > free:
            return f"{what} of {limits.format_size(size)} does not fit the {limits.format_size(free)} free " \
                   f"in the agent's cache folder"
        return None

    def _drop_upload(self) -> None:
        if self._upload is not None:
            self._upload.discard()
            self._upload = None
        self._refused_upload = None

    def _on_model_chunk(self, message: Message) -> None:
        chunk = message.body
        if chunk.offset == 0:
            # Every upload starts at offset 0; one left half-done is abandoned.
            self._drop_upload()
            problem = self._no_room(chunk.total, "upload")
            if problem is not None:
                self._refused_upload = chunk.total
                self._refuse(ErrorCode.NO_ROOM, problem)
                return
            try:
                self._upload = self.cache.begin_upload(chunk.total)
            except OSError as exc:
                self._refused_upload = chunk.total
                self._refuse(ErrorCode.INTERNAL, f"cannot spool the upload in the cache: {exc}")
                return
        elif self._upload is None:
            if self._refused_upload == chunk.total:
                return  # the rest of an upload already refused once
            raise ProtocolError(f"MODEL_CHUNK at offset {chunk.offset} with no upload in progress")
        try:
            self._upload.add(chunk)
        except ProtocolError:
            self._drop_upload()
            raise

    def _on_model_commit(self, message: Message) -> None:
        sha, size, fmt = message.body["sha256"], message.body["size"], message.body["format"]
        upload, self._upload = self._upload, None
        if upload is None and self._refused_upload is not None:
            self._refused_upload = None
            return  # refused at its first chunk, and said so then
        if upload is None or not upload.done:
            if upload is not None:
                upload.discard()
            raise ProtocolError(f"MODEL_COMMIT for {sha[:12]} without a complete upload before it")
        if upload.total != size:
            upload.discard()
            raise ProtocolError(f"MODEL_COMMIT says {size} bytes, the upload had {upload.total}")
        self._submit("store", sha[:12], lambda job: self._store(job, sha, fmt, upload), on_drop=upload.discard)

    def _on_workload(self, message: Message) -> None:
        body = message.body
        job_id = body["id"]
        if not 1 <= len(job_id) <= MAX_JOB_ID:
            raise ProtocolError(f"WORKLOAD id must be 1..{MAX_JOB_ID} characters")
        if body["task"] != TASK_TRAIN:
            self._refuse(ErrorCode.UNSUPPORTED, f"workload {job_id}: task '{body['task']}' is not supported yet")
            return
        try:
            workload = Workload.from_params(body["params"])
        except WorkloadError as exc:
            self._refuse(ErrorCode.WORKLOAD_INVALID, f"workload {job_id}: {exc}")
            return
        model_sha = body["model_sha256"]
        self._submit("train", job_id, lambda job: self._train(job, model_sha, workload))

    def _on_cancel(self, message: Message) -> None:
        job = self.worker.current
        if job is not None and job.kind == "train" and job.job_id == message.body["id"]:
            job.cancel.set()

    def _on_bye(self, message: Message) -> None:
        self._end_session(f"host said bye ({message.body.get('reason', 'no reason')})")

    def _on_host_error(self, message: Message) -> None:
        log.warning("host reported %s: %s", message.body["code"], message.body["message"])

    # --------------------------------------------------------------------------------- jobs

    def _job_error(self, job: Job, code: str, text: str) -> None:
        log.warning("%s %s failed (%s): %s", job.kind, job.job_id, code, text)
        self._post(job.generation, MsgType.ERROR, {"code": code, "message": _clip(text)})

    def _result_error(self, job: Job, code: str, text: str) -> None:
        log.warning("workload %s failed (%s): %s", job.job_id, code, text)
        body = {"id": job.job_id, "status": "error", "message": _clip(text), "metrics": {"code": code}}
        self._post(job.generation, MsgType.RESULT, body)

    def _verify(self, job: Job, sha: str, fmt: str, announced: int | None) -> None:
        size = self.cache.has(sha, fmt)
        if size is None and announced is not None:
            problem = self._no_room(announced, _blob_name(fmt, sha))
            if problem is not None:
                self._job_error(job, ErrorCode.NO_ROOM, problem)  # before a single byte of it is sent
                return
        body: dict[str, Any] = {"sha256": sha, "have": size is not None}
        if size is not None:
            body["size"] = size
        self._post(job.generation, MsgType.MODEL_HAVE, body)

    def _store(self, job: Job, sha: str, fmt: str, upload: Upload) -> None:
        try:
            actual = upload.finish()
            if actual != sha:
                self._job_error(job, ErrorCode.HASH_MISMATCH, f"upload hashes to {actual}, the commit names {sha}")
                return
            self._validate_and_adopt(job, sha, fmt, upload)
        except OSError as exc:
            self._job_error(job, ErrorCode.INTERNAL, f"cannot write the cache: {exc}")
        finally:
            upload.discard()  # a no-op once adopted: the spool has been renamed away

    def _validate_and_adopt(self, job: Job, sha: str, fmt: str, upload: Upload) -> None:
        blob = upload.path.read_bytes()
        is_model = fmt in ACCEPTED_MODEL_FORMATS
        where = _blob_name(fmt, sha)
        invalid = ErrorCode.MODEL_INVALID if is_model else ErrorCode.DATA_INVALID
        # Only a blob that imports within the memory budget (edgetrain.limits) is cached: a fold bomb is
        # refused here, before the reference evaluator allocates it, and never reaches a workload.
        try:
            if is_model:
                load_model(blob, where=where)
            else:
                TrainingData.from_npz(blob, where)
        except ModelError as exc:
            self._job_error(job, ErrorCode.MODEL_INVALID, str(exc))
            return
        except DataError as exc:
            self._job_error(job, ErrorCode.DATA_INVALID, str(exc))
            return
        except ResourceLimitError as exc:
            self._job_error(job, invalid, str(exc))
            return
        except MemoryError:
            # The budget is checked before every allocation a file asks for; this is the board running out
            # anyway (other work, a budget set too high). Refuse the blob and keep serving.
            log.exception("%s: out of memory while importing it", where)
            self._job_error(job, invalid, f"{where}: the board ran out of memory importing it "
                                          f"(memory budget {limits.format_size(limits.budget().max_bytes)})")
            return
        del blob  # imported and checked; the spool on disk becomes the cache entry without a copy
        self.cache.adopt(sha, fmt, upload.path)
        self._post(job.generation, MsgType.MODEL_HAVE, {"sha256": sha, "have": True, "size": upload.total})

    def _train(self, job: Job, model_sha: str, workload: Workload) -> None:
        job.total_steps = workload.total_steps
        try:
            self._train_checked(job, model_sha, workload)
        except ModelError as exc:
            self._result_error(job, ErrorCode.MODEL_INVALID, str(exc))
        except DataError as exc:
            self._result_error(job, ErrorCode.DATA_INVALID, str(exc))
        except EdgetrainError as exc:  # WorkloadError, engine refusals, a workload over the memory budget
            self._result_error(job, ErrorCode.WORKLOAD_INVALID, str(exc))
        except Exception as exc:  # the host gets one line; the traceback goes to the agent's log
            log.exception("workload %s crashed", job.job_id)
            self._result_error(job, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _train_checked(self, job: Job, model_sha: str, workload: Workload) -> None:
        blob = self.cache.read_verified(model_sha, "onnx")
        if blob is None:
            self._result_error(job, ErrorCode.MODEL_MISSING, f"model {model_sha[:12]} is not cached; upload it first")
            return
        model = load_model(blob, seed=workload.seed, where=f"model {model_sha[:12]}")
        data = None
        if workload.data_sha256 is not None:
            data_blob = self.cache.read_verified(workload.data_sha256, "npz")
            if data_blob is None:
                text = f"data {workload.data_sha256[:12]} is not cached; upload it first"
                self._result_error(job, ErrorCode.DATA_MISSING, text)
                return
            data = TrainingData.from_npz(data_blob, f"data {workload.data_sha256[:12]}")
        meter = BoardMeter(self.telemetry_root)
        last_sent = 0.0

        def on_step(done: int, total: int, loss: float) -> None:
            nonlocal last_sent
            job.step = done
            now = time.monotonic()
            if done == total or now - last_sent >= PROGRESS_INTERVAL_S:
                last_sent = now
                body: dict[str, Any] = {"id": job.job_id, "step": done, "total_steps": total}
                if math.isfinite(loss):
                    body["loss"] = loss
                self._post(job.generation, MsgType.PROGRESS, body)

        run = train(model, workload, data, on_step=on_step, should_stop=job.cancel.is_set, timed_phase=lambda: meter)
        if run.cancelled:
            self._post(job.generation, MsgType.RESULT, {"id": job.job_id, "status": "cancelled"})
            return
        metrics = run_metrics(run, workload, meter)
        body = {"id": job.job_id, "status": "ok", "metrics": metrics}
        if meter.energy_j is not None:
            body["energy_j"] = meter.energy_j
        self._post(job.generation, MsgType.RESULT, body)


# ------------------------------------------------------------------------------------------ command line


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the agent's argument parser."""
    parser = _OneLineParser(prog=AGENT_NAME, description="Serve edgetrain profiling workloads over a serial port.")
    parser.add_argument("--port", required=True, help="serial device (or pyserial URL) the host is attached to")
    parser.add_argument("--cache", help=f"folder for received models and data (default {default_cache_dir()})")
    parser.add_argument("--baud", type=int, default=DEFAULT_BAUD, help=f"line rate (default {DEFAULT_BAUD})")
    parser.add_argument(
        "--telemetry-root", default="/", help="read sensors below this folder instead of / (recorded trees, tests)"
    )
    parser.add_argument(
        limits.FLAG, metavar="SIZE", type=memory_size,
        help=f"memory budget for what one uploaded file may make the agent allocate, e.g. 512M or 2G "
             f"(default: ${limits.ENV_VAR}, else half of the memory the agent may use)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log every session and refusal")
    parser.add_argument("--backend", choices=CHOICES, default=None,
                        help=f"integer kernel route (default ${ENV_VAR}, else auto); a workload may name its own")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point of `edgetrain-agent`."""
    args = build_parser().parse_args(argv)
    if args.max_memory is not None:
        limits.set_max_memory(args.max_memory)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s edgetrain-agent %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    cache_dir = args.cache or default_cache_dir()
    try:
        use_backend(args.backend)  # probes the routes (safely) now, not in the middle of the first job
    except EdgetrainError as exc:
        print(f"{AGENT_NAME}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        agent = Agent(args.port, cache_dir=cache_dir, baud=args.baud, telemetry_root=args.telemetry_root)
    except OSError as exc:
        print(f"{AGENT_NAME}: error: cannot use cache folder {cache_dir}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        port = open_port(args.port, args.baud)
    except (serial.SerialException, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{AGENT_NAME}: error: cannot open port {args.port}: {reason}", file=sys.stderr)
        return EXIT_USAGE
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    log.info("serving %s, cache %s", args.port, Path(cache_dir).resolve())
    agent.serve_forever(stop, port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
