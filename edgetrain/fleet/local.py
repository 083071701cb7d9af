"""One client's round, without Flower: load the global tensors, train K steps with edgetrain's Trainer on the
client's partition, evaluate on its held-out split, and encode the deltas (the ClientApp wraps this)."""
from __future__ import annotations

import functools
import os
import resource
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgetrain.data import Split, load_data
from edgetrain.fleet.codec import encode
from edgetrain.fleet.partitions import client_split
from edgetrain.fleet.settings import FleetSettings, client_seed
from edgetrain.train.runstate import build_model
from edgetrain.train.trainer import QUIET_NUMPY, Trainer, evaluate, recalibrate_for_export

RANGE_PREFIX = "act-range/"


@dataclass
class LocalResult:
    """What a client sends back after one round: wire arrays and metrics (flat numbers)."""

    arrays: dict[str, np.ndarray]
    metrics: dict[str, int | float]


@functools.lru_cache(maxsize=4)
def load_split(spec: str, seed: int, val_fraction: float, normalize: bool) -> Split:
    """A data source read once per process (a simulated client process serves many rounds)."""
    return load_data(spec, seed=seed, val_fraction=val_fraction, normalize=normalize)


@functools.lru_cache(maxsize=4)
def model_normalizes_cached(path: str) -> bool:
    """Whether the ONNX file normalises its own input (then the data is fed raw)."""
    import onnx

    from edgetrain.preprocess import normalizes_in_graph

    return normalizes_in_graph(onnx.load(path, load_external_data=False))


