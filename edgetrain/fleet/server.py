"""The federation's server loop: Flower's strategies aggregate, edgetrain checks, evaluates, checkpoints and
exports.

Each round: the strategy configures the clients (Flower sends the global float32 tensors), every reply is
checked (edgetrain.fleet.validate) and decoded, the accepted ones are put in the order of their client ids
(float sums depend on order: this keeps seeded runs bit-identical) and handed to the strategy as full
weights (global + delta); then the global model is evaluated centrally, checkpointed atomically in
edgetrain's format (ckpt-<round>.npz, so `edgetrain eval/export/info DIR` read it), and logged to
rounds.jsonl. A stopped federation resumes from its newest checkpoint.
"""
from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedTrimmedAvg, Krum, Strategy

from edgetrain import preprocess
from edgetrain.errors import EdgetrainError
from edgetrain.fileio import make_folder, write_atomic
from edgetrain.fleet import codec
from edgetrain.fleet.local import RANGE_PREFIX, load_split, model_normalizes_cached
from edgetrain.fleet.settings import FleetSettings
from edgetrain.fleet.validate import RejectedReply, check_examples, check_layout, decode_checked, max_wire_bytes
from edgetrain.precision.control import make_controller
from edgetrain.preprocess import Preprocess
from edgetrain.quant import RunningRange
from edgetrain.train.checkpoint import CheckpointManager, file_sha256
from edgetrain.train.runfolder import RunFolder
from edgetrain.train.runstate import (
    ACT_RANGE,
    apply_precision,
    build_model,
    latest_checkpoint,
    prepare_model,
    unpack_state,
)
from edgetrain.train.trainer import QUIET_NUMPY, evaluate

ROUNDS_LOG = "rounds.jsonl"
FLOAT_EXPORT, INT8_EXPORT = "global.onnx", "global.int8.onnx"
SETTINGS_KEY, ROUND_KEY = "fleet/settings", "fleet/round"
PRECISION_KEY = "trainer/precision"  # what restore_run re-applies (edgetrain.train.runstate)
# Settings a resumed federation may change: how long it runs and what it does at the end, not what a round computes.
RESUMABLE = {"rounds", "stop_after", "out", "export", "client_eval", "round_timeout", "resume", "extra"}
CHECK_SAMPLES = 1000  # test samples the onnxruntime check of the exports reads
CALIBRATION_SAMPLES = 256
MOMENTUM = "momentum"  # FedAvgM's buffer in the checkpoint's optimizer state


class FedTrimmedAvgM(FedAvgM, FedTrimmedAvg):
    """FedTrimmedAvg's coordinate-wise trimmed mean, then FedAvgM's momentum step on it (Flower has no such class:
    FedAvgM's aggregate_train steps on whatever its next class in the MRO aggregates)."""

    def __init__(self, *, beta: float, server_momentum: float, **common: Any):
        super().__init__(server_learning_rate=1.0, server_momentum=server_momentum, **common)
        if not 0.0 <= beta < 0.5:
            raise ValueError("`beta` must be in the range [0, 0.5).")
        self.beta = beta  # FedAvgM's __init__ passes FedTrimmedAvg's only its own arguments: beta is set here


def make_strategy(settings: FleetSettings) -> Strategy:
    """The Flower strategy the settings name; every client takes part in every round (min-clients aside)."""
    n = settings.required_clients
    common = dict(fraction_train=1.0, fraction_evaluate=1.0 if settings.client_eval else 0.0, min_train_nodes=n,
                  min_evaluate_nodes=n if settings.client_eval else 0, min_available_nodes=n)
    if settings.strategy == "fedprox":
        return FedProx(proximal_mu=settings.proximal_mu, **common)
    if settings.strategy == "fedavgm":
        return FedAvgM(server_learning_rate=1.0, server_momentum=settings.server_momentum, **common)
    if settings.strategy == "fedadam":
        return FedAdam(eta=settings.server_lr, **common)
    if settings.strategy == "fedtrimmedavgm":
        return FedTrimmedAvgM(beta=settings.trim_beta, server_momentum=settings.server_momentum, **common)
    if settings.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(beta=settings.trim_beta, **common)
    if settings.strategy == "krum":
        return Krum(num_malicious_nodes=settings.krum_byzantine, **common)
    return FedAvg(**common)


