"""The ClientApp: Flower messages in, edgetrain training (edgetrain.fleet.local) out.

Settings come from the run config (`FleetSettings` keys); `make_client_app(overrides)` bakes in settings for
`run_simulation`, whose Python API passes no run config. A deployed SuperNode names its partition with
`--node-config "partition-id=0 num-partitions=3"` or its own data with `data=SPEC`, and may carry its own precision
policy as JSON: `precision-policy='{"latency_table": "/opt/board.json", "schedule": "dfq", "dfq_target": 3.0}'`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgetrain.fleet.local import corrupt, evaluate_round, train_round
from edgetrain.fleet.settings import FleetSettings

ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"
POLICY_NODE_KEY = "precision-policy"  # a SuperNode's own precision policy (JSON), over the run config's entry


def _settings(context: Context, overrides: Mapping[str, Any]) -> FleetSettings:
    return FleetSettings.from_run_config({**dict(context.run_config), **overrides})


def _client_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose settings are the run config with `overrides` on top."""
    overrides = dict(overrides or {})
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        settings = _settings(context, overrides)
        client = _client_id(context)
        config = msg.content.get(CONFIG) or {}
        rnd = int(config.get("server-round", 0))
        global_state = {k: a.numpy() for k, a in msg.content[ARRAYS].items()}
        result = train_round(settings, client, rnd, global_state, proximal_mu=float(config.get("proximal-mu", 0.0)),
                             data=context.node_config.get("data"),
                             node_policy=context.node_config.get(POLICY_NODE_KEY))
        arrays = result.arrays
        kind = settings.fault_for(client, rnd)
        if kind is not None:
            arrays = corrupt(arrays, kind)
        record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return Message(RecordDict({ARRAYS: record, METRICS: MetricRecord(result.metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        settings = _settings(context, overrides)
        client = _client_id(context)
        global_state = {k: a.numpy() for k, a in msg.content[ARRAYS].items()}
        res = evaluate_round(settings, client, global_state, data=context.node_config.get("data"))
        metrics = {"num-examples": max(int(res["samples"]), 1), "partition-id": client,
                   "loss": float(res["loss"]), "accuracy": float(res["accuracy"])}
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


app = make_client_app()  # `flwr run`: [tool.flwr.app.components] clientapp = "edgetrain.fleet.client_app:app"