def peak_memory_bytes() -> int:
    """The process's peak resident set so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def data_for(settings: FleetSettings, client: int, data: str | None = None) -> Split:
    """Client `client`'s partition of the run's data (or of `data`, a SuperNode's own source, unpartitioned)."""
    config = settings.train_config()
    normalize = not model_normalizes_cached(settings.model)
    if data:  # a deployed board names its own data: it is the whole of its share
        return load_split(data, config.seed, config.val_fraction, normalize)
    split = load_split(settings.data, config.seed, config.val_fraction, normalize)
    return client_split(split, client, settings.clients, settings.partition, settings.seed)


def _proximal(trainer: Trainer, anchor: Mapping[str, np.ndarray], mu: float) -> None:
    """FedProx's term mu/2 |w - w_global|^2: its gradient mu (w - w_global) joins each step's gradients."""
    params = trainer.model.parameters()

    def term(grads: dict[str, np.ndarray]) -> None:
        for name in trainer.trainable:
            if grads.get(name) is not None and name in anchor:
                grads[name] = grads[name] + np.float32(mu) * (params[name] - anchor[name])

    trainer.add_gradient_term(term)


def train_round(settings: FleetSettings, client: int, round: int, global_state: Mapping[str, np.ndarray], *,
                proximal_mu: float = 0.0, data: str | None = None, node_policy: str | None = None) -> LocalResult:
    """Train one client for one round from the global tensors, under its own precision policy; see the module doc."""
    started = time.perf_counter()
    split = data_for(settings, client, data)
    seed = client_seed(settings.seed, round, client)
    policy = settings.policy_for(client, node_policy)
    with tempfile.TemporaryDirectory(prefix="edgetrain-fleet-") as scratch:
        # The Trainer's run folder is never written here (no fit(): no log, checkpoint or export).
        config = settings.train_config(seed=seed, out=os.path.join(scratch, "run"), policy=policy)
        model, head = build_model(settings.model, settings.seed, config.num_classes)
        trainer = Trainer(model, split, config, head=head, export_model=False, report=lambda _: None)
        # After the Trainer: DFQ's gates are parameters by now. A client whose policy differs from the run's
        # may hold tensors the global model lacks (its own gates: they start afresh each round and stay on
        # the board) or lack some it holds (the run's gates: it sends them back unchanged).
        local_state = model.state_dict()
        model.load_state_dict({**local_state, **{k: v for k, v in global_state.items() if k in local_state}})
        if proximal_mu > 0:
            _proximal(trainer, global_state, proximal_mu)
        losses = []
        for _ in range(settings.local_steps):
            loss = trainer.train_step()
            trainer.control(loss)
            losses.append(loss)
        if len(split.test):
            with np.errstate(**QUIET_NUMPY):
                held = evaluate(model, split.test)
        else:
            held = {"loss": float("nan"), "accuracy": 0.0}
        # A gated client's statistics describe its gated mix; the global model runs every block (and has
        # no gates of this client's): it gets statistics re-estimated at full depth, as a gated run's export.
        recalibrate_for_export(model, split.train.x, config)  # config.seed is this round's client seed
    state = model.state_dict()
    deltas = {n: (state[n] - global_state[n]).astype(np.float32) if n in state
              else np.zeros_like(global_state[n], dtype=np.float32) for n in global_state}
    arrays = encode(deltas, settings.bits, seed=settings.seed, round=round, client=client)
    metrics = {"num-examples": len(split.train), "partition-id": client, "loss": float(np.mean(losses)),
               "accuracy": float(held["accuracy"]), "eval-samples": len(split.test),
               "bitops": float(model.cost.bitops), "fp32-bitops": float(model.cost.fp32_bitops),
               "bitops-percent": float(model.cost.percent_of_fp32), "policy": int(bool(policy)),
               "wall-seconds": time.perf_counter() - started, "peak-memory-bytes": peak_memory_bytes(),
               "update-bytes": int(sum(a.nbytes for a in arrays.values()))}
    # The running activation ranges the quantised layers learnt: the server averages them, so its central
    # evaluation and int8 export quantise as trained.
    metrics.update({RANGE_PREFIX + k: float(r.value) for k, r in sorted(model.runtime.act_ranges.items())
                    if r.value is not None})
    return LocalResult(arrays, metrics)


def preflight(settings: FleetSettings) -> None:
    """Everything a client round checks (data fits the model, freeze patterns, precision), for client 0, before
    any simulation starts: a mistake in the flags is one line, not a failed round on every client."""
    policies = settings.policies()
    for client in sorted({0} | set(policies)):  # the run's settings, and each client policy once
        split = data_for(settings, client)
        with tempfile.TemporaryDirectory(prefix="edgetrain-fleet-") as scratch:
            config = settings.train_config(out=os.path.join(scratch, "run"), policy=policies.get(client),
                                           where=f"client {client}")
            model, head = build_model(settings.model, settings.seed, config.num_classes)
            Trainer(model, split, config, head=head, export_model=False, report=lambda _: None)


def evaluate_round(settings: FleetSettings, client: int, global_state: Mapping[str, np.ndarray], *,
                   data: str | None = None) -> dict[str, Any]:
    """The global model on this client's held-out split (loss, accuracy, samples)."""
    split = data_for(settings, client, data)
    config = settings.train_config()
    from edgetrain.precision.control import make_controller
    from edgetrain.train.runstate import apply_precision, prepare_model

    model, _ = build_model(settings.model, settings.seed, config.num_classes)
    prepare_model(model, config)
    apply_precision(model, make_controller(config).precision, config)
    model.load_state_dict(dict(global_state))
    if not len(split.test):
        return {"loss": 0.0, "accuracy": 0.0, "samples": 0}
    with np.errstate(**QUIET_NUMPY):
        return evaluate(model, split.test)


def corrupt(arrays: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """A faulty or hostile client's reply (the `fault` setting): NaN, a wrong shape or dtype, or scaled garbage."""
    out = dict(arrays)
    name = sorted(out)[0]
    if kind == "nan":
        bad = out[name].astype(np.float32) if out[name].dtype.kind == "f" else None
        if bad is None:  # a quantised update: its scales carry the NaN
            scale_name = next(n for n in sorted(out) if n.endswith(".scale"))
            out[scale_name] = np.full_like(out[scale_name], np.nan)
        else:
            bad.reshape(-1)[0] = np.nan
            out[name] = bad
    elif kind == "shape":
        out[name] = np.zeros(out[name].size + 1, out[name].dtype)
    elif kind == "dtype":
        out[name] = out[name].astype(np.float64)
    elif kind == "garbage":  # well-formed, finite and large: only a robust aggregate survives it
        rng = np.random.default_rng(0)
        for n, a in out.items():
            if n.endswith(".scale") or a.dtype.kind == "f":
                out[n] = np.asarray(a * np.float32(50) + rng.standard_normal(a.shape).astype(np.float32), a.dtype)
    return out