def _strategy_state(strategy: Strategy, names: list[str]) -> dict[str, np.ndarray]:
    """A stateful strategy's state for the checkpoint (FedAdam's moments, FedAvgM's momentum); nothing for others."""
    out: dict[str, np.ndarray] = {}
    for part in ("m_t", "v_t"):
        for name, value in (getattr(strategy, part, None) or {}).items():
            out[f"{part}/{name}"] = np.asarray(value)
    # FedAvgM keeps its buffer as a list in the order of the arrays it was sent, which is `names`' order.
    if vector := getattr(strategy, "momentum_vector", None):
        out.update({f"{MOMENTUM}/{n}": np.asarray(v) for n, v in zip(names, vector, strict=True)})
    return out


def _load_strategy_state(strategy: Strategy, state: dict[str, Any], names: list[str]) -> None:
    for part in ("m_t", "v_t"):
        table = {k[len(part) + 1:]: np.asarray(v) for k, v in state.items() if k.startswith(part + "/")}
        if table:
            setattr(strategy, part, table)
    if isinstance(strategy, FedAvgM) and f"{MOMENTUM}/{names[0]}" in state:
        # Its other state, the weights of the last round, it takes again from the first configure_train.
        strategy.momentum_vector = [np.asarray(state[f"{MOMENTUM}/{n}"]) for n in names]


def _short(reason: str) -> str:
    """A client's error as one short line: Ray wraps it in a coloured traceback; Flower's own message is the point."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(reason))
    found = re.search(r"Message: (.*?)(?:'>|$)", text, re.S)
    return " ".join((found.group(1) if found else text).split())[:300]


def _round_of(line: str) -> int:
    """The round a rounds.jsonl line records; a blank or torn line (a kill mid-write) counts as none to keep."""
    try:
        return int(json.loads(line)["round"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62


def _comparable(settings: FleetSettings) -> dict[str, Any]:
    return {k: v for k, v in settings.to_run_config().items() if k.replace("-", "_") not in RESUMABLE}


class Federation:
    """One federation's server side (see the module doc); `run(grid)` drives it to the end or to stop-after."""

    def __init__(self, settings: FleetSettings, *, resume: bool = False,
                 report: Callable[[str], None] | None = None):
        settings.check()
        self.settings = settings
        self.resume = resume
        self.report = report or (lambda text: print(text, file=sys.stderr, flush=True))
        self.out = Path(settings.out)
        self.config = settings.train_config()
        self.model, _ = build_model(settings.model, settings.seed, self.config.num_classes)
        prepare_model(self.model, self.config)
        # The ServerApp runs in a thread of the simulation's driver, where a multi-threaded OpenBLAS sgemm was
        # seen to hang (Flower 1.42, Ray 2.55: fp32 central evaluation never returned). The portable float
        # kernels need no BLAS, and make the central figures the same on every machine.
        self.model.deterministic = True
        self.spec = make_controller(self.config).precision
        apply_precision(self.model, self.spec, self.config)  # central evaluation runs at the clients' precision
        state = self.model.state_dict()
        self.names = sorted(n for n, a in state.items() if a.dtype.kind == "f")
        self.shapes = {n: tuple(state[n].shape) for n in self.names}
        self.layout = codec.wire_layout(self.shapes, settings.bits)
        self.limit = max_wire_bytes(self.layout, settings.max_reply_factor)
        normalize = not model_normalizes_cached(settings.model)
        self.split = load_split(settings.data, self.config.seed, self.config.val_fraction, normalize)
        self.strategy = make_strategy(settings)
        self.model_sha256 = file_sha256(settings.model)
        self.first_round = 1
        self.records: list[dict[str, Any]] = []
        self.node_clients: dict[int, int] = {}  # Flower node id -> client (partition) id, from earlier replies

    # -- state ----------------------------------------------------------------------------------
    def global_state(self) -> dict[str, np.ndarray]:
        """The global tensors the clients receive (float32 copies)."""
        state = self.model.state_dict()
        return {n: np.array(state[n], copy=True) for n in self.names}

    def _prepare_folder(self) -> None:
        make_folder(self.out)
        ckpt = latest_checkpoint(self.out, self.report)
        log_path = self.out / ROUNDS_LOG
        if ckpt is None:
            if self.resume:
                self.report(f"edgetrain: warning: {self.out}: no checkpoint to resume from; starting at round 1")
            log_path.unlink(missing_ok=True)
            return
        if not self.resume:
            raise EdgetrainError(f"{self.out} holds a federation (round {ckpt.step}); give --resume to continue it, "
                                 "or another --out")
        # A setting added since the checkpoint was written (server-momentum) counts as its default there.
        stored = {**_comparable(FleetSettings()), **json.loads(str(ckpt.controller_state.get(SETTINGS_KEY, "{}")))}
        now = _comparable(self.settings)
        changed = sorted(k for k in set(now) | set(stored) if k in now and stored.get(k) != now.get(k))
        if changed:
            raise EdgetrainError(f"{ckpt.path}: the federation ran with other settings ({', '.join(changed)}); "
                                 "a resumed federation may change only its rounds, stop-after and export")
        self.model.load_state_dict({**ckpt.params, **ckpt.buffers})
        unpack_state(self.model, ckpt.controller_state)  # the activation ranges
        _load_strategy_state(self.strategy, ckpt.optimizer_state, self.names)
        self.first_round = ckpt.step + 1
        if log_path.is_file():  # rounds after the checkpoint were never completed: their lines go
            kept = [line for line in log_path.read_text().splitlines() if _round_of(line) <= ckpt.step]
            write_atomic(log_path, "".join(line + "\n" for line in kept).encode())
            self.records = [json.loads(line) for line in kept]
        self.report(f"resuming {self.out} after round {ckpt.step}")

    def _checkpoint(self, rnd: int) -> Path:
        manager = CheckpointManager(self.out, keep=2)
        meta = {"epoch": 0, "seed": self.settings.seed, "config": self.config.to_dict(),
                "model_sha256": self.model_sha256,
                "preprocess": preprocess.record(Preprocess.of_dataset(self.split.train))}
        controller: dict[str, Any] = {PRECISION_KEY: json.dumps(self.spec), ROUND_KEY: rnd,
                                      SETTINGS_KEY: json.dumps(_comparable(self.settings))}
        controller.update({ACT_RANGE + k: float(r.value) for k, r in self.model.runtime.act_ranges.items()
                           if r.value is not None})  # restore_run gives them back to eval and export
        return manager.save(rnd, params=self.model.parameters(), buffers=self.model.buffers(),
                            optimizer_state=_strategy_state(self.strategy, self.names), controller_state=controller,
                            meta=meta)

    # -- one round ------------------------------------------------------------------------------
    def _accept(self, rnd: int, reply: Message, global_state: dict[str, np.ndarray]
                ) -> tuple[int, Message, dict[str, float]]:
        """(client id, the reply rewritten as full float32 weights, its activation ranges) or RejectedReply."""
        if reply.has_error():
            raise RejectedReply(f"client error: {_short(reply.error.reason)}")
        content = reply.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise RejectedReply("expected one ArrayRecord and one MetricRecord")
        record = next(iter(content.array_records.values()))
        metrics = next(iter(content.metric_records.values()))
        n = check_examples(metrics)
        ranges = {k[len(RANGE_PREFIX):]: float(v) for k, v in metrics.items() if k.startswith(RANGE_PREFIX)}
        if not all(np.isfinite(v) and v >= 0 for v in ranges.values()):
            raise RejectedReply("an activation range is negative, NaN or infinite")
        check_layout(record, self.layout, self.limit)
        deltas = decode_checked({k: a.numpy() for k, a in record.items()}, self.shapes, self.settings.bits)
        weights = {k: (global_state[k] + deltas[k]).astype(global_state[k].dtype) for k in self.names}
        reply.content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                                    "metrics": MetricRecord({"num-examples": n})})
        return int(metrics.get("partition-id", -1)), reply, ranges

    def _set_ranges(self, ranges: list[dict[str, float]]) -> None:
        """The clients' running activation ranges, averaged (in client order), as the global model's."""
        rt = self.model.runtime
        for key in sorted(set().union(*ranges)):
            values = [r[key] for r in ranges if key in r]
            rt.act_ranges[key] = RunningRange(rt.range_momentum, float(np.mean(values)))
    def _round(self, grid: Grid, rnd: int) -> dict[str, Any]:
        started = time.perf_counter()
        global_state = self.global_state()
        sent = ArrayRecord({k: Array(v) for k, v in global_state.items()})
        messages = list(self.strategy.configure_train(rnd, sent, ConfigRecord(), grid))
        down = len(messages) * codec.payload_bytes(global_state)
        timeout = self.settings.round_timeout or None
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        accepted: list[tuple[int, Message, dict[str, float]]] = []
        rejected: list[dict[str, Any]] = []
        clients: list[dict[str, Any]] = []
        up = up_wire = 0
        # An error the SuperLink writes for a node (e.g. "node unavailable") comes from the SuperLink itself: the
        # instruction it answers names the node.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for reply in replies:
            node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            who = self.node_clients.get(node, -1)
            if reply.has_content():
                record = next(iter(reply.content.array_records.values()), None)
                if record is not None:
                    up += sum(int(np.dtype(a.dtype).itemsize * int(np.prod(a.shape, dtype=np.int64)))
                              for a in record.values())
                    up_wire += sum(len(a.data) for a in record.values())
                metrics = next(iter(reply.content.metric_records.values()), None)
                if metrics is not None:
                    clients.append({k: v for k, v in metrics.items()})
                    who = int(metrics.get("partition-id", -1))
                    self.node_clients[node] = who
            try:
                accepted.append(self._accept(rnd, reply, global_state))
            except RejectedReply as exc:
                self.report(f"round {rnd}: reply of client {who} rejected: {exc}")
                rejected.append({"client": who, "reason": str(exc)})
        if replies and all(r.has_error() for r in replies):
            # Every client failed (a setting no board can train with, or the whole fleet gone): stop, do not spin.
            raise EdgetrainError(f"round {rnd}: every client failed; the first said: {_short(replies[0].error.reason)}")
        accepted.sort(key=lambda item: item[0])  # a fixed order: float sums depend on it
        if accepted:
            with np.errstate(**QUIET_NUMPY):
                arrays, _ = self.strategy.aggregate_train(rnd, [m for _, m, _ in accepted])
            if arrays is not None:
                new = {k: np.asarray(arrays[k].numpy(), dtype=global_state[k].dtype) for k in self.names}
                bad = next((k for k, v in new.items() if not np.isfinite(v).all()), None)
                if bad is not None:
                    raise EdgetrainError(f"round {rnd}: the aggregate of '{bad}' is not finite")
                self.model.load_state_dict({**self.model.state_dict(), **new})
            self._set_ranges([r for _, _, r in accepted])
        with np.errstate(**QUIET_NUMPY):
            central = evaluate(self.model, self.split.test)
        if self.settings.client_eval:
            sent = ArrayRecord({k: Array(v) for k, v in self.global_state().items()})
            ev = list(self.strategy.configure_evaluate(rnd, sent, ConfigRecord(), grid))
            down += len(ev) * codec.payload_bytes(global_state)
            agg = self.strategy.aggregate_evaluate(rnd, list(grid.send_and_receive(ev, timeout=timeout)))
            client_eval = dict(agg) if agg is not None else None
        else:
            client_eval = None
        clients.sort(key=lambda c: c.get("partition-id", -1))
        # Each client's cost this round, side by side: a board under its own precision policy shows here.
        costs = [{"client": int(c.get("partition-id", -1)), "bitops": float(c.get("bitops", 0.0)),
                  "bitops_percent": float(c.get("bitops-percent", 0.0)),
                  "wall_seconds": float(c.get("wall-seconds", 0.0)), "own_policy": bool(c.get("policy", 0))}
                 for c in clients]
        return {"round": rnd, "accuracy": central["accuracy"], "loss": central["loss"],
                "replies": len(replies), "accepted": len(accepted), "rejected": rejected,
                "uplink_bytes": up, "uplink_wire_bytes": up_wire, "downlink_bytes": down,
                "update_bits": self.settings.update_bits, "clients": clients, "costs": costs,
                "client_eval": client_eval,
                "bitops": float(sum(c.get("bitops", 0.0) for c in clients)),
                "seconds": round(time.perf_counter() - started, 3)}

    # -- the whole federation -------------------------------------------------------------------
    def run(self, grid: Grid) -> dict[str, Any]:
        """Rounds from the first not yet done to the last (or to stop-after); then the export. The folder is
        locked throughout: a second federation on it fails at once."""
        with RunFolder(self.out):
            return self._run_locked(grid)

    def _run_locked(self, grid: Grid) -> dict[str, Any]:
        self._prepare_folder()
        s = self.settings
        log_path = self.out / ROUNDS_LOG
        if self.first_round == 1:
            with np.errstate(**QUIET_NUMPY):
                start = evaluate(self.model, self.split.test)
            self.report(f"round 0/{s.rounds}: central accuracy {start['accuracy']:.2%} (the model as given)")
        stopped = False
        for rnd in range(self.first_round, s.rounds + 1):
            record = self._round(grid, rnd)
            record["checkpoint"] = str(self._checkpoint(rnd))
            with open(log_path, "a") as f:  # one line per finished round, after its checkpoint
                f.write(json.dumps(record) + "\n")
            self.records.append(record)
            self.report(f"round {rnd}/{s.rounds}: central accuracy {record['accuracy']:.2%} "
                        f"(loss {record['loss']:.4f}), {record['accepted']}/{record['replies']} updates accepted, "
                        f"uplink {record['uplink_bytes'] / 1e3:.1f} kB, downlink {record['downlink_bytes'] / 1e3:.1f} "
                        f"kB, {record['seconds']:.1f} s")
            if s.stop_after and rnd == s.stop_after and rnd < s.rounds:
                stopped = True
                self.report(f"stopped after round {rnd} of {s.rounds}; resume with --resume")
                break
        summary: dict[str, Any] = {"out": str(self.out), "rounds": [r["round"] for r in self.records],
                                   "stopped": stopped, "final_accuracy": self.records[-1]["accuracy"]
                                   if self.records else None, "log": str(log_path)}
        if not stopped and s.export and self.records:
            summary["export"] = self.export()
        return summary

    def export(self) -> dict[str, Any]:
        """The final global model as float and int8 ONNX, each checked in onnxruntime against the engine."""
        from edgetrain.export import compare_with_engine, export_int8, export_onnx

        paths = {"float": str(self.out / FLOAT_EXPORT), "int8": str(self.out / INT8_EXPORT)}
        export_onnx(self.model, paths["float"])
        export_int8(self.model, paths["int8"], calibration=self.split.train.x[:CALIBRATION_SAMPLES])
        x = self.split.test.x[:CHECK_SAMPLES]
        checks = {kind: compare_with_engine(self.model, path, x, int8=kind == "int8") for kind, path in paths.items()}
        for kind, c in checks.items():
            self.report(f"exported {paths[kind]}: onnxruntime agrees with the engine on {c['top1_agreement']:.2%} "
                        f"of top-1 (max relative error {c['max_relative_error']:.1e})")
        return {"files": paths, "onnxruntime": checks}


def make_server_app(overrides: dict[str, Any] | None = None, *, resume: bool = False,
                    result: dict[str, Any] | None = None):
    """A ServerApp running a Federation with the run config plus `overrides`; its summary lands in `result`."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:
        settings = FleetSettings.from_run_config({**dict(context.run_config), **(overrides or {})})
        summary = Federation(settings, resume=resume or settings.resume).run(grid)
        if result is not None:
            result.update(summary)

    return app


app = make_server_app()  # `flwr run`: [tool.flwr.app.components] serverapp = "edgetrain.fleet.server:app"
